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
use backstop_test::tansu::{self, Tansu};
use backstop_test::{Backend as _, Harness, eventually, start};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: u32 = 2_000;

/// One in ten fails once (to the tier and back), one in fifty always.
fn fate(n: u32) -> (bool, bool) {
    (n.is_multiple_of(10), n % 50 == 1)
}

/// When each permanent failure was handled (to tell, for a dead letter
/// missing after the broker's kill, whether it was written before it).
static DEAD_CALLS: Mutex<Vec<(u32, Instant)>> = Mutex::new(Vec::new());

type Seen = Arc<Mutex<HashMap<u32, u32>>>;

/// Two partitions on the test's own broker, with a session (15 s) that
/// outlasts each fault: on tansu 0.6 a member whose heartbeat arrives
/// after its session expired (held by a partition, or sent to a broker
/// back from a restart) is removed but stays the group's leader, and the
/// group never forms again (README, broker limits).
fn backend(brokers: &str) -> common::KafkaBackend {
    let config = common::test_config(brokers).with_property("session.timeout.ms", "15000");
    common::KafkaBackend::with_config(config, 2)
}

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
    common::produce_plain(brokers, &h.source, (0..TOTAL).map(|n| n.to_string()));
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
                DEAD_CALLS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((n, Instant::now()));
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

#[test]
fn kill_nine_of_the_broker_mid_stream_loses_nothing() {
    tansu::run_against(Tansu::start("broker-kill"), broker_kill);
}

async fn broker_kill(broker: Arc<Mutex<Tansu>>) {
    let brokers = tansu::lock(&broker).brokers();
    let backend = backend(&brokers);
    let (h, seen, running) = stream(&backend, &brokers, "broker-kill").await;
    let count = || seen.lock().expect("lock").len();
    eventually("300 handled", Duration::from_secs(120), || async {
        count() >= 300
    })
    .await;

    tansu::lock(&broker).kill9();
    let killed = Instant::now();
    let at_kill = count();
    let check = tokio::time::timeout(Duration::from_secs(10), h.transport.check()).await;
    assert!(
        !matches!(check, Ok(Ok(()))),
        "the broker check fails while the broker is down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = Instant::now();
    tansu::lock(&broker).restart();
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
    backstop_test::until_settled(
        "every message handled or dead-lettered, nothing pending",
        Duration::from_secs(120),
        || async {
            let ok = count();
            let (dead, pending) = (dead_now().await, backend.pending(&h.source).await);
            (
                ok == want_ok && pending == 0,
                format!("{ok}/{want_ok} handled, {dead} dead letters, {pending} pending"),
            )
        },
    )
    .await;
    missing_dead_letters(&h.transport, &dlq, &expected_dead, killed).await;
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

/// Waits (restarting on progress) until every expected dead letter can be
/// read; when some never can, fails naming each with when its message was
/// failed, relative to the broker's kill.
async fn missing_dead_letters(
    transport: &backstop_kafka::KafkaTransport,
    dlq: &str,
    expected: &[u32],
    killed: Instant,
) {
    let missing = || async {
        let dead = transport.browse(dlq, 100_000).await.unwrap_or_default();
        let found: std::collections::BTreeSet<u32> = dead
            .iter()
            .filter_map(|m| std::str::from_utf8(m.payload()).ok()?.parse().ok())
            .collect();
        expected
            .iter()
            .filter(|n| !found.contains(n))
            .copied()
            .collect::<Vec<u32>>()
    };
    // A read shortly after the stream settled may still miss the last
    // letters: poll while the missing set shrinks, 30 s without change at most.
    let mut last = missing().await;
    let mut quiet = Instant::now();
    while !last.is_empty() && quiet.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = missing().await;
        if now != last {
            quiet = Instant::now();
        }
        last = now;
    }
    if last.is_empty() {
        return;
    }
    let gone = missing().await;
    let calls = DEAD_CALLS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let when: Vec<String> = gone
        .iter()
        .map(|n| {
            let at: Vec<String> = calls
                .iter()
                .filter(|(c, _)| c == n)
                .map(|(_, t)| {
                    if *t < killed {
                        format!("-{:?}", killed.duration_since(*t))
                    } else {
                        format!("+{:?}", t.duration_since(killed))
                    }
                })
                .collect();
            format!("{n} (failed at {at:?} from the kill)")
        })
        .collect();
    panic!("dead letters lost: {when:?}");
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
    let backend = backend(&broker.brokers());
    let (h, seen, running) = stream(&backend, &broker.brokers(), "network").await;
    let count = || seen.lock().expect("lock").len();
    progress_past(&seen, 200, "started").await;

    proxy.set_delay(Duration::from_millis(50));
    let slowed = progress_past(&seen, count() + 20, "progress under a 50 ms delay").await;
    proxy.set_delay(Duration::ZERO);

    proxy.blackhole(true);
    let (check, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(5), h.transport.check()),
        tokio::time::sleep(Duration::from_secs(5))
    );
    assert!(
        !matches!(check, Ok(Ok(()))),
        "the broker check fails while nothing gets through"
    );
    let held = count();
    proxy.blackhole(false);
    let healed = progress_past(&seen, held, "progress after the blackhole").await;

    let at = count();
    proxy.cut();
    let reconnected = progress_past(&seen, at + 20, "progress after the cut").await;

    let want_ok = (0..TOTAL).filter(|n| !fate(*n).1).count();
    let expected_dead = (0..TOTAL).filter(|n| fate(*n).1).count();
    let dlq = dlq_topic(&h.group, &h.source);
    // The wait restarts while anything moves: a loaded machine is slow,
    // not wrong; a stall names what is left.
    backstop_test::until_settled(
        "every message handled or dead-lettered, nothing pending",
        Duration::from_secs(120),
        || async {
            let ok = count();
            let dead = h
                .transport
                .browse(&dlq, 100_000)
                .await
                .map_or(0, |d| d.len());
            let pending = backend.pending(&h.source).await;
            (
                ok == want_ok && dead >= expected_dead && pending == 0,
                format!("{ok}/{want_ok} handled, {dead} dead letters, {pending} pending"),
            )
        },
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

/// Records of a topic created the way DLQ topics are (kept for ever) are
/// still there after the broker restarts: tansu 0.6 deleted every record
/// of a `retention.ms=-1` topic at its maintenance, which runs at start.
#[test]
fn a_kept_topic_keeps_its_records_across_a_broker_restart() {
    tansu::run_against(Tansu::start("kept-topic"), kept_topic);
}

async fn kept_topic(broker: Arc<Mutex<Tansu>>) {
    let brokers = tansu::lock(&broker).brokers();
    let transport =
        backstop_kafka::KafkaTransport::new(common::test_config(&brokers)).expect("config");
    let topic = "kept";
    transport
        .admin()
        .ensure_kept_topic(topic, 2)
        .await
        .expect("created");
    for n in 0..5 {
        transport
            .publisher()
            .send(topic, backstop_core::Message::new(format!("letter {n}")))
            .await
            .expect("acknowledged");
    }
    tansu::lock(&broker).restart();
    let read = backstop_kafka::KafkaTransport::new(common::test_config(&brokers))
        .expect("config")
        .browse(topic, 100)
        .await
        .expect("read after the restart");
    assert_eq!(read.len(), 5, "every record kept across the restart");
}
