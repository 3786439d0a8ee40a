//! The worker's `tracing` subscriber: text or JSON lines; JSON events carry the
//! fields of the `backstop.handle` span they happen in (message id, source,
//! attempt, outcome).

use super::config::{LogFormat, WorkerConfig, WorkerConfigError};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the subscriber unless one is installed already (tests, or a
/// binary that set up its own).
pub(crate) fn init(config: &WorkerConfig) -> Result<(), WorkerConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(&v).map_err(|e| WorkerConfigError::new("RUST_LOG", e.to_string()))?
        }
        _ => EnvFilter::try_new(&config.logging.level)
            .map_err(|e| WorkerConfigError::new("logging.level", e.to_string()))?,
    };
    let fmt = match config.logging.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    let registry = registry.with(super::otel::layer(config)?);
    let _ = registry.try_init();
    Ok(())
}
