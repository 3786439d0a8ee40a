//! The backlog memory check: with N small messages (default 1,000,000 JSON
//! payloads of about 100 bytes) waiting in the broker, a worker's resident
//! memory stays flat and under 100 MiB while it works through them.
//!
//! ```text
//! cargo run --release -p backstop-integration --bin backlog-rss -- [--messages N] [--broker rabbitmq|kafka]
//! ```
//!
//! Two consumers drain the same backlog, each in a child process of its own
//! (this binary re-executed with a hidden `consume` subcommand), so their RSS
//! figures are independent of each other and of the filling:
//!
//! - raw: the broker's client on its own, same prefetch, one settled message
//!   at a time (lapin: `basic.qos` + one awaited ack per delivery; rdkafka: a
//!   `StreamConsumer` storing every offset);
//! - backstop: a default `Runner` (64 in flight, default handler options) with
//!   a handler that does nothing (Kafka: `BACKLOG_PARTITION_CONCURRENCY=n`
//!   sets `KafkaConfig::with_partition_concurrency`).
//!
//! RabbitMQ (`BACKSTOP_AMQP_URL`, default guest@127.0.0.1:5672): a fresh
//! quorum queue is filled with N messages for each consumer, right before it
//! runs, and deleted afterwards. Kafka (`BACKSTOP_KAFKA_BROKERS`, default
//! tansu on 127.0.0.1:19092): one topic of 4 partitions is filled once and each
//! consumer reads all of it in a group of its own.
//!
//! Each child samples its own `VmRSS` every 250 ms and reports the peak,
//! `VmHWM` and RSS along the way on one JSON line. The parent prints the
//! table, the backstop/raw ratios, and PASS/FAIL for the goal; it exits
//! non-zero when Backstop's peak RSS is 100 MiB or more.

use anyhow::{Context as _, anyhow, bail, ensure};
use backstop::kafka::{BROKERS_ENV, KafkaConfig, KafkaTransport, dlq_topic, tier_topic};
use backstop::rabbitmq::{AMQP_URL_ENV, RabbitConfig, RabbitTransport, dlq_queue, tier_queue};
use backstop::{Context, HandlerOptions, RetryPolicy, Runner, Subscription, handler_fn};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The goal: Backstop's peak RSS while draining the backlog.
const GOAL_MIB: f64 = 100.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// A consumer that handles nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(60);
/// Confirms (RabbitMQ) / deliveries (Kafka) awaited at once while filling.
const FILL_WINDOW: usize = 4096;
const KAFKA_PARTITIONS: i32 = 4;
/// Progress points at which the RSS is shown (percent of the backlog handled).
const CHECKPOINTS: [u64; 5] = [10, 25, 50, 75, 95];

#[derive(Parser, Debug)]
#[command(
    about = "RSS of a worker draining a large broker backlog: Backstop against the raw client"
)]
struct Cli {
    /// Messages in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// The broker to fill and drain.
    #[arg(long, value_enum, default_value_t = Broker::Rabbitmq)]
    broker: Broker,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Subcommand, Debug)]
