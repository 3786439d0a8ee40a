//! The RabbitMQ worker example: a consumer over one queue, and a producer mode
//! that publishes demo orders.

use crate::demo::{demo_policy, publish_demo, run_demo};
use backstop::rabbitmq::{RabbitConfig, RabbitTransport};
use backstop::{RunReport, Subscription};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    about = "A Backstop consumer over one RabbitMQ queue (or, with --produce, a producer of demo orders)"
)]
pub struct Args {
    /// AMQP URL (`amqp://user:pass@host:port/vhost`, or `amqps://`).
    #[arg(
        long,
        env = "BACKSTOP_AMQP_URL",
        // `--help` would print the variable's value, password included.
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The source queue.
    #[arg(long, default_value = "orders")]
    pub queue: String,
    /// Publish this many demo orders (declaring the queues), then exit.
    #[arg(long)]
    pub produce: Option<u64>,
    /// In --produce mode: every n-th order is invalid (permanent failure).
    #[arg(long, default_value_t = 20)]
    pub permanent_every: u64,
    /// In --produce mode: every n-th order fails twice before it succeeds.
    #[arg(long, default_value_t = 7)]
    pub flaky_every: u64,
    /// Delay tiers, shortest first.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "1s,5s")]
    pub tiers: Vec<Duration>,
    /// Messages in flight at once (also the prefetch).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Append the id of every handled message to this file (crash tests).
    #[arg(long)]
    pub handled_log: Option<PathBuf>,
}

impl Args {
    fn transport(&self) -> anyhow::Result<RabbitTransport> {
        Ok(RabbitTransport::new(RabbitConfig::new(&self.amqp_url))?)
    }
}

/// Publishes `count` demo orders (declaring the queues); returns their ids.
pub async fn produce(args: &Args, count: u64) -> anyhow::Result<Vec<String>> {
    let transport = args.transport()?;
    transport
        .declare(
            &Subscription::new(args.queue.clone(), "producer")
                .with_tiers(demo_policy(&args.tiers).tiers().to_vec())
                .with_prefetch(1),
        )
        .await?;
    publish_demo(
        &transport,
        &args.queue,
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
        args.transport()?,
        &format!("{}-worker", args.queue),
        &args.queue,
        args.concurrency,
        &args.tiers,
        args.handled_log.as_deref(),
        shutdown,
    )
    .await
}
