//! The outbox against an in-process publisher whose behaviour the test
//! controls: group commit, per-key order under failures, the dead table, caps,
//! restart, direct-with-fallback, metrics.

use backstop_core::{
    Backoff, Message, PublishError, Publisher, TransportError, TransportErrorKind,
};
use backstop_outbox::{Mode, OutboxConfig, OutboxInspector, OutboxPublisher, Sent, WhenFull};
use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Published = Arc<Mutex<Vec<(String, Option<Bytes>, Message)>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up,
    Down,
    Hang,
}

/// A broker stand-in: up, down (connection lost), or never confirming; can fail
/// a share of publishes at random; refuses payloads `too-big` as invalid.
#[derive(Clone)]
struct TestBroker {
    state: Arc<Mutex<State>>,
    flaky_percent: Arc<AtomicU32>,
    published: Published,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    /// Publishes of a `boom` payload left to panic.
    panics: Arc<AtomicU32>,
}

impl TestBroker {
    fn new(state: State) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            flaky_percent: Arc::new(AtomicU32::new(0)),
            published: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            panics: Arc::default(),
        }
    }

    fn set(&self, state: State) {
        *self.state.lock().expect("lock") = state;
    }

    fn published(&self) -> Vec<(String, Option<Bytes>, Message)> {
        self.published.lock().expect("lock").clone()
    }

    fn payloads(&self) -> Vec<String> {
        self.published()
            .iter()
            .map(|(_, _, m)| String::from_utf8_lossy(m.payload()).into_owned())
            .collect()
    }
}

