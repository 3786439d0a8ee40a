//! The kafka_worker example as a binary the crash tests can start and kill.

use backstop_examples::kafka_worker::{self, Args};
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
        kafka_worker::produce(&args, count).await?;
        return Ok(());
    }
    let report = kafka_worker::work(&args, kafka_worker::signal()).await?;
    anyhow::ensure!(
        report.drained,
        "in-flight work did not finish before the deadline"
    );
    Ok(())
}
