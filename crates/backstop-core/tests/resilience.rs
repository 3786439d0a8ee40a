//! The resilience layers on the in-memory broker, on tokio's paused clock:
//! circuit breaker (paused intake, held messages, half-open probes), priority,
//! rate limit, dedupe, fallbacks.

use backstop_core::dedupe::{Dedupe, MemoryDedupeStore};
use backstop_core::memory::MemoryBroker;
use backstop_core::message::names;
use backstop_core::{
    Backoff, CircuitBreaker, Context, DelayTier, HandlerError, HandlerOptions, Message, Priority,
    Publisher, RateLimit, RetryPolicy, Runner, handler_fn,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A dependency that is down between two instants of tokio's clock.
#[derive(Clone)]
struct Dependency {
    down: Arc<Mutex<Option<(Instant, Instant)>>>,
}

impl Dependency {
    fn up(&self) -> bool {
        let now = Instant::now();
        !matches!(*self.down.lock().unwrap_or_else(|p| p.into_inner()), Some((a, b)) if now >= a && now < b)
    }
}

#[tokio::test(start_paused = true)]
async fn a_dependency_down_for_60s_pauses_intake_and_loses_nothing() {
    const BEFORE: u64 = 200;
    const DURING: u64 = 2_000;
    let broker = MemoryBroker::new();
    let t0 = Instant::now();
    let outage = (t0 + Duration::from_secs(10), t0 + Duration::from_secs(70));
    let dep = Dependency {
        down: Arc::new(Mutex::new(Some(outage))),
    };
    for n in 0..BEFORE {
        broker
            .publish(
                "orders",
                Message::new(format!("{n}")).with_id(format!("m{n}")),
            )
            .await
            .expect("publish");
    }
    // Calls (and their times) and successful side effects, per message id.
    let calls: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let done: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let (dep, calls, done) = (dep.clone(), calls.clone(), done.clone());
        handler_fn(move |_: Bytes, ctx: Context| {
            let (dep, calls, done) = (dep.clone(), calls.clone(), done.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let up = dep.up();
                calls.lock().expect("calls").push((Instant::now(), up));
                if !up {
                    return Err(HandlerError::transient("inventory: connection refused")
                        .with_dependency("inventory"));
                }
                *done
                    .lock()
                    .expect("done")
                    .entry(ctx.message_id().to_owned())
                    .or_default() += 1;
                Ok(())
            }
        })
    };
    let threshold = 5;
    let runner = Runner::builder(broker.clone())
        .with_group("billing")
        .with_handler_options(
            "orders",
            handler,
            HandlerOptions::default()
                .with_concurrency(8)
                .with_policy(RetryPolicy::default().with_backoff(Backoff::exponential(
                    Duration::from_millis(10),
                    Duration::from_millis(100),
                )))
                .with_circuit_breaker(
                    CircuitBreaker::default()
                        .with_consecutive_failures(Some(threshold))
                        .with_open_for(Duration::from_secs(5), Duration::from_secs(20)),
                ),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    // 2,000 messages arrive during the outage, 100 every 3 s.
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(outage.0).await;
            for n in 0..DURING {
                if n > 0 && n % 100 == 0 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                let id = format!("m{}", BEFORE + n);
                broker
                    .publish("orders", Message::new(id.clone()).with_id(id))
                    .await
                    .expect("publish");
            }
        })
    };
    // Snapshots at the start and the end of the outage.
    let watcher = {
        let (stats, broker) = (stats.clone(), broker.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(outage.0).await;
            let start = stats.snapshot();
            tokio::time::sleep_until(outage.1 - Duration::from_millis(1)).await;
            (start, stats.snapshot(), broker.ready_len("orders"))
        })
    };
    let total = (BEFORE + DURING) as usize;
    let report = {
        let done = done.clone();
        runner
            .run(async move {
                while done.lock().expect("done").len() < total {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
    };
    publisher.await.expect("publisher");
    let (start, end, backlog) = watcher.await.expect("watcher");

    // Nothing lost, nothing dead-lettered or delayed, each handled once.
    let done = done.lock().expect("done");
    assert_eq!(done.len(), total, "every message processed after recovery");
    assert!(done.values().all(|n| *n == 1));
    assert_eq!(report.stats.dead_lettered, 0, "no DLQ flood");
    assert_eq!(report.stats.delayed, 0, "no retry-tier churn either");
    assert_eq!(broker.ready_len("orders.dlq"), 0);
    assert_eq!(broker.pending(), 0);
    // No acks (commits) past the outage point while it lasted.
    assert_eq!(end.ok, start.ok, "nothing acked during the outage");
    assert!(report.stats.circuit_opened >= 2, "{:?}", report.stats);
    // Intake paused within the threshold: the backlog waited in the broker.
    let calls = calls.lock().expect("calls");
    let failed: Vec<Instant> = calls
        .iter()
        .filter(|(_, up)| !up)
        .map(|(t, _)| *t)
        .collect();
    let first_failure = failed[0];
    assert!(first_failure < outage.0 + Duration::from_millis(100));
    assert!(
        backlog as u64 >= DURING - 8,
        "the backlog stays in the broker: {backlog} ready at the end of the outage"
    );
    // The breaker opened on the 5th consecutive failure (messages in flight
    // when it opened could still fail once: at most the concurrency more);
    // after that only half-open probes reached the dependency, one at a time,
    // at 5 s, then 10 s, then 20 s (the cap) apart.
    let opened_at = failed[threshold as usize - 1];
    let in_flight_tail = failed
        .iter()
        .filter(|t| **t > opened_at && **t < opened_at + Duration::from_secs(1))
        .count();
    assert!(in_flight_tail <= 8, "{in_flight_tail} late failures");
    // Concurrent calls failing together on the new dependency all count: the
    // dependency saw at most one wave (the concurrency) before the breaker
    // stopped calling it, not a second wave of immediate retries.
    let before_probes = failed
        .iter()
        .filter(|t| **t < opened_at + Duration::from_secs(1))
        .count();
    assert!(
        before_probes <= 8,
        "{before_probes} calls failed before the breaker held them"
    );
    let probes: Vec<Instant> = failed
        .iter()
        .copied()
        .filter(|t| *t >= opened_at + Duration::from_secs(1))
        .collect();
    let gaps: Vec<u64> = std::iter::once(opened_at)
        .chain(probes.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs())
        .collect();
    assert_eq!(gaps.first(), Some(&5), "first probe after 5 s: {gaps:?}");
    assert!(
        gaps.len() >= 3,
        "probing went on through the outage: {gaps:?}"
    );
    assert!(
        gaps.windows(2).all(|w| w[1] == (w[0] * 2).min(20)),
        "the open interval doubles up to its cap: {gaps:?}"
    );
    // Recovery: the first probe after the outage succeeded and the rest followed.
    let after: Vec<&(Instant, bool)> = calls.iter().filter(|(t, _)| *t >= outage.1).collect();
    assert!(after.iter().all(|(_, up)| *up));
    assert!(report.stats.circuit_held > 0);
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_never_open_the_breaker() {
    let broker = MemoryBroker::new();
    for n in 0..50 {
        broker
            .publish("orders", Message::new(format!("{n}")))
            .await
            .expect("publish");
    }
    let runner = Runner::builder(broker.clone())
        .with_handler_options(
            "orders",
            handler_fn(|_: Bytes, _: Context| async move {
                Err::<(), _>(HandlerError::permanent("no such customer"))
            }),
            HandlerOptions::default()
                .with_circuit_breaker(CircuitBreaker::default().with_consecutive_failures(Some(3))),
        )
        .build()
        .expect("valid");
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(report.stats.dead_lettered, 50);
    assert_eq!(report.stats.circuit_opened, 0);
}

#[tokio::test(start_paused = true)]
async fn a_low_priority_source_yields_under_load() {
    let broker = MemoryBroker::new();
    for n in 0..40 {
        broker
            .publish("payments", Message::new(format!("{n}")))
            .await
            .expect("publish");
        broker
            .publish("reports", Message::new(format!("{n}")))
            .await
            .expect("publish");
    }
    let order: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let slow = |name: &'static str, order: Arc<Mutex<Vec<&'static str>>>| {
        handler_fn(move |_: Bytes, _: Context| {
            let order = order.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                order.lock().expect("order").push(name);
                Ok(())
            }
        })
    };
    let runner = Runner::builder(broker.clone())
        .with_max_in_flight(2)
        .with_handler("payments", slow("payments", order.clone()))
        .with_handler_options(
            "reports",
            slow("reports", order.clone()),
            HandlerOptions::default().with_priority(Priority::Low),
        )
        .build()
        .expect("valid");
    let idle = broker.clone();
    runner.run(async move { idle.wait_idle().await }).await;
    let order = order.lock().expect("order");
    assert_eq!(order.len(), 80);
    let last_payment = order
        .iter()
        .rposition(|s| *s == "payments")
        .expect("payments");
    let early_reports = order[..last_payment]
        .iter()
        .filter(|s| **s == "reports")
        .count();
    assert!(
        early_reports <= 2,
        "reports took {early_reports} slots while payments waited: {order:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_spaces_out_intake() {
    let broker = MemoryBroker::new();
    for n in 0..31 {
        broker
            .publish("emails", Message::new(format!("{n}")))
            .await
            .expect("publish");
    }
    let runner = Runner::builder(broker.clone())
        .with_handler_options(
            "emails",
            handler_fn(|_: Bytes, _: Context| async move { Ok(()) }),
            HandlerOptions::default().with_rate_limit(RateLimit::per_second(10.0).with_burst(1)),
        )
        .build()
        .expect("valid");
    let idle = broker.clone();
    let started = Instant::now();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    let took = started.elapsed();
    assert_eq!(report.stats.ok, 31);
    assert!(
        took >= Duration::from_millis(2990) && took <= Duration::from_millis(3100),
        "31 messages at 10/s with a burst of 1 take 3 s: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn each_message_delivered_three_times_is_handled_once() {
    let broker = MemoryBroker::new();
    // Three copies of each (a producer retry, a replay, a redelivery).
    for round in 0..3 {
        for n in 0..50 {
            broker
                .publish(
                    "orders",
                    Message::new(format!("order {n} round {round}")).with_id(format!("order-{n}")),
                )
                .await
                .expect("publish");
        }
    }
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let store = MemoryDedupeStore::new();
    let runner = {
        let effects = effects.clone();
        Runner::builder(broker.clone())
            .with_handler_options(
                "orders",
                handler_fn(move |_: Bytes, ctx: Context| {
                    let effects = effects.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        *effects
                            .lock()
                            .expect("effects")
                            .entry(ctx.message_id().to_owned())
                            .or_default() += 1;
                        Ok(())
                    }
                }),
                HandlerOptions::default().with_dedupe(Dedupe::new(store.clone())),
            )
            .build()
            .expect("valid")
    };
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    let effects = effects.lock().expect("effects");
    assert_eq!(effects.len(), 50);
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
    assert_eq!(report.stats.duplicates, 100);
    assert_eq!(report.stats.ok, 50);
    assert_eq!(store.done_len(), 50);
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_releases_the_claim_so_the_retry_runs() {
    let broker = MemoryBroker::new();
    broker
        .publish("orders", Message::new("x").with_id("order-1"))
        .await
        .expect("publish");
    let calls = Arc::new(AtomicU64::new(0));
    let runner = {
        let calls = calls.clone();
        Runner::builder(broker.clone())
            .with_handler_options(
                "orders",
                handler_fn(move |_: Bytes, _: Context| {
                    let calls = calls.clone();
                    async move {
                        if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                            Err(HandlerError::transient("flaky"))
                        } else {
                            Ok(())
                        }
                    }
                }),
                HandlerOptions::default()
                    .with_policy(RetryPolicy::default().with_backoff(Backoff::exponential(
                        Duration::from_millis(1),
                        Duration::from_millis(2),
                    )))
                    .with_dedupe(Dedupe::new(MemoryDedupeStore::new())),
            )
            .build()
            .expect("valid")
    };
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(report.stats.ok, 1);
    assert_eq!(report.stats.duplicates, 0);
}

#[tokio::test(start_paused = true)]
async fn dedupe_retention_shorter_than_a_tier_is_refused() {
    let err = Runner::builder(MemoryBroker::new())
        .with_handler_options(
            "orders",
            handler_fn(|_: Bytes, _: Context| async move { Ok(()) }),
            HandlerOptions::default()
                .with_policy(
                    RetryPolicy::default().with_tiers([DelayTier::new(Duration::from_secs(3600))]),
                )
                .with_dedupe(
                    Dedupe::new(MemoryDedupeStore::new()).with_retention(Duration::from_secs(60)),
                ),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.field, "handlers[orders].dedupe.retention");
    let err = Runner::builder(MemoryBroker::new())
        .with_handler_options(
            "orders",
            handler_fn(|_: Bytes, _: Context| async move { Ok(()) }),
            HandlerOptions::default()
                .with_timeout(Duration::from_secs(30))
                .with_dedupe(
                    Dedupe::new(MemoryDedupeStore::new()).with_lease(Duration::from_secs(5)),
                ),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.field, "handlers[orders].dedupe.lease");
    let err = Runner::builder(MemoryBroker::new())
        .with_handler_options(
            "orders",
            handler_fn(|_: Bytes, _: Context| async move { Ok(()) }),
            HandlerOptions::default()
                .with_circuit_breaker(CircuitBreaker::default().with_half_open_probes(0)),
        )
        .build()
        .unwrap_err();
    assert_eq!(
        err.field,
        "handlers[orders].circuit_breaker.half_open_probes"
    );
}

/// The two fallback outcomes: park (copy confirmed, then ack) and skip.
#[tokio::test(start_paused = true)]
async fn fallbacks_park_and_skip_without_retrying() {
    let broker = MemoryBroker::new();
    for (n, kind) in ["ok", "park", "skip", "ok"].iter().enumerate() {
        broker
            .publish(
                "orders",
                Message::new(format!("{n}")).with_header("kind", *kind),
            )
            .await
            .expect("publish");
    }
    let runner = Runner::builder(broker.clone())
        .with_handler(
            "orders",
            handler_fn(move |_: Bytes, ctx: Context| async move {
                match ctx.headers().get_str("kind") {
                    Some("park") => Err(HandlerError::park(
                        "orders.parked",
                        "pricing down: parked for a later run",
                    )),
                    Some("skip") => Err(HandlerError::skip("order cancelled meanwhile")),
                    _ => Ok(()),
                }
            }),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let report = runner
        .run(async move {
            while stats.snapshot().in_flight > 0
                || stats.snapshot().ok + stats.snapshot().parked + stats.snapshot().skipped < 4
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    assert_eq!(report.stats.ok, 2);
    assert_eq!(report.stats.parked, 1);
    assert_eq!(report.stats.skipped, 1);
    assert_eq!(report.stats.dead_lettered, 0);
    assert_eq!(report.stats.handler_errors, 0, "fallbacks are not errors");
    let parked = broker.messages("orders.parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].headers().get_str(names::ERROR_MESSAGE),
        Some("pricing down: parked for a later run")
    );
    assert_eq!(
        parked[0].headers().get_str(names::ORIGIN_SOURCE),
        Some("orders")
    );
    assert_eq!(broker.ready_len("orders.dlq"), 0);
}
