//! A worker's configuration: a TOML file, then `BACKSTOP_<SECTION>__<FIELD>`
//! environment variables over it. Every field has a default or a refusal at
//! start that names it. Durations are written `"500ms"`, `"30s"`, `"5m"`.
//! Secrets (passwords) come from the environment or from files, never from
//! the config file, and are never logged.

use backstop_core::transport::redacted;
use backstop_core::{
    Backoff, CircuitBreaker, ClassAction, DelayTier, ErrorClass, FailureRate, HandlerOptions,
    Priority, RateLimit, RetryBudget, RetryPolicy,
};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable naming the config file ([`WorkerConfig::from_env`]).
pub const CONFIG_ENV: &str = "BACKSTOP_CONFIG";

/// A refused configuration: the field (a dotted path, as in the TOML file)
/// and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {reason}")]
pub struct WorkerConfigError {
    /// The field, e.g. `handlers.orders.timeout`.
    pub field: String,
    /// What is wrong with it (and where the value came from).
    pub reason: String,
}

impl WorkerConfigError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<figment::Error> for WorkerConfigError {
    fn from(e: figment::Error) -> Self {
        // figment paths start with the profile ("default").
        let path: Vec<&str> = e
            .path
            .iter()
            .map(String::as_str)
            .skip_while(|p| *p == "default")
            .collect();
        let from = e
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(source) => format!(" (from {source})"),
                None => format!(" (from {})", m.name),
            })
            .unwrap_or_default();
        let field = if path.is_empty() {
            "(config)".to_owned()
        } else {
            path.join(".")
        };
        Self::new(field, format!("{}{from}", e.kind))
    }
}

/// A duration written as text: `"500ms"`, `"30s"`, `"5m"`, `"1h 30m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration such as "500ms", "30s" or "5m""#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v.trim()).map(Dur).map_err(|e| {
                    E::custom(format!(
                        r#"{v:?} is not a duration ({e}); write e.g. "500ms", "30s", "5m""#
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Which broker the worker consumes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// Kafka (feature `kafka`), section `[kafka]`.
    Kafka,
    /// RabbitMQ (feature `rabbitmq`), section `[rabbitmq]`.
    Rabbitmq,
    /// The in-memory broker (feature `memory`): local runs and tests.
    Memory,
}

/// The whole configuration. See `examples/worker.toml` for every option.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// `kafka`, `rabbitmq` or `memory`; no default, a worker must say.
    pub broker: Option<BrokerKind>,
    /// Consumer group / service name (default: the executable's name).
    pub group: Option<String>,
    /// Deliveries in flight across all handlers (default 64).
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// How long in-flight work may take to finish at shutdown (default 30s).
    #[serde(default = "defaults::shutdown_deadline")]
    pub shutdown_deadline: Dur,
    /// Where a message goes when its DLQ refuses even its stub for good
    /// (default `backstop-unroutable` in the working directory; put it on a
    /// persistent volume). `backstop unroutable list <dir>` reads it.
    pub unroutable_dir: Option<std::path::PathBuf>,
    /// `[kafka]`.
    #[serde(default)]
    pub kafka: KafkaSection,
    /// `[rabbitmq]`.
    #[serde(default)]
    pub rabbitmq: RabbitSection,
    /// `[handlers.<source>]`: options of the handler of each source.
    #[serde(default)]
    pub handlers: BTreeMap<String, HandlerSection>,
    /// `[http]`: the health and metrics server.
    #[serde(default)]
    pub http: HttpSection,
    /// `[health]`.
    #[serde(default)]
    pub health: HealthSection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[logging]`.
    #[serde(default)]
    pub logging: LoggingSection,
    /// `[tracing]`.
    #[serde(default)]
    pub tracing: TracingSection,
}

mod defaults {
    use super::Dur;
    use std::time::Duration;
    pub(super) fn max_in_flight() -> usize {
        64
    }
    pub(super) fn shutdown_deadline() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

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

/// `[handlers.<source>]`: every field optional, defaults as in [`HandlerOptions`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HandlerSection {
    /// Handler name in metrics and DLQ headers (default: the source).
    pub name: Option<String>,
    /// Per-call timeout (default 30s).
    pub timeout: Option<Dur>,
    /// Messages of this source in flight (default 16).
    pub concurrency: Option<usize>,
    /// Deliveries of one message before it is dead-lettered as poison
    /// (default 10; 0 turns the guard off).
    pub max_deliveries: Option<u32>,
    /// `normal` (default) or `low`.
    pub priority: Option<PriorityName>,
    /// `[handlers.<source>.retry]`.
    pub retry: Option<RetrySection>,
    /// `[handlers.<source>.retry_budget]`: present = on.
    pub retry_budget: Option<BudgetSection>,
    /// `[handlers.<source>.circuit_breaker]`: present = on.
    pub circuit_breaker: Option<BreakerSection>,
    /// `[handlers.<source>.rate_limit]`: present = on.
    pub rate_limit: Option<RateSection>,
    /// `[handlers.<source>.dedupe]`: present = on.
    pub dedupe: Option<DedupeSection>,
}

/// `handlers.<source>.priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityName {
    /// Default.
    Normal,
    /// Yields in-flight slots to normal sources.
    Low,
}

/// `[handlers.<source>.retry]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetrySection {
    /// Attempts in process before the first delay tier (default 3).
    pub immediate_attempts: Option<u32>,
    /// First backoff (default 100ms).
    pub backoff_min: Option<Dur>,
    /// Backoff cap (default 5s).
    pub backoff_max: Option<Dur>,
    /// Backoff growth factor (default 2).
    pub backoff_factor: Option<f32>,
    /// Delay tiers, shortest first (default `["5s", "30s", "5m"]`; `[]` = none).
    pub tiers: Option<Vec<Dur>>,
    /// A retry-after hint up to this long is waited in process (default 1s).
    pub retry_after_inline_max: Option<Dur>,
    /// What a class of failure does: `{ timeout = "delay_only", permanent = "dead_letter" }`.
    #[serde(default)]
    pub on: BTreeMap<String, ClassActionName>,
}

