//! kill -9 of a worker 20 times at random moments under a 10,000-message
//! mixed stream on Kafka (tansu, 4 partitions; successes; transient
//! failures that take a 200 ms delay tier once; permanent failures to the
//! DLQ): nothing lost, duplicates counted and reported. The worker is this
//! test binary run again in child mode (`backstop_test::crash`), living
//! 6.5 to 8.5 s: longer than the 6 s session after which the group notices
//! the member killed before it, so each worker gets partitions. (Shorter
//! sessions let a loaded machine's workers miss heartbeats and churn;
//! static membership made no progress on tansu 0.6.)

mod common;

use backstop_core::DeadLetterSource;
use backstop_kafka::{KafkaTransport, dlq_topic};
use backstop_test::Backend as _;
use backstop_test::crash::{self, KILLS, Rng, TOTAL};
use std::time::{Duration, Instant};

const TEST: &str = "kill_nine_twenty_times_under_a_mixed_stream_loses_nothing";

#[test]
fn kill_nine_twenty_times_under_a_mixed_stream_loses_nothing() {
    crash::main(
        || {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
            KafkaTransport::new(common::test_config(&common::brokers())).expect("config")
        },
        parent,
    );
}

async fn parent() {
    let backend = common::KafkaBackend::new(4);
    let transport = backend.transport().await;
    let source = backend
        .fresh_source("crash", crash::GROUP, &[crash::tier()])
        .await;
    let log = std::env::temp_dir().join(format!("{source}.log"));
    let _ = std::fs::remove_file(&log);
    common::produce_plain(&common::brokers(), &source, (0..TOTAL).map(crash::body));
    let dlq = dlq_topic(crash::GROUP, &source);
    let dead_now = || async { transport.browse(&dlq, 100_000).await.map_or(0, |d| d.len()) };
    let mut rng = Rng::seeded();
    let mut mid_stream = 0;
    for _ in 0..KILLS {
        let worker = crash::spawn_child(TEST, &source, &log);
        std::thread::sleep(Duration::from_millis(6_500 + rng.below(2_000)));
        if backend.pending(&source).await > 0 {
            mid_stream += 1;
        }
        crash::kill(worker);
    }
    // The last worker runs until everything is handled or dead-lettered;
    // the wait restarts while anything moves.
    let worker = crash::spawn_child(TEST, &source, &log);
    let started = Instant::now();
    crash::until_drained(&log, Duration::from_secs(120), || async {
        (dead_now().await, backend.pending(&source).await)
    })
    .await;
    crash::kill(worker);
    let dead = transport.browse(&dlq, 100_000).await.expect("DLQ");
    let r = crash::reconcile(&log, &dead);
    crash::report("Kafka, tansu", mid_stream, &r, started.elapsed());
    let _ = std::fs::remove_file(&log);
}
