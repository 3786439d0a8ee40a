//! Outbox settings, validated at open.

use backstop_core::{Backoff, ConfigError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How `send` gets a message to the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Every send is written to disk (fsynced, group commit) and returns; the
    /// relay publishes it. The safest mode.
    Durable,
    /// Publish straight to the broker with `timeout`; if that fails or times
    /// out, write to disk and let the relay publish it. A key that has
    /// entries waiting on disk always goes through the disk, so its order holds.
    DirectWithFallback {
        /// How long a direct publish may take before the message is spooled.
        timeout: Duration,
    },
}

/// What `send` does when the outbox is at its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Fail at once with `SendErrorKind::Full` (the default).
    Fail,
    /// Wait up to this long for the relay to make room, then fail.
    Wait(Duration),
}

/// Outbox settings.
///
/// ```
/// use backstop_outbox::{Mode, OutboxConfig};
/// use std::time::Duration;
/// let c = OutboxConfig::new("/var/lib/orders/outbox.db")
///     .with_mode(Mode::DirectWithFallback { timeout: Duration::from_millis(500) })
///     .with_max_pending_entries(100_000);
/// assert!(c.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub(crate) path: PathBuf,
    pub(crate) name: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) max_pending_entries: u64,
    pub(crate) max_pending_bytes: u64,
    pub(crate) when_full: WhenFull,
    pub(crate) max_batch: usize,
    pub(crate) relay_in_flight: usize,
    pub(crate) relay_window: usize,
    pub(crate) relay_backoff: Backoff,
    pub(crate) relay_publish_timeout: Duration,
    pub(crate) trace_propagation: Option<std::sync::Arc<dyn backstop_core::TracePropagation>>,
}

impl OutboxConfig {
    /// An outbox in the SQLite file at `path` (created if missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            name: None,
            mode: Mode::Durable,
            max_pending_entries: 1_000_000,
            max_pending_bytes: 1 << 30,
            when_full: WhenFull::Fail,
            max_batch: 1024,
            relay_in_flight: 256,
            relay_window: 10_000,
            relay_backoff: Backoff::exponential(
                Duration::from_millis(100),
                Duration::from_secs(30),
            ),
            relay_publish_timeout: Duration::from_secs(30),
            trace_propagation: None,
        }
    }

    /// Writes the sender's trace context (the current span) into each sent
    /// message that has no `traceparent` yet (an OpenTelemetry propagator:
    /// `backstop::worker::trace_propagation()` with the `otel` feature). The
    /// header is stored with the message and published with it.
    #[must_use]
    pub fn with_trace_propagation(
        mut self,
        propagation: std::sync::Arc<dyn backstop_core::TracePropagation>,
    ) -> Self {
        self.trace_propagation = Some(propagation);
        self
    }

    /// The `outbox` metric label; default the file name without extension.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// [`Mode::Durable`] (default) or [`Mode::DirectWithFallback`].
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Cap on entries waiting for the broker (default 1,000,000).
    #[must_use]
    pub fn with_max_pending_entries(mut self, n: u64) -> Self {
        self.max_pending_entries = n;
        self
    }

    /// Cap on the bytes of entries waiting for the broker (default 1 GiB):
    /// payload, key, headers and destination.
    #[must_use]
    pub fn with_max_pending_bytes(mut self, n: u64) -> Self {
        self.max_pending_bytes = n;
        self
    }

    /// What `send` does at the cap (default [`WhenFull::Fail`]).
    #[must_use]
    pub fn with_when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// Most sends one commit (one fsync) holds (default 1024).
    #[must_use]
    pub fn with_max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// Publishes the relay keeps in flight, across keys (default 256).
    #[must_use]
    pub fn with_relay_in_flight(mut self, n: usize) -> Self {
        self.relay_in_flight = n;
        self
    }

    /// Entries the relay holds in memory at once (default 10,000); the rest
    /// waits on disk.
    #[must_use]
    pub fn with_relay_window(mut self, n: usize) -> Self {
        self.relay_window = n;
        self
    }

    /// Backoff between publish attempts of one entry (default exponential,
    /// 100 ms to 30 s, full jitter).
    #[must_use]
    pub fn with_relay_backoff(mut self, backoff: Backoff) -> Self {
        self.relay_backoff = backoff;
        self
    }

    /// How long one relay publish may wait for the broker's confirm before it
    /// counts as failed and is retried (default 30 s).
    #[must_use]
    pub fn with_relay_publish_timeout(mut self, timeout: Duration) -> Self {
        self.relay_publish_timeout = timeout;
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map_or_else(|| "outbox".to_owned(), |s| s.to_string_lossy().into_owned())
        })
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("outbox.path", "must not be empty"));
        }
        if let Mode::DirectWithFallback { timeout } = self.mode
            && timeout.is_zero()
        {
            return Err(ConfigError::new(
                "outbox.mode.timeout",
                "must be greater than zero",
            ));
        }
        for (field, value) in [
            ("outbox.max_pending_entries", self.max_pending_entries),
            ("outbox.max_pending_bytes", self.max_pending_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        for (field, value) in [
            ("outbox.max_batch", self.max_batch),
            ("outbox.relay_in_flight", self.relay_in_flight),
            ("outbox.relay_window", self.relay_window),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        if self.relay_publish_timeout.is_zero() {
            return Err(ConfigError::new(
                "outbox.relay_publish_timeout",
                "must be greater than zero",
            ));
        }
        if let WhenFull::Wait(d) = self.when_full
            && d.is_zero()
        {
            return Err(ConfigError::new(
                "outbox.when_full",
                "a wait must be greater than zero (or use WhenFull::Fail)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let bad = [
            (OutboxConfig::new(""), "outbox.path"),
            (
                OutboxConfig::new("x.db").with_mode(Mode::DirectWithFallback {
                    timeout: Duration::ZERO,
                }),
                "outbox.mode.timeout",
            ),
            (
                OutboxConfig::new("x.db").with_max_pending_entries(0),
                "outbox.max_pending_entries",
            ),
            (
                OutboxConfig::new("x.db").with_max_pending_bytes(0),
                "outbox.max_pending_bytes",
            ),
            (
                OutboxConfig::new("x.db").with_max_batch(0),
                "outbox.max_batch",
            ),
            (
                OutboxConfig::new("x.db").with_relay_in_flight(0),
                "outbox.relay_in_flight",
            ),
            (
                OutboxConfig::new("x.db").with_when_full(WhenFull::Wait(Duration::ZERO)),
                "outbox.when_full",
            ),
        ];
        for (config, field) in bad {
            assert_eq!(config.validate().expect_err(field).field, field);
        }
        assert_eq!(OutboxConfig::new("/tmp/orders.db").label(), "orders");
    }
}
