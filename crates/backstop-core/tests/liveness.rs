//! Liveness sees a stuck slot: a delivery whose step never ends (here a
//! dedupe store whose `complete` never answers, as a store call without a
//! timeout would) makes `live` fail once the step has lasted longer than
//! the handler's timeout plus its backoff cap plus the routing deadline,
//! while the source loop itself keeps beating. A message held by an open
//! circuit breaker for far longer is not stuck.

use backstop_core::dedupe::{Claim, Dedupe, DedupeError, DedupeStore};
use backstop_core::memory::MemoryBroker;
use backstop_core::transport::BoxFuture;
use backstop_core::{
    Backoff, CircuitBreaker, Context, HandlerError, HandlerOptions, Message, Publisher,
    RetryPolicy, Runner, handler_fn,
};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Claims everything; `complete` never answers.
struct Hanging;

impl DedupeStore for Hanging {
    fn claim<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupeError>> {
        Box::pin(async { Ok(Claim::Claimed) })
    }

    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        Box::pin(std::future::pending())
    }

    fn release<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), DedupeError>> {
        Box::pin(async { Ok(()) })
    }
}

const DAY: Duration = Duration::from_secs(86_400);

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_backoff(Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .with_tiers([])
}

#[tokio::test(start_paused = true)]
async fn a_delivery_stuck_in_one_step_fails_liveness() {
    let broker = MemoryBroker::new();
    broker
        .publish("q", Message::new("x"))
        .await
        .expect("publish");
    let runner = Runner::builder(broker.clone())
        .with_routing_deadline(Duration::from_secs(5))
        .with_handler_options(
            "q",
            handler_fn(|_: Bytes, _: Context| async { Ok::<_, HandlerError>(()) }),
            HandlerOptions::default()
                .with_timeout(Duration::from_secs(2))
                .with_policy(policy())
                .with_dedupe(Dedupe::new(Hanging)),
        )
        .build()
        .expect("valid");
    let health = runner.health();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    // Bound: 2 s timeout + 1 s backoff cap + 5 s routing deadline.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        health.live(DAY).is_ok(),
        "within the bound: {:?}",
        health.live(DAY)
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let why = health.live(DAY).expect_err("a stuck slot fails liveness");
    assert!(
        why.contains("source q: 1 delivery in flight in one step"),
        "{why}"
    );
    let route = &health.routes()[0];
    assert_eq!(route.stuck, 1);
    assert_eq!(route.stuck_after, Duration::from_secs(8));
    assert!(
        route.idle_for < Duration::from_secs(2),
        "the loop itself beats"
    );
    let _ = tx.send(());
    running.abort();
}

#[tokio::test(start_paused = true)]
async fn a_message_held_by_an_open_breaker_is_not_stuck() {
    let broker = MemoryBroker::new();
    for i in 0..3 {
        broker
            .publish("q", Message::new(format!("{i}")))
            .await
            .expect("publish");
    }
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let runner = Runner::builder(broker.clone())
        .with_routing_deadline(Duration::from_secs(5))
        .with_handler_options(
            "q",
            handler_fn(move |_: Bytes, _: Context| {
                let d = d.clone();
                async move {
                    if d.load(Ordering::SeqCst) {
                        Err(HandlerError::transient("dependency down"))
                    } else {
                        Ok(())
                    }
                }
            }),
            HandlerOptions::default()
                .with_timeout(Duration::from_secs(2))
                .with_policy(policy())
                .with_circuit_breaker(
                    CircuitBreaker::default()
                        .with_consecutive_failures(Some(1))
                        .with_open_for(Duration::from_secs(600), Duration::from_secs(600)),
                ),
        )
        .build()
        .expect("valid");
    let health = runner.health();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        health.routes()[0].circuit,
        backstop_core::CircuitState::Open,
        "the breaker holds the messages"
    );
    assert!(
        health.live(DAY).is_ok(),
        "held by the breaker for two minutes, not stuck: {:?}",
        health.live(DAY)
    );
    down.store(false, Ordering::SeqCst);
    let _ = tx.send(());
    running.abort();
}
