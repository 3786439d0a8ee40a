//! Kafka configuration: validated at start, secrets never printed.

use crate::names::TopicNames;
use backstop_core::ConfigError;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Environment variable with the default bootstrap servers.
pub const BROKERS_ENV: &str = "BACKSTOP_KAFKA_BROKERS";

/// How a Kafka transport connects and behaves.
///
/// Security settings (SASL, TLS) are librdkafka properties passed through with
/// [`with_property`](Self::with_property); values of keys that look secret are
/// redacted in `Debug` and never appear in errors or logs.
///
/// ```
/// use backstop_kafka::KafkaConfig;
/// use std::time::Duration;
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .with_property("security.protocol", "SASL_SSL")
///     .with_property("sasl.password", "hunter2")
///     .with_fetch_wait_max(Duration::from_millis(20));
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("hunter2"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    brokers: String,
    properties: BTreeMap<String, String>,
    fetch_wait_max: Option<Duration>,
    delivery_timeout: Duration,
    request_timeout: Duration,
    tier_partitions: Option<i32>,
    replication_factor: i32,
    topic_names: TopicNames,
    partition_concurrency: usize,
    dead_letter_retention: Option<Duration>,
    revoke_wait: Duration,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if backstop_core::transport::is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &props)
            .field("fetch_wait_max", &self.fetch_wait_max)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("tier_partitions", &self.tier_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("partition_concurrency", &self.partition_concurrency)
            .field("revoke_wait", &self.revoke_wait)
            .finish_non_exhaustive()
    }
}

