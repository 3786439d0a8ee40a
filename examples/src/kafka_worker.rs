//! The Kafka worker example: a consumer binary over one topic, and a producer
//! mode that publishes demo orders.

use crate::demo::{publish_demo, run_demo};
use backstop::RunReport;
use backstop::kafka::{KafkaConfig, KafkaTransport};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    about = "A Backstop consumer over one Kafka topic (or, with --produce, a producer of demo orders)"
)]
pub struct Args {
    /// Bootstrap servers.
    #[arg(long, env = "BACKSTOP_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The source topic.
    #[arg(long, default_value = "orders")]
    pub topic: String,
    /// The consumer group.
    #[arg(long, default_value = "orders-worker")]
    pub group: String,
    /// Publish this many demo orders (creating the topic if needed), then exit.
    #[arg(long)]
    pub produce: Option<u64>,
    /// In --produce mode: every n-th order is invalid (permanent failure).
    #[arg(long, default_value_t = 20)]
    pub permanent_every: u64,
    /// In --produce mode: every n-th order fails twice before it succeeds.
    #[arg(long, default_value_t = 7)]
    pub flaky_every: u64,
    /// Partitions of the topic when --produce creates it.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Delay tiers, shortest first.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "1s,5s")]
    pub tiers: Vec<Duration>,
    /// How long the broker may hold a fetch (about 20ms for tansu).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fetch_wait_max: Option<Duration>,
    /// Messages in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Append the id of every handled message to this file (crash tests).
    #[arg(long)]
    pub handled_log: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.brokers);
        if let Some(wait) = self.fetch_wait_max {
            c = c.with_fetch_wait_max(wait);
        }
        c
    }
}

/// Publishes `count` demo orders (creating the topic if needed); returns their ids.
pub async fn produce(args: &Args, count: u64) -> anyhow::Result<Vec<String>> {
    let transport = KafkaTransport::new(args.config())?;
    transport
        .admin()
        .ensure_topic(&args.topic, args.partitions)
        .await?;
    publish_demo(
        &transport,
        &args.topic,
        count,
        args.permanent_every,
        args.flaky_every,
    )
    .await
}

/// Runs the worker until `shutdown` completes.
pub async fn work(
    args: &Args,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunReport> {
    run_demo(
        KafkaTransport::new(args.config())?,
        &args.group,
        &args.topic,
        args.concurrency,
        &args.tiers,
        args.handled_log.as_deref(),
        shutdown,
    )
    .await
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
