//! The production worker (`examples/worker.rs`, built from config) as a
//! process against RabbitMQ and against tansu: a known mix of messages (ok,
//! transient, transient through a delay tier, permanent, poison) gives exactly
//! the counters and histogram counts scraped from `/metrics`, the backlog
//! gauges settle, failures are logged as JSON with message id, source,
//! attempt and outcome, `/readyz` turns not-ready while the broker is down
//! and ready again when it is back (while `/healthz` stays alive), and SIGTERM
//! drains in-flight work: exit 0, every message either handled or still
//! waiting in the broker.

use backstop::kafka::{KafkaConfig, KafkaTransport};
use backstop::message::names;
use backstop::rabbitmq::{QueueType, RabbitConfig, RabbitTransport, dlq_queue, tier_queue};
use backstop::{DeadLetterSource, DelayTier, Message, Publisher, Subscription};
use backstop_examples::demo::{Behaviour, DemoOrder};
use backstop_test::eventually_every;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn unique(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{t}-{}", std::process::id())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn order(id: u64, behaviour: Behaviour) -> Message {
    Message::new(serde_json::to_vec(&DemoOrder { id, behaviour }).expect("json"))
        .with_key(format!("customer-{}", id % 4))
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The mix every test publishes, and what it must add up to.
struct Mix;

impl Mix {
    const OK: u64 = 20;
    /// Fail twice, succeed on the third immediate attempt.
    const FLAKY: u64 = 5;
    /// Fail three times (every immediate attempt), pass through the 1s tier.
    const DELAYED: u64 = 3;
    const PERMANENT: u64 = 4;
    const POISON: u64 = 3;

    fn messages() -> Vec<Message> {
        let mut out = Vec::new();
        let mut id = 0;
        let mut next = |b: Behaviour, n: u64, out: &mut Vec<Message>| {
            for _ in 0..n {
                id += 1;
                out.push(order(id, b));
            }
        };
        next(Behaviour::Ok, Self::OK, &mut out);
        next(Behaviour::Flaky { failures: 2 }, Self::FLAKY, &mut out);
        next(Behaviour::Flaky { failures: 3 }, Self::DELAYED, &mut out);
        next(Behaviour::Permanent, Self::PERMANENT, &mut out);
        // One of them comes with a W3C trace context.
        if let Some(last) = out.pop() {
            out.push(last.with_header(names::TRACEPARENT, TRACEPARENT));
        }
        for i in 0..Self::POISON {
            out.push(Message::new(format!("{{ not json {i}")));
        }
        out
    }

    fn ok() -> u64 {
        Self::OK + Self::FLAKY + Self::DELAYED
    }
    fn dead_lettered() -> u64 {
        Self::PERMANENT + Self::POISON
    }
    fn transient_errors() -> u64 {
        Self::FLAKY * 2 + Self::DELAYED * 3
    }
    fn retried() -> u64 {
        // Immediate retries: two per flaky message, two per delayed one
        // before its tier hop.
        Self::FLAKY * 2 + Self::DELAYED * 2
    }
    fn invocations() -> u64 {
        Self::ok() + Self::transient_errors() + Self::PERMANENT + Self::POISON
    }
}

/// A running `demo-worker` process.
struct Worker {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Worker {
    fn start(dir: &Path, source: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let config = format!("{config}\n[http]\nlisten = \"127.0.0.1:{port}\"\n");
        let path = dir.join("worker.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.join("worker.log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo-worker"));
        cmd.env("BACKSTOP_CONFIG", &path)
            .env("ORDERS_SOURCE", source)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start demo-worker");
        Self { child, port, log }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    }

    async fn status(&self, path: &str) -> u16 {
        self.get(path).await.map_or(0, |(s, _)| s)
    }

    async fn metrics(&self) -> Metrics {
        Metrics(
            self.get("/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default(),
        )
    }

    fn logs(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self, why: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker not ready ({why}): /readyz says {:?}\nworker log:\n{}",
                self.get("/readyz").await,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A `/metrics` scrape.
struct Metrics(String);

impl Metrics {
    /// The value of the series `name` whose labels include `labels`
    /// (summed when several match).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (n, l) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                continue;
            }
            let have: BTreeMap<&str, &str> = l
                .trim_end_matches('}')
                .split("\",")
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
                let v: f64 = value.parse().unwrap_or(f64::NAN);
                found = Some(found.unwrap_or(0.0) + v);
            }
        }
        found
    }

    fn n(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(name, labels).unwrap_or(0.0) as u64
    }
}

/// Asserts the counters and histogram counts of one source after the mix.
fn assert_mix(m: &Metrics, source: &str) {
    let out = |o: &str| {
        m.n(
            "backstop_messages_total",
            &[("source", source), ("outcome", o)],
        )
    };
    let err = |c: &str| {
        m.n(
            "backstop_handler_errors_total",
            &[("source", source), ("class", c)],
        )
    };
    assert_eq!(out("ok"), Mix::ok(), "ok\n{}", m.0);
    assert_eq!(out("dead_lettered"), Mix::dead_lettered(), "dead_lettered");
    assert_eq!(out("retried"), Mix::retried(), "retried");
    assert_eq!(out("delayed"), Mix::DELAYED, "delayed");
    assert_eq!(out("failed_to_route"), 0, "failed_to_route");
    assert_eq!(
        err("transient"),
        Mix::transient_errors(),
        "transient errors"
    );
    assert_eq!(err("permanent"), Mix::PERMANENT, "permanent errors");
    assert_eq!(err("poison"), Mix::POISON, "poison errors");
    assert_eq!(err("timeout") + err("panic"), 0, "no timeouts or panics");
    assert_eq!(
        m.n(
            "backstop_handler_duration_seconds_count",
            &[("source", source)]
        ),
        Mix::invocations(),
        "one handler-duration observation per invocation"
    );
    let buckets = m.n(
        "backstop_handler_duration_seconds_bucket",
        &[("source", source), ("le", "+Inf")],
    );
    assert_eq!(buckets, Mix::invocations(), "+Inf bucket = count");
    assert!(
        m.get(
            "backstop_handler_duration_seconds_bucket",
            &[("source", source), ("le", "1.5")]
        )
        .is_some(),
        "the 1.5 s bucket the p95 alert needs exists"
    );
    assert_eq!(
        m.n("backstop_end_to_end_seconds_count", &[("source", source)]),
        Mix::ok() + Mix::dead_lettered(),
        "end to end: one observation per final ok or dead letter"
    );
    assert_eq!(m.n("backstop_inflight", &[]), 0, "nothing in flight");
    assert!(m.n("backstop_worker_start_time_seconds", &[]) > 1_700_000_000);
}

/// Every failure is logged as JSON inside its `backstop.handle` span: message
/// id, source, attempt and outcome.
fn assert_failure_logs(w: &Worker, source: &str) {
    let logs = w.logs();
    assert!(!logs.is_empty(), "JSON logs:\n{}", w.log_text());
    let dead: Vec<&serde_json::Value> = logs
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("dead-lettered to"))
        })
        .collect();
    assert_eq!(
        dead.len() as u64,
        Mix::dead_lettered(),
        "one line per dead letter:\n{}",
        w.log_text()
    );
    for l in &dead {
        let span = &l["span"];
        assert_eq!(span["name"], "backstop.handle", "{l}");
        assert_eq!(span["messaging.destination.name"], source, "{l}");
        assert!(
            span["messaging.message.id"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{l}"
        );
        assert!(
            span["backstop.attempt"].as_u64().is_some_and(|a| a >= 1),
            "{l}"
        );
        assert_eq!(span["backstop.outcome"], "dead_lettered", "{l}");
        assert!(l["fields"]["class"].is_string(), "{l}");
    }
    let traced: Vec<_> = dead
        .iter()
        .filter(|l| l["span"]["trace_id"] == TRACE_ID)
        .collect();
    assert_eq!(
        traced.len(),
        1,
        "the traced message's log line carries its trace id"
    );
    let failed = logs
        .iter()
        .filter(|l| l["fields"]["message"] == "attempt failed")
        .count() as u64;
    assert_eq!(
        failed,
        Mix::transient_errors() + Mix::PERMANENT + Mix::POISON,
        "every failed attempt is logged"
    );
}

