//! The outbox_producer example as a binary the crash test can start and kill.

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
    outbox_producer::run(&args).await?;
    Ok(())
}
