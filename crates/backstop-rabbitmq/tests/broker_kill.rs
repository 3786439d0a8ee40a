//! kill -9 of RabbitMQ itself (its `beam.smp`) while a mixed stream flows
//! (successes, transient failures through a delay tier, permanent failures
//! to the DLQ), then `rabbitmq-server -detached` as `scripts/test.sh` starts
//! it: the broker check fails while it is down (so `/readyz` does), the
//! worker recovers by itself, every message ends handled or dead-lettered,
//! nothing is lost; duplicates and the recovery time are printed for the
//! notes. Its own test binary, so no other test shares the broker while it
//! is down.

mod common;

use backstop_core::{Context, HandlerError, HandlerOptions, Inspect, Message, RetryPolicy};
use backstop_test::{Harness, eventually, start};
use common::RabbitBackend;
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: u32 = 3_000;

/// One in ten fails once (to the tier and back), one in fifty always.
fn fate(n: u32) -> (bool, bool) {
    (n.is_multiple_of(10), n % 50 == 1)
}

fn kill_broker() {
    let out = Command::new("pkill")
        .args(["-9", "-u", "rabbitmq", "-f", "beam.smp"])
        .status()
        .expect("pkill runs");
    assert!(out.success(), "RabbitMQ's beam.smp was killed");
}

/// Starts RabbitMQ as `scripts/test.sh` does and waits until it has booted
/// (`await_startup` fails until the node answers at all).
fn start_broker() {
    let _ = Command::new("rabbitmq-server").arg("-detached").status();
    let started = Instant::now();
    while !Command::new("rabbitmqctl")
        .arg("await_startup")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "RabbitMQ did not come back within 180 s of `rabbitmq-server -detached`"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_the_broker_mid_stream_loses_nothing() {
    let backend = RabbitBackend::new();
    let policy = RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([backstop_core::DelayTier::named(
            "broker-kill-1s",
            Duration::from_secs(1),
        )]);
    let h = Harness::new(&backend, "broker-kill", policy).await;
    for n in 0..TOTAL {
        h.publish(Message::new(n.to_string())).await;
    }
    let handled: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let seen = handled.clone();
    let handler = backstop_core::handler_fn(move |body: String, ctx: Context| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
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
    });
    let running = start(
        h.runner(handler, HandlerOptions::default().with_concurrency(16))
            .with_resubscribe_backoff(backstop_core::Backoff::exponential(
                Duration::from_millis(200),
                Duration::from_secs(2),
            ))
            .build()
            .expect("valid"),
    );
    let count = || handled.lock().expect("lock").len();
    eventually("500 handled", Duration::from_secs(120), || async {
        count() >= 500
    })
    .await;

    kill_broker();
    let at_kill = count();
    let check = tokio::time::timeout(Duration::from_secs(5), h.transport.check()).await;
    assert!(
        !matches!(check, Ok(Ok(()))),
        "the broker check fails while RabbitMQ is down"
    );
    let restarting = Instant::now();
    start_broker();
    let restart = restarting.elapsed();
    let back = Instant::now();
    let before = count();
    eventually(
        "progress after the restart",
        Duration::from_secs(120),
        || async { count() > before },
    )
    .await;
    let recovery = back.elapsed();

    let want_ok = (0..TOTAL).filter(|n| !fate(*n).1).count();
    let want_dead = TOTAL as usize - want_ok;
    backstop_test::eventually(
        "every message handled or dead-lettered",
        Duration::from_secs(240),
        || async { count() == want_ok && h.dlq().await.len() >= want_dead },
    )
    .await;
    backstop_test::until_zero("source and tier drained", Duration::from_secs(60), || {
        backstop_test::Backend::pending(&backend, &h.source)
    })
    .await;
    running.stop().await;
    let dead = h.dlq().await;
    let mut dead_ns: Vec<u32> = dead
        .iter()
        .filter_map(|m| std::str::from_utf8(m.payload()).ok()?.parse().ok())
        .collect();
    dead_ns.sort_unstable();
    dead_ns.dedup();
    let expected_dead: Vec<u32> = (0..TOTAL).filter(|n| fate(*n).1).collect();
    assert_eq!(dead_ns, expected_dead, "every permanent failure in the DLQ");
    let handled = handled.lock().expect("lock").clone();
    let duplicates: u32 = handled.values().map(|c| c - 1).sum();
    eprintln!(
        "broker kill -9 (RabbitMQ): {TOTAL} messages, {at_kill} handled at the kill, 0 lost, \
         {duplicates} duplicate successes, {} extra dead letters; restart took {restart:?}, \
         first progress {recovery:?} after it",
        dead.len() - want_dead
    );
}
