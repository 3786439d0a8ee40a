//! Kafka: where the broker is, topics, filling them, the mock cluster.

mod consume;

pub(crate) use consume::run_child;

use crate::scenario::{Scenario, payload};
use anyhow::{Context as _, anyhow, bail, ensure};
use backstop_kafka::{BROKERS_ENV, KafkaConfig, dlq_topic, tier_topic};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

/// Deliveries awaited at once while filling.
const FILL_WINDOW: usize = 4096;

/// The tansu (or any Kafka) bootstrap servers.
pub(crate) fn brokers() -> String {
    std::env::var(BROKERS_ENV).unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The client settings both contenders use against tansu: it holds every
/// fetch for `fetch.wait.max.ms`, so 20 ms for raw and Backstop alike (set
/// through `KafkaConfig::with_fetch_wait_max`, which raw reads back with
/// `to_client_config`).
pub(crate) fn tansu_config() -> KafkaConfig {
    KafkaConfig::new(brokers()).with_fetch_wait_max(Duration::from_millis(20))
}

/// Fails with how to start tansu when nothing listens at the first broker.
pub(crate) fn ensure_reachable() -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let brokers = brokers();
    let first = brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let reachable = first.to_socket_addrs().is_ok_and(|mut addrs| {
        addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    ensure!(
        reachable,
        "no Kafka broker at {first} ({BROKERS_ENV}): start tansu with `./scripts/tansu.sh start` \
         (the first start installs it, about 10 minutes)"
    );
    Ok(())
}

/// Creates `topic` with `partitions` (tansu has no auto-creation).
pub(crate) async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&new], &opts).await? {
        if let Err((t, code)) = r {
            bail!("create topic {t}: {code}");
        }
    }
    Ok(())
}

/// Publishes ids `0..n` as PLAIN records: a raw `FutureProducer` without
/// idempotence and without headers (tansu 0.6's sqlite storage stalls on
/// idempotent records with headers, BROKERS.md), acks=all, key `k<i % 64>`.
pub(crate) async fn fill(brokers: &str, topic: &str, n: u64) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "false")
        .set("acks", "all")
        .set("linger.ms", "20")
        .create()
        .context("producer")?;
    let started = Instant::now();
    let mut waiting = FuturesUnordered::new();
    let settle = |r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, _>| match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(anyhow!("produce: {e}")),
        Err(_) => Err(anyhow!("produce: the delivery was canceled")),
    };
    for i in 0..n {
        if waiting.len() == FILL_WINDOW
            && let Some(r) = waiting.next().await
        {
            settle(r)?;
        }
        let body = payload(i);
        let key = format!("k{}", i % 64);
        let record = FutureRecord::to(topic).payload(&body).key(&key);
        let future = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow!("produce: {e}"))?;
        waiting.push(future);
    }
    while let Some(r) = waiting.next().await {
        settle(r)?;
    }
    eprintln!(
        "    filled {topic} with {n} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Keeps a mock cluster alive on a thread of its own (`MockCluster` is
/// `!Send`) until dropped.
#[derive(Debug)]
pub(crate) struct Mock {
    pub(crate) servers: String,
    _stop: std::sync::mpsc::Sender<()>,
}

impl Mock {
    /// One broker with the source topic plus the retry-tier and DLQ topics
    /// Backstop would create (the mock has no CreateTopics).
    pub(crate) fn start(scenario: &Scenario, source: &str, group: &str) -> anyhow::Result<Self> {
        let mut topics = vec![(source.to_owned(), scenario.partitions)];
        for tier in scenario.policy().tiers() {
            topics.push((tier_topic(group, source, tier), scenario.partitions));
        }
        topics.push((dlq_topic(group, source), scenario.partitions));
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let started = (|| {
                let cluster = MockCluster::new(1)?;
                for (t, p) in &topics {
                    cluster.create_topic(t, *p, 1)?;
                }
                anyhow::Ok(cluster)
            })();
            match started {
                Ok(cluster) => {
                    let _ = tx.send(Ok(cluster.bootstrap_servers()));
                    let _ = stopped.recv();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let servers = rx.recv().context("mock cluster thread")??;
        Ok(Self {
            servers,
            _stop: stop,
        })
    }
}
