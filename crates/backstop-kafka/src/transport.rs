//! `KafkaTransport`: every transport capability over one configuration. DLQ
//! reading (browse, take, the backlog's readings) is in `dead_letters`.

use crate::admin::KafkaAdmin;
use crate::config::KafkaConfig;
use crate::dead_letters::{blocking_error, close_off_thread, dlq_reading, unique_group};
use crate::publisher::KafkaPublisher;
use crate::subscriber::KafkaStream;
use backstop_core::{
    Backlog, ConfigError, DeadLetterPublisher, DelayPublisher, DelayTier, Inspect, Message,
    PublishError, Publisher, Subscriber, Subscription, TransportError, TransportErrorKind,
};
use rdkafka::consumer::BaseConsumer;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Kafka as a Backstop transport: publisher, subscriber with retry-tier topics
/// `<group>.<topic>.retry.<tier>`, DLQ topic `<group>.<topic>.dlq`, topic
/// provisioning, and DLQ reading for the CLI.
#[derive(Clone)]
pub struct KafkaTransport {
    pub(crate) config: Arc<KafkaConfig>,
    publisher: KafkaPublisher,
    pub(crate) admin: KafkaAdmin,
    revoked: Arc<AtomicU64>,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// Validates `config` and creates the producer and admin client. No network
    /// traffic happens until first use.
    pub fn new(config: KafkaConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            publisher: KafkaPublisher::new(&config)?,
            admin: KafkaAdmin::new(&config)?,
            config: Arc::new(config),
            revoked: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The publisher.
    pub fn publisher(&self) -> &KafkaPublisher {
        &self.publisher
    }

    /// How many times the consumers of this transport had partitions revoked
    /// (a rebalance: a member joined or left, or this one was dropped from its
    /// group, e.g. for not polling within `max.poll.interval.ms`).
    pub fn revocations(&self) -> u64 {
        self.revoked.load(Ordering::Relaxed)
    }

    /// The admin client (topic creation and metadata).
    pub fn admin(&self) -> &KafkaAdmin {
        &self.admin
    }

    pub(crate) fn reader(&self, group: &str) -> Result<BaseConsumer, TransportError> {
        self.config
            .consumer_client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| {
                TransportError::new(TransportErrorKind::Other, "create reader").with_source(e)
            })
    }
}

impl Publisher for KafkaTransport {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        self.publisher.send(destination, message).await
    }
}

impl Subscriber for KafkaTransport {
    type Stream = KafkaStream;

    fn system(&self) -> &'static str {
        "kafka"
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<KafkaStream, TransportError> {
        self.admin.provision(subscription).await?;
        KafkaStream::open(&self.config, subscription, self.revoked.clone())
    }
}

impl DelayPublisher for KafkaTransport {
    async fn publish_delayed(
        &self,
        subscription: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> Result<(), PublishError> {
        let topic = self
            .config
            .topic_names()
            .tier(&subscription.group, &subscription.source, tier);
        self.publisher.send(&topic, message).await
    }
}

impl DeadLetterPublisher for KafkaTransport {
    fn dead_letter_destination(&self, subscription: &Subscription) -> String {
        self.config
            .topic_names()
            .dlq(&subscription.group, &subscription.source)
    }

    async fn publish_dead_letter(
        &self,
        subscription: &Subscription,
        message: Message,
    ) -> Result<(), PublishError> {
        let topic = self.dead_letter_destination(subscription);
        self.publisher.send(&topic, message).await
    }
}

impl Inspect for KafkaTransport {
    /// A metadata request.
    async fn check(&self) -> Result<(), TransportError> {
        self.admin.topics().await.map(|_| ())
    }

    /// Lag of the group on the main topic (per partition) and on each tier
    /// topic (summed); DLQ depth = records the DLQ topic retains minus those
    /// the CLI recorded as handled; oldest age = the oldest `backstop-failed-at`
    /// among the first 1,000 retained records not handled.
    async fn backlog(&self, subscription: &Subscription) -> Result<Backlog, TransportError> {
        let names = self.config.topic_names();
        let (group, source) = (&subscription.group, &subscription.source);
        let dlq = names.dlq(group, source);
        let tiers: Vec<(String, String)> = subscription
            .tiers
            .iter()
            .map(|t| (t.name().to_owned(), names.tier(group, source, t)))
            .collect();
        let mut topics = vec![source.clone()];
        topics.extend(tiers.iter().map(|(_, topic)| topic.clone()));
        let lag = self.admin.group_lag(group, &topics).await?;
        let mut backlog = Backlog::new(dlq.clone());
        backlog.lag = lag
            .iter()
            .filter(|((t, _), _)| t == source)
            .map(|((_, p), l)| (*p, u64::try_from(*l).unwrap_or(0)))
            .collect();
        backlog.lag.sort_unstable();
        backlog.tiers = tiers
            .iter()
            .map(|(name, topic)| {
                let waiting = lag
                    .iter()
                    .filter(|((t, _), _)| t == topic)
                    .map(|(_, l)| u64::try_from(*l).unwrap_or(0))
                    .sum();
                (name.clone(), waiting)
            })
            .collect();
        let known = self.admin.topics().await?;
        let Some(&partitions) = known.get(&dlq) else {
            return Ok(backlog);
        };
        let handled = crate::names::handled_topic(&dlq);
        let handled_partitions = known.get(&handled).copied().unwrap_or(0);
        let consumer = self.reader(&unique_group("backlog"))?;
        let timeout = self.config.request_timeout();
        let (depth, oldest) = tokio::task::spawn_blocking(move || {
            let r = dlq_reading(
                &consumer,
                &dlq,
                partitions,
                &handled,
                handled_partitions,
                timeout,
            );
            close_off_thread(consumer);
            r
        })
        .await
        .map_err(blocking_error)??;
        backlog.dlq_depth = Some(depth);
        backlog.dlq_oldest_age = oldest.map(|t| {
            std::time::SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
        });
        Ok(backlog)
    }
}