/// The dead letter of the traced message kept its `traceparent`.
fn assert_trace_kept(dead: &[Message]) {
    let kept = dead
        .iter()
        .filter(|m| m.headers().get_str(names::TRACEPARENT) == Some(TRACEPARENT))
        .count();
    assert_eq!(kept, 1, "the DLQ copy carries the same traceparent");
}

/// The final JSON line: `worker stopped: in-flight work drained` with its
/// counters.
fn stopped_ok(w: &Worker) -> u64 {
    let logs = w.logs();
    let line = logs
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("worker stopped"))
        })
        .unwrap_or_else(|| panic!("no stop line:\n{}", w.log_text()));
    assert_eq!(
        line["fields"]["message"], "worker stopped: in-flight work drained",
        "{line}"
    );
    line["fields"]["ok"].as_u64().expect("ok counter")
}

fn slow_batch(n: u64) -> Vec<Message> {
    (0..n)
        .map(|i| order(10_000 + i, Behaviour::Slow { ms: 300 }))
        .collect()
}

const SLOW: u64 = 60;

/// Waits until the mix is handled and the backlog gauges have settled
/// (`backlog`: the broker's own gauge of the main source is 0), then checks
/// the counters, the DLQ's age, the logs and the traced dead letter.
async fn check_mix<T: DeadLetterSource>(
    w: &Worker,
    t: &T,
    source: &str,
    dlq: &str,
    backlog: (&str, f64),
) {
    eventually_every(
        "the mix is handled and the backlog gauges settle",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            let m = w.metrics().await;
            let out = |o: &str| {
                m.n(
                    "backstop_messages_total",
                    &[("source", source), ("outcome", o)],
                )
            };
            out("ok") == Mix::ok()
                && out("dead_lettered") == Mix::dead_lettered()
                && m.get("backstop_dlq_depth", &[("dlq", dlq)]) == Some(Mix::dead_lettered() as f64)
                && m.get(backlog.0, &[("source", source)]) == Some(backlog.1)
                && m.get(
                    "backstop_retry_backlog",
                    &[("source", source), ("tier", "1s")],
                ) == Some(0.0)
        },
    )
    .await;
    let m = w.metrics().await;
    assert_mix(&m, source);
    let age = m
        .get("backstop_dlq_oldest_age_seconds", &[("dlq", dlq)])
        .expect("DLQ age exported");
    assert!(age > 0.0 && age < 180.0, "oldest dead letter age {age}");
    assert_eq!(m.n("backstop_worker_ready", &[]), 1);
    assert_failure_logs(w, source);
    assert_trace_kept(&t.browse(dlq, 100).await.expect("browse DLQ"));
}

