//! `cargo run --example quickstart`: 1,000 orders through the in-memory broker,
//! with transient failures that recover, permanent ones and undecodable ones.

use backstop_quickstart as quickstart;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs stay quiet unless asked for (RUST_LOG=backstop_core=info), so the
    // table is readable; a worker binary would log at info.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let summary = quickstart::run(1_000).await?;
    print!("{}", quickstart::render(&summary, 3));
    println!();
    println!("{}", summary.line());
    anyhow::ensure!(summary.lost == 0, "{} messages lost", summary.lost);
    anyhow::ensure!(
        summary.ok + summary.dead_lettered == summary.published,
        "ok + dead_lettered != published"
    );
    Ok(())
}
