//! No-op-handler consume rate of Backstop's Kafka runner against raw rdkafka on
//! the same broker, in the same run: `cargo bench -p backstop-kafka --bench consume`.
//!
//! Two brokers: librdkafka's in-process mock cluster (never the bottleneck, so
//! the ratio shows the framework's own overhead) and the broker at
//! `BACKSTOP_KAFKA_BROKERS` (tansu from `./scripts/tansu.sh start`), when
//! reachable. Both consumers read the same topic from offset 0 in their own
//! group; the raw one stores every offset (the same at-least-once contract).
//! Backstop runs twice: with the default (one message of a partition at a
//! time, strict order) and with partition concurrency 64 (order per key; the
//! messages have 64 keys).
//! Set `BENCH_MESSAGES` to change the message count.

use backstop_core::{Context, HandlerOptions, Message, Publisher, RetryPolicy, Runner, handler_fn};
use backstop_kafka::{KafkaConfig, KafkaTransport};
use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;

async fn fill(transport: &KafkaTransport, topic: &str, n: usize) {
    let payload = Bytes::from(vec![b'x'; 200]);
    let mut pending = Vec::with_capacity(1024);
    for i in 0..n {
        let t = transport.clone();
        let topic = topic.to_owned();
        let m = Message::new(payload.clone()).with_key(format!("k{}", i % 64));
        pending.push(tokio::spawn(async move { t.publish(&topic, m).await }));
        if pending.len() == 1024 {
            for p in pending.drain(..) {
                p.await.expect("join").expect("publish");
            }
        }
    }
    for p in pending {
        p.await.expect("join").expect("publish");
    }
}

async fn raw(config: &KafkaConfig, topic: &str, n: usize) -> f64 {
    let consumer: StreamConsumer = config
        .to_client_config()
        .set("group.id", format!("raw-{topic}"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let start = Instant::now();
    let mut count = 0;
    while count < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("raw consumer made no progress for 30 s")
            .expect("recv");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
            .expect("tpl");
        consumer.store_offsets(&tpl).expect("store");
        count += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::thread::spawn(move || drop(consumer));
    rate
}

async fn backstop(transport: &KafkaTransport, group: &str, topic: &str, n: usize) -> f64 {
    let runner = Runner::builder(transport.clone())
        .with_group(group)
        .with_max_in_flight(256)
        .with_handler_options(
            topic,
            handler_fn(|_: Bytes, _: Context| async { Ok(()) }),
            HandlerOptions::default()
                .with_concurrency(256)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    // Time from the first handled message, as for the raw consumer's first recv
    // (group join is excluded from both).
    while stats.snapshot().ok == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let start = Instant::now();
    let mut last = (0, Instant::now());
    while (stats.snapshot().ok as usize) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
        let ok = stats.snapshot().ok;
        if ok != last.0 {
            last = (ok, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(30),
            "runner made no progress for 30 s at {ok}"
        );
    }
    let rate = (n - 1) as f64 / start.elapsed().as_secs_f64();
    let _ = tx.send(());
    run.await.expect("runner");
    rate
}

fn unique_topic() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{}-{nanos}", std::process::id())
}

async fn compare(name: &str, config: KafkaConfig, topic: &str, n: usize) {
    let transport = KafkaTransport::new(config.clone()).expect("config");
    transport
        .admin()
        .ensure_topic(topic, PARTITIONS)
        .await
        .expect("topic");
    eprintln!("{name}: publishing {n} messages");
    fill(&transport, topic, n).await;
    eprintln!("{name}: raw rdkafka consumer");
    let raw_rate = raw(&config, topic, n).await;
    eprintln!("{name}: backstop runner");
    let ours = backstop(&transport, &format!("backstop-{topic}"), topic, n).await;
    eprintln!("{name}: backstop runner, partition concurrency 64 (64 keys)");
    let keyed = KafkaTransport::new(config.with_partition_concurrency(64)).expect("config");
    let ours_keyed = backstop(&keyed, &format!("backstop-keyed-{topic}"), topic, n).await;
    println!(
        "{name:<12} {n:>8} msgs  raw rdkafka {raw_rate:>10.0} msg/s  backstop {ours:>10.0} msg/s  ratio {:.2}  \
         partition concurrency 64: {ours_keyed:>10.0} msg/s  ratio {:.2}",
        ours / raw_rate,
        ours_keyed / raw_rate
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);

    // In-process mock cluster: the framework's own overhead. Owned by a thread
    // of its own (`MockCluster` is !Send, and has no CreateTopics), kept alive
    // until the comparison is done.
    let topic = unique_topic();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let mock_topic = topic.clone();
    let keeper = std::thread::spawn(move || {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic(&mock_topic, PARTITIONS, 1)
            .expect("topic");
        for group in ["backstop", "backstop-keyed"] {
            let dlq = backstop_kafka::dlq_topic(&format!("{group}-{mock_topic}"), &mock_topic);
            cluster
                .create_topic(&dlq, PARTITIONS, 1)
                .expect("dlq topic");
        }
        tx.send(cluster.bootstrap_servers()).expect("servers");
        let _ = stop_rx.recv();
    });
    let servers = rx.recv().expect("mock started");
    // The mock cluster silently keeps only about 5 MiB per partition.
    compare(
        "mock-cluster",
        KafkaConfig::new(&servers),
        &topic,
        n.min(60_000),
    )
    .await;
    let _ = stop_tx.send(());
    keeper.join().expect("mock thread");

    let brokers =
        std::env::var("BACKSTOP_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let reachable = brokers
        .split(',')
        .next()
        .and_then(|a| a.parse().ok())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if reachable {
        // tansu's SQLite storage consumes about 2,000 msg/s: keep it small.
        let broker_n = n.min(20_000);
        let config = KafkaConfig::new(&brokers).with_fetch_wait_max(Duration::from_millis(20));
        compare("broker", config, &unique_topic(), broker_n).await;
    } else {
        println!(
            "broker       no broker at {brokers}: start one with ./scripts/tansu.sh start to compare there too"
        );
    }
}
