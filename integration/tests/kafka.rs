//! The Kafka worker example end to end against tansu (started by
//! scripts/test.sh): the DLQ holds exactly the invalid orders with their
//! headers, the group's offsets reach the end, and a worker killed with
//! SIGKILL mid-stream loses nothing after a restart.

use backstop::DeadLetterSource;
use backstop::kafka::{KafkaConfig, KafkaTransport, dlq_topic};
use backstop::message::names;
use backstop_examples::demo::{Behaviour, DemoOrder};
use backstop_examples::kafka_worker::{self, Args};
use clap::Parser;
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backstop_integration::kafka_brokers as brokers;

fn unique(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{t}-{}", std::process::id())
}

fn args(topic: &str, group: &str, extra: &[&str]) -> Args {
    let brokers = brokers();
    let mut argv = vec![
        "worker",
        "--brokers",
        &brokers,
        "--topic",
        topic,
        "--group",
        group,
        "--fetch-wait-max",
        "20ms",
        "--tiers",
        "300ms,600ms",
    ];
    argv.extend_from_slice(extra);
    Args::parse_from(argv)
}

async fn lag(transport: &KafkaTransport, group: &str, topics: &[String]) -> i64 {
    transport
        .admin()
        .group_lag(group, topics)
        .await
        .expect("lag")
        .values()
        .sum()
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    backstop_test::eventually_every(what, timeout, Duration::from_millis(200), cond).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_dead_letters_exactly_the_invalid_orders() {
    let topic = unique("demo-orders");
    let group = format!("{topic}-worker");
    let a = args(
        &topic,
        &group,
        &["--permanent-every", "20", "--flaky-every", "7"],
    );
    let ids = kafka_worker::produce(&a, 1_000).await.expect("produce");
    assert_eq!(ids.len(), 1_000);

    let transport = KafkaTransport::new(
        KafkaConfig::new(brokers()).with_fetch_wait_max(Duration::from_millis(20)),
    )
    .expect("config");
    let dlq = dlq_topic(&group, &topic);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let a = a.clone();
        tokio::spawn(async move {
            kafka_worker::work(&a, async move {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let topics = vec![topic.clone()];
    wait_for(
        "the source consumed and committed",
        Duration::from_secs(240),
        || async {
            lag(&transport, &group, &topics).await == 0
                && transport
                    .browse(&dlq, 10_000)
                    .await
                    .map(|d| d.len())
                    .unwrap_or(0)
                    >= 50
        },
    )
    .await;
    let _ = stop_tx.send(());
    let report = worker.await.expect("join").expect("worker");
    assert!(report.drained);

    let dead = transport.browse(&dlq, 10_000).await.expect("browse DLQ");
    assert_eq!(dead.len(), 50, "exactly the 5 % invalid orders");
    let mut seen = HashSet::new();
    for m in &dead {
        let order: DemoOrder = serde_json::from_slice(m.payload()).expect("payload kept");
        assert_eq!(order.behaviour, Behaviour::Permanent);
        assert!(
            seen.insert(order.id),
            "order {} dead-lettered twice",
            order.id
        );
        let h = m.headers();
        assert_eq!(h.get_str(names::DEAD_LETTER_REASON), Some("permanent"));
        assert_eq!(h.get_str(names::ERROR_CLASS), Some("permanent"));
        assert_eq!(h.get_str(names::ORIGIN_SOURCE), Some(topic.as_str()));
        assert_eq!(h.get_str(names::ORIGIN_GROUP), Some(group.as_str()));
        assert!(h.get_str(names::ORIGIN_PARTITION).is_some());
        assert!(h.get_str(names::ORIGIN_OFFSET).is_some());
        assert_eq!(h.get_str(names::ATTEMPT), Some("1"));
        assert!(
            h.get_str(names::ERROR_MESSAGE)
                .is_some_and(|s| s.contains("rejected"))
        );
        assert!(ids.iter().any(|id| Some(id.as_str()) == m.id()));
    }
    assert_eq!(report.stats.dead_lettered, 50);
    assert_eq!(report.stats.ok, 950);
    assert!(report.stats.retried > 0, "flaky orders were retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_nothing_after_restart() {
    let topic = unique("crash-orders");
    let group = format!("{topic}-worker");
    let a = args(
        &topic,
        &group,
        &["--permanent-every", "0", "--flaky-every", "0"],
    );
    let ids = kafka_worker::produce(&a, 2_000).await.expect("produce");
    let dir = std::env::temp_dir().join(unique("backstop-crash"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("handled.log");
    let brokers = brokers();
    let worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kafka-demo-worker"))
            .args([
                "--brokers",
                &brokers,
                "--topic",
                &topic,
                "--group",
                &group,
                "--fetch-wait-max",
                "20ms",
                "--tiers",
                "300ms",
                "--handled-log",
                log.to_str().expect("utf-8 path"),
            ])
            .kill_on_drop(true)
            .spawn()
            .expect("start worker")
    };
    let handled = || std::fs::read_to_string(&log).unwrap_or_default();

    let transport = KafkaTransport::new(KafkaConfig::new(&brokers)).expect("config");
    let topics = vec![topic.clone()];
    let mut first = worker();
    // Kill it mid-stream, once some offsets are committed and work is in flight.
    wait_for(
        "the first worker to commit some",
        Duration::from_secs(120),
        || async {
            handled().lines().count() >= 300 && lag(&transport, &group, &topics).await < 2_000
        },
    )
    .await;
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");
    let before = handled().lines().count();

    let mut second = worker();
    wait_for(
        "the restarted worker to finish",
        Duration::from_secs(240),
        || async { lag(&transport, &group, &topics).await == 0 },
    )
    .await;
    // Graceful stop: SIGTERM, exit 0.
    let status = backstop_integration::terminate(&mut second, Duration::from_secs(60)).await;
    assert!(status.success(), "worker exit status {status}");

    let text = handled();
    let got: HashSet<&str> = text.lines().collect();
    let missing: Vec<_> = ids.iter().filter(|id| !got.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    let duplicates = text.lines().count() - got.len();
    println!("crash test: {before} handled before SIGKILL, {duplicates} handled twice, 0 lost");
    assert!(duplicates < before, "committed work was not repeated");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The outbox producer example against Kafka: every accepted send reaches the
/// topic, per-key order kept, nothing left in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_producer_delivers_every_send_to_kafka() {
    use backstop_examples::outbox_producer;
    let topic = unique("outbox-orders");
    let dir = std::env::temp_dir().join(unique("backstop-outbox-kafka"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("outbox.db");
    let brokers = brokers();
    let a = outbox_producer::Args::parse_from([
        "outbox_producer",
        "--broker",
        "kafka",
        "--brokers",
        &brokers,
        "--destination",
        &topic,
        "--db",
        db.to_str().expect("utf-8 path"),
        "--count",
        "600",
        "--keys",
        "6",
        // One sender: acceptance order is order-number order, per customer.
        "--concurrency",
        "1",
    ]);
    let report = outbox_producer::run(&a).await.expect("run");
    assert_eq!(report.accepted, 600);
    assert_eq!(report.left_pending, 0, "the outbox flushed everything");
    let transport = KafkaTransport::new(KafkaConfig::new(&brokers)).expect("config");
    let messages = transport.browse(&topic, 10_000).await.expect("read topic");
    let orders: Vec<(u64, u64)> = messages
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload()).expect("json");
            (
                v["customer"].as_u64().expect("customer"),
                v["order"].as_u64().expect("order"),
            )
        })
        .collect();
    let distinct: HashSet<u64> = orders.iter().map(|(_, n)| *n).collect();
    assert_eq!(distinct.len(), 600, "every order arrived");
    // Per key (customer) the relay sends one at a time, into one partition:
    // the orders of a customer read back ascending.
    for customer in 0..6 {
        let seq: Vec<u64> = orders
            .iter()
            .filter(|(c, _)| *c == customer)
            .map(|(_, n)| *n)
            .collect();
        assert!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "customer {customer} out of order: {seq:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An entry Kafka refuses for good (over `message.max.bytes`) moves to the
/// outbox's dead table with the reason; the entries of the same key after it
/// are still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_buries_a_message_kafka_refuses_and_goes_on() {
    use backstop::Message;
    use backstop::kafka::KafkaAdmin;
    use backstop::outbox::{OutboxConfig, OutboxInspector, OutboxPublisher};
    let brokers = brokers();
    let topic = unique("outbox-too-large");
    let config = KafkaConfig::new(&brokers);
    KafkaAdmin::new(&config)
        .expect("admin")
        .ensure_topic(&topic, 1)
        .await
        .expect("topic");
    let dir = std::env::temp_dir().join(unique("backstop-outbox-dead"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("outbox.db");
    let transport = KafkaTransport::new(config).expect("config");
    let outbox = OutboxPublisher::open(transport.clone(), OutboxConfig::new(&db))
        .await
        .expect("open");
    let big = vec![b'x'; 2 * 1024 * 1024];
    for payload in [b"before".to_vec(), big, b"after".to_vec()] {
        outbox
            .send(&topic, Message::new(payload).with_key("k"))
            .await
            .expect("accepted");
    }
    assert!(
        outbox.wait_empty(Duration::from_secs(60)).await,
        "{:?}",
        outbox.stats()
    );
    assert_eq!(outbox.stats().dead, 1);
    outbox.shutdown(Duration::from_secs(10)).await;
    let dead = OutboxInspector::open(&db)
        .expect("inspect")
        .dead(10)
        .expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.payload().len(), 2 * 1024 * 1024);
    let reason = dead[0].error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("too large"),
        "the reason names the cause: {reason}"
    );
    let got: Vec<Vec<u8>> = transport
        .browse(&topic, 10)
        .await
        .expect("read topic")
        .iter()
        .map(|m| m.payload().to_vec())
        .collect();
    assert_eq!(got, [b"before".to_vec(), b"after".to_vec()]);
    let _ = std::fs::remove_dir_all(&dir);
}
