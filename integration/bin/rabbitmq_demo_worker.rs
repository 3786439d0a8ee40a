//! The rabbitmq_worker example as a binary the crash tests can start and kill.

use backstop_examples::kafka_worker::signal;
use backstop_examples::rabbitmq_worker::{self, Args};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(count) = args.produce {
        rabbitmq_worker::produce(&args, count).await?;
        return Ok(());
    }
    let report = rabbitmq_worker::work(&args, signal()).await?;
    anyhow::ensure!(
        report.drained,
        "in-flight work did not finish before the deadline"
    );
    Ok(())
}
