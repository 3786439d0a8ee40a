//! The worker's broker and server sections: `[kafka]`, `[rabbitmq]`,
//! `[http]`, `[health]`, `[metrics]`, `[logging]`, `[tracing]`.

use super::{Dur, WorkerConfigError};
use backstop_core::transport::redacted;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[kafka]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaSection {
    /// Bootstrap servers (default `127.0.0.1:9092`).
    #[serde(default = "KafkaSection::default_brokers")]
    pub brokers: String,
    /// More librdkafka properties (`"security.protocol" = "SASL_SSL"`, ...).
    /// No secrets here: a property whose name says password or secret is
    /// refused; use `password_file` / `BACKSTOP_KAFKA__PASSWORD`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// `sasl.password`, from the environment only (`BACKSTOP_KAFKA__PASSWORD`).
    pub password: Option<String>,
    /// A file holding `sasl.password` (a mounted secret).
    pub password_file: Option<PathBuf>,
    /// `fetch.wait.max.ms`.
    pub fetch_wait_max: Option<Dur>,
    /// Admin and metadata request timeout.
    pub request_timeout: Option<Dur>,
    /// Partitions of the tier and DLQ topics Backstop creates.
    pub tier_partitions: Option<i32>,
    /// Replication factor of the topics Backstop creates.
    pub replication_factor: Option<i32>,
    /// Messages of one partition handled at once, never two of one key
    /// (default 1: strict partition order).
    pub partition_concurrency: Option<usize>,
    /// How long DLQ topics Backstop creates keep dead letters (default:
    /// for ever, `retention.ms` = `Long.MAX_VALUE`).
    pub dead_letter_retention: Option<Dur>,
    /// How long a revocation waits for the revoked partitions' work in
    /// flight (default 30 s; `0s` turns it off).
    pub revoke_wait: Option<Dur>,
}

impl KafkaSection {
    fn default_brokers() -> String {
        "127.0.0.1:9092".into()
    }
}

impl Default for KafkaSection {
    fn default() -> Self {
        Self {
            brokers: Self::default_brokers(),
            properties: BTreeMap::new(),
            password: None,
            password_file: None,
            fetch_wait_max: None,
            request_timeout: None,
            tier_partitions: None,
            replication_factor: None,
            partition_concurrency: None,
            dead_letter_retention: None,
            revoke_wait: None,
        }
    }
}

impl fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSection")
            .field("brokers", &self.brokers)
            .field(
                "properties",
                &self
                    .properties
                    .iter()
                    .map(|(k, v)| {
                        let shown = if backstop_core::transport::is_secret_property(k) {
                            "***"
                        } else {
                            v.as_str()
                        };
                        (k.as_str(), shown)
                    })
                    .collect::<BTreeMap<_, _>>(),
            )
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .finish_non_exhaustive()
    }
}

/// `[rabbitmq]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RabbitSection {
    /// `amqp://user@host:5672/vhost` (default `amqp://guest@127.0.0.1:5672/%2f`).
    /// A password in the URL is accepted only from the environment
    /// (`BACKSTOP_RABBITMQ__URL`).
    #[serde(default = "RabbitSection::default_url")]
    pub url: String,
    /// The password, from the environment only (`BACKSTOP_RABBITMQ__PASSWORD`).
    pub password: Option<String>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// `quorum` (default) or `classic`.
    #[serde(default)]
    pub queue_type: QueueTypeName,
    /// The connection name shown in the management UI.
    pub connection_name: Option<String>,
    /// How long to wait for a publisher confirm.
    pub confirm_timeout: Option<Dur>,
    /// How long connecting may take (default 10 s).
    pub connect_timeout: Option<Dur>,
}

/// `rabbitmq.queue_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueTypeName {
    /// Quorum queues.
    #[default]
    Quorum,
    /// Classic queues.
    Classic,
}

impl RabbitSection {
    fn default_url() -> String {
        "amqp://guest@127.0.0.1:5672/%2f".into()
    }
}

impl Default for RabbitSection {
    fn default() -> Self {
        Self {
            url: Self::default_url(),
            password: None,
            password_file: None,
            queue_type: QueueTypeName::default(),
            connection_name: None,
            confirm_timeout: None,
            connect_timeout: None,
        }
    }
}

impl fmt::Debug for RabbitSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSection")
            .field("url", &redacted(&self.url))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .field("queue_type", &self.queue_type)
            .finish_non_exhaustive()
    }
}

/// `[http]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpSection {
    /// Serve `/healthz`, `/readyz`, `/metrics` (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address (default `0.0.0.0:9464`).
    #[serde(default = "HttpSection::default_listen")]
    pub listen: SocketAddr,
}

fn yes() -> bool {
    true
}

impl HttpSection {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 9464))
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: Self::default_listen(),
        }
    }
}

