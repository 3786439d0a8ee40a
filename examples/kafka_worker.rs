//! A Backstop consumer over one Kafka topic.
//!
//! ```sh
//! ./scripts/tansu.sh start    # or docker compose up -d kafka (then --brokers 127.0.0.1:9092)
//! export BACKSTOP_KAFKA_BROKERS=127.0.0.1:19092
//! cargo run -p backstop-examples --example kafka_worker -- --produce 1000 --fetch-wait-max 20ms   # demo orders, 5 % invalid
//! cargo run -p backstop-examples --example kafka_worker -- --fetch-wait-max 20ms                  # work; Ctrl-C stops cleanly
//! ```

use backstop_examples::kafka_worker::{self, Args};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(count) = args.produce {
        let ids = kafka_worker::produce(&args, count).await?;
        println!("published {} demo orders to {}", ids.len(), args.topic);
        return Ok(());
    }
    tracing::info!(topic = %args.topic, group = %args.group, brokers = %args.brokers, "worker starting; Ctrl-C or SIGTERM stops it");
    let report = kafka_worker::work(&args, kafka_worker::signal()).await?;
    let s = report.stats;
    println!(
        "stopped: ok={} retried={} delayed={} dead_lettered={} failed_to_route={} drained={}",
        s.ok, s.retried, s.delayed, s.dead_lettered, s.failed_to_route, report.drained
    );
    Ok(())
}
