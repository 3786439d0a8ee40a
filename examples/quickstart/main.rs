//! `cargo run --example quickstart`: 1,000 orders through the in-memory broker,
//! with transient failures that recover, permanent ones and undecodable ones.

use backstop_quickstart as quickstart;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs stay quiet unless asked for (RUST_LOG=info, a level: no module
    // filters here, which would build a regex engine), so the table is
    // readable; a worker binary would log at info.
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::ERROR);
    tracing_subscriber::fmt().with_max_level(level).init();
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
