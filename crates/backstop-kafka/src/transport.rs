//! `KafkaTransport`: every transport capability over one configuration.

use crate::admin::KafkaAdmin;
use crate::config::KafkaConfig;
use crate::convert::{Arena, from_record};
use crate::publisher::KafkaPublisher;
use crate::subscriber::KafkaStream;
use backstop_core::transport::BoxFuture;
use backstop_core::{
    Acknowledge, Backlog, ConfigError, DeadLetterPublisher, DeadLetterSource, DelayPublisher,
    DelayTier, Delivery, Inspect, Message, PublishError, Publisher, SourceInfo, SourceKind,
    Subscriber, Subscription, TransportError, TransportErrorKind,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Kafka as a Backstop transport: publisher, subscriber with retry-tier topics
/// `<group>.<topic>.retry.<tier>`, DLQ topic `<group>.<topic>.dlq`, topic
/// provisioning, and DLQ reading for the CLI.
#[derive(Clone)]
pub struct KafkaTransport {
    config: Arc<KafkaConfig>,
    publisher: KafkaPublisher,
    admin: KafkaAdmin,
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

    fn reader(&self, group: &str) -> Result<BaseConsumer, TransportError> {
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

fn unique_group(purpose: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "backstop-{purpose}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn blocking_error(e: tokio::task::JoinError) -> TransportError {
    TransportError::new(TransportErrorKind::Other, "blocking task").with_source(e)
}

fn kafka(context: &str, e: rdkafka::error::KafkaError) -> TransportError {
    TransportError::new(TransportErrorKind::ConnectionLost, context.to_owned()).with_source(e)
}

/// Reads every partition of `topic` from `start` up to its high watermark
/// (or `limit` records). `timeout` bounds the wait for the next record, not
/// the whole read: a big topic on a slow broker is read to its end. A read
/// that stops short is an error, never a partial answer taken for the whole
/// (a DLQ listing, a replay's selection, the handled log).
fn read_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: usize,
    start: impl Fn(i32) -> Offset,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<(Message, i32, i64)>, TransportError> {
    let mut ends = assign(consumer, topic, partitions, start, timeout)?;
    let mut out = Vec::new();
    let mut deadline = Instant::now() + timeout;
    let mut arena = Arena::default();
    while ends.remaining > 0 && out.len() < limit && Instant::now() < deadline {
        let Some(r) = consumer.poll(Duration::from_millis(100)) else {
            // A partition whose last offsets are no records (transaction
            // markers) ends where the consumer's position passed its end.
            if let Ok(positions) = consumer.position() {
                for e in positions.elements_for_topic(topic) {
                    if let Offset::Offset(at) = e.offset() {
                        ends.reached(e.partition(), at);
                    }
                }
            }
            continue;
        };
        let m = r.map_err(|e| kafka("read", e))?;
        deadline = Instant::now() + timeout;
        out.push((from_record(&m, &mut arena), m.partition(), m.offset()));
        ends.reached(m.partition(), m.offset().saturating_add(1));
    }
    if ends.remaining > 0 && out.len() < limit {
        return Err(TransportError::new(
            TransportErrorKind::ConnectionLost,
            format!(
                "reading {topic:?} stopped: no record for {timeout:?} with {} \
                 partition(s) not read to their end ({} records read)",
                ends.remaining,
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Assigns every partition of `topic` to `consumer` from `start` (never
/// below the log start) and returns where each ends now.
fn assign(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: usize,
    start: impl Fn(i32) -> Offset,
    timeout: Duration,
) -> Result<Ends, TransportError> {
    let mut tpl = TopicPartitionList::new();
    let mut ends = Ends::default();
    for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| kafka("fetch watermarks", e))?;
        let from = match start(p) {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        ends.add(from, high);
        tpl.add_partition_offset(topic, p, Offset::Offset(from))
            .map_err(|e| kafka("assign", e))?;
    }
    consumer.assign(&tpl).map_err(|e| kafka("assign", e))?;
    Ok(ends)
}

/// Where the partitions of a read end (their high watermark when it began),
/// and which have been read to there.
#[derive(Default)]
struct Ends {
    ends: Vec<i64>,
    done: Vec<bool>,
    /// Partitions not read to their end yet.
    remaining: usize,
}

impl Ends {
    /// The next partition, read from `from`, ends at `high`.
    fn add(&mut self, from: i64, high: i64) {
        let done = from >= high;
        if !done {
            self.remaining += 1;
        }
        self.ends.push(high);
        self.done.push(done);
    }

    /// Partition `p` (a broker's number: anything) has been read up to
    /// `at` (the next offset).
    fn reached(&mut self, p: i32, at: i64) {
        let p = usize::try_from(p).unwrap_or(usize::MAX);
        if let (Some(end), Some(done)) = (self.ends.get(p), self.done.get_mut(p))
            && at >= *end
            && !*done
        {
            *done = true;
            self.remaining -= 1;
        }
    }
}

impl DeadLetterSource for KafkaTransport {
    async fn browse(&self, dlq: &str, limit: usize) -> Result<Vec<Message>, TransportError> {
        Ok(self
            .browse_positioned(dlq, limit)
            .await?
            .into_iter()
            .map(|(m, _, _)| m)
            .collect())
    }

    async fn take(&self, dlq: &str) -> Result<Option<Delivery>, TransportError> {
        let topics = self.admin.topics().await?;
        let Some(&partitions) = topics.get(dlq) else {
            return Err(TransportError::new(
                TransportErrorKind::NotFound,
                format!("DLQ topic {dlq:?} does not exist"),
            ));
        };
        // The reader group of this DLQ remembers (by committing) what was taken.
        let consumer = self.reader(&format!("backstop-dlq-reader.{dlq}"))?;
        let timeout = self.config.request_timeout();
        let topic = dlq.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| kafka("committed offsets", e))?;
            let start = |p: i32| {
                committed
                    .find_partition(&topic, p)
                    .map_or(Offset::Beginning, |e| e.offset())
            };
            let first = read_to_end(&consumer, &topic, partitions, start, 1, timeout)?;
            let Some((message, partition, offset)) = first.into_iter().next() else {
                close_off_thread(consumer);
                return Ok(None);
            };
            let info = SourceInfo::new(topic.as_str(), SourceKind::DeadLetter)
                .at(Some(partition), Some(offset));
            let ack = TakeAck {
                consumer: Some(consumer),
                topic,
                partition,
                offset,
            };
            Ok(Some(Delivery::new(message, info, Box::new(ack))))
        })
        .await
        .map_err(blocking_error)?
    }
}

/// How many retained DLQ records a backlog reading scans, from the oldest, for
/// the oldest one not yet replayed or purged.
const OLDEST_SCAN: usize = 1_000;

impl KafkaTransport {
    /// Up to `limit` records of `dlq`, oldest first, each with its partition
    /// and offset (what the handled log names), nothing removed.
    pub async fn browse_positioned(
        &self,
        dlq: &str,
        limit: usize,
    ) -> Result<Vec<(Message, i32, i64)>, TransportError> {
        let topics = self.admin.topics().await?;
        let Some(&partitions) = topics.get(dlq) else {
            return Err(TransportError::new(
                TransportErrorKind::NotFound,
                format!("DLQ topic {dlq:?} does not exist"),
            ));
        };
        let consumer = self.reader(&unique_group("browse"))?;
        let timeout = self.config.request_timeout();
        let topic = dlq.to_owned();
        let mut found = tokio::task::spawn_blocking(move || {
            let r = read_to_end(
                &consumer,
                &topic,
                partitions,
                |_| Offset::Beginning,
                limit,
                timeout,
            );
            close_off_thread(consumer);
            r
        })
        .await
        .map_err(blocking_error)??;
        found.sort_by_key(|(m, p, o)| (m.timestamp(), *p, *o));
        found.truncate(limit);
        Ok(found)
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

/// Retained records of `dlq` not recorded in `handled`, and the oldest
/// failure time among the first [`OLDEST_SCAN`] of them.
fn dlq_reading(
    consumer: &BaseConsumer,
    dlq: &str,
    partitions: usize,
    handled: &str,
    handled_partitions: usize,
    timeout: Duration,
) -> Result<(u64, Option<std::time::SystemTime>), TransportError> {
    let retained = |topic: &str, partitions: usize| -> Result<u64, TransportError> {
        let mut n = 0u64;
        for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| kafka("fetch watermarks", e))?;
            n += u64::try_from(high - low).unwrap_or(0);
        }
        Ok(n)
    };
    let records = retained(dlq, partitions)?;
    let log = if handled_partitions > 0 {
        crate::handled::Handled::read(
            read_to_end(
                consumer,
                handled,
                handled_partitions,
                |_| Offset::Beginning,
                usize::MAX,
                timeout,
            )?
            .into_iter()
            .map(|(m, _, _)| m),
        )
    } else {
        crate::handled::Handled::default()
    };
    let depth = records.saturating_sub(log.len() as u64);
    if depth == 0 {
        return Ok((0, None));
    }
    let oldest = read_to_end(
        consumer,
        dlq,
        partitions,
        |_| Offset::Beginning,
        OLDEST_SCAN,
        timeout,
    )?
    .into_iter()
    .filter(|(m, p, o)| !log.covers(m, *p, *o))
    .filter_map(|(m, _, _)| {
        m.headers()
            .get_str(backstop_core::message::names::FAILED_AT)
            .and_then(backstop_core::message::parse_timestamp)
    })
    .min();
    Ok((depth, oldest))
}

/// Closes a consumer on its own thread (see the rust-rdkafka shutdown trap).
fn close_off_thread(consumer: BaseConsumer) {
    let _ = std::thread::Builder::new()
        .name("backstop-kafka-close".into())
        .spawn(move || drop(consumer));
}

struct TakeAck {
    consumer: Option<BaseConsumer>,
    topic: String,
    partition: i32,
    offset: i64,
}

impl Acknowledge for TakeAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let Some(consumer) = self.consumer.take() else {
                return Err(TransportError::new(
                    TransportErrorKind::Invalid,
                    "a taken DLQ message settled twice",
                ));
            };
            let (topic, partition) = (self.topic.clone(), self.partition);
            // The position after the record; the broker's offset is not
            // trusted to leave room for it.
            let Some(next) = self.offset.checked_add(1) else {
                close_off_thread(consumer);
                return Err(TransportError::new(
                    TransportErrorKind::Invalid,
                    format!("offset {} of {topic:?} has no next position", self.offset),
                ));
            };
            tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, partition, Offset::Offset(next))
                    .map_err(|e| kafka("commit", e))?;
                let r = consumer
                    .commit(&tpl, CommitMode::Sync)
                    .map_err(|e| kafka("commit taken DLQ message", e));
                close_off_thread(consumer);
                r
            })
            .await
            .map_err(blocking_error)?
        })
    }

    fn nack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if let Some(c) = self.consumer.take() {
            close_off_thread(c);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for TakeAck {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            close_off_thread(c);
        }
    }
}
