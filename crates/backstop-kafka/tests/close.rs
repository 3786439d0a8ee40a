//! Graceful shutdown on tansu: when `Runner::run` returns, the consumer has
//! made its final commit (auto commit is set far off here, so only that
//! commit can have stored the work) and left its group.

mod common;

use backstop_core::{Backoff, Context, Message, Publisher, Runner, handler_fn};
use backstop_test::Backend as _;
use bytes::Bytes;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_after_the_final_commit() {
    const N: usize = 20;
    let brokers = common::brokers();
    common::require_broker(&brokers);
    let config = common::test_config(&brokers)
        // Nothing but the final commit commits within this test.
        .with_property("auto.commit.interval.ms", "600000");
    let backend = common::KafkaBackend::with_config(config, 1);
    let group = common::unique("close-group");
    let source = backend.fresh_source("close", &group, &[]).await;
    let transport = backend.transport().await;
    for i in 0..N {
        transport
            .publish(&source, Message::new(format!("m{i}")))
            .await
            .expect("published");
    }
    let runner = Runner::builder(transport)
        .with_group(&group)
        .with_handler(&source, handler_fn(|_: Bytes, _: Context| async { Ok(()) }))
        .with_resubscribe_backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        ))
        .build()
        .expect("valid");
    let stats = runner.stats();
    let running = backstop_test::start(runner);
    backstop_test::eventually(
        "every message handled",
        Duration::from_secs(120),
        || async { stats.snapshot().ok == N as u64 },
    )
    .await;
    let report = running.stop().await;
    assert!(report.drained);
    // The consumer closes on a thread of its own (closing can block): it
    // has finished, group leave included, before run() returned.
    assert_eq!(
        close_threads(),
        0,
        "the consumer's close thread is still at work after run() returned"
    );
    // Right away: no waiting for a commit that might still come.
    assert_eq!(
        backend.lag(&group, vec![source.clone()]).await,
        0,
        "everything handled is committed when run() returns"
    );
}

/// Threads of this process named `backstop-kafka-close` (Linux shows the
/// first 15 bytes of a thread's name).
fn close_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "backstop-kafka-")
        .count()
}
