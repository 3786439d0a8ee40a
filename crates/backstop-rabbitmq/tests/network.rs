//! Network faults between a worker and RabbitMQ, through the TCP proxy of
//! `backstop_test::proxy`, while 2,000 messages flow: a 50 ms delay on every
//! chunk, a 5 s blackhole (nothing moves; the broker check fails, so
//! `/readyz` would), and every connection cut at once. Nothing is lost;
//! how long each recovery took is printed for the notes.

mod common;

use backstop_core::{
    Context, HandlerError, HandlerOptions, Inspect, Message, Publisher, RetryPolicy, Runner,
    Subscription, handler_fn,
};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport};
use backstop_test::proxy::Proxy;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: u32 = 2_000;

type Seen = Arc<Mutex<HashMap<u32, u32>>>;

fn distinct(seen: &Seen) -> usize {
    seen.lock().expect("lock").len()
}

/// Waits until more than `than` messages were handled; how long it took.
async fn progress_past(seen: &Seen, than: usize, what: &str) -> Duration {
    let started = Instant::now();
    backstop_test::eventually(what, Duration::from_secs(120), || async {
        distinct(seen) > than
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_blackhole_and_cut_lose_nothing() {
    let backend = common::RabbitBackend::new();
    let direct = RabbitTransport::new(backend.config().clone()).expect("config");
    let source = common::unique("network");
    direct
        .declare(&Subscription::new(source.clone(), "network").with_prefetch(8))
        .await
        .expect("declare");
    for n in 0..TOTAL {
        direct
            .publish(&source, Message::new(n.to_string()))
            .await
            .expect("publish");
    }
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("address")).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let through =
        RabbitTransport::new(RabbitConfig::new(url).with_connect_timeout(Duration::from_secs(2)))
            .expect("config");
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let handler = handler_fn(move |body: String, _: Context| {
        let s = s.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let n: u32 = body
                .parse()
                .map_err(|_| HandlerError::permanent("not a number"))?;
            *s.lock().expect("lock").entry(n).or_default() += 1;
            Ok::<_, HandlerError>(())
        }
    });
    let runner = Runner::builder(through.clone())
        .with_group("network")
        .with_resubscribe_backoff(backstop_core::Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .with_handler_options(
            &source,
            handler,
            HandlerOptions::default()
                .with_concurrency(8)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let running = backstop_test::start(runner);
    progress_past(&seen, 200, "started").await;

    proxy.set_delay(Duration::from_millis(50));
    let at = distinct(&seen);
    let slowed = progress_past(&seen, at + 20, "progress under a 50 ms delay").await;
    proxy.set_delay(Duration::ZERO);

    proxy.blackhole(true);
    let check = tokio::time::timeout(Duration::from_secs(2), through.check()).await;
    assert!(
        !matches!(check, Ok(Ok(()))),
        "the broker check fails while nothing gets through"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = distinct(&seen);
    proxy.blackhole(false);
    let healed = progress_past(&seen, held, "progress after the blackhole").await;

    let at = distinct(&seen);
    proxy.cut();
    let reconnected = progress_past(&seen, at + 8, "progress after the cut").await;
    let check = tokio::time::timeout(Duration::from_secs(5), through.check()).await;
    assert!(
        matches!(check, Ok(Ok(()))),
        "the check passes again: {check:?}"
    );

    backstop_test::eventually(
        "every message handled",
        Duration::from_secs(120),
        || async { distinct(&seen) == TOTAL as usize },
    )
    .await;
    backstop_test::until_zero("source drained", Duration::from_secs(60), || async {
        direct
            .ready_count(&source)
            .await
            .ok()
            .flatten()
            .unwrap_or(0) as usize
    })
    .await;
    running.stop().await;
    let seen = seen.lock().expect("lock").clone();
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "network faults (RabbitMQ): {TOTAL} messages, 0 lost, {duplicates} duplicates; \
         20 more handled {slowed:?} into a 50 ms delay; progress {healed:?} after a 5 s \
         blackhole healed; {reconnected:?} from a cut of every connection to 8 more handled"
    );
    let _ = direct.delete_queue(&source).await;
    let _ = direct
        .delete_queue(&backstop_rabbitmq::dlq_queue(&source))
        .await;
}
