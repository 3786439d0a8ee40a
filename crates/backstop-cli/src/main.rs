//! `backstop`: inspect and group dead letters; inspect outboxes.
//! Exit codes: 0 ok, 1 error, 2 usage.

use backstop_cli::{Cli, run};
use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's convention), help and version with 0.
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    match run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            drop(out);
            eprintln!("backstop: {e:#}");
            ExitCode::from(1)
        }
    }
}