/// `[health]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthSection {
    /// `/healthz` fails when a source loop made no progress this long (default 60s).
    #[serde(default = "HealthSection::default_stall_after")]
    pub stall_after: Dur,
    /// How often the broker is checked for `/readyz` (default 5s).
    #[serde(default = "HealthSection::default_check_interval")]
    pub check_interval: Dur,
    /// A broker check slower than this fails (default 5s).
    #[serde(default = "HealthSection::default_check_timeout")]
    pub check_timeout: Dur,
    /// How long routing a copy may take before `/healthz` counts its
    /// delivery as stuck (default 60s; see `RunnerBuilder::with_routing_deadline`).
    #[serde(default = "HealthSection::default_routing_deadline")]
    pub routing_deadline: Dur,
}

impl HealthSection {
    fn default_stall_after() -> Dur {
        Dur(Duration::from_secs(60))
    }
    fn default_check_interval() -> Dur {
        Dur(Duration::from_secs(5))
    }
    fn default_check_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    fn default_routing_deadline() -> Dur {
        Dur(Duration::from_secs(60))
    }
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            stall_after: Self::default_stall_after(),
            check_interval: Self::default_check_interval(),
            check_timeout: Self::default_check_timeout(),
            routing_deadline: Self::default_routing_deadline(),
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MetricsSection {
    /// Install the Prometheus exporter (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often lag, queue depth, retry backlog and DLQ depth/age are read
    /// from the broker (default 15s; "0s" = never).
    #[serde(default = "MetricsSection::default_backlog_interval")]
    pub backlog_interval: Dur,
    /// Buckets (seconds) of `backstop_handler_duration_seconds`.
    #[serde(default = "MetricsSection::default_handler_buckets")]
    pub handler_buckets: Vec<f64>,
    /// Buckets (seconds) of `backstop_end_to_end_seconds`.
    #[serde(default = "MetricsSection::default_end_to_end_buckets")]
    pub end_to_end_buckets: Vec<f64>,
}

impl MetricsSection {
    fn default_backlog_interval() -> Dur {
        Dur(Duration::from_secs(15))
    }
    /// 5 ms to 60 s, with 1.5 s for the p95 alert.
    pub fn default_handler_buckets() -> Vec<f64> {
        vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]
    }
    /// 10 ms to 6 h: end to end includes delay tiers.
    pub fn default_end_to_end_buckets() -> Vec<f64> {
        vec![
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
        ]
    }
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            backlog_interval: Self::default_backlog_interval(),
            handler_buckets: Self::default_handler_buckets(),
            end_to_end_buckets: Self::default_end_to_end_buckets(),
        }
    }
}

/// `[logging]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LoggingSection {
    /// `text` (default) or `json` (one object a line, with the span's fields:
    /// message id, source, attempt, outcome).
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter (default `info`); `RUST_LOG` wins when set.
    #[serde(default = "LoggingSection::default_level")]
    pub level: String,
}

/// `logging.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

impl LoggingSection {
    fn default_level() -> String {
        "info".into()
    }
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: Self::default_level(),
        }
    }
}

/// `[tracing]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TracingSection {
    /// Export spans with OpenTelemetry OTLP to this endpoint (feature `otel`),
    /// e.g. `http://127.0.0.1:4318` (OTLP over HTTP; `/v1/traces` is added).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (default: the group).
    pub service_name: Option<String>,
}

impl HealthSection {
    pub(super) fn validate(&self) -> Result<(), WorkerConfigError> {
        if self.check_interval.0.is_zero() {
            return Err(WorkerConfigError::new(
                "health.check_interval",
                "must be greater than zero",
            ));
        }
        if self.check_timeout.0.is_zero() {
            return Err(WorkerConfigError::new(
                "health.check_timeout",
                "must be greater than zero",
            ));
        }
        if self.stall_after.0 < Duration::from_secs(2) {
            return Err(WorkerConfigError::new(
                "health.stall_after",
                "must be at least 2s (idle source loops beat once a second)",
            ));
        }
        Ok(())
    }
}

impl MetricsSection {
    pub(super) fn validate(&self) -> Result<(), WorkerConfigError> {
        for (name, buckets) in [
            ("metrics.handler_buckets", &self.handler_buckets),
            ("metrics.end_to_end_buckets", &self.end_to_end_buckets),
        ] {
            let increasing = buckets
                .iter()
                .zip(buckets.iter().skip(1))
                .all(|(a, b)| a < b);
            if buckets.is_empty()
                || !increasing
                || buckets.iter().any(|b| !b.is_finite() || *b <= 0.0)
            {
                return Err(WorkerConfigError::new(
                    name,
                    "must be positive, increasing numbers of seconds",
                ));
            }
        }
        Ok(())
    }
}

impl TracingSection {
    pub(super) fn validate(&self) -> Result<(), WorkerConfigError> {
        #[cfg(not(feature = "otel"))]
        if self.otlp_endpoint.is_some() {
            return Err(WorkerConfigError::new(
                "tracing.otlp_endpoint",
                "exporting spans needs the backstop feature `otel`",
            ));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(WorkerConfigError::new(
                "tracing.otlp_endpoint",
                format!("{e:?} is not an http(s) URL"),
            ));
        }
        Ok(())
    }
}
