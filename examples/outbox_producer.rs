//! Sends demo orders through Backstop's disk-backed outbox to RabbitMQ or Kafka.
//!
//! ```sh
//! cargo run -p backstop-examples --example outbox_producer -- --broker rabbitmq --destination orders --count 10000
//! cargo run -p backstop-examples --example outbox_producer -- --broker kafka --brokers 127.0.0.1:9092 --destination orders
//! sqlite3 outbox.db "SELECT count(*) FROM outbox_pending"   # what is still waiting for the broker
//! ```
//!
//! Stop the broker while it runs: sends keep being accepted (on disk), and the
//! relay delivers them once the broker is back.

use backstop_examples::outbox_producer::{self, Args};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let report = outbox_producer::run(&args).await?;
    eprintln!(
        "done: accepted={} direct={} left_pending={} ({:.2?})",
        report.accepted, report.direct, report.left_pending, report.elapsed
    );
    Ok(())
}
