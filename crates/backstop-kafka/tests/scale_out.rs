//! Scale-out on Kafka: three workers of one consumer group, members
//! leaving (graceful stop) and joining every 3-6 s while 20,000 messages
//! flow (successes; one in ten fails once and takes a 200 ms delay tier;
//! one in twenty fails for good and goes to the DLQ), on librdkafka's mock
//! cluster and on a tansu of the test's own. Nothing is
//! lost; on each partition the first successes of the messages handled
//! straight from the source come in offset order; no partition (and so no
//! message) is handled by two members at once. Duplicates and the number
//! of membership changes are printed for the notes.

mod common;

use backstop_core::{
    Context, DeadLetterSource, DelayTier, HandlerError, HandlerOptions, RetryPolicy, Runner,
    SourceKind, handler_fn,
};
use backstop_kafka::{KafkaConfig, KafkaTransport, dlq_topic};
use backstop_test::crash::Rng;
use backstop_test::tansu::{self, Tansu};
use backstop_test::{Backend as _, Running, start, until_settled};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: u32 = 20_000;
const PARTITIONS: i32 = 4;
const MEMBERS: usize = 3;

/// `ok`, `once` (fails on its first attempt, then the tier) or `dead`:
/// the crash tests' mix.
fn fate(n: u32) -> &'static str {
    backstop_test::crash::kind(n)
}

/// What every member's handler writes down, under one lock.
#[derive(Default)]
struct Ledger {
    /// Members handling each (tier or source, partition) now, with counts.
    busy: HashMap<(String, i32), HashMap<usize, u32>>,
    /// Successes per message.
    successes: HashMap<u32, u32>,
    /// Per source partition, the offsets of first successes straight from
    /// the source, in the order they happened.
    order: HashMap<i32, Vec<i64>>,
    /// Two members on one partition at once, described.
    overlaps: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(l: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

fn lane(ctx: &Context) -> (String, i32) {
    let s = ctx.source();
    let kind = match &s.kind {
        SourceKind::Main => "source".to_owned(),
        SourceKind::RetryTier(t) => format!("tier {t}"),
        SourceKind::DeadLetter => "dlq".to_owned(),
    };
    (kind, s.partition.unwrap_or(-1))
}

impl Ledger {
    fn enter(&mut self, member: usize, lane: &(String, i32), n: u32) {
        let here = self.busy.entry(lane.clone()).or_default();
        if let Some(other) = here.iter().find(|(m, c)| **m != member && **c > 0) {
            self.overlaps.push(format!(
                "message {n}: member {member} on {lane:?} while member {} was",
                other.0
            ));
        }
        *here.entry(member).or_default() += 1;
    }

    fn leave(&mut self, member: usize, lane: &(String, i32)) {
        if let Some(c) = self.busy.get_mut(lane).and_then(|h| h.get_mut(&member)) {
            *c = c.saturating_sub(1);
        }
    }

    fn succeeded(&mut self, n: u32, ctx: &Context) {
        let count = self.successes.entry(n).or_default();
        *count += 1;
        let s = ctx.source();
        if *count == 1
            && s.kind == SourceKind::Main
            && let (Some(p), Some(o)) = (s.partition, s.offset)
        {
            self.order.entry(p).or_default().push(o);
        }
    }
}

fn handler(member: usize, ledger: Shared) -> impl backstop_core::Handler {
    handler_fn(move |body: String, ctx: Context| {
        let ledger = ledger.clone();
        async move {
            let n: u32 = body.parse().map_err(|_| HandlerError::permanent("nan"))?;
            let lane = lane(&ctx);
            lock(&ledger).enter(member, &lane, n);
            tokio::time::sleep(Duration::from_millis(4)).await;
            let result = match fate(n) {
                "dead" => Err(HandlerError::permanent("fails for ever")),
                "once" if ctx.delayed_attempts() == 0 => Err(HandlerError::transient("once")),
                _ => Ok(()),
            };
            let mut l = lock(&ledger);
            if result.is_ok() {
                l.succeeded(n, &ctx);
            }
            l.leave(member, &lane);
            result
        }
    })
}

fn member(base: &KafkaConfig, group: &str, source: &str, n: usize, ledger: &Shared) -> Running {
    // Fetches held 200 ms, not the other tests' 20 ms: three members
    // fetching eight partitions each every 20 ms kept tansu at 100 % CPU,
    // its answers slowed past the group's timeouts and the group
    // rebalanced without end.
    let config = base
        .clone()
        .with_fetch_wait_max(Duration::from_millis(200))
        .with_partition_concurrency(1);
    let transport = KafkaTransport::new(config).expect("config");
    let policy = RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([DelayTier::named("200ms", Duration::from_millis(200))]);
    start(
        Runner::builder(transport)
            .with_group(group)
            .with_handler_options(
                source,
                handler(n, ledger.clone()),
                HandlerOptions::default()
                    .with_concurrency(8)
                    .with_policy(policy),
            )
            .build()
            .expect("valid"),
    )
}

/// One membership change: a picked member leaves when another runs, else
/// a stopped one joins (the picked one if it is stopped). Returns what it
/// did.
async fn churn(
    slots: &mut [Option<Running>],
    rng: &mut Rng,
    join: impl Fn(usize) -> Running,
) -> &'static str {
    let running = slots.iter().filter(|s| s.is_some()).count();
    let pick = usize::try_from(rng.below(MEMBERS as u64)).unwrap_or(0);
    if running > 1
        && let Some(r) = slots.get_mut(pick).and_then(Option::take)
    {
        r.stop().await;
        return "left";
    }
    let stopped = if slots.get(pick).is_some_and(Option::is_none) {
        Some(pick)
    } else {
        slots.iter().position(Option::is_none)
    };
    match stopped.and_then(|i| slots.get_mut(i).map(|s| (i, s))) {
        Some((i, slot)) => {
            *slot = Some(join(i));
            "joined"
        }
        None => "kept",
    }
}

#[test]
fn members_joining_and_leaving_lose_nothing_and_keep_order() {
    tansu::run_against(Tansu::start("scale-out"), |broker| async move {
        let brokers = tansu::lock(&broker).brokers();
        // A long session: a heartbeat late on a busy machine must not find
        // its member's session expired (tansu 0.6 then keeps the group
        // from ever forming again: README, broker limits). With 6 s
        // sessions earlier runs rebalanced without end.
        let config = common::test_config(&brokers).with_property("session.timeout.ms", "30000");
        scale_out(
            "tansu",
            common::KafkaBackend::with_config(config, PARTITIONS),
        )
        .await;
        drop(broker);
    });
}

/// The same on librdkafka's mock cluster (in process, no CPU spent on a
/// broker's storage): tells Backstop's part from tansu's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_and_leaving_on_the_mock_cluster() {
    scale_out("mock cluster", common::KafkaBackend::mock(PARTITIONS)).await;
}

