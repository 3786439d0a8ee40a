//! Topic provisioning: retry-tier and DLQ topics are created when missing
//! (tansu and many real clusters do not auto-create), existing ones validated.

use crate::config::KafkaConfig;
use backstop_core::{ConfigError, Subscription, TransportError, TransportErrorKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Creates and checks topics.
#[derive(Clone)]
pub struct KafkaAdmin {
    config: KafkaConfig,
    admin: Arc<AdminClient<DefaultClientContext>>,
    timeout: Duration,
    tier_partitions: Option<i32>,
    replication: i32,
}

impl fmt::Debug for KafkaAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAdmin").finish_non_exhaustive()
    }
}

impl KafkaAdmin {
    /// An admin client for `config`.
    pub fn new(config: &KafkaConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let admin = config
            .client()
            .create()
            .map_err(|e| ConfigError::new("kafka", format!("cannot create admin client: {e}")))?;
        Ok(Self {
            config: config.clone(),
            admin: Arc::new(admin),
            timeout: config.request_timeout(),
            tier_partitions: config.tier_partitions(),
            replication: config.replication_factor(),
        })
    }

    /// Partition counts of every topic the broker knows.
    pub async fn topics(&self) -> Result<HashMap<String, usize>, TransportError> {
        let admin = self.admin.clone();
        let timeout = self.timeout;
        let brokers = self.config.brokers().to_owned();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, timeout)
                .map(|md| {
                    md.topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| (t.name().to_owned(), t.partitions().len()))
                        .collect()
                })
                .map_err(|e| {
                    TransportError::new(
                        TransportErrorKind::ConnectionLost,
                        format!("fetch metadata from {brokers} (is the broker running?)"),
                    )
                    .with_source(e)
                })
        })
        .await
        .map_err(|e| {
            TransportError::new(TransportErrorKind::Other, "metadata task").with_source(e)
        })?
    }

    /// Consumer lag of `group` on `topics`, per partition: the high watermark
    /// minus the committed offset (the low watermark when nothing is committed).
    pub async fn group_lag(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<HashMap<(String, i32), i64>, TransportError> {
        let known = self.topics().await?;
        let consumer: BaseConsumer = self
            .config
            .consumer_client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| {
                TransportError::new(TransportErrorKind::Other, "lag reader").with_source(e)
            })?;
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            for p in 0..known.get(t).copied().unwrap_or(0) {
                tpl.add_partition(t, i32::try_from(p).unwrap_or(i32::MAX));
            }
        }
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            let lost = |context: &str, e| {
                TransportError::new(TransportErrorKind::ConnectionLost, context.to_owned())
                    .with_source(e)
            };
            let committed = consumer
                .committed_offsets(tpl.clone(), timeout)
                .map_err(|e| lost("committed offsets", e))?;
            let mut lag = HashMap::new();
            for e in tpl.elements() {
                let (low, high) = consumer
                    .fetch_watermarks(e.topic(), e.partition(), timeout)
                    .map_err(|err| lost("watermarks", err))?;
                let done = match committed
                    .find_partition(e.topic(), e.partition())
                    .map(|c| c.offset())
                {
                    Some(Offset::Offset(o)) => o.max(low),
                    _ => low,
                };
                lag.insert((e.topic().to_owned(), e.partition()), (high - done).max(0));
            }
            // Consumers are closed off the runtime (rust-rdkafka shutdown trap).
            let _ = std::thread::Builder::new().spawn(move || drop(consumer));
            Ok(lag)
        })
        .await
        .map_err(|e| TransportError::new(TransportErrorKind::Other, "lag task").with_source(e))?
    }

    /// Creates `name` with `partitions` unless it exists; a refusal names the topic.
    pub async fn ensure_topic(&self, name: &str, partitions: i32) -> Result<(), TransportError> {
        if self.topics().await?.contains_key(name) {
            return Ok(());
        }
        self.create(&[(name.to_owned(), partitions, Vec::new())])
            .await
    }

    /// Like [`ensure_topic`](Self::ensure_topic), for a topic whose records
    /// must stay (a DLQ's log of handled letters): created with the
    /// dead-letter retention (kept for ever unless configured).
    pub async fn ensure_kept_topic(
        &self,
        name: &str,
        partitions: i32,
    ) -> Result<(), TransportError> {
        if self.topics().await?.contains_key(name) {
            return Ok(());
        }
        self.create(&[(name.to_owned(), partitions, self.kept())])
            .await
    }

    /// What dead letters and their handled log are created with: deleted by
    /// nothing but the configured retention (for ever by default: the
    /// cluster's default, often 7 days, would delete dead letters nobody
    /// looked at yet, and make replayed letters replayable again).
    ///
    /// "For ever" is written [`KEEP_FOREVER_MS`], not `-1`: Kafka reads both
    /// as "never expires" (it deletes a record when `now - timestamp >
    /// retention.ms`), but tansu 0.6 applies that comparison to `-1` too and
    /// deleted every dead letter at its maintenance (at start and every 10
    /// minutes; seen in `tests/broker_faults.rs` after a restart).
    fn kept(&self) -> Vec<(&'static str, String)> {
        let retention = self
            .config
            .dead_letter_retention()
            .map_or(KEEP_FOREVER_MS, |d| {
                i64::try_from(d.as_millis()).unwrap_or(KEEP_FOREVER_MS)
            });
        vec![
            ("retention.ms", retention.to_string()),
            ("cleanup.policy", "delete".to_owned()),
        ]
    }

    /// Topic configuration values as the broker reports them; `None` when it
    /// cannot tell (not every broker answers DescribeConfigs).
    pub async fn topic_config(&self, topic: &str) -> Option<HashMap<String, String>> {
        let opts = AdminOptions::new().request_timeout(Some(self.timeout));
        let results = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await
            .ok()?;
        let resource = results.into_iter().next()?.ok()?;
        Some(
            resource
                .entries
                .into_iter()
                .filter_map(|e| Some((e.name, e.value?)))
                .collect(),
        )
    }

    async fn create(&self, topics: &[NewTopicSpec]) -> Result<(), TransportError> {
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions, configs)| {
                configs.iter().fold(
                    NewTopic::new(name, *partitions, TopicReplication::Fixed(self.replication)),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results = self
            .admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| {
                TransportError::new(
                    TransportErrorKind::Rejected,
                    format!("create topics {:?}", names(topics)),
                )
                .with_source(e)
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    // Some brokers (librdkafka's mock cluster) cannot create topics
                    // through the API; accept a topic that exists anyway.
                    if self.topics().await?.contains_key(&topic) {
                        continue;
                    }
                    return Err(TransportError::new(
                        TransportErrorKind::Rejected,
                        format!("the broker refused to create topic {topic:?}: {code}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes sure the source exists and creates its retry-tier and DLQ topics
    /// (as many partitions as the source unless configured) when missing.
    pub async fn provision(&self, subscription: &Subscription) -> Result<(), TransportError> {
        let existing = self.topics().await?;
        let Some(&source_partitions) = existing.get(&subscription.source) else {
            return Err(TransportError::new(
                TransportErrorKind::NotFound,
                format!(
                    "source topic {:?} does not exist; create it before starting the consumer",
                    subscription.source
                ),
            ));
        };
        let partitions = self
            .tier_partitions
            .unwrap_or(i32::try_from(source_partitions).unwrap_or(1).max(1));
        let mut wanted: Vec<String> = subscription
            .tiers
            .iter()
            .map(|t| {
                self.config
                    .topic_names()
                    .tier(&subscription.group, &subscription.source, t)
            })
            .collect();
        wanted.push(
            self.config
                .topic_names()
                .dlq(&subscription.group, &subscription.source),
        );
        let dlq = self
            .config
            .topic_names()
            .dlq(&subscription.group, &subscription.source);
        // Copies carry the source's records plus headers: they must fit
        // where the source's records did.
        let source_max = self
            .topic_config(&subscription.source)
            .await
            .and_then(|c| c.get("max.message.bytes").cloned());
        let missing: Vec<NewTopicSpec> = wanted
            .into_iter()
            .filter(|name| match existing.get(name) {
                Some(&n) => {
                    if n != partitions as usize {
                        tracing::info!(topic = %name, partitions = n, expected = partitions, "existing topic has a different partition count; using it as it is");
                    }
                    false
                }
                None => true,
            })
            .map(|name| {
                let mut configs = if name == dlq { self.kept() } else { Vec::new() };
                if let Some(max) = &source_max {
                    configs.push(("max.message.bytes", max.clone()));
                }
                (name, partitions, configs)
            })
            .collect();
        if !missing.is_empty() {
            tracing::info!(topics = ?names(&missing), partitions, "creating retry-tier and DLQ topics");
            self.create(&missing).await?;
        }
        self.check_dlq_retention(&dlq).await;
        Ok(())
    }

    /// Warns about, and exports, a DLQ whose records expire (a topic made
    /// before Backstop created it, or changed since).
    async fn check_dlq_retention(&self, dlq: &str) {
        let Some(config) = self.topic_config(dlq).await else {
            return;
        };
        let retention = config
            .get("retention.ms")
            .and_then(|r| r.parse::<i64>().ok());
        let compacted = config
            .get("cleanup.policy")
            .is_some_and(|p| p.contains("compact"));
        let seconds = retention
            .filter(|r| (0..FOREVER_FROM_MS).contains(r))
            .map(|r| r as f64 / 1000.0);
        metrics::gauge!(DLQ_RETENTION_SECONDS, "dlq" => dlq.to_owned())
            .set(seconds.unwrap_or(-1.0));
        if let Some(s) = seconds {
            tracing::warn!(
                dlq,
                retention_seconds = s,
                "the DLQ topic deletes dead letters after its retention: set retention.ms=9223372036854775807 on it to keep them"
            );
        }
        if compacted {
            tracing::warn!(
                dlq,
                "the DLQ topic is compacted: dead letters with the same key replace each other; set cleanup.policy=delete"
            );
        }
    }
}

/// `retention.ms` of topics kept for ever (Java's `Long.MAX_VALUE`).
pub(crate) const KEEP_FOREVER_MS: i64 = i64::MAX;

/// A retention of this many milliseconds (a thousand years) or more, or
/// `-1`, keeps records for ever.
const FOREVER_FROM_MS: i64 = 1_000 * 365 * 24 * 3_600 * 1_000;

/// Gauge {dlq}: the DLQ topic's retention in seconds, -1 when kept for ever.
pub(crate) const DLQ_RETENTION_SECONDS: &str = "backstop_dlq_retention_seconds";

/// A topic to create: name, partitions, configuration.
type NewTopicSpec = (String, i32, Vec<(&'static str, String)>);

fn names(topics: &[NewTopicSpec]) -> Vec<&str> {
    topics.iter().map(|(n, _, _)| n.as_str()).collect()
}
