//! A Backstop consumer over one RabbitMQ queue.
//!
//! ```sh
//! export BACKSTOP_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f   # or docker compose up -d rabbitmq
//! cargo run -p backstop-examples --example rabbitmq_worker -- --produce 1000   # demo orders, 5 % invalid
//! cargo run -p backstop-examples --example rabbitmq_worker                     # work; Ctrl-C or SIGTERM stops it cleanly
//! ```

use backstop_examples::kafka_worker::signal;
use backstop_examples::rabbitmq_worker::{self, Args};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(count) = args.produce {
        let ids = rabbitmq_worker::produce(&args, count).await?;
        println!("published {} demo orders to {}", ids.len(), args.queue);
        return Ok(());
    }
    tracing::info!(queue = %args.queue, "worker starting; Ctrl-C or SIGTERM stops it");
    let report = rabbitmq_worker::work(&args, signal()).await?;
    let s = report.stats;
    println!(
        "stopped: ok={} retried={} delayed={} dead_lettered={} failed_to_route={} drained={}",
        s.ok, s.retried, s.delayed, s.dead_lettered, s.failed_to_route, report.drained
    );
    Ok(())
}