/// An action of `handlers.<source>.retry.on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassActionName {
    /// Immediate retries, then tiers, then the DLQ.
    Retry,
    /// Tiers, then the DLQ.
    DelayOnly,
    /// The DLQ at once.
    DeadLetter,
}

/// `[handlers.<source>.retry_budget]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetSection {
    /// Window (1s to 60s, default 10s).
    pub window: Option<Dur>,
    /// Retries a second always allowed (default 10).
    pub min_per_sec: Option<u32>,
    /// Retries per success (default 0.2).
    pub ratio: Option<f32>,
}

/// `[handlers.<source>.circuit_breaker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerSection {
    /// Failures in a row that open it (default 5; 0 = no such trigger).
    pub consecutive_failures: Option<u32>,
    /// Share of failed calls that opens it (default 0.5; 0 = no such trigger).
    pub failure_rate: Option<f64>,
    /// Window of the failure rate (default 30s).
    pub failure_window: Option<Dur>,
    /// Calls in the window before the rate counts (default 20).
    pub minimum_calls: Option<u32>,
    /// First open interval (default 5s).
    pub open_for: Option<Dur>,
    /// Cap of the doubling open interval (default 60s).
    pub max_open_for: Option<Dur>,
    /// Messages let through while half-open (default 1).
    pub half_open_probes: Option<u32>,
}

/// `[handlers.<source>.rate_limit]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateSection {
    /// Messages a second.
    pub per_second: f64,
    /// Burst after an idle spell (default: one second's worth).
    pub burst: Option<u32>,
}

/// `[handlers.<source>.dedupe]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DedupeSection {
    /// `memory` (one process), `sqlite` (one node) or `redis` (shared).
    pub store: DedupeStoreName,
    /// SQLite file (store = "sqlite").
    pub path: Option<PathBuf>,
    /// Redis URL (store = "redis"); a password in it only from the environment.
    pub url: Option<String>,
    /// Header holding the idempotency key (default: the message id).
    pub key_header: Option<String>,
    /// How long a done key is remembered (default 24h).
    pub retention: Option<Dur>,
    /// How long a claim holds (default max(2 × timeout, 10s)).
    pub lease: Option<Dur>,
}

impl fmt::Debug for DedupeSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeSection")
            .field("store", &self.store)
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(redacted))
            .field("key_header", &self.key_header)
            .finish_non_exhaustive()
    }
}

