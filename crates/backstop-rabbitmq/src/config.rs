//! RabbitMQ configuration: validated at start, the password never printed.

use backstop_core::{ConfigError, DelayTier};
use std::fmt;
use std::time::Duration;

/// Environment variable with the default AMQP URL.
pub const AMQP_URL_ENV: &str = "BACKSTOP_AMQP_URL";

/// The type of queues Backstop declares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, with at-least-once dead-lettering (recommended).
    #[default]
    Quorum,
    /// Classic queues.
    Classic,
}

/// How a RabbitMQ transport connects and what it declares.
///
/// ```
/// use backstop_rabbitmq::RabbitConfig;
/// let c = RabbitConfig::new("amqp://app:s3cret@127.0.0.1:5672/%2f");
/// assert!(c.validate().is_ok());
/// assert!(!format!("{c:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    url: String,
    queue_type: QueueType,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    connection_name: String,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redacted(&self.url))
            .field("queue_type", &self.queue_type)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

pub use backstop_core::transport::redacted;

impl RabbitConfig {
    /// An AMQP URL: `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queue_type: QueueType::default(),
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            connection_name: format!(
                "backstop@{}:{}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id()
            ),
        }
    }

    /// From `BACKSTOP_AMQP_URL`, else the local broker.
    pub fn from_env() -> Self {
        Self::new(
            std::env::var(AMQP_URL_ENV)
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        )
    }

    /// Queue type of declared queues (default quorum).
    #[must_use]
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// How long a publish waits for the broker's confirm before it fails and the
    /// message is handed back.
    #[must_use]
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long connecting (TCP, TLS, the AMQP handshake, the publish
    /// channel) may take before it fails: a broker that does not answer
    /// (a blackholed address) never stalls publishing longer (default 10 s).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The name the connection shows in `rabbitmqctl list_connections` and the
    /// management UI (client property `connection_name`); default
    /// `backstop@<host>:<pid>`.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// See [`with_connection_name`](Self::with_connection_name).
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The URL without its password.
    pub fn display_url(&self) -> String {
        redacted(&self.url)
    }

    pub(crate) fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    pub(crate) fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Checks the configuration; the error names the field (never the password).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(ConfigError::new(
                "rabbitmq.url",
                format!(
                    "{} must start with amqp:// or amqps:// (set {AMQP_URL_ENV} or pass --amqp-url)",
                    redacted(&self.url)
                ),
            ));
        }
        if self.url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(ConfigError::new(
                "rabbitmq.url",
                format!("{} is not a valid AMQP URL", redacted(&self.url)),
            ));
        }
        if self.confirm_timeout.is_zero() {
            return Err(ConfigError::new(
                "rabbitmq.confirm_timeout",
                "must be greater than zero",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new(
                "rabbitmq.connect_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// `<queue>.retry.<tier>`: holds messages for the tier's delay, then
/// dead-letters them back to `<queue>`.
pub fn tier_queue(queue: &str, tier: &DelayTier) -> String {
    format!("{queue}.retry.{}", tier.name())
}

/// `<queue>.dlq`.
pub fn dlq_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("amqp://app:s3cret@host:5672/%2f"),
            "amqp://app:***@host:5672/%2f"
        );
        assert_eq!(redacted("amqp://host:5672"), "amqp://host:5672");
        // Unencoded characters that end other parts of a URL.
        for (url, shown) in [
            ("amqp://app:pa/ss@host/%2f", "amqp://app:***@host/%2f"),
            (
                "amqp://app:p@ss:w/rd?x@host:5672",
                "amqp://app:***@host:5672",
            ),
            ("amqp://app:#?&=@host", "amqp://app:***@host"),
            ("redis://h?pass=s3cret@x", "redis://***@x"),
            ("redis://h/0?password=s3cret", "redis://h/0?password=***"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
        for url in ["amqp://app:pa/ss@host", "amqp://app:s3/cr@et@h"] {
            let e = RabbitConfig::new(url.replace("amqp", "http"))
                .validate()
                .unwrap_err();
            assert!(
                !e.to_string().contains("pa/ss") && !e.to_string().contains("s3/cr"),
                "{e}"
            );
        }
        let e = RabbitConfig::new("http://u:s3cret@h")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "rabbitmq.url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn names_are_stable() {
        let t = DelayTier::new(Duration::from_secs(30));
        assert_eq!(tier_queue("orders", &t), "orders.retry.30s");
        assert_eq!(dlq_queue("orders"), "orders.dlq");
    }
}
