//! Kafka-specific behaviour against tansu: per-partition order under
//! concurrency, and a rebalance mid-stream (a second member joins, then
//! leaves) where every message is handled and every committed offset was
//! handled first.

mod common;

use backstop_core::{
    Context, HandlerError, HandlerOptions, Message, Publisher, RetryPolicy, Runner, handler_fn,
};
use backstop_test::{Running, start};
use bytes::Bytes;
use common::{KafkaBackend, unique};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn wait_for<F, Fut>(what: &str, timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    backstop_test::eventually_every(what, timeout, Duration::from_millis(100), cond).await;
}

/// A runner of `handler` on `source` with no delay tiers.
fn no_tiers<H: backstop_core::Handler>(
    transport: &backstop_kafka::KafkaTransport,
    group: &str,
    source: &str,
    handler: H,
    concurrency: usize,
) -> Runner<backstop_kafka::KafkaTransport> {
    Runner::builder(transport.clone())
        .with_group(group)
        .with_handler_options(
            source,
            handler,
            HandlerOptions::default()
                .with_concurrency(concurrency)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid")
}

type Seen = Arc<Mutex<HashMap<String, Vec<u32>>>>;

/// Waits until `n` payloads were recorded in all.
async fn wait_seen(seen: &Seen, n: usize) {
    wait_for("all handled", Duration::from_secs(120), || async {
        seen.lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_is_handled_in_order_while_partitions_run_concurrently() {
    let backend = KafkaBackend::new(4);
    let transport = backstop_test::Backend::transport(&backend).await;
    let group = unique("order-group");
    let source = backstop_test::Backend::fresh_source(&backend, "order", &group, &[]).await;
    for n in 0..400u32 {
        let key = format!("k{}", n % 8);
        let m = Message::new(format!("{n}")).with_key(key);
        transport.publish(&source, m).await.expect("publish");
    }
    let seen: Seen = Arc::default();
    let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, c, p) = (seen.clone(), now.clone(), peak.clone());
    let handler = handler_fn(move |payload: String, ctx: Context| {
        let (s, c, p) = (s.clone(), c.clone(), p.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let running = c.fetch_add(1, SeqCst) + 1;
            p.fetch_max(running, SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            let key = String::from_utf8_lossy(ctx.message().key().expect("key")).into_owned();
            s.lock()
                .expect("lock")
                .entry(key)
                .or_default()
                .push(payload.parse().expect("n"));
            c.fetch_sub(1, SeqCst);
            // An occasional immediate retry must not reorder the partition.
            if ctx.attempt() == 1 && payload.ends_with('3') {
                return Err(HandlerError::transient("blip"));
            }
            Ok(())
        }
    });
    let running = start(no_tiers(&transport, &group, &source, handler, 16));
    wait_seen(&seen, 400 + 40).await;
    running.stop().await;
    for (key, ns) in seen.lock().expect("lock").iter() {
        let mut dedup = ns.clone();
        dedup.dedup();
        let mut sorted = dedup.clone();
        sorted.sort_unstable();
        assert_eq!(dedup, sorted, "key {key} handled out of order");
        assert_eq!(sorted.len(), 50);
    }
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak >= 2, "partitions ran concurrently (peak {peak})");
    assert!(
        peak <= 4,
        "at most one message per partition at a time (peak {peak})"
    );
}

type Handled = Arc<Mutex<HashSet<(i32, i64)>>>;

fn member(
    transport: &backstop_kafka::KafkaTransport,
    group: &str,
    source: &str,
    handled: &Handled,
) -> Running {
    let h = handled.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let h = h.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let s = ctx.source();
            h.lock()
                .expect("lock")
                .insert((s.partition.expect("partition"), s.offset.expect("offset")));
            Ok(())
        }
    });
    start(no_tiers(transport, group, source, handler, 8))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_mid_stream_handles_everything_and_commits_only_handled_offsets() {
    let backend = KafkaBackend::new(4);
    let transport = backstop_test::Backend::transport(&backend).await;
    let group = unique("rebalance-group");
    let source = backstop_test::Backend::fresh_source(&backend, "rebalance", &group, &[]).await;
    let total = 1_200usize;
    for n in 0..total {
        transport
            .publish(
                &source,
                Message::new(format!("{n}")).with_key(format!("k{n}")),
            )
            .await
            .expect("publish");
    }
    let handled: Handled = Arc::default();
    let a = member(&transport, &group, &source, &handled);
    wait_for("first member working", Duration::from_secs(60), || async {
        handled.lock().expect("lock").len() >= 100
    })
    .await;
    let b = member(&transport, &group, &source, &handled);
    let at_join = handled.lock().expect("lock").len();
    wait_for("both members working", Duration::from_secs(60), || async {
        handled.lock().expect("lock").len() >= at_join + 300
    })
    .await;
    b.stop().await;
    wait_for("everything handled", Duration::from_secs(180), || async {
        handled.lock().expect("lock").len() == total
    })
    .await;
    wait_for(
        "offsets committed to the end",
        Duration::from_secs(60),
        || async { backend.lag(&group, vec![source.clone()]).await == 0 },
    )
    .await;
    a.stop().await;

    // Every committed offset was handled first: nothing below the committed
    // position of any partition is missing from what the handlers saw.
    let handled = handled.lock().expect("lock").clone();
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (p, o) in &handled {
        by_partition.entry(*p).or_default().push(*o);
    }
    let mut count = 0;
    for (p, mut offsets) in by_partition {
        offsets.sort_unstable();
        let end = *offsets.last().expect("non-empty") + 1;
        assert_eq!(
            offsets.len() as i64,
            end,
            "partition {p} has gaps below its end"
        );
        count += offsets.len();
    }
    assert_eq!(count, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overridden_topic_names_are_provisioned_and_used() {
    use backstop_core::{DeadLetterPublisher, DeadLetterSource, DelayTier, Subscription};
    let brokers = common::brokers();
    common::require_broker(&brokers);
    let names = backstop_kafka::TopicNames::new("{topic}__{tier}", "{topic}__dead").expect("valid");
    let transport =
        backstop_kafka::KafkaTransport::new(common::test_config(&brokers).with_topic_names(names))
            .expect("config");
    let source = unique("named");
    transport
        .admin()
        .ensure_topic(&source, 1)
        .await
        .expect("topic");
    let group = format!("{source}-g");
    let tier = DelayTier::new(Duration::from_millis(200));
    transport
        .publish(&source, Message::new("x"))
        .await
        .expect("publish");
    let runner = Runner::builder(transport.clone())
        .with_group(group.clone())
        .with_handler_options(
            source.clone(),
            handler_fn(|_: Bytes, ctx: Context| async move {
                if ctx.attempt() == 1 {
                    Err(HandlerError::transient("once more, after the tier"))
                } else {
                    Err(HandlerError::permanent("then give up"))
                }
            }),
            HandlerOptions::default().with_policy(
                RetryPolicy::default()
                    .with_immediate_attempts(1)
                    .with_tiers([tier.clone()]),
            ),
        )
        .build()
        .expect("valid");
    let running = start(runner);
    let dlq = format!("{source}__dead");
    let sub = Subscription::new(source.clone(), group)
        .with_tiers(vec![tier])
        .with_prefetch(1);
    assert_eq!(transport.dead_letter_destination(&sub), dlq);
    wait_for(
        "dead-lettered through the renamed topics",
        Duration::from_secs(60),
        || async {
            transport
                .browse(&dlq, 10)
                .await
                .map(|m| m.len())
                .unwrap_or(0)
                == 1
        },
    )
    .await;
    running.stop().await;
    let topics = transport.admin().topics().await.expect("metadata");
    assert!(topics.contains_key(&format!("{source}__200ms")));
    assert!(!topics.contains_key(&backstop_kafka::dlq_topic(&sub.group, &source)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_a_missing_source_names_the_topic() {
    use backstop_core::{Subscriber, Subscription, TransportErrorKind};
    let backend = KafkaBackend::new(1);
    let transport = backstop_test::Backend::transport(&backend).await;
    let missing = unique("missing-topic");
    let err = transport
        .subscribe(&Subscription::new(missing.clone(), "g").with_prefetch(1))
        .await
        .map(|_| ())
        .expect_err("a missing source is refused");
    assert_eq!(err.kind(), TransportErrorKind::NotFound);
    assert!(err.to_string().contains(&missing), "{err}");
}

/// A circuit breaker open for longer than `max.poll.interval.ms`: the
/// assignment is paused (messages arriving meanwhile wait in the broker) and
/// resumed when the breaker closes; the stream is still polled while paused,
/// so the member stays in its group (no revocation) and nothing is handled
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_open_circuit_keeps_the_member_in_its_group() {
    use backstop_core::CircuitBreaker;
    use std::sync::atomic::{AtomicBool, Ordering};
    let backend = KafkaBackend::with_config(
        common::test_config(&common::brokers()).with_property("max.poll.interval.ms", "6000"),
        2,
    );
    let transport = backstop_test::Backend::transport(&backend).await;
    let group = unique("pause-group");
    let source = backstop_test::Backend::fresh_source(&backend, "pause", &group, &[]).await;
    for n in 0..30u32 {
        let m = Message::new(format!("{n}")).with_key(format!("k{}", n % 4));
        transport.publish(&source, m).await.expect("publish");
    }
    let down = Arc::new(AtomicBool::new(true));
    let handled: Arc<Mutex<BTreeMap<u32, u32>>> = Arc::default();
    let (d, h) = (down.clone(), handled.clone());
    let handler = handler_fn(move |payload: String, _: Context| {
        let (d, h) = (d.clone(), h.clone());
        async move {
            if d.load(Ordering::SeqCst) {
                return Err(HandlerError::transient("ledger down").with_dependency("ledger"));
            }
            *h.lock()
                .expect("lock")
                .entry(payload.parse().expect("n"))
                .or_default() += 1;
            Ok(())
        }
    });
    let runner = Runner::builder(transport.clone())
        .with_group(&group)
        .with_handler_options(
            &source,
            handler,
            HandlerOptions::default()
                .with_concurrency(4)
                .with_policy(RetryPolicy::default().with_tiers([]))
                .with_circuit_breaker(
                    CircuitBreaker::default()
                        .with_consecutive_failures(Some(2))
                        .with_open_for(Duration::from_secs(2), Duration::from_secs(4)),
                ),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let running: Running = start(runner);
    wait_for("the breaker opened", Duration::from_secs(60), || async {
        stats.snapshot().circuit_opened >= 1
    })
    .await;
    // Open (and probing) for well past max.poll.interval.ms, while 30 more
    // messages arrive: the paused partitions must not fetch them until the
    // breaker closes and the assignment is resumed.
    let revoked = transport.revocations();
    for n in 30..60u32 {
        let m = Message::new(format!("{n}")).with_key(format!("k{}", n % 4));
        transport.publish(&source, m).await.expect("publish");
    }
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert_eq!(stats.snapshot().ok, 0);
    down.store(false, Ordering::SeqCst);
    wait_for("all 60 handled", Duration::from_secs(60), || async {
        handled.lock().expect("lock").len() == 60
    })
    .await;
    wait_for("all committed", Duration::from_secs(30), || async {
        backstop_test::Backend::pending(&backend, &source).await == 0
    })
    .await;
    // A member dropped for not polling learns it on a later poll: give it
    // time to show (about 2 s here when the stream is not polled while paused).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        transport.revocations(),
        revoked,
        "the member left its group while intake was paused"
    );
    let report = running.stop().await;
    let handled = handled.lock().expect("lock");
    let twice: Vec<_> = handled.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "handled again after the member left its group: {twice:?}"
    );
    assert_eq!(report.stats.ok, 60);
    assert_eq!(report.stats.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_concurrency_overlaps_keys_and_keeps_each_keys_order() {
    let brokers = common::brokers();
    common::require_broker(&brokers);
    let transport = backstop_kafka::KafkaTransport::new(
        common::test_config(&brokers).with_partition_concurrency(8),
    )
    .expect("config");
    let source = unique("keyed");
    let group = unique("keyed-group");
    transport
        .admin()
        .ensure_topic(&source, 1)
        .await
        .expect("create topic");
    const KEYS: u32 = 6;
    const N: u32 = 240;
    for n in 0..N {
        let m = Message::new(format!("{n}")).with_key(format!("k{}", n % KEYS));
        transport.publish(&source, m).await.expect("publish");
    }
    let seen: Seen = Arc::default();
    let running: Arc<Mutex<Vec<String>>> = Arc::default();
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let overlap = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, r, p, o) = (seen.clone(), running.clone(), peak.clone(), overlap.clone());
    let handler = handler_fn(move |payload: String, ctx: Context| {
        let (s, r, p, o) = (s.clone(), r.clone(), p.clone(), o.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let key = String::from_utf8_lossy(ctx.message().key().expect("key")).into_owned();
            {
                let mut r = r.lock().expect("lock");
                if r.contains(&key) {
                    o.store(true, SeqCst);
                }
                r.push(key.clone());
                p.fetch_max(r.len(), SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            {
                let mut r = r.lock().expect("lock");
                let i = r.iter().position(|k| *k == key).expect("running");
                r.remove(i);
            }
            // An immediate retry keeps its key busy: still in order.
            if ctx.attempt() == 1 && payload.ends_with('7') {
                return Err(HandlerError::transient("blip"));
            }
            s.lock()
                .expect("lock")
                .entry(key)
                .or_default()
                .push(payload.parse().expect("n"));
            Ok(())
        }
    });
    let run = start(no_tiers(&transport, &group, &source, handler, 16));
    wait_seen(&seen, N as usize).await;
    // Every offset is committed once all are handled (the watermark moves
    // past out-of-order completions).
    wait_for("committed to the end", Duration::from_secs(30), || async {
        transport
            .admin()
            .group_lag(&group, std::slice::from_ref(&source))
            .await
            .is_ok_and(|lag| lag.values().sum::<i64>() == 0)
    })
    .await;
    run.stop().await;
    assert!(
        !overlap.load(std::sync::atomic::Ordering::SeqCst),
        "two messages of one key were handled at once"
    );
    for (key, ns) in seen.lock().expect("lock").iter() {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, &sorted, "key {key} handled out of order");
        assert_eq!(ns.len(), (N / KEYS) as usize, "key {key}: each once");
    }
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (4..=KEYS as usize).contains(&peak),
        "one partition, several keys at once, never more than the keys (peak {peak})"
    );
}

/// A second member joins while the only partition's message is being
/// handled (eager rebalance): the revocation waits for that work, commits
/// past it, and the next owner starts after it: the message is handled once,
/// never by two members at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_waits_for_the_work_in_flight_on_its_partitions() {
    let backend = KafkaBackend::new(1);
    let transport = backstop_test::Backend::transport(&backend).await;
    let group = unique("revoke-group");
    let source = backstop_test::Backend::fresh_source(&backend, "revoke", &group, &[]).await;
    transport
        .publish(&source, Message::new("slow"))
        .await
        .expect("publish");
    let starts: Arc<Mutex<Vec<String>>> = Arc::default();
    let slow_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let member = |name: &'static str| {
        let (starts, slow_done) = (starts.clone(), slow_done.clone());
        let handler = handler_fn(move |payload: String, _: Context| {
            let (starts, slow_done) = (starts.clone(), slow_done.clone());
            async move {
                starts
                    .lock()
                    .expect("lock")
                    .push(format!("{name}:{payload}"));
                if payload == "slow" {
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    slow_done.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(())
            }
        });
        start(no_tiers(&transport, &group, &source, handler, 1))
    };
    let a = member("a");
    wait_for(
        "the slow message started",
        Duration::from_secs(60),
        || async { !starts.lock().expect("lock").is_empty() },
    )
    .await;
    let b = member("b");
    for n in 0..5 {
        transport
            .publish(&source, Message::new(format!("after-{n}")))
            .await
            .expect("publish");
    }
    wait_for("everything handled", Duration::from_secs(120), || async {
        let s = starts.lock().expect("lock");
        slow_done.load(std::sync::atomic::Ordering::SeqCst)
            && (0..5).all(|n| s.iter().any(|e| e.ends_with(&format!(":after-{n}"))))
    })
    .await;
    a.stop().await;
    b.stop().await;
    let starts = starts.lock().expect("lock").clone();
    let slow: Vec<&String> = starts.iter().filter(|e| e.ends_with(":slow")).collect();
    assert_eq!(slow.len(), 1, "handled once: {starts:?}");
}