async fn scale_out(broker: &str, backend: common::KafkaBackend) {
    let brokers = backend.config().brokers().to_owned();
    let policy_tiers = [DelayTier::named("200ms", Duration::from_millis(200))];
    let group = "scale-out-group";
    let source = backend
        .fresh_source("scale-out", group, &policy_tiers)
        .await;
    common::produce_plain(&brokers, &source, (0..TOTAL).map(|n| n.to_string()));
    let ledger: Shared = Arc::default();
    let join = |n: usize| member(backend.config(), group, &source, n, &ledger);
    let mut slots: Vec<Option<Running>> = (0..MEMBERS).map(|n| Some(join(n))).collect();

    let want_ok = (0..TOTAL).filter(|n| fate(*n) != "dead").count();
    let expected_dead: BTreeSet<u32> = (0..TOTAL).filter(|n| fate(*n) == "dead").collect();
    let transport = backend.transport().await;
    let dlq = dlq_topic(group, &source);
    let dead = || async {
        transport
            .browse(&dlq, 100_000)
            .await
            .map(|d| {
                d.iter()
                    .filter_map(|m| std::str::from_utf8(m.payload()).ok()?.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .unwrap_or_default()
    };
    let handled = || lock(&ledger).successes.len();

    // Membership changes every 3-6 s while the stream flows.
    let mut rng = Rng::seeded();
    let mut changes = Vec::new();
    let started = Instant::now();
    while handled() < want_ok && changes.len() < 20 {
        tokio::time::sleep(Duration::from_millis(3_000 + rng.below(3_000))).await;
        if handled() >= want_ok {
            break;
        }
        changes.push(churn(&mut slots, &mut rng, join).await);
        eprintln!(
            "{:?}: {} handled, member {:?}",
            started.elapsed(),
            handled(),
            changes.last()
        );
    }
    for (n, slot) in slots.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = Some(join(n));
        }
    }
    until_settled(
        "every message handled or dead-lettered, nothing pending",
        Duration::from_secs(120),
        || async {
            let (h, d, p) = (
                handled(),
                dead().await.len(),
                backend.pending(&source).await,
            );
            (
                h == want_ok && d >= expected_dead.len() && p == 0,
                format!("{h}/{want_ok} handled, {d} dead letters, {p} pending"),
            )
        },
    )
    .await;
    let took = started.elapsed();
    for r in slots.into_iter().flatten() {
        r.stop().await;
    }

    let dead_now = dead().await;
    let l = lock(&ledger);
    assert!(
        l.overlaps.is_empty(),
        "handled by two members at once: {:?}",
        l.overlaps.iter().take(10).collect::<Vec<_>>()
    );
    for (p, offsets) in &l.order {
        let out_of_order: Vec<_> = offsets.windows(2).filter(|w| w[0] >= w[1]).collect();
        assert!(
            out_of_order.is_empty(),
            "partition {p}: first successes out of offset order at {:?}",
            out_of_order.iter().take(5).collect::<Vec<_>>()
        );
    }
    let distinct: BTreeSet<u32> = dead_now.iter().copied().collect();
    assert_eq!(
        distinct, expected_dead,
        "every permanent failure in the DLQ"
    );
    let duplicates: u32 = l.successes.values().map(|c| c - 1).sum();
    let mid_stream = changes.iter().filter(|c| **c != "kept").count();
    assert!(
        mid_stream >= 3,
        "the members changed only {mid_stream} times while messages flowed"
    );
    eprintln!(
        "scale-out ({broker}, {PARTITIONS} partitions, {MEMBERS} members): {TOTAL} messages in \
         {took:?}, {mid_stream} membership changes mid-stream ({changes:?}), 0 lost, order kept, \
         no overlap; {duplicates} duplicate successes, {} extra dead letters",
        dead_now.len() - expected_dead.len()
    );
}
