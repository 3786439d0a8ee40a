//! The Kafka worker example: a consumer binary over one topic, and a producer
//! mode that publishes demo orders.

use crate::demo::{DemoHandler, demo_message};
use backstop::kafka::{KafkaConfig, KafkaTransport};
use backstop::{Backoff, DelayTier, HandlerOptions, Publisher, RetryPolicy, RunReport, Runner};
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

/// Publishes `count` demo orders; returns their message ids.
pub async fn produce(args: &Args, count: u64) -> anyhow::Result<Vec<String>> {
    let transport = KafkaTransport::new(args.config())?;
    transport
        .admin()
        .ensure_topic(&args.topic, args.partitions)
        .await?;
    let mut ids = Vec::with_capacity(count as usize);
    let mut sends = Vec::new();
    for n in 0..count {
        let m = demo_message(n, args.permanent_every, args.flaky_every);
        ids.push(m.id().unwrap_or_default().to_owned());
        let t = transport.clone();
        let topic = args.topic.clone();
        sends.push(tokio::spawn(async move { t.publish(&topic, m).await }));
    }
    for s in sends {
        s.await??;
    }
    Ok(ids)
}

/// Runs the worker until `shutdown` completes.
pub async fn work(
    args: &Args,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunReport> {
    let transport = KafkaTransport::new(args.config())?;
    let handler = match &args.handled_log {
        Some(path) => DemoHandler::recording(path)?,
        None => DemoHandler::default(),
    };
    let policy = RetryPolicy::default()
        .with_backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        ))
        .with_tiers(args.tiers.iter().map(|d| DelayTier::new(*d)));
    let runner = Runner::builder(transport)
        .with_group(&args.group)
        .with_max_in_flight(args.concurrency)
        .with_handler_options(
            &args.topic,
            handler,
            HandlerOptions::default()
                .with_name("demo-orders")
                .with_concurrency(args.concurrency)
                .with_timeout(Duration::from_secs(10))
                .with_policy(policy),
        )
        .build()?;
    Ok(runner.run(shutdown).await)
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
