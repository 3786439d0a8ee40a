//! A production consumer binary: configuration from a TOML file and
//! `BACKSTOP_*` variables, Prometheus metrics and probes on :9464, JSON or
//! text logs, graceful shutdown on SIGTERM. See examples/worker.toml.
//!
//! ```sh
//! BACKSTOP_CONFIG=examples/worker.toml cargo run -p backstop-examples --example worker
//! curl -s 127.0.0.1:9464/readyz; curl -s 127.0.0.1:9464/metrics | grep backstop_
//! ```

use backstop::worker::Worker;
use backstop_examples::demo::DemoHandler;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let source = std::env::var("ORDERS_SOURCE").unwrap_or_else(|_| "orders".into());
    Worker::from_env()?
        .with_handler(source, DemoHandler::default())
        .run()
        .await?;
    Ok(())
}
