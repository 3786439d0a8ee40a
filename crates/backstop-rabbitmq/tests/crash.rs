//! kill -9 of a worker 20 times at random moments under a 10,000-message
//! mixed stream on RabbitMQ (successes; transient failures that take a
//! 200 ms delay tier once; permanent failures to the DLQ): nothing lost,
//! duplicates counted and reported. The worker is this test binary run
//! again in child mode (`backstop_test::crash`), so a kill is a real
//! SIGKILL of a real process, its connection and unacked deliveries left to
//! the broker.

mod common;

use backstop_core::{DeadLetterSource, Message, Publisher, Subscription};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue, tier_queue};
use backstop_test::crash::{self, KILLS, Rng, TOTAL};
use std::time::{Duration, Instant};

const TEST: &str = "kill_nine_twenty_times_under_a_mixed_stream_loses_nothing";

#[test]
fn kill_nine_twenty_times_under_a_mixed_stream_loses_nothing() {
    crash::main(
        || RabbitTransport::new(RabbitConfig::from_env()).expect("config"),
        parent,
    );
}

async fn parent() {
    let backend = common::RabbitBackend::new();
    let transport = RabbitTransport::new(backend.config().clone()).expect("config");
    let source = common::unique("crash");
    let tier_q = tier_queue(&source, &crash::tier());
    transport
        .declare(
            &Subscription::new(source.clone(), crash::GROUP)
                .with_tiers(vec![crash::tier()])
                .with_prefetch(8),
        )
        .await
        .expect("declare");
    let log = std::env::temp_dir().join(format!("{source}.log"));
    let _ = std::fs::remove_file(&log);
    for n in 0..TOTAL {
        transport
            .publish(&source, Message::new(crash::body(n)))
            .await
            .expect("publish");
    }
    let depth = |q: String| {
        let t = transport.clone();
        async move { t.ready_count(&q).await.ok().flatten().unwrap_or(0) as usize }
    };
    let pending = || async { depth(source.clone()).await + depth(tier_q.clone()).await };
    let mut rng = Rng::seeded();
    let mut mid_stream = 0;
    for _ in 0..KILLS {
        let worker = crash::spawn_child(TEST, &source, &log);
        std::thread::sleep(Duration::from_millis(300 + rng.below(1_200)));
        if pending().await > 0 {
            mid_stream += 1;
        }
        crash::kill(worker);
    }
    // The last worker runs until everything is handled or dead-lettered;
    // the wait restarts while anything moves.
    let worker = crash::spawn_child(TEST, &source, &log);
    let dlq = dlq_queue(&source);
    let started = Instant::now();
    crash::until_drained(&log, Duration::from_secs(60), || async {
        (depth(dlq.clone()).await, pending().await)
    })
    .await;
    crash::kill(worker);
    let dead = transport.browse(&dlq, 100_000).await.expect("DLQ");
    let r = crash::reconcile(&log, &dead);
    crash::report("RabbitMQ", mid_stream, &r, started.elapsed());
    for q in [source.clone(), dlq, tier_q.clone()] {
        let _ = transport.delete_queue(&q).await;
    }
    let _ = std::fs::remove_file(&log);
}
