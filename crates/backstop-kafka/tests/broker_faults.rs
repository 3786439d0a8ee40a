//! Broker faults on Kafka, each against a tansu of the test's own
//! (`backstop_test::tansu`), while a mixed stream flows (successes,
//! transient failures through a delay tier, permanent failures to the
//! DLQ): kill -9 of the broker and a restart on the same data. The broker
//! check fails while it is down (so `/readyz` does), the worker recovers by
//! itself, every message ends handled or dead-lettered, nothing is lost;
//! duplicates and recovery times are printed for the notes.

mod common;

use backstop_core::{
    Context, DeadLetterSource, DelayTier, HandlerError, HandlerOptions, Inspect, RetryPolicy,
};
use backstop_kafka::dlq_topic;
use backstop_test::tansu::Tansu;
use backstop_test::{Backend as _, Harness, eventually, start};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: u32 = 2_000;

/// One in ten fails once (to the tier and back), one in fifty always.
fn fate(n: u32) -> (bool, bool) {
    (n.is_multiple_of(10), n % 50 == 1)
}

/// Plain records (no idempotence, no headers): what tansu serves well
/// (BROKERS.md).
fn produce(brokers: &str, source: &str) {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for n in 0..TOTAL {
        let body = n.to_string();
        while producer
            .send(BaseRecord::to(source).payload(&body).key(&body))
            .is_err()
        {
            producer.poll(Duration::from_millis(10));
        }
    }
    producer.flush(Duration::from_secs(60)).expect("produced");
}

type Seen = Arc<Mutex<HashMap<u32, u32>>>;

/// A fresh source with a 1 s tier, filled with the stream, and a runner on
/// it that resubscribes quickly: the harness, what it handled, the runner.
async fn stream(
    backend: &common::KafkaBackend,
    brokers: &str,
    name: &str,
) -> (
    Harness<backstop_kafka::KafkaTransport>,
    Seen,
    backstop_test::Running,
) {
    let policy = RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([DelayTier::named("1s", Duration::from_secs(1))]);
    let h = Harness::new(backend, name, policy).await;
    produce(brokers, &h.source);
    let seen: Seen = Arc::default();
    let running = start(
        h.runner(handler(seen.clone()), HandlerOptions::default())
            .with_resubscribe_backoff(backstop_core::Backoff::exponential(
                Duration::from_millis(200),
                Duration::from_secs(2),
            ))
            .build()
            .expect("valid"),
    );
    (h, seen, running)
}