impl KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
            fetch_wait_max: None,
            delivery_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            tier_partitions: None,
            replication_factor: -1,
            topic_names: TopicNames::default(),
            partition_concurrency: 1,
            dead_letter_retention: None,
            revoke_wait: Duration::from_secs(30),
        }
    }

    /// How long a revocation (a rebalance taking partitions away) waits for
    /// the work still in flight on those partitions to settle before they go
    /// (default 30 s). Their offsets are committed up to what was handled,
    /// so the new owner starts after it instead of handling it again while
    /// this member still does. Past the wait the partitions go anyway (the
    /// rest is redelivered to the new owner, at least once). The group's
    /// rebalance waits meanwhile, up to `max.poll.interval.ms`; zero turns
    /// the wait off.
    #[must_use]
    pub fn with_revoke_wait(mut self, wait: Duration) -> Self {
        self.revoke_wait = wait;
        self
    }

    pub(crate) fn revoke_wait(&self) -> Duration {
        self.revoke_wait
    }

    /// How long DLQ topics (and their handled logs) that Backstop creates
    /// keep records; by default for ever (`retention.ms=9223372036854775807`, Kafka's
    /// `Long.MAX_VALUE`, which tansu reads right where it misreads `-1`), since a dead
    /// letter that expires is lost. A finite retention is warned about at
    /// start and exported as `backstop_dlq_retention_seconds`.
    #[must_use]
    pub fn with_dead_letter_retention(mut self, retention: Duration) -> Self {
        self.dead_letter_retention = Some(retention);
        self
    }

    pub(crate) fn dead_letter_retention(&self) -> Option<Duration> {
        self.dead_letter_retention
    }

    /// Bootstrap servers from `BACKSTOP_KAFKA_BROKERS`, else `127.0.0.1:9092`.
    pub fn from_env() -> Self {
        Self::new(std::env::var(BROKERS_ENV).unwrap_or_else(|_| "127.0.0.1:9092".to_owned()))
    }

    /// Any librdkafka property (security, tuning), passed through unchanged to
    /// the producer, consumers and admin client. Backstop's own settings that
    /// guard delivery (idempotence, acks, offset storage) cannot be overridden.
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// `fetch.wait.max.ms`: how long the broker may hold a fetch. librdkafka's
    /// default is 500 ms; against tansu use about 20 ms.
    #[must_use]
    pub fn with_fetch_wait_max(mut self, wait: Duration) -> Self {
        self.fetch_wait_max = Some(wait);
        self
    }

    /// How long a publish may wait for the broker's acknowledgement
    /// (`message.timeout.ms`) before it fails and the message is handed back.
    #[must_use]
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Timeout of admin and metadata requests.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Messages of one partition handled at once (default 1: strictly in
    /// partition order). Above 1, the next message of a partition may start
    /// while earlier ones are still being handled, unless one of them has
    /// its key: order is kept per key (keyless messages have none), and
    /// offsets are still committed only up to the lowest unfinished one. For
    /// deep backlogs on few partitions; the handler's own concurrency still
    /// bounds the total.
    #[must_use]
    pub fn with_partition_concurrency(mut self, n: usize) -> Self {
        self.partition_concurrency = n;
        self
    }

    pub(crate) fn partition_concurrency(&self) -> usize {
        self.partition_concurrency
    }

    /// Partitions of created retry/DLQ topics; default: as many as the source.
    #[must_use]
    pub fn with_tier_partitions(mut self, partitions: i32) -> Self {
        self.tier_partitions = Some(partitions);
        self
    }

    /// Replication factor of created topics; default -1 (the broker's default).
    #[must_use]
    pub fn with_replication_factor(mut self, factor: i32) -> Self {
        self.replication_factor = factor;
        self
    }

    /// How retry-tier and DLQ topics are named (default
    /// `<group>.<topic>.retry.<tier>` and `<group>.<topic>.dlq`).
    #[must_use]
    pub fn with_topic_names(mut self, names: TopicNames) -> Self {
        self.topic_names = names;
        self
    }

    /// The topic naming in use.
    pub fn topic_names(&self) -> &TopicNames {
        &self.topic_names
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    pub(crate) fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub(crate) fn tier_partitions(&self) -> Option<i32> {
        self.tier_partitions
    }

    pub(crate) fn replication_factor(&self) -> i32 {
        self.replication_factor
    }

    /// Checks the configuration; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self
            .dead_letter_retention
            .is_some_and(|d| d.as_millis() == 0)
        {
            return Err(ConfigError::new(
                "kafka.dead_letter_retention",
                "must be at least a millisecond (leave it unset to keep dead letters for ever)",
            ));
        }
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.brokers",
                format!("must not be empty (set {BROKERS_ENV} or pass --brokers)"),
            ));
        }
        if let Some(bad) = self.brokers.split(',').find(|b| {
            let b = b.trim();
            b.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            return Err(ConfigError::new(
                "kafka.brokers",
                format!("{bad:?} is not host:port"),
            ));
        }
        for key in self.properties.keys() {
            if key.trim().is_empty() {
                return Err(ConfigError::new("kafka.properties", "empty property name"));
            }
            if GUARDED.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    format!("kafka.properties.{key}"),
                    "is set by Backstop to keep delivery guarantees and cannot be overridden",
                ));
            }
        }
        if self.delivery_timeout.is_zero() {
            return Err(ConfigError::new(
                "kafka.delivery_timeout",
                "must be greater than zero",
            ));
        }
        if self.partition_concurrency == 0 {
            return Err(ConfigError::new(
                "kafka.partition_concurrency",
                "must be at least 1",
            ));
        }
        if self.tier_partitions.is_some_and(|p| p < 1) {
            return Err(ConfigError::new(
                "kafka.tier_partitions",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The librdkafka consumer configuration: brokers, pass-through properties
    /// and consumer settings (for tools and benchmarks that need a raw client).
    pub fn to_client_config(&self) -> ClientConfig {
        self.consumer_client()
    }

    /// A client config with the brokers and the pass-through properties.
    pub(crate) fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// [`client`](Self::client) plus consumer-only settings (librdkafka warns
    /// when a producer is given them).
    pub(crate) fn consumer_client(&self) -> ClientConfig {
        let mut c = self.client();
        if let Some(wait) = self.fetch_wait_max {
            c.set("fetch.wait.max.ms", wait.as_millis().max(1).to_string());
        }
        c
    }
}

/// Properties Backstop sets itself; overriding them would break at-least-once.
const GUARDED: [&str; 5] = [
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "group.id",
    "bootstrap.servers",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_are_checked_and_named() {
        assert_eq!(
            KafkaConfig::new("").validate().unwrap_err().field,
            "kafka.brokers"
        );
        let e = KafkaConfig::new("localhost").validate().unwrap_err();
        assert!(e.reason.contains("host:port"), "{e}");
        assert!(KafkaConfig::new("a:1,b:2").validate().is_ok());
    }

    #[test]
    fn guarded_properties_cannot_be_overridden() {
        let e = KafkaConfig::new("a:1")
            .with_property("enable.auto.offset.store", "true")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "kafka.properties.enable.auto.offset.store");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = KafkaConfig::new("a:1")
            .with_property("sasl.password", "s3cr3t")
            .with_property("sasl.jaas.config", "user=x password=s3cr3t")
            .with_property("client.id", "visible");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("visible"));
    }
}