/// `handlers.<source>.dedupe.store`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeStoreName {
    /// In process.
    Memory,
    /// A SQLite file (feature `dedupe-sqlite`).
    Sqlite,
    /// Redis (feature `dedupe-redis`).
    Redis,
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

/// Secrets that may not come from the config file, and whether they did.
const ENV_ONLY: [&str; 2] = ["kafka.password", "rabbitmq.password"];

impl WorkerConfig {
    /// Reads the file named by `BACKSTOP_CONFIG` (if set), then the
    /// `BACKSTOP_<SECTION>__<FIELD>` environment variables over it.
    pub fn from_env() -> Result<Self, WorkerConfigError> {
        let path = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        Self::load(path.as_deref())
    }

    /// Reads `path` (TOML; it must exist when given), then the environment
    /// over it.
    pub fn load(path: Option<&Path>) -> Result<Self, WorkerConfigError> {
        let mut figment = Figment::new();
        if let Some(p) = path {
            if !p.is_file() {
                return Err(WorkerConfigError::new(
                    CONFIG_ENV,
                    format!("config file {} does not exist", p.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(p));
        }
        Self::extract(figment.merge(env()))
    }

    /// Reads TOML text, then the environment over it (tests, embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, WorkerConfigError> {
        Self::extract(Figment::new().merge(Toml::string(text)).merge(env()))
    }

    fn extract(figment: Figment) -> Result<Self, WorkerConfigError> {
        let config: Self = figment.extract()?;
        // Secrets: never from the config file.
        for key in ENV_ONLY {
            if let Some(m) = figment.find_metadata(key)
                && !from_env(m)
            {
                let var = format!("BACKSTOP_{}", key.replace('.', "__").to_uppercase());
                return Err(WorkerConfigError::new(
                    key,
                    format!(
                        "secrets may not be written in the config file; set {var} or {key}_file"
                    ),
                ));
            }
        }
        for (key, url) in config.urls() {
            if url_has_password(&url)
                && let Some(m) = figment.find_metadata(&key)
                && !from_env(m)
            {
                let var = format!("BACKSTOP_{}", key.replace('.', "__").to_uppercase());
                return Err(WorkerConfigError::new(
                    key,
                    format!(
                        "holds a password, and secrets may not be written in the config file; set {var} or use password_file"
                    ),
                ));
            }
        }
        if let Some(k) = config
            .kafka
            .properties
            .keys()
            .find(|k| backstop_core::transport::is_secret_property(k))
        {
            return Err(WorkerConfigError::new(
                format!("kafka.properties.\"{k}\""),
                "secrets may not be written in the config file; use kafka.password_file or BACKSTOP_KAFKA__PASSWORD for sasl.password, and a file property (ssl.key.location, ssl.keystore.location) for keys",
            ));
        }
        config.validate()?;
        Ok(config)
    }

    fn urls(&self) -> Vec<(String, String)> {
        let mut urls = vec![("rabbitmq.url".to_owned(), self.rabbitmq.url.clone())];
        for (source, h) in &self.handlers {
            if let Some(url) = h.dedupe.as_ref().and_then(|d| d.url.clone()) {
                urls.push((format!("handlers.{source}.dedupe.url"), url));
            }
        }
        urls
    }

    /// Checks what serde cannot: ranges and combinations. Handler options are
    /// checked again, in full, when the runner is built.
    fn validate(&self) -> Result<(), WorkerConfigError> {
        if self.max_in_flight == 0 {
            return Err(WorkerConfigError::new(
                "max_in_flight",
                "must be at least 1",
            ));
        }
        if let Some(g) = &self.group
            && g.trim().is_empty()
        {
            return Err(WorkerConfigError::new("group", "must not be empty"));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(WorkerConfigError::new("kafka.brokers", "must not be empty"));
        }
        if !(self.rabbitmq.url.starts_with("amqp://") || self.rabbitmq.url.starts_with("amqps://"))
        {
            return Err(WorkerConfigError::new(
                "rabbitmq.url",
                format!(
                    "{:?} is not an AMQP URL (amqp://user@host:5672/vhost)",
                    redacted(&self.rabbitmq.url)
                ),
            ));
        }
        if self.health.check_interval.0.is_zero() {
            return Err(WorkerConfigError::new(
                "health.check_interval",
                "must be greater than zero",
            ));
        }
        if self.health.check_timeout.0.is_zero() {
            return Err(WorkerConfigError::new(
                "health.check_timeout",
                "must be greater than zero",
            ));
        }
        if self.health.stall_after.0 < Duration::from_secs(2) {
            return Err(WorkerConfigError::new(
                "health.stall_after",
                "must be at least 2s (idle source loops beat once a second)",
            ));
        }
        for (name, buckets) in [
            ("metrics.handler_buckets", &self.metrics.handler_buckets),
            (
                "metrics.end_to_end_buckets",
                &self.metrics.end_to_end_buckets,
            ),
        ] {
            if buckets.is_empty()
                || buckets.windows(2).any(|w| w[0] >= w[1])
                || buckets.iter().any(|b| !b.is_finite() || *b <= 0.0)
            {
                return Err(WorkerConfigError::new(
                    name,
                    "must be positive, increasing numbers of seconds",
                ));
            }
        }
        if self.logging.level.trim().is_empty() {
            return Err(WorkerConfigError::new("logging.level", "must not be empty"));
        }
        #[cfg(not(feature = "otel"))]
        if self.tracing.otlp_endpoint.is_some() {
            return Err(WorkerConfigError::new(
                "tracing.otlp_endpoint",
                "exporting spans needs the backstop feature `otel`",
            ));
        }
        if let Some(e) = &self.tracing.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(WorkerConfigError::new(
                "tracing.otlp_endpoint",
                format!("{e:?} is not an http(s) URL"),
            ));
        }
        for (source, h) in &self.handlers {
            h.options(source)?;
        }
        Ok(())
    }

    /// The group, or the executable's name.
    pub fn group(&self) -> String {
        self.group.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "backstop".into())
        })
    }

    /// The options of `source`'s handler: `[handlers.<source>]` over the
    /// defaults (no dedupe store yet: the worker opens it).
    pub fn handler_options(&self, source: &str) -> Result<HandlerOptions, WorkerConfigError> {
        self.handlers
            .get(source)
            .map_or_else(|| Ok(HandlerOptions::default()), |h| h.options(source))
    }
}

