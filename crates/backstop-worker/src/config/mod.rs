//! A worker's configuration: a TOML file, then `BACKSTOP_<SECTION>__<FIELD>`
//! environment variables over it. Every field has a default or a refusal at
//! start that names it. Durations are written `"500ms"`, `"30s"`, `"5m"`.
//! Secrets (passwords) come from the environment or from files, never from
//! the config file, and are never logged.

mod handler;
mod sections;

pub use handler::{BreakerSection, DedupeSection, DedupeStoreName, HandlerSection, RetrySection};
pub use sections::{
    HealthSection, HttpSection, KafkaSection, LogFormat, LoggingSection, MetricsSection,
    QueueTypeName, RabbitSection, TracingSection,
};

use backstop_core::HandlerOptions;
use backstop_core::transport::redacted;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
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
        backstop_core::config_serde::duration(d).map(Dur)
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
        self.health.validate()?;
        self.metrics.validate()?;
        if self.logging.level.trim().is_empty() {
            return Err(WorkerConfigError::new("logging.level", "must not be empty"));
        }
        self.tracing.validate()?;
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
/// (Only the broker backends have secrets.)
#[cfg(any(feature = "kafka", feature = "rabbitmq"))]
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