impl Publisher for TestBroker {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        if message.payload() == "boom"
            && self
                .panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            panic!("the publisher blew up");
        }
        let state = *self.state.lock().expect("lock");
        let flaky = fastrand::u32(0..100) < self.flaky_percent.load(Ordering::SeqCst);
        let result = if message.payload() == "too-big" {
            Err(TransportErrorKind::Invalid)
        } else {
            match state {
                State::Hang => {
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                State::Down => Err(TransportErrorKind::ConnectionLost),
                State::Up if flaky => Err(TransportErrorKind::Rejected),
                State::Up => Ok(()),
            }
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(()) => {
                self.published.lock().expect("lock").push((
                    destination.to_owned(),
                    message.key().cloned(),
                    message,
                ));
                Ok(())
            }
            Err(kind) => Err(PublishError::new(
                TransportError::new(kind, "test broker says no"),
                message,
            )),
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "backstop-outbox-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("outbox.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fast(config: OutboxConfig) -> OutboxConfig {
    config.with_relay_backoff(Backoff::exponential(
        Duration::from_millis(1),
        Duration::from_millis(10),
    ))
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_share_commits() {
    let dir = TempDir::new("group");
    let broker = TestBroker::new(State::Hang);
    let outbox = Arc::new(
        OutboxPublisher::open(broker.clone(), OutboxConfig::new(dir.db()))
            .await
            .unwrap(),
    );
    let sends = 1000;
    let mut tasks = Vec::new();
    for n in 0..sends {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            outbox.send("orders", Message::new(format!("{n}"))).await
        }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Ok(Sent::Stored { .. })));
    }
    let stats = outbox.stats();
    assert_eq!(stats.pending, sends);
    assert!(
        stats.commits * 4 < sends,
        "{} commits for {sends} concurrent sends: group commit should share fsyncs",
        stats.commits
    );
    let on_disk = OutboxInspector::open(dir.db()).unwrap().status().unwrap();
    assert_eq!(on_disk.pending, sends, "every accepted send is in the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_order_holds_through_failures_with_keys_in_parallel() {
    let dir = TempDir::new("order");
    let broker = TestBroker::new(State::Up);
    broker.flaky_percent.store(30, Ordering::SeqCst);
    let outbox = Arc::new(
        OutboxPublisher::open(broker.clone(), fast(OutboxConfig::new(dir.db())))
            .await
            .unwrap(),
    );
    let keys: u64 = 8;
    let per_key: u32 = 100;
    let mut tasks = Vec::new();
    for k in 0..keys {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per_key {
                let m = Message::new(format!("{k}:{n}")).with_key(format!("key-{k}"));
                outbox.send("orders", m).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(outbox.wait_empty(WAIT).await, "relay drained");
    let stats = outbox.stats();
    assert!(
        stats.publish_failures > 0,
        "the broker failed some publishes"
    );
    assert_eq!(stats.delivered, keys * u64::from(per_key));
    let mut next = vec![0u32; usize::try_from(keys).unwrap()];
    for p in broker.payloads() {
        let (k, n) = p.split_once(':').unwrap();
        let (k, n): (usize, u32) = (k.parse().unwrap(), n.parse().unwrap());
        assert_eq!(n, next[k], "key {k} out of order");
        next[k] += 1;
    }
    assert!(
        next.iter().all(|n| *n == per_key),
        "every message published once"
    );
    assert!(
        broker.max_in_flight.load(Ordering::SeqCst) > 1,
        "several keys in flight at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_entry_moves_to_the_dead_table_and_its_key_goes_on() {
    let dir = TempDir::new("dead");
    let broker = TestBroker::new(State::Up);
    let outbox = OutboxPublisher::open(broker.clone(), fast(OutboxConfig::new(dir.db())))
        .await
        .unwrap();
    for p in ["first", "too-big", "third"] {
        outbox
            .send("orders", Message::new(p).with_key("k"))
            .await
            .unwrap();
    }
    assert!(outbox.wait_empty(WAIT).await);
    assert_eq!(broker.payloads(), ["first", "third"]);
    assert_eq!(outbox.stats().dead, 1);
    let inspector = OutboxInspector::open(dir.db()).unwrap();
    let dead = inspector.dead(10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.payload(), "too-big");
    assert!(
        dead[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("test broker says no"),
        "{:?}",
        dead[0].error
    );
    assert_eq!(inspector.status().unwrap().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_fails_fast_and_loses_nothing_accepted() {
    let dir = TempDir::new("full");
    let broker = TestBroker::new(State::Down);
    let outbox = OutboxPublisher::open(
        broker.clone(),
        fast(OutboxConfig::new(dir.db())).with_max_pending_entries(10),
    )
    .await
    .unwrap();
    let mut accepted = Vec::new();
    for n in 0..10 {
        let m = Message::new(format!("{n}"));
        accepted.push(m.id().unwrap().to_owned());
        outbox.send("orders", m).await.unwrap();
    }
    let refused = Message::new("eleventh").with_header("tenant", "acme");
    let e = outbox
        .send("orders", refused.clone())
        .await
        .expect_err("the cap is reached");
    assert!(e.is_full(), "{e}");
    assert!(e.to_string().contains("max_pending_entries"), "{e}");
    assert_eq!(
        e.into_message(),
        refused,
        "the refused message is handed back"
    );
    broker.set(State::Up);
    assert!(outbox.wait_empty(WAIT).await);
    let mut published: Vec<String> = broker
        .published()
        .iter()
        .map(|(_, _, m)| m.id().unwrap().to_owned())
        .collect();
    published.sort();
    accepted.sort();
    assert_eq!(published, accepted, "every accepted send arrived once");
    outbox
        .send("orders", Message::new("room again"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_can_wait_for_room() {
    let dir = TempDir::new("wait");
    let broker = TestBroker::new(State::Down);
    let outbox = Arc::new(
        OutboxPublisher::open(
            broker.clone(),
            fast(OutboxConfig::new(dir.db()))
                .with_max_pending_entries(2)
                .with_when_full(WhenFull::Wait(Duration::from_secs(20))),
        )
        .await
        .unwrap(),
    );
    outbox.send("orders", Message::new("1")).await.unwrap();
    outbox.send("orders", Message::new("2")).await.unwrap();
    let waiting = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.send("orders", Message::new("3")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the third send waits for room");
    broker.set(State::Up);
    assert!(waiting.await.unwrap().is_ok());
    assert!(outbox.wait_empty(WAIT).await);
    let mut got = broker.payloads();
    got.sort();
    assert_eq!(got, ["1", "2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_what_was_pending() {
    let dir = TempDir::new("restart");
    let down = TestBroker::new(State::Down);
    let outbox = OutboxPublisher::open(down.clone(), fast(OutboxConfig::new(dir.db())))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..50usize {
        let m = Message::new(format!("{n}")).with_key(format!("k{}", n % 3));
        ids.push(m.id().unwrap().to_owned());
        outbox.send("orders", m).await.unwrap();
    }
    let report = outbox.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.left_pending, 50);
    assert!(!report.flushed);
    let listed = OutboxInspector::open(dir.db()).unwrap().pending(5).unwrap();
    let listed_ids: Vec<&str> = listed.iter().map(|e| e.message.id().unwrap()).collect();
    assert_eq!(
        listed_ids,
        ids[..5].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(listed.iter().all(|e| e.destination == "orders"));
    assert!(
        listed.iter().any(|e| e.attempts > 0
            && e.error
                .as_deref()
                .unwrap_or_default()
                .contains("test broker says no")),
        "failed attempts are recorded: {listed:?}"
    );

    let up = TestBroker::new(State::Up);
    let outbox = OutboxPublisher::open(up.clone(), fast(OutboxConfig::new(dir.db())))
        .await
        .unwrap();
    assert!(outbox.wait_empty(WAIT).await);
    let report = outbox.shutdown(Duration::from_secs(5)).await;
    assert!(report.flushed);
    for k in 0..3 {
        let key = format!("k{k}");
        let got: Vec<String> = up
            .published()
            .iter()
            .filter(|(_, key_, _)| key_.as_deref() == Some(key.as_bytes()))
            .map(|(_, _, m)| m.id().unwrap().to_owned())
            .collect();
        let want: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(n, _)| n % 3 == k)
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(got, want, "key {key}: same ids, in send order");
    }
    assert_eq!(
        OutboxInspector::open(dir.db())
            .unwrap()
            .status()
            .unwrap()
            .pending,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_with_fallback_publishes_directly_spools_on_failure_and_keeps_key_order() {
    let dir = TempDir::new("direct");
    let broker = TestBroker::new(State::Up);
    let outbox = OutboxPublisher::open(
        broker.clone(),
        OutboxConfig::new(dir.db())
            .with_mode(Mode::DirectWithFallback {
                timeout: Duration::from_millis(300),
            })
            // Slow relay retries, so a spooled entry stays pending for a while.
            .with_relay_backoff(Backoff::exponential(
                Duration::from_secs(2),
                Duration::from_secs(2),
            ))
            .with_relay_publish_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let sent = outbox
        .send("orders", Message::new("direct").with_key("a"))
        .await
        .unwrap();
    assert_eq!(sent, Sent::Published);

    broker.set(State::Down);
    let sent = outbox
        .send("orders", Message::new("spooled").with_key("a"))
        .await
        .unwrap();
    assert!(matches!(sent, Sent::Stored { .. }), "{sent:?}");

    broker.set(State::Hang);
    let started = tokio::time::Instant::now();
    let sent = outbox
        .send("orders", Message::new("timed out").with_key("b"))
        .await
        .unwrap();
    assert!(matches!(sent, Sent::Stored { .. }), "{sent:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    broker.set(State::Up);
    // Key `a` has an entry on disk: the next `a` queues behind it.
    let sent = outbox
        .send("orders", Message::new("after").with_key("a"))
        .await
        .unwrap();
    assert!(matches!(sent, Sent::Stored { .. }), "{sent:?}");
    let sent = outbox
        .send("orders", Message::new("other key").with_key("c"))
        .await
        .unwrap();
    assert_eq!(sent, Sent::Published);
    assert!(outbox.wait_empty(WAIT).await);
    let a: Vec<String> = broker
        .published()
        .iter()
        .filter(|(_, k, _)| k.as_deref() == Some(&b"a"[..]))
        .map(|(_, _, m)| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    assert_eq!(a, ["direct", "spooled", "after"]);
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_report_pending_age_and_failures() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let dir = TempDir::new("metrics");
    let broker = TestBroker::new(State::Down);
    let outbox = OutboxPublisher::open(
        broker.clone(),
        fast(OutboxConfig::new(dir.db())).with_name("orders-outbox"),
    )
    .await
    .unwrap();
    for n in 0..3 {
        outbox
            .send("orders", Message::new(format!("{n}")))
            .await
            .unwrap();
    }
    let failed = Arc::new(AtomicBool::new(false));
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if outbox.stats().publish_failures >= 3 {
            failed.store(true, Ordering::SeqCst);
            break;
        }
    }
    assert!(failed.load(Ordering::SeqCst), "the relay tried and failed");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let values = snap.snapshot().into_vec();
    let find = |name: &str| -> &DebugValue {
        values
            .iter()
            .find(|(k, _, _, _)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "outbox" && l.value() == "orders-outbox")
            })
            .map(|(_, _, _, v)| v)
            .unwrap_or_else(|| panic!("{name} not recorded"))
    };
    assert_eq!(
        find("backstop_outbox_pending"),
        &DebugValue::Gauge(3.0.into())
    );
    match find("backstop_outbox_oldest_age_seconds") {
        DebugValue::Gauge(age) => assert!(age.into_inner() >= 0.5, "age {age}"),
        other => panic!("{other:?}"),
    }
    match find("backstop_outbox_publish_failures_total") {
        DebugValue::Counter(n) => assert!(*n >= 3, "{n}"),
        other => panic!("{other:?}"),
    }
}

/// Writes a fixed context, as a propagator writes the current span's.
#[derive(Debug)]
struct FixedTrace;

impl backstop_core::TracePropagation for FixedTrace {
    fn on_consume(&self, _: &backstop_core::Headers, _: &tracing::Span) {}
    fn on_publish(&self, headers: &mut backstop_core::Headers, _: &tracing::Span) {
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_carry_the_senders_trace_context_unless_they_have_one() {
    let dir = TempDir::new("trace");
    let broker = TestBroker::new(State::Up);
    let outbox = OutboxPublisher::open(
        broker.clone(),
        fast(OutboxConfig::new(dir.db())).with_trace_propagation(Arc::new(FixedTrace)),
    )
    .await
    .unwrap();
    let own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    outbox.send("orders", Message::new("plain")).await.unwrap();
    outbox
        .send(
            "orders",
            Message::new("traced").with_header("traceparent", own),
        )
        .await
        .unwrap();
    assert!(outbox.wait_empty(WAIT).await);
    outbox.shutdown(Duration::from_secs(5)).await;
    let by_payload = |p: &str| {
        broker
            .published()
            .into_iter()
            .find(|(_, _, m)| m.payload() == p.as_bytes())
            .map(|(_, _, m)| m.headers().get_str("traceparent").map(str::to_owned))
            .expect("published")
    };
    assert_eq!(
        by_payload("plain").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "the sender's context, stored and published"
    );
    assert_eq!(
        by_payload("traced").as_deref(),
        Some(own),
        "an existing one is kept"
    );
}

/// A publisher that panics fails that attempt like any error: the entry is
/// retried, its key's later entries wait and then follow in order, and the
/// outbox drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_publisher_neither_loses_nor_blocks_a_key() {
    let dir = TempDir::new("panic");
    let broker = TestBroker::new(State::Up);
    broker.panics.store(2, Ordering::SeqCst);
    let outbox = OutboxPublisher::open(broker.clone(), fast(OutboxConfig::new(dir.db())))
        .await
        .unwrap();
    for body in ["before", "boom", "after"] {
        outbox
            .send("orders", Message::new(body).with_key("k"))
            .await
            .unwrap();
    }
    assert!(outbox.wait_empty(WAIT).await, "the relay drained");
    assert_eq!(broker.payloads(), ["before", "boom", "after"], "in order");
    assert_eq!(broker.panics.load(Ordering::SeqCst), 0, "it panicked twice");
    let report = outbox.shutdown(WAIT).await;
    assert!(report.flushed);
    assert_eq!(report.left_pending, 0);
}
