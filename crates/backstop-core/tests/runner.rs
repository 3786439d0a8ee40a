//! Runner behaviour that the conformance suite does not cover: metrics through
//! the `metrics` facade, configuration validation, derived message ids.

use backstop_core::memory::MemoryBroker;
use backstop_core::message::names;
use backstop_core::observability::names as metric;
use backstop_core::{
    Backoff, Context, DelayPublisher, DelayTier, HandlerError, HandlerOptions, Headers, Json,
    Message, Publisher, RetryBudget, RetryPolicy, Runner, Subscription, handler_fn,
};
use bytes::Bytes;
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(5),
        ))
        .with_tiers([DelayTier::new(Duration::from_millis(100))])
}

type Snap = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn find<'a>(snap: &'a Snap, name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    snap.iter()
        .find(|(key, _, _, _)| {
            let k = key.key();
            k.name() == name
                && labels
                    .iter()
                    .all(|(l, v)| k.labels().any(|kl| kl.key() == *l && kl.value() == *v))
        })
        .map(|(_, _, _, v)| v)
}

fn counter(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(snap, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

fn histogram_count(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> usize {
    match find(snap, name, labels) {
        Some(DebugValue::Histogram(v)) => v.len(),
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn metrics_follow_observability_md() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let broker = MemoryBroker::new();
    for (i, kind) in [
        "ok", "ok", "ok", "ok", "blip", "blip", "bad", "bad", "poison",
    ]
    .iter()
    .enumerate()
    {
        let payload = if *kind == "poison" {
            "not json".to_owned()
        } else {
            format!(r#"{{"i":{i},"kind":"{kind}"}}"#)
        };
        broker
            .publish("orders", Message::new(payload))
            .await
            .unwrap();
    }
    // A tier delivery with a malformed attempt header.
    let sub = Subscription::new("orders", "g")
        .with_tiers(policy().tiers().to_vec())
        .with_prefetch(8);
    broker
        .publish_delayed(
            &sub,
            &policy().tiers()[0],
            Message::new(r#"{"i":99,"kind":"ok"}"#).with_header(names::ATTEMPT, "x"),
        )
        .await
        .unwrap();

    #[derive(serde::Deserialize)]
    struct P {
        kind: String,
    }
    let handler = handler_fn(|Json(p): Json<P>, ctx: Context| async move {
        match p.kind.as_str() {
            "blip" if ctx.attempt() == 1 => Err(HandlerError::transient("blip")),
            "bad" => Err(HandlerError::permanent("bad")),
            _ => Ok(()),
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_group("g")
        .with_handler_options(
            "orders",
            handler,
            HandlerOptions::default()
                .with_name("fulfil")
                .with_policy(policy()),
        )
        .build()
        .unwrap();
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(report.stats.ok, 7);
    // One snapshot: the debugging recorder drains values as it reads them.
    let snap: Snap = snap.snapshot().into_vec();

    let by = |outcome| {
        counter(
            &snap,
            metric::MESSAGES_TOTAL,
            &[
                ("source", "orders"),
                ("handler", "fulfil"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(by("ok"), 7);
    assert_eq!(by("retried"), 2);
    assert_eq!(by("dead_lettered"), 3);
    assert_eq!(by("delayed"), 0);
    assert_eq!(by("failed_to_route"), 0);
    let errors = |class| {
        counter(
            &snap,
            metric::HANDLER_ERRORS_TOTAL,
            &[
                ("source", "orders"),
                ("handler", "fulfil"),
                ("class", class),
            ],
        )
    };
    assert_eq!(errors("transient"), 2);
    assert_eq!(errors("permanent"), 2);
    assert_eq!(errors("poison"), 1);
    assert_eq!(errors("timeout"), 0);
    // 10 messages, 2 of them invoked twice.
    assert_eq!(
        histogram_count(
            &snap,
            metric::HANDLER_DURATION_SECONDS,
            &[("source", "orders"), ("handler", "fulfil")]
        ),
        12
    );
    // Final outcomes: 7 ok + 3 dead-lettered.
    assert_eq!(
        histogram_count(&snap, metric::END_TO_END_SECONDS, &[("source", "orders")]),
        10
    );
    assert_eq!(
        counter(
            &snap,
            metric::MALFORMED_HEADERS_TOTAL,
            &[("source", "orders"), ("header", names::ATTEMPT)]
        ),
        1
    );
    match find(&snap, metric::INFLIGHT, &[("handler", "fulfil")]) {
        Some(DebugValue::Gauge(v)) => assert_eq!(v.into_inner(), 0.0),
        other => panic!("inflight gauge: {other:?}"),
    }
}

#[test]
fn bad_config_is_refused_naming_the_field() {
    let ok = || handler_fn(|_: Bytes, _: Context| async { Ok(()) });
    let build = |b: backstop_core::RunnerBuilder<MemoryBroker>| b.build().map(|_| ()).unwrap_err();

    let e = build(Runner::builder(MemoryBroker::new()));
    assert_eq!(e.field, "handlers");
    let e = build(
        Runner::builder(MemoryBroker::new())
            .with_group(" ")
            .with_handler("q", ok()),
    );
    assert_eq!(e.field, "group");
    let e = build(
        Runner::builder(MemoryBroker::new())
            .with_handler("q", ok())
            .with_handler("q", ok()),
    );
    assert_eq!(e.field, "handlers[q].source");
    let e = build(Runner::builder(MemoryBroker::new()).with_handler_options(
        "q",
        ok(),
        HandlerOptions::default().with_timeout(Duration::ZERO),
    ));
    assert_eq!(e.field, "handlers[q].timeout");
    let e = build(Runner::builder(MemoryBroker::new()).with_handler_options(
        "q",
        ok(),
        HandlerOptions::default().with_concurrency(0),
    ));
    assert_eq!(e.field, "handlers[q].concurrency");
    let e = build(Runner::builder(MemoryBroker::new()).with_handler_options(
        "q",
        ok(),
        HandlerOptions::default().with_max_deliveries(Some(0)),
    ));
    assert_eq!(e.field, "handlers[q].max_deliveries");
    let e = build(Runner::builder(MemoryBroker::new()).with_handler_options(
        "q",
        ok(),
        HandlerOptions::default().with_retry_budget(RetryBudget::new(
            Duration::from_secs(120),
            1,
            0.1,
        )),
    ));
    assert_eq!(e.field, "handlers[q].retry_budget.window");
    let e = build(
        Runner::builder(MemoryBroker::new()).with_handler_options(
            "q",
            ok(),
            HandlerOptions::default().with_policy(
                RetryPolicy::default()
                    .with_tiers([DelayTier::named("no/slash", Duration::from_secs(1))]),
            ),
        ),
    );
    assert_eq!(e.field, "handlers[q].policy.tiers[0].name");
    assert!(
        e.to_string().contains("handlers[q].policy.tiers[0].name"),
        "{e}"
    );
    let e = build(
        Runner::builder(MemoryBroker::new())
            .with_handler("q", ok())
            .with_max_in_flight(0),
    );
    assert_eq!(e.field, "max_in_flight");
}

/// A message without `backstop-message-id` gets one derived from its source
/// position, the same on every redelivery, and carried on its DLQ copy.
#[tokio::test(start_paused = true)]
async fn missing_message_id_is_derived_stably() {
    let broker = MemoryBroker::new();
    let bare = Message::from_parts(None, Bytes::from_static(b"x"), Headers::new());
    assert_eq!(bare.id(), None);
    broker.publish("q", bare).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(ctx.message_id().to_owned());
            if ctx.attempt() == 1 {
                // Simulate a crash mid-handling: the delivery is dropped unacked.
                std::future::pending::<()>().await;
            }
            Err(HandlerError::permanent("no"))
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_handler_options(
            "q",
            handler,
            HandlerOptions::default().with_timeout(Duration::from_secs(60)),
        )
        .with_shutdown_deadline(Duration::from_millis(10))
        .build()
        .unwrap();
    let started = seen.clone();
    let report = runner
        .run(async move {
            while started.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    assert_eq!(report.stats.abandoned, 1);
    assert_eq!(
        broker.ready_len("q"),
        1,
        "abandoned delivery is back in the queue"
    );

    let h2 = seen.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let s = h2.clone();
        async move {
            s.lock().unwrap().push(ctx.message_id().to_owned());
            Err(HandlerError::permanent("no"))
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_handler("q", handler)
        .build()
        .unwrap();
    let idle = broker.clone();
    runner.run(async move { idle.wait_idle().await }).await;
    let ids = seen.lock().unwrap().clone();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1], "redelivery derives the same id");
    assert!(uuid::Uuid::parse_str(&ids[0]).is_ok());
    let dead = broker.messages("q.dlq");
    assert_eq!(dead[0].id(), Some(ids[0].as_str()));
}

/// A full runner stops fetching: with room for 2, exactly 2 deliveries are
/// taken from the broker while the handler is busy; the rest stay in the queue.
#[tokio::test(start_paused = true)]
async fn a_full_runner_stops_fetching() {
    let broker = MemoryBroker::new();
    for _ in 0..10 {
        broker.publish("q", Message::new("x")).await.unwrap();
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let handler = handler_fn(move |_: Bytes, _: Context| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok(())
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_handler_options("q", handler, HandlerOptions::default().with_concurrency(5))
        .with_max_in_flight(2)
        .build()
        .unwrap();
    let stats = runner.stats();
    let (b, g) = (broker.clone(), gate.clone());
    let done = tokio::spawn(runner.run(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(b.unacked_len("q"), 2, "fetched beyond the in-flight bound");
        assert_eq!(b.ready_len("q"), 8);
        g.add_permits(10);
        b.wait_idle().await;
    }));
    let report = done.await.unwrap();
    assert_eq!(report.stats.ok, 10);
    assert_eq!(stats.snapshot().in_flight, 0);
}

/// A 100 % failure burst spends at most the budget's floor on immediate
/// retries; every other failure skips straight to its delay tier, counted.
#[tokio::test(start_paused = true)]
async fn retry_budget_caps_immediate_retries_in_a_failure_burst() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let broker = MemoryBroker::new();
    let n = 300u64;
    for i in 0..n {
        broker
            .publish("orders", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    let budget = RetryBudget::new(Duration::from_secs(10), 2, 0.2);
    let runner = Runner::builder(broker.clone())
        .with_group("billing")
        .with_handler_options(
            "orders",
            handler_fn(|_: Bytes, _: Context| async {
                Err(HandlerError::transient("inventory down"))
            }),
            HandlerOptions::default()
                .with_name("reserve")
                .with_retry_budget(budget)
                .with_policy(
                    RetryPolicy::default()
                        .with_immediate_attempts(3)
                        .with_backoff(Backoff::exponential(
                            Duration::from_millis(1),
                            Duration::from_millis(2),
                        ))
                        .with_tiers([DelayTier::new(Duration::from_secs(3600))]),
                ),
        )
        .build()
        .unwrap();
    let stats = runner.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    while stats.snapshot().delayed < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = tx.send(());
    let report = run.await.unwrap();
    let s = report.stats;
    assert!(
        s.retried <= budget.floor(),
        "{} immediate retries, budget floor {}",
        s.retried,
        budget.floor()
    );
    assert!(s.budget_exhausted > 0);
    assert_eq!(
        s.delayed, n,
        "every message went on to its tier, none dead-lettered"
    );
    assert_eq!(s.dead_lettered, 0);
    let snap: Snap = snap.snapshot().into_vec();
    assert_eq!(
        counter(
            &snap,
            "backstop_retry_budget_exhausted_total",
            &[("handler", "reserve")]
        ),
        s.budget_exhausted
    );
}

#[tokio::test(start_paused = true)]
async fn circuit_state_and_duplicates_are_exported() {
    use backstop_core::CircuitBreaker;
    use backstop_core::dedupe::{Dedupe, MemoryDedupeStore};
    use std::sync::atomic::{AtomicBool, Ordering};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let gauge = |snap: &Snap| match find(snap, metric::CIRCUIT_STATE, &[("handler", "fulfil")]) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("circuit gauge: {other:?}"),
    };

    let broker = MemoryBroker::new();
    for copy in 0..2 {
        for n in 0..3 {
            broker
                .publish(
                    "orders",
                    Message::new(format!("{n}/{copy}")).with_id(format!("o{n}")),
                )
                .await
                .unwrap();
        }
    }
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let runner = Runner::builder(broker.clone())
        .with_handler_options(
            "orders",
            handler_fn(move |_: Bytes, _: Context| {
                let d = d.clone();
                async move {
                    if d.load(Ordering::SeqCst) {
                        Err(HandlerError::transient("down"))
                    } else {
                        Ok(())
                    }
                }
            }),
            HandlerOptions::default()
                .with_name("fulfil")
                .with_concurrency(1)
                .with_policy(policy())
                .with_circuit_breaker(
                    CircuitBreaker::default()
                        .with_consecutive_failures(Some(2))
                        .with_open_for(Duration::from_secs(1), Duration::from_secs(1)),
                )
                .with_dedupe(Dedupe::new(MemoryDedupeStore::new())),
        )
        .build()
        .unwrap();
    let stats = runner.stats();
    let (idle, s) = (broker.clone(), stats.clone());
    let report = runner
        .run(async move {
            while s.snapshot().circuit_opened == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(gauge(&snapshotter.snapshot().into_vec()), 2.0, "open");
            down.store(false, Ordering::SeqCst);
            idle.wait_idle().await;
            assert_eq!(
                gauge(&snapshotter.snapshot().into_vec()),
                0.0,
                "closed again"
            );
        })
        .await;
    assert_eq!(report.stats.ok, 3);
    assert_eq!(report.stats.duplicates, 3);
    assert_eq!(report.stats.dead_lettered, 0);
    assert_eq!(report.stats.delayed, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dlq_copy_too_large_for_the_broker_goes_with_slim_failure_headers() {
    let broker = MemoryBroker::new();
    // The original fits; its DLQ copy with a long error chain would not.
    broker.set_max_message_bytes(Some(3_000));
    broker
        .publish("orders", Message::new("x".repeat(1_500)))
        .await
        .unwrap();
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Deep(String, #[source] std::io::Error);
    let runner = Runner::builder(broker.clone())
        .with_handler(
            "orders",
            handler_fn(|_: Bytes, _: Context| async move {
                Err(HandlerError::permanent(Deep(
                    "invalid order: ".to_owned() + &"line item rejected; ".repeat(60),
                    std::io::Error::other("cause ".repeat(300)),
                )))
            }),
        )
        .build()
        .unwrap();
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(report.stats.dead_lettered, 1);
    assert_eq!(report.stats.failed_to_route, 0);
    let dead = broker.messages("orders.dlq");
    assert_eq!(dead.len(), 1);
    let h = dead[0].headers();
    assert!(h.get(names::ERROR_CHAIN).is_none(), "chain dropped");
    let msg = h.get_str(names::ERROR_MESSAGE).expect("message kept");
    assert!(
        msg.len() <= 256 && msg.starts_with("invalid order: "),
        "{msg}"
    );
    assert_eq!(h.get_str(names::ERROR_CLASS), Some("permanent"));
    assert_eq!(dead[0].payload().len(), 1_500, "payload intact");
}

/// Origin headers that arrive on a main source are a producer's words: the
/// DLQ copy names where the worker really received the message, so a
/// routine replay cannot be steered to another queue.
#[tokio::test(start_paused = true)]
async fn forged_origin_headers_on_a_main_source_are_replaced() {
    let broker = MemoryBroker::new();
    let forged = Message::new("x")
        .with_header(names::ORIGIN_SOURCE, "payments")
        .with_header(names::ORIGIN_PARTITION, "7")
        .with_header(names::ORIGIN_OFFSET, "12345")
        .with_header(names::ORIGIN_GROUP, "someone-else");
    broker.publish("q", forged).await.unwrap();
    let handler = handler_fn(|_: Bytes, _: Context| async { Err(HandlerError::permanent("no")) });
    let runner = Runner::builder(broker.clone())
        .with_group("billing")
        .with_handler("q", handler)
        .build()
        .unwrap();
    let idle = broker.clone();
    runner.run(async move { idle.wait_idle().await }).await;
    let dead = broker.messages("q.dlq");
    assert_eq!(dead.len(), 1);
    let h = dead[0].headers();
    assert_eq!(h.get_str(names::ORIGIN_SOURCE), Some("q"));
    assert_eq!(h.get_str(names::ORIGIN_GROUP), Some("billing"));
    assert_ne!(
        h.get_str(names::ORIGIN_PARTITION),
        Some("7"),
        "forged position gone"
    );
    assert_ne!(h.get_str(names::ORIGIN_OFFSET), Some("12345"));
}

/// A copy the broker refuses even slimmed never sends its message round
/// again (the memory broker, like Kafka and classic queues, does not count
/// deliveries): a tier copy goes to the DLQ instead, and the DLQ gets a
/// stub without the payload, which says its size and SHA-256. The handler
/// runs once.
#[tokio::test(start_paused = true)]
async fn a_copy_refused_even_slimmed_ends_as_a_dlq_stub_after_one_handling() {
    for tiers in [vec![], vec![DelayTier::new(Duration::from_secs(1))]] {
        let broker = MemoryBroker::new();
        // The original (2,900 bytes and its id) fits; no copy with failure
        // headers does.
        broker.set_max_message_bytes(Some(3_000));
        broker
            .publish("orders", Message::new("x".repeat(2_900)))
            .await
            .unwrap();
        let calls = Arc::new(Mutex::new(0u32));
        let c = calls.clone();
        let handler = handler_fn(move |_: Bytes, _: Context| {
            *c.lock().unwrap() += 1;
            async { Err(HandlerError::transient("down")) }
        });
        let runner = Runner::builder(broker.clone())
            .with_handler_options(
                "orders",
                handler,
                HandlerOptions::default().with_policy(
                    RetryPolicy::default()
                        .with_immediate_attempts(1)
                        .with_tiers(tiers.clone()),
                ),
            )
            .build()
            .unwrap();
        let idle = broker.clone();
        let report = runner.run(async move { idle.wait_idle().await }).await;
        assert_eq!(*calls.lock().unwrap(), 1, "tiers {tiers:?}: handled once");
        assert_eq!(
            (report.stats.dead_lettered, report.stats.failed_to_route),
            (1, 0)
        );
        let dead = broker.messages("orders.dlq");
        assert_eq!(dead.len(), 1);
        let h = dead[0].headers();
        assert!(dead[0].payload().is_empty(), "a stub");
        assert_eq!(h.get_str(names::PAYLOAD_SIZE), Some("2900"));
        assert_eq!(h.get_str(names::PAYLOAD_SHA256).map(str::len), Some(64));
        assert_eq!(h.get_str(names::ERROR_CLASS), Some("transient"));
        assert!(h.get(names::DEAD_LETTER_REASON).is_some());
        assert_eq!(broker.ready_len("orders") + broker.unacked_len("orders"), 0);
    }
}

/// A DLQ that refuses even the stub (here its headers alone are over the
/// size limit) for good: the message is written, whole, to the local
/// unroutable store and only then acked; the handler ran once and the
/// source moved on to the next message.
#[tokio::test(start_paused = true)]
async fn a_message_whose_dlq_refuses_even_its_stub_is_kept_locally() {
    let dir = scratch_dir("backstop-unroutable-runner");
    let broker = MemoryBroker::new();
    broker.set_max_message_bytes(Some(3_000));
    let big = Message::new("payload kept").with_header("big", "h".repeat(2_800));
    broker.publish("orders", big.clone()).await.unwrap();
    broker
        .publish("orders", Message::new("next"))
        .await
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let handler = next_succeeds_the_rest_fail(calls.clone());
    let runner = Runner::builder(broker.clone())
        .with_unroutable_dir(&dir)
        .with_handler("orders", handler)
        .build()
        .unwrap();
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(
        *calls.lock().unwrap(),
        ["payload kept", "next"],
        "each handled once, in order"
    );
    assert_eq!(
        (
            report.stats.unroutable,
            report.stats.ok,
            report.stats.failed_to_route
        ),
        (1, 1, 0)
    );
    assert!(broker.messages("orders.dlq").is_empty());
    assert_eq!(broker.ready_len("orders") + broker.unacked_len("orders"), 0);
    let kept = backstop_core::unroutable::UnroutableStore::new(&dir)
        .list()
        .unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].destination, "orders.dlq");
    assert_eq!(kept[0].message.payload(), big.payload(), "whole");
    assert_eq!(kept[0].message.id(), big.id());
    assert_eq!(
        kept[0].message.headers().get_str(names::ERROR_CLASS),
        Some("permanent")
    );
    assert!(kept[0].reason.contains("limit"), "{}", kept[0].reason);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A DLQ that keeps refusing (a length policy, an outage that does not
/// end): each delivery gives the message back, and after
/// `with_unroutable_after` deliveries it is kept in the unroutable store and
/// acked: the handler ran that often, no more, and the source moved on.
#[tokio::test(start_paused = true)]
async fn a_message_whose_copy_keeps_being_refused_is_kept_after_bounded_deliveries() {
    let dir = scratch_dir("backstop-unroutable-rounds");
    let broker = MemoryBroker::new();
    broker.fail_next_dead_letter_publishes(u32::MAX);
    let bad = Message::new("bad");
    broker.publish("orders", bad.clone()).await.unwrap();
    broker
        .publish("orders", Message::new("next"))
        .await
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let handler = next_succeeds_the_rest_fail(calls.clone());
    let runner = Runner::builder(broker.clone())
        .with_unroutable_dir(&dir)
        .with_unroutable_after(3)
        .with_route_retries(
            2,
            Backoff::exponential(Duration::from_millis(5), Duration::from_millis(10)),
        )
        .with_handler("orders", handler)
        .build()
        .unwrap();
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|c| *c == "bad").count(), 3, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| *c == "next").count(), 1);
    assert_eq!(
        (
            report.stats.unroutable,
            report.stats.failed_to_route,
            report.stats.ok
        ),
        (1, 2, 1)
    );
    assert_eq!(broker.ready_len("orders") + broker.unacked_len("orders"), 0);
    let kept = backstop_core::unroutable::UnroutableStore::new(&dir)
        .list()
        .unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].message.id(), bad.id());
    assert_eq!(kept[0].message.payload(), bad.payload());
    assert!(
        kept[0].reason.contains("on 3 deliveries"),
        "{}",
        kept[0].reason
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory of its own under the temporary directory.
fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("{prefix}-{}-{t}", std::process::id()))
}

/// Records each payload it sees in `calls`; `next` succeeds, anything else
/// fails for good.
fn next_succeeds_the_rest_fail(calls: Arc<Mutex<Vec<String>>>) -> impl backstop_core::Handler {
    handler_fn(move |body: Bytes, _: Context| {
        let body = String::from_utf8_lossy(&body).into_owned();
        calls.lock().expect("lock").push(body.clone());
        async move {
            if body == "next" {
                Ok(())
            } else {
                Err(HandlerError::permanent("bad order"))
            }
        }
    })
}

/// An id over 4 KiB is malformed (HEADERS.md, "Limits"): counted, and the
/// DLQ copy carries `sha256:<hex>` of it instead.
#[tokio::test(start_paused = true)]
async fn an_id_over_4_kib_travels_as_its_digest() {
    let broker = MemoryBroker::new();
    let long = "i".repeat(5_000);
    broker
        .publish("q", Message::new("x").with_header(names::MESSAGE_ID, long))
        .await
        .unwrap();
    let handler = handler_fn(|_: Bytes, _: Context| async { Err(HandlerError::permanent("no")) });
    let runner = Runner::builder(broker.clone())
        .with_handler("q", handler)
        .build()
        .unwrap();
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;
    assert_eq!(report.stats.dead_lettered, 1);
    assert!(report.stats.malformed_headers >= 1);
    let dead = broker.messages("q.dlq");
    let id = dead[0].id().expect("an id");
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
}

/// The prefetch window a source asks its backend for (basic.qos on
/// RabbitMQ) is four deliveries per in-flight slot: the handler's
/// concurrency, or the runner's bound when that is lower.
#[test]
fn the_prefetch_window_is_four_per_in_flight_slot() {
    let ok = || handler_fn(|_: Bytes, _: Context| async { Ok(()) });
    let prefetch = |runner: Runner<MemoryBroker>| {
        runner
            .subscriptions()
            .iter()
            .map(|s| (s.source.clone(), s.prefetch))
            .collect::<Vec<_>>()
    };
    let defaults = Runner::builder(MemoryBroker::new())
        .with_handler("a", ok())
        .with_handler_options("b", ok(), HandlerOptions::default().with_concurrency(3))
        .build()
        .unwrap();
    assert_eq!(
        prefetch(defaults),
        [("a".to_owned(), 64), ("b".to_owned(), 12)]
    );
    let bounded = Runner::builder(MemoryBroker::new())
        .with_handler("a", ok())
        .with_max_in_flight(5)
        .build()
        .unwrap();
    assert_eq!(prefetch(bounded), [("a".to_owned(), 20)]);
}