/// `/readyz` turns 503 after `down` and 200 after `up`; `/healthz` stays 200.
async fn check_readiness(w: &Worker, down: impl FnOnce(), up: impl FnOnce()) {
    down();
    eventually_every(
        "/readyz says not ready while the broker is down",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { w.status("/readyz").await == 503 },
    )
    .await;
    let (_, why) = w.get("/readyz").await.expect("answers");
    assert!(
        why.contains("broker") || why.contains("subscribed"),
        "{why}"
    );
    assert_eq!(
        w.status("/healthz").await,
        200,
        "alive while the broker is down"
    );
    up();
    w.wait_ready("after the broker came back").await;
    assert_eq!(w.status("/healthz").await, 200);
}

/// Publishes the slow batch, sends SIGTERM once some of it is handled, checks
/// the worker exits 0 having drained, and returns how many it handled.
async fn sigterm_mid_batch<P: Publisher>(w: &mut Worker, p: &P, source: &str) -> u64 {
    for m in slow_batch(SLOW) {
        p.publish(source, m).await.expect("publish");
    }
    eventually_every(
        "some slow messages are handled",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            w.metrics().await.n(
                "backstop_messages_total",
                &[("source", source), ("outcome", "ok")],
            ) >= Mix::ok() + 8
        },
    )
    .await;
    let status = backstop_integration::terminate(&mut w.child, Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status:?}\n{}",
        w.log_text()
    );
    stopped_ok(w) - Mix::ok()
}

fn config(broker: &str, group: &str, source: &str, extra: &str) -> String {
    format!(
        r#"
broker = "{broker}"
group = "{group}"
shutdown_deadline = "20s"
{extra}
[health]
check_interval = "300ms"
check_timeout = "2s"
[metrics]
backlog_interval = "500ms"
[logging]
format = "json"
level = "info"
[handlers."{source}"]
timeout = "5s"
concurrency = 8
[handlers."{source}".retry]
immediate_attempts = 3
backoff_min = "10ms"
backoff_max = "50ms"
tiers = ["1s"]
"#
    )
}

/// Starts the RabbitMQ app again if a test stopped it and then failed.
struct RabbitBack(bool);