enum Child {
    /// Internal: drain `source` with one consumer and report on stdout.
    #[command(hide = true)]
    Consume {
        #[arg(long, value_enum)]
        consumer: Kind,
        #[arg(long)]
        source: String,
        /// Kafka consumer group.
        #[arg(long, default_value = "backstop")]
        group: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Broker {
    Rabbitmq,
    Kafka,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Raw,
    Backstop,
}

impl Kind {
    fn label(self, broker: Broker) -> &'static str {
        match (self, broker) {
            (Kind::Raw, Broker::Rabbitmq) => "raw lapin",
            (Kind::Raw, Broker::Kafka) => "raw rdkafka",
            (Kind::Backstop, _) => "backstop Runner",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    ensure!(cli.messages > 0, "--messages must be at least 1");
    match &cli.child {
        Some(Child::Consume {
            consumer,
            source,
            group,
        }) => {
            let report = consume(cli.broker, *consumer, source, group, cli.messages).await?;
            println!("{report}");
            Ok(())
        }
        None => parent(&cli).await,
    }
}

// ---------------------------------------------------------------- the parent

async fn parent(cli: &Cli) -> anyhow::Result<()> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let n = cli.messages;
    let (setup, reports) = match cli.broker {
        Broker::Rabbitmq => rabbit_parent(n, stamp).await?,
        Broker::Kafka => kafka_parent(n, stamp).await?,
    };
    print_table(cli.broker, n, &setup, &reports)
}

/// Runs this binary's hidden `consume` subcommand and reads its JSON report.
async fn run_child(
    broker: Broker,
    kind: Kind,
    source: &str,
    group: &str,
    n: u64,
) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("path of this binary")?;
    let broker = match broker {
        Broker::Rabbitmq => "rabbitmq",
        Broker::Kafka => "kafka",
    };
    let consumer = match kind {
        Kind::Raw => "raw",
        Kind::Backstop => "backstop",
    };
    eprintln!("==> {consumer}: draining {source} in a child process");
    let out = tokio::process::Command::new(exe)
        .args(["--messages", &n.to_string(), "--broker", broker])
        .args(["consume", "--consumer", consumer, "--source", source])
        .args(["--group", group])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("start the consumer child")?
        .wait_with_output()
        .await
        .context("run the consumer child")?;
    ensure!(
        out.status.success(),
        "the {consumer} consumer failed ({})",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("the {consumer} consumer printed no report: {stdout:?}"))?;
    serde_json::from_str(line).with_context(|| format!("report of the {consumer} consumer"))
}

/// Waits for `work` unless Ctrl-C comes first (the caller still cleans up).
async fn interruptible<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

/// A JSON payload of about 100 bytes, different for every message.
fn payload(i: u64) -> Vec<u8> {
    format!(
        r#"{{"id":{i},"type":"order.created","customer":"c-{:06}","amount_cents":{},"currency":"EUR","v":1}}"#,
        i % 100_000,
        (i * 7919) % 1_000_000
    )
    .into_bytes()
}

fn payload_size(n: u64) -> usize {
    let probe = [0, n / 2, n.saturating_sub(1)];
    probe.iter().map(|&i| payload(i).len()).sum::<usize>() / probe.len()
}

// ---------------------------------------------------------------- RabbitMQ

const PREFETCH_NOTE: &str = "default Runner: max in flight 64, handler concurrency 16";

/// The prefetch a default `Runner` asks for: the handler's concurrency (16 by
/// default) capped by max in flight (64). The raw consumer uses the same.
fn rabbit_prefetch() -> u16 {
    16
}

fn amqp_url() -> String {
    std::env::var(AMQP_URL_ENV).unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn rabbit_parent(n: u64, stamp: u128) -> anyhow::Result<(String, Vec<Value>)> {
    let t = RabbitTransport::new(RabbitConfig::from_env()).context("RabbitMQ config")?;
    let raw_q = format!("backstop-bench.backlog-raw-{stamp}");
    let ours_q = format!("backstop-bench.backlog-backstop-{stamp}");
    // Backstop declares the default policy's delay tiers next to its queue.
    let tiers = RetryPolicy::default().tiers().to_vec();
    let mut doomed = vec![raw_q.clone(), dlq_queue(&raw_q), ours_q.clone()];
    doomed.extend(tiers.iter().map(|tier| tier_queue(&ours_q, tier)));
    doomed.push(dlq_queue(&ours_q));

    let work = async {
        let url = amqp_url();
        let mut reports = Vec::new();
        for (kind, queue, tiers) in [
            (Kind::Raw, &raw_q, vec![]),
            (Kind::Backstop, &ours_q, tiers.clone()),
        ] {
            t.declare(&Subscription {
                source: queue.clone(),
                group: "backstop".into(),
                tiers,
                prefetch: usize::from(rabbit_prefetch()),
            })
            .await
            .context("declare the queue (is RabbitMQ running on 127.0.0.1:5672?)")?;
            rabbit_fill(&url, queue, n).await?;
            reports.push(run_child(Broker::Rabbitmq, kind, queue, "backstop", n).await?);
            // Free the broker of the drained queue before the next fill.
            let left = t.ready_count(queue).await.ok().flatten();
            if let Some(left) = left.filter(|&l| l > 0) {
                eprintln!("warning: {left} messages left in {queue}");
            }
            rabbit_delete(&t, queue).await;
        }
        anyhow::Ok(reports)
    };
    let result = interruptible(work).await;
    for q in &doomed {
        rabbit_delete(&t, q).await;
    }
    let setup = format!(
        "RabbitMQ quorum queue, prefetch {} ({PREFETCH_NOTE}), a fresh queue filled before each consumer",
        rabbit_prefetch()
    );
    Ok((setup, result?))
}

/// Deletes `queue` (gone already is fine), retrying: RabbitMQ 3.10 can close
/// the connection with INTERNAL_ERROR while it deletes a big quorum queue, and
/// the transport reconnects on its next use.
async fn rabbit_delete(t: &RabbitTransport, queue: &str) {
    for attempt in 1..=3 {
        match t.delete_queue(queue).await {
            Ok(()) => return,
            Err(e) if attempt == 3 => eprintln!("warning: could not delete {queue}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Publishes `n` persistent messages with publisher confirms, `FILL_WINDOW`
/// awaiting their confirm at once.
async fn rabbit_fill(url: &str, queue: &str, n: u64) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut waiting = FuturesUnordered::new();
    let mut confirmed = 0u64;
    let confirm = |c: Result<lapin::Confirmation, lapin::Error>| -> anyhow::Result<()> {
        match c.context("publisher confirm")? {
            lapin::Confirmation::Ack(_) => Ok(()),
            other => bail!("publish not confirmed: {other:?}"),
        }
    };
    for i in 0..n {
        if waiting.len() == FILL_WINDOW
            && let Some(c) = waiting.next().await
        {
            confirm(c)?;
            confirmed += 1;
            if confirmed.is_multiple_of(100_000) {
                eprintln!(
                    "    filled {confirmed}/{n} ({:.0} msg/s)",
                    confirmed as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
        let pending = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                &payload(i),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/json")),
            )
            .await
            .context("publish")?;
        waiting.push(pending);
    }
    while let Some(c) = waiting.next().await {
        confirm(c)?;
    }
    eprintln!(
        "==> filled {queue} with {n} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = ch.close(200, ShortString::from("filled")).await;
    let _ = conn.close(200, ShortString::from("filled")).await;
    Ok(())
}

/// lapin alone: `basic.qos(prefetch)`, one awaited ack per delivery.
async fn rabbit_raw(queue: String, n: u64, done: Arc<AtomicU64>) -> anyhow::Result<()> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(rabbit_prefetch(), BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut count = 0;
    while count < n {
        let d = consumer
            .next()
            .await
            .ok_or_else(|| anyhow!("the consumer ended"))??;
        d.acker.ack(BasicAckOptions::default()).await?;
        count += 1;
        done.store(count, Ordering::Relaxed);
    }
    let _ = ch.close(200, ShortString::from("done")).await;
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(())
}

// ---------------------------------------------------------------- Kafka

fn kafka_brokers() -> String {
    std::env::var(BROKERS_ENV).unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The same client settings for both consumers (tansu answers a fetch late
/// unless told not to wait).
fn kafka_config() -> KafkaConfig {
    KafkaConfig::new(kafka_brokers()).with_fetch_wait_max(Duration::from_millis(20))
}

/// Fails fast when nothing listens at the first bootstrap server (librdkafka
/// would retry for a long time).
fn kafka_reachable() -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let brokers = kafka_brokers();
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let reachable = first.to_socket_addrs().is_ok_and(|mut addrs| {
        addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    ensure!(
        reachable,
        "no Kafka broker at {first} ({BROKERS_ENV}); start tansu with ./scripts/tansu.sh start"
    );
    Ok(())
}

async fn kafka_parent(n: u64, stamp: u128) -> anyhow::Result<(String, Vec<Value>)> {
    kafka_reachable()?;
    let config = kafka_config();
    let transport = KafkaTransport::new(config.clone()).context("Kafka config")?;
    let topic = format!("backstop-bench.backlog-{stamp}");
    let raw_group = format!("raw-{topic}");
    let ours_group = format!("backstop-{topic}");
    let mut doomed = vec![topic.clone()];
    doomed.extend(
        RetryPolicy::default()
            .tiers()
            .iter()
            .map(|tier| tier_topic(&ours_group, &topic, tier)),
    );
    doomed.push(dlq_topic(&ours_group, &topic));

    let work = async {
        transport
            .admin()
            .ensure_topic(&topic, KAFKA_PARTITIONS)
            .await
            .with_context(|| {
                format!(
                    "create topic {topic:?} (is a broker at {}? ./scripts/tansu.sh start)",
                    kafka_brokers()
                )
            })?;
        kafka_fill(&config, &topic, n).await?;
        let raw = run_child(Broker::Kafka, Kind::Raw, &topic, &raw_group, n).await?;
        let ours = run_child(Broker::Kafka, Kind::Backstop, &topic, &ours_group, n).await?;
        anyhow::Ok(vec![raw, ours])
    };
    let result = interruptible(work).await;
    if let Err(e) = kafka_delete(&doomed).await {
        eprintln!("warning: could not delete the topics {doomed:?}: {e:#}");
    }
    let setup = format!(
        "Kafka at {}, one topic of {KAFKA_PARTITIONS} partitions filled once, each consumer in its own group from offset 0 ({PREFETCH_NOTE})",
        kafka_brokers()
    );
    Ok((setup, result?))
}

async fn kafka_fill(config: &KafkaConfig, topic: &str, n: u64) -> anyhow::Result<()> {
    let producer: FutureProducer = config
        .to_client_config()
        .remove("fetch.wait.max.ms")
        .set("linger.ms", "20")
        .set("acks", "all")
        .create()
        .context("producer")?;
    let started = Instant::now();
    let mut waiting = FuturesUnordered::new();
    let mut delivered = 0u64;
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
            delivered += 1;
            if delivered.is_multiple_of(100_000) {
                eprintln!(
                    "    produced {delivered}/{n} ({:.0} msg/s)",
                    delivered as f64 / started.elapsed().as_secs_f64()
                );
            }
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
        "==> produced {n} messages to {topic} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn kafka_delete(topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config()
        .to_client_config()
        .remove("fetch.wait.max.ms")
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&names, &opts).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => bail!("{topic}: {code}"),
        }
    }
    Ok(())
}

/// rdkafka alone: a `StreamConsumer` in its own group from offset 0, storing
/// every handled offset (auto-committed), like Backstop's at-least-once.
async fn kafka_raw(
    topic: String,
    group: String,
    n: u64,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = kafka_config()
        .to_client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("raw consumer")?;
    consumer.subscribe(&[&topic])?;
    let mut count = 0;
    while count < n {
        let m = consumer.recv().await?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))?;
        consumer.store_offsets(&tpl)?;
        count += 1;
        done.store(count, Ordering::Relaxed);
    }
    // Closing a consumer blocks: off the runtime.
    std::thread::spawn(move || drop(consumer));
    Ok(())
}

// ---------------------------------------------------------------- the child

/// Drains `source` with one consumer while sampling this process's RSS;
/// returns the JSON report line.
async fn consume(
    broker: Broker,
    kind: Kind,
    source: &str,
    group: &str,
    n: u64,
) -> anyhow::Result<Value> {
    let done = Arc::new(AtomicU64::new(0));
    let sampler = Sampler::start(done.clone(), n, kind.label(broker));
    let start_kib = sampler.start_kib;
    let measured = match kind {
        Kind::Raw => {
            let task = match broker {
                Broker::Rabbitmq => tokio::spawn(rabbit_raw(source.to_owned(), n, done.clone())),
                Broker::Kafka => tokio::spawn(kafka_raw(
                    source.to_owned(),
                    group.to_owned(),
                    n,
                    done.clone(),
                )),
            };
            let measured = watch(&done, n, || task.is_finished()).await;
            let finished = task.await.context("raw consumer task")?;
            let measured = measured?;
            finished?;
            (measured, json!(null))
        }
        Kind::Backstop => match broker {
            Broker::Rabbitmq => {
                let t = RabbitTransport::new(RabbitConfig::from_env())?;
                backstop_drain(t, "backstop", source, n, &done).await?
            }
            Broker::Kafka => {
                let mut config = kafka_config();
                if let Some(n) = std::env::var("BACKLOG_PARTITION_CONCURRENCY")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    config = config.with_partition_concurrency(n);
                }
                let t = KafkaTransport::new(config)?;
                backstop_drain(t, group, source, n, &done).await?
            }
        },
    };
    let cpu = cpu_seconds();
    let samples = sampler.stop();
    let hwm_kib = status_kib("VmHWM:").unwrap_or(0);
    let peak_kib = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let at: Vec<Value> = CHECKPOINTS
        .iter()
        .map(|&pct| {
            let want = n * pct / 100;
            // Samples taken once everything was handled may come after the
            // consumer closed: used only when there is no other.
            let working = || samples.iter().filter(|s| s.done < n);
            let rss = working()
                .find(|s| s.done >= want)
                .or_else(|| working().next_back())
                .or(samples.last())
                .map_or(0, |s| s.rss_kib);
            json!([pct, rss])
        })
        .collect();
    Ok(json!({
        "consumer": kind.label(broker),
        "messages": done.load(Ordering::Relaxed),
        "seconds": measured.0.as_secs_f64(),
        "cpu_seconds": cpu,
        "start_rss_kib": start_kib,
        "peak_rss_kib": peak_kib,
        "hwm_kib": hwm_kib,
        "rss_at_pct_kib": at,
        "samples": samples.len(),
        "runner": measured.1,
    }))
}

/// Runs a default `Runner` with a no-op handler on `source` until `n`
/// messages were handled; the elapsed time and the runner's final counters.
async fn backstop_drain<T>(
    transport: T,
    group: &str,
    source: &str,
    n: u64,
    done: &Arc<AtomicU64>,
) -> anyhow::Result<(Duration, Value)>
where
    T: backstop::Subscriber
        + backstop::DelayPublisher
        + backstop::DeadLetterPublisher
        + backstop::Publisher,
{
    let runner = Runner::builder(transport)
        .with_group(group)
        .with_handler_options(
            source,
            handler_fn(|_: Bytes, _: Context| async { Ok(()) }),
            HandlerOptions::default(),
        )
        .build()
        .context("runner")?;
    let stats = runner.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    let counter = {
        let (stats, done) = (stats.clone(), done.clone());
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let task = tokio::spawn(async move {
            while flag.load(Ordering::Relaxed) {
                done.store(stats.snapshot().ok, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        (running, task)
    };
    let measured = watch(done, n, || run.is_finished()).await;
    counter.0.store(false, Ordering::Relaxed);
    let _ = counter.1.await;
    let _ = stop.send(());
    let report = run.await.context("runner task")?;
    let measured = measured?;
    let s = report.stats;
    done.store(s.ok, Ordering::Relaxed);
    Ok((
        measured,
        json!({
            "ok": s.ok,
            "handler_errors": s.handler_errors,
            "dead_lettered": s.dead_lettered,
            "delayed": s.delayed,
            "abandoned": s.abandoned,
            "drained": report.drained,
        }),
    ))
}

/// Waits until `done` reaches `n`: the time from the first handled message to
/// the last. Fails when nothing moves for `STALL` or the consumer quits.
async fn watch(done: &AtomicU64, n: u64, quit: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let mut first = None;
    let mut last = (0, Instant::now());
    loop {
        let now = done.load(Ordering::Relaxed);
        if now > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if now >= n {
            return Ok(first.map_or(Duration::ZERO, |f| f.elapsed()));
        }
        if now != last.0 {
            last = (now, Instant::now());
        }
        if last.1.elapsed() > STALL {
            bail!("no progress for {STALL:?} at {now}/{n}");
        }
        if quit() {
            bail!("the consumer stopped at {now}/{n}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// CPU time (user + system) of this process so far, from /proc/self/stat
/// (fields 14 and 15, in USER_HZ = 100 ticks a second on Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// A field of /proc/self/status in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    done: u64,
    rss_kib: u64,
}

/// Samples VmRSS every `SAMPLE_EVERY` on a thread of its own (not a task, so
/// a busy runtime cannot delay it), logging every tenth of the way.
struct Sampler {
    start_kib: u64,
    running: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(done: Arc<AtomicU64>, n: u64, label: &'static str) -> Self {
        let start_kib = status_kib("VmRSS:").unwrap_or(0);
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            let step = (n / 10).max(1);
            let mut next_log = step;
            loop {
                let d = done.load(Ordering::Relaxed);
                let rss_kib = status_kib("VmRSS:").unwrap_or(0);
                samples.push(Sample { done: d, rss_kib });
                if d >= next_log {
                    eprintln!(
                        "    {label}: {d}/{n} handled after {:.1} s, RSS {:.1} MiB",
                        started.elapsed().as_secs_f64(),
                        mib(rss_kib)
                    );
                    next_log = (d / step + 1) * step;
                }
                if !flag.load(Ordering::Relaxed) {
                    return samples;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self {
            start_kib,
            running,
            thread,
        }
    }

    fn stop(self) -> Vec<Sample> {
        self.running.store(false, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

// ---------------------------------------------------------------- the table

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn field(report: &Value, key: &str) -> anyhow::Result<f64> {
    report[key]
        .as_f64()
        .ok_or_else(|| anyhow!("report without {key:?}: {report}"))
}

fn print_table(broker: Broker, n: u64, setup: &str, reports: &[Value]) -> anyhow::Result<()> {
    let [raw, ours] = reports else {
        bail!("expected two reports, got {}", reports.len());
    };
    println!();
    println!(
        "backlog-rss: {n} messages of ~{} B JSON waiting; {setup}; each consumer in its own process, VmRSS sampled every {} ms",
        payload_size(n),
        SAMPLE_EVERY.as_millis()
    );
    println!(
        "{:<16} {:>9} {:>8} {:>9} {:>7} {:>10} {:>10} {:>10}   RSS MiB at 10/25/50/75/95% handled",
        "consumer", "messages", "seconds", "msg/s", "CPU s", "start MiB", "peak MiB", "VmHWM MiB"
    );
    let mut rows = Vec::new();
    for r in [raw, ours] {
        let messages = field(r, "messages")?;
        let seconds = field(r, "seconds")?;
        let rate = if seconds > 0.0 {
            messages / seconds
        } else {
            0.0
        };
        let peak = mib(field(r, "peak_rss_kib")? as u64);
        let hwm = mib(field(r, "hwm_kib")? as u64);
        let along: Vec<String> = r["rss_at_pct_kib"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| format!("{:.1}", mib(p[1].as_u64().unwrap_or(0))))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:>9} {:>8.1} {:>9.0} {:>7.1} {:>10.1} {:>10.1} {:>10.1}   {}",
            r["consumer"].as_str().unwrap_or("?"),
            messages,
            seconds,
            rate,
            field(r, "cpu_seconds")?,
            mib(field(r, "start_rss_kib")? as u64),
            peak,
            hwm,
            along.join(" / ")
        );
        rows.push((rate, peak.max(hwm)));
    }
    let (raw_rate, raw_peak) = rows[0];
    let (ours_rate, ours_peak) = rows[1];
    println!(
        "backstop/raw: peak RSS {:.2}x, throughput {:.2}x",
        ours_peak / raw_peak,
        ours_rate / raw_rate
    );
    if !ours["runner"].is_null() {
        println!("backstop runner counters: {}", ours["runner"]);
    }
    let pass = ours_peak < GOAL_MIB;
    println!(
        "goal ({}): backstop peak RSS {:.1} MiB < {GOAL_MIB:.0} MiB: {}",
        match broker {
            Broker::Rabbitmq => "rabbitmq",
            Broker::Kafka => "kafka",
        },
        ours_peak,
        if pass { "PASS" } else { "FAIL" }
    );
    ensure!(
        pass,
        "backstop's peak RSS {ours_peak:.1} MiB is over the goal"
    );
    Ok(())
}