fn handler(seen: Seen) -> impl backstop_core::Handler {
    backstop_core::handler_fn(move |body: String, ctx: Context| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let n: u32 = body.parse().map_err(|_| HandlerError::permanent("nan"))?;
            let (transient, permanent) = fate(n);
            if permanent {
                return Err(HandlerError::permanent("fails for ever"));
            }
            if transient && ctx.delayed_attempts() == 0 {
                return Err(HandlerError::transient("fails once"));
            }
            *seen.lock().expect("lock").entry(n).or_default() += 1;
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails today: after tansu's kill -9 and restart the stream did not finish within 300 s (cause not yet known: see the issue 13 note)"]
async fn kill_nine_of_the_broker_mid_stream_loses_nothing() {
    let mut broker = Tansu::start("broker-kill");
    let backend = common::KafkaBackend::at(&broker.brokers(), 2);
    let (h, seen, running) = stream(&backend, &broker.brokers(), "broker-kill").await;
    let count = || seen.lock().expect("lock").len();
    eventually("300 handled", Duration::from_secs(120), || async {
        count() >= 300
    })
    .await;

    broker.kill9();
    let at_kill = count();
    let check = tokio::time::timeout(Duration::from_secs(10), h.transport.check()).await;
    assert!(
        !matches!(check, Ok(Ok(()))),
        "the broker check fails while the broker is down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = Instant::now();
    broker.restart();
    let restart = restarting.elapsed();
    let before = count();
    let back = Instant::now();
    eventually(
        "progress after the restart",
        Duration::from_secs(180),
        || async { count() > before },
    )
    .await;
    let recovery = back.elapsed();

    let want_ok = (0..TOTAL).filter(|n| !fate(*n).1).count();
    let expected_dead: Vec<u32> = (0..TOTAL).filter(|n| fate(*n).1).collect();
    let dlq = dlq_topic(&h.group, &h.source);
    let dead_now = || async {
        h.transport
            .browse(&dlq, 100_000)
            .await
            .map_or(0, |d| d.len())
    };
    eventually(
        "every message handled or dead-lettered",
        Duration::from_secs(300),
        || async { count() == want_ok && dead_now().await >= expected_dead.len() },
    )
    .await;
    backstop_test::until_zero(
        "source and tier committed",
        Duration::from_secs(120),
        || backend.pending(&h.source),
    )
    .await;
    running.stop().await;
    let dead = h.transport.browse(&dlq, 100_000).await.expect("DLQ");
    let mut dead_ns: Vec<u32> = dead
        .iter()
        .filter_map(|m| std::str::from_utf8(m.payload()).ok()?.parse().ok())
        .collect();
    dead_ns.sort_unstable();
    dead_ns.dedup();
    assert_eq!(dead_ns, expected_dead, "every permanent failure in the DLQ");
    let duplicates: u32 = seen.lock().expect("lock").values().map(|c| c - 1).sum();
    eprintln!(
        "broker kill -9 (tansu): {TOTAL} messages, {at_kill} handled at the kill, 0 lost, \
         {duplicates} duplicate successes, {} extra dead letters; restart took {restart:?}, \
         first progress {recovery:?} after it",
        dead.len() - expected_dead.len()
    );
}

/// Waits until more than `than` distinct messages were handled; how long
/// it took.
async fn progress_past(seen: &Seen, than: usize, what: &str) -> Duration {
    let started = Instant::now();
    eventually(what, Duration::from_secs(180), || async {
        seen.lock().expect("lock").len() > than
    })
    .await;
    started.elapsed()
}

/// Network faults between the worker and the broker, through the TCP proxy
/// of `backstop_test::proxy` (the broker advertises the proxy, so every
/// connection a client makes goes through it): a 50 ms delay on every
/// chunk, a 5 s blackhole, every connection cut at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_delay_blackhole_and_cut_lose_nothing() {
    let listen = backstop_test::tansu::free_port();
    let proxy = backstop_test::proxy::Proxy::start(listen).await;
    let broker = Tansu::start_advertising("network", listen, proxy.addr());
    let backend = common::KafkaBackend::at(&broker.brokers(), 2);
    let (h, seen, running) = stream(&backend, &broker.brokers(), "network").await;
    let count = || seen.lock().expect("lock").len();
    progress_past(&seen, 200, "started").await;

    proxy.set_delay(Duration::from_millis(50));
    let slowed = progress_past(&seen, count() + 20, "progress under a 50 ms delay").await;
    proxy.set_delay(Duration::ZERO);

    proxy.blackhole(true);
    let check = tokio::time::timeout(Duration::from_secs(10), h.transport.check()).await;
    assert!(
        !matches!(check, Ok(Ok(()))),
        "the broker check fails while nothing gets through"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = count();
    proxy.blackhole(false);
    let healed = progress_past(&seen, held, "progress after the blackhole").await;

    let at = count();
    proxy.cut();
    let reconnected = progress_past(&seen, at + 20, "progress after the cut").await;

    let want_ok = (0..TOTAL).filter(|n| !fate(*n).1).count();
    let expected_dead = (0..TOTAL).filter(|n| fate(*n).1).count();
    let dlq = dlq_topic(&h.group, &h.source);
    eventually(
        "every message handled or dead-lettered",
        Duration::from_secs(300),
        || async {
            count() == want_ok
                && h.transport
                    .browse(&dlq, 100_000)
                    .await
                    .map_or(0, |d| d.len())
                    >= expected_dead
        },
    )
    .await;
    backstop_test::until_zero(
        "source and tier committed",
        Duration::from_secs(120),
        || backend.pending(&h.source),
    )
    .await;
    running.stop().await;
    let duplicates: u32 = seen.lock().expect("lock").values().map(|c| c - 1).sum();
    eprintln!(
        "network faults (tansu): {TOTAL} messages, 0 lost, {duplicates} duplicates; 20 more \
         handled {slowed:?} into a 50 ms delay; progress {healed:?} after a 5 s blackhole \
         healed; {reconnected:?} from a cut of every connection to 20 more handled"
    );
}