fn env() -> Env {
    // Only nested keys (`BACKSTOP_KAFKA__BROKERS`): single-underscore names
    // such as BACKSTOP_CONFIG or BACKSTOP_AMQP_URL are not config fields.
    Env::prefixed("BACKSTOP_")
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

fn from_env(m: &figment::Metadata) -> bool {
    m.name.contains("environment")
}

fn url_has_password(url: &str) -> bool {
    url.split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
        .and_then(|authority| authority.rsplit_once('@'))
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// Reads a secret file: trimmed of a trailing newline, refused when empty.
pub(crate) fn read_secret(field: &str, path: &Path) -> Result<String, WorkerConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        WorkerConfigError::new(field, format!("cannot read {}: {e}", path.display()))
    })?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(WorkerConfigError::new(
            field,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(secret)
}

impl HandlerSection {
    /// These settings over [`HandlerOptions::default`], checked as the runner
    /// will check them (errors named `handlers.<source>.<field>`).
    pub fn options(&self, source: &str) -> Result<HandlerOptions, WorkerConfigError> {
        let field = |f: &str| format!("handlers.{source}.{f}");
        let mut o = HandlerOptions::default();
        if let Some(n) = &self.name {
            if n.trim().is_empty() {
                return Err(WorkerConfigError::new(field("name"), "must not be empty"));
            }
            o = o.with_name(n.clone());
        }
        if let Some(t) = self.timeout {
            if t.0.is_zero() {
                return Err(WorkerConfigError::new(
                    field("timeout"),
                    "must be greater than zero",
                ));
            }
            o = o.with_timeout(t.0);
        }
        if let Some(c) = self.concurrency {
            if c == 0 {
                return Err(WorkerConfigError::new(
                    field("concurrency"),
                    "must be at least 1",
                ));
            }
            o = o.with_concurrency(c);
        }
        if let Some(m) = self.max_deliveries {
            o = o.with_max_deliveries((m > 0).then_some(m));
        }
        if let Some(p) = self.priority {
            o = o.with_priority(match p {
                PriorityName::Normal => Priority::Normal,
                PriorityName::Low => Priority::Low,
            });
        }
        let named =
            |e: backstop_core::ConfigError| WorkerConfigError::new(field(&e.field), e.reason);
        let mut policy = RetryPolicy::default();
        if let Some(r) = &self.retry {
            if let Some(n) = r.immediate_attempts {
                policy = policy.with_immediate_attempts(n);
            }
            let b = *policy.backoff();
            let mut backoff = Backoff::exponential(
                r.backoff_min.map_or(b.min(), |d| d.0),
                r.backoff_max.map_or(b.max(), |d| d.0),
            );
            if let Some(f) = r.backoff_factor {
                backoff = backoff.with_factor(f);
            }
            policy = policy.with_backoff(backoff);
            if let Some(tiers) = &r.tiers {
                policy = policy.with_tiers(tiers.iter().map(|d| DelayTier::new(d.0)));
            }
            if let Some(m) = r.retry_after_inline_max {
                policy = policy.with_retry_after_inline_max(m.0);
            }
            for (class, action) in &r.on {
                let Some(c) = ErrorClass::ALL.iter().find(|c| c.as_str() == class) else {
                    let known: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
                    return Err(WorkerConfigError::new(
                        field(&format!("retry.on.{class}")),
                        format!("unknown error class; one of {}", known.join(", ")),
                    ));
                };
                policy = policy.on(
                    *c,
                    match action {
                        ClassActionName::Retry => ClassAction::Retry,
                        ClassActionName::DelayOnly => ClassAction::DelayOnly,
                        ClassActionName::DeadLetter => ClassAction::DeadLetter,
                    },
                );
            }
        }
        policy.validate().map_err(|e| {
            let f = e
                .field
                .trim_start_matches("policy.")
                .replace("backoff.", "backoff_");
            WorkerConfigError::new(field(&format!("retry.{f}")), e.reason)
        })?;
        o = o.with_policy(policy);
        if let Some(b) = &self.retry_budget {
            let d = RetryBudget::default();
            let budget = RetryBudget::new(
                b.window.map_or(d.window(), |w| w.0),
                b.min_per_sec.unwrap_or(d.min_per_sec()),
                b.ratio.unwrap_or(d.ratio()),
            );
            budget.validate().map_err(named)?;
            o = o.with_retry_budget(Some(budget));
        }
        if let Some(c) = &self.circuit_breaker {
            let d = CircuitBreaker::default();
            let rate = d.failure_rate().unwrap_or(FailureRate {
                threshold: 0.5,
                window: Duration::from_secs(30),
                minimum_calls: 20,
            });
            let threshold = c.failure_rate.unwrap_or(rate.threshold);
            let breaker = CircuitBreaker::default()
                .with_consecutive_failures(match c.consecutive_failures {
                    Some(0) => None,
                    Some(n) => Some(n),
                    None => d.consecutive_failures(),
                })
                .with_failure_rate((threshold != 0.0).then_some(FailureRate {
                    threshold,
                    window: c.failure_window.map_or(rate.window, |w| w.0),
                    minimum_calls: c.minimum_calls.unwrap_or(rate.minimum_calls),
                }))
                .with_open_for(
                    c.open_for.map_or(d.open_for(), |x| x.0),
                    c.max_open_for.map_or(d.max_open_for(), |x| x.0),
                )
                .with_half_open_probes(c.half_open_probes.unwrap_or(d.half_open_probes()));
            breaker.validate().map_err(named)?;
            o = o.with_circuit_breaker(Some(breaker));
        }
        if let Some(r) = &self.rate_limit {
            let mut limit = RateLimit::per_second(r.per_second);
            if let Some(b) = r.burst {
                limit = limit.with_burst(b);
            }
            limit.validate().map_err(named)?;
            o = o.with_rate_limit(Some(limit));
        }
        if let Some(d) = &self.dedupe {
            match d.store {
                DedupeStoreName::Sqlite if d.path.is_none() => {
                    return Err(WorkerConfigError::new(
                        field("dedupe.path"),
                        "the sqlite store needs a file path",
                    ));
                }
                DedupeStoreName::Redis if d.url.is_none() => {
                    return Err(WorkerConfigError::new(
                        field("dedupe.url"),
                        "the redis store needs a URL (redis://host:6379)",
                    ));
                }
                _ => {}
            }
            if let Some(r) = d.retention
                && r.0.is_zero()
            {
                return Err(WorkerConfigError::new(
                    field("dedupe.retention"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(o)
    }
}