impl Drop for RabbitBack {
    fn drop(&mut self) {
        if self.0 {
            let _ = Command::new("rabbitmqctl").arg("start_app").status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_worker_metrics_readiness_and_drain() {
    let source = unique("backstop-test.worker");
    let t = RabbitTransport::new(
        RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
            .with_queue_type(QueueType::Classic),
    )
    .expect("config");
    let tier = DelayTier::new(Duration::from_secs(1));
    t.declare(
        &Subscription::new(source.clone(), "test")
            .with_tiers(vec![tier.clone()])
            .with_prefetch(1),
    )
    .await
    .expect("RabbitMQ at 127.0.0.1:5672 (start it with `rabbitmq-server -detached`)");
    let dir = std::env::temp_dir().join(unique("backstop-worker"));
    std::fs::create_dir_all(&dir).expect("dir");
    for m in Mix::messages() {
        t.publish(&source, m).await.expect("publish");
    }
    let w = Worker::start(
        &dir,
        &source,
        &config(
            "rabbitmq",
            &format!("{source}-worker"),
            &source,
            // Classic queues: the DLQ's oldest age can be read without
            // counting a delivery.
            "[rabbitmq]\nurl = \"amqp://guest@127.0.0.1:5672/%2f\"\nqueue_type = \"classic\"",
        ),
        // The password comes from the environment, as secrets must.
        &[("BACKSTOP_RABBITMQ__PASSWORD", "guest")],
    );
    let mut w = w;
    w.wait_ready("start").await;
    let dlq = dlq_queue(&source);
    check_mix(&w, &t, &source, &dlq, ("backstop_queue_depth", 0.0)).await;

    // The broker goes away: not ready (but alive), then ready again.
    let mut back = RabbitBack(true);
    check_readiness(
        &w,
        || {
            backstop_test::rabbitmqctl(&["stop_app"]);
        },
        || {
            backstop_test::rabbitmqctl(&["start_app"]);
            back.0 = false;
        },
    )
    .await;

    // SIGTERM in the middle of slow work: drained, exit 0, nothing lost.
    let handled = sigterm_mid_batch(&mut w, &t, &source).await;
    let waiting = u64::from(
        t.ready_count(&source)
            .await
            .expect("reachable")
            .unwrap_or(0),
    );
    assert!(waiting > 0, "SIGTERM came before the batch was done");
    assert_eq!(
        handled + waiting,
        SLOW,
        "every slow message is either handled (acked) or back in the queue"
    );
    for q in [tier_queue(&source, &tier), dlq, source.clone()] {
        let _ = t.delete_queue(&q).await;
    }
}

/// The tansu process serving `brokers` (to freeze it with SIGSTOP).
fn tansu_pid(brokers: &str) -> String {
    let port = brokers.rsplit(':').next().unwrap_or("19092");
    let out = Command::new("pgrep")
        .args([
            "-f",
            &format!("tansu broker --listener-url tcp://127.0.0.1:{port}"),
        ])
        .output()
        .expect("pgrep");
    let pid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !pid.is_empty(),
        "no tansu process on port {port} (./scripts/tansu.sh start)"
    );
    pid
}

/// Thaws tansu if a test froze it and then failed.
struct Thaw(Option<String>);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(pid) = &self.0 {
            let _ = Command::new("kill").args(["-CONT", pid]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_worker_metrics_readiness_and_drain() {
    let brokers = backstop_integration::kafka_brokers();
    let topic = unique("worker-orders");
    let group = format!("{topic}-worker");
    let t = KafkaTransport::new(KafkaConfig::new(&brokers)).expect("config");
    t.admin()
        .ensure_topic(&topic, 2)
        .await
        .expect("create topic");
    let dir = std::env::temp_dir().join(unique("backstop-worker"));
    std::fs::create_dir_all(&dir).expect("dir");
    for m in Mix::messages() {
        t.publish(&topic, m).await.expect("publish");
    }
    let mut w = Worker::start(
        &dir,
        &topic,
        &config(
            "kafka",
            &group,
            &topic,
            &format!(
                "[kafka]\nbrokers = \"{brokers}\"\nfetch_wait_max = \"20ms\"\nrequest_timeout = \"2s\""
            ),
        ),
        &[],
    );
    w.wait_ready("start").await;
    let dlq = backstop::kafka::dlq_topic(&group, &topic);
    check_mix(&w, &t, &topic, &dlq, ("backstop_consumer_lag", 0.0)).await;
    let m = w.metrics().await;
    for p in ["0", "1"] {
        assert_eq!(
            m.get(
                "backstop_consumer_lag",
                &[("source", &topic), ("partition", p)]
            ),
            Some(0.0),
            "lag per partition"
        );
    }

    // The broker stops answering (frozen): not ready, alive; thawed: ready.
    let pid = tansu_pid(&brokers);
    let mut thaw = Thaw(Some(pid.clone()));
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill")
                .success()
        );
    };
    check_readiness(
        &w,
        || signal("-STOP"),
        || {
            signal("-CONT");
            thaw.0 = None;
        },
    )
    .await;

    // SIGTERM in the middle of slow work.
    let handled = sigterm_mid_batch(&mut w, &t, &topic).await;
    let lag: i64 = t
        .admin()
        .group_lag(&group, std::slice::from_ref(&topic))
        .await
        .expect("lag")
        .values()
        .sum();
    let waiting = u64::try_from(lag).unwrap_or(0);
    assert!(waiting > 0, "SIGTERM came before the batch was done");
    assert_eq!(
        handled + waiting,
        SLOW,
        "every slow message is either handled (committed) or still ahead of the group"
    );
}
