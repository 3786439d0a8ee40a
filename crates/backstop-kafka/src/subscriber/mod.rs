//! The consumer side: one consumer-group member per subscription, reading the
//! source and its retry-tier topics, committing offsets only up to the lowest
//! unfinished offset of each partition.

mod tracker;

use crate::config::KafkaConfig;
use crate::convert::from_record;
use backstop_core::message::{names, parse_timestamp};
use backstop_core::{
    Acknowledge, Delivery, DeliveryStream, Message, SourceInfo, SourceKind, Subscription,
    TransportError, TransportErrorKind,
};
use rdkafka::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracker::{Settled, Tracker};

/// The consumer context: keeps the tracker in step with the assignment.
pub(crate) struct Ctx {
    tracker: Arc<Mutex<Tracker>>,
    /// The runner paused intake: partitions assigned meanwhile start paused.
    paused: Arc<AtomicBool>,
    /// Revocations, counted for the transport.
    revoked: Arc<AtomicU64>,
}

fn lock(t: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn keys(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Stored offsets of finished work are committed by librdkafka before
            // the partitions go (auto commit on revoke); acks still in flight
            // for them become stale and the new owner redelivers that work.
            tracing::info!(partitions = ?keys(tpl), "partitions revoked");
            self.revoked.fetch_add(1, Ordering::Relaxed);
            lock(&self.tracker).revoke(keys(tpl));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?keys(tpl), "partitions assigned");
                lock(&self.tracker).assign(keys(tpl));
                if self.paused.load(Ordering::SeqCst) {
                    // Intake is paused: new partitions wait too.
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(error = %e, "pause on assign");
                    }
                } else if let Err(e) = consumer.resume(tpl) {
                    // A partition paused under an earlier assignment starts afresh.
                    tracing::debug!(error = %e, "resume on assign");
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Owns the consumer. Dropping a consumer after manual offset work can block
/// for `session.timeout.ms` or longer (rust-rdkafka issues 611, 597), so the
/// final close runs on its own thread, never on an async worker.
struct Owned(Option<StreamConsumer<Ctx>>);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let spawned = std::thread::Builder::new()
                .name("backstop-kafka-close".into())
                .spawn(move || {
                    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                        tracing::debug!(error = %e, "final commit on close");
                    }
                    drop(consumer);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not spawn the consumer close thread");
            }
        }
    }
}

struct Shared {
    consumer: Owned,
    tracker: Arc<Mutex<Tracker>>,
    /// Woken when a delivery settles, so its partition's next message can go.
    settled: tokio::sync::Notify,
    /// Partitions to seek back after a nack, and the offset: the stream drops
    /// their buffered messages and seeks, so they are fetched again in order.
    rewound: Mutex<Vec<(String, i32, i64)>>,
}

impl Shared {
    fn consumer(&self) -> &StreamConsumer<Ctx> {
        self.consumer
            .0
            .as_ref()
            .expect("consumer present until drop")
    }

    fn store(&self, topic: &str, partition: i32, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            tracing::warn!(error = %e, "offset list");
            return;
        }
        if let Err(e) = self.consumer().store_offsets(&tpl) {
            // Happens when the partition was revoked meanwhile: the new owner
            // redelivers from the last commit (at-least-once).
            tracing::debug!(topic, partition, offset, error = %e, "store offset");
        }
    }
}

/// Where a topic of the subscription leads.
#[derive(Clone, Debug)]
enum Role {
    Main,
    Tier(String),
}

/// A fetched message waiting for its turn.
struct Fetched {
    message: Message,
    offset: i64,
    /// Tier messages wait until due (tokio clock).
    due: Option<Instant>,
}

/// Per partition: fetched messages in offset order, and whether it is paused.
struct PartitionQueue {
    /// The assignment epoch the buffered messages belong to.
    epoch: u64,
    queue: VecDeque<Fetched>,
    paused: bool,
}

/// Above this many buffered messages a partition is paused; below
/// `RESUME_BELOW` it is resumed (librdkafka refetches from where it stopped).
/// Every pause drops librdkafka's prefetched data for the partition and a
/// resume refetches it, so the band is wide: a narrow one (256/64) cut the
/// no-op consume rate on the mock cluster from about 59,000 to 2,000 msg/s.
const PAUSE_ABOVE: usize = 4096;
const RESUME_BELOW: usize = 1024;

/// The delivery stream of one subscription. Partitions are handled
/// concurrently, each in order: a partition's next message is handed out only
/// after the previous one settled (acked, or its retry/DLQ copy confirmed).
pub struct KafkaStream {
    shared: Arc<Shared>,
    roles: HashMap<String, Role>,
    source: String,
    partitions: HashMap<(String, i32), PartitionQueue>,
    /// Round-robin start, so no partition starves the others.
    turn: usize,
    /// Intake paused by the runner; shared with the rebalance callback.
    paused: Arc<AtomicBool>,
    /// Messages of one partition in flight at once
    /// ([`KafkaConfig::with_partition_concurrency`]).
    per_partition: usize,
}

impl fmt::Debug for KafkaStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaStream")
            .field("source", &self.source)
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

fn kafka_error(context: &str, e: KafkaError) -> TransportError {
    TransportError::new(TransportErrorKind::ConnectionLost, context.to_owned()).with_source(e)
}

impl KafkaStream {
    pub(crate) fn open(
        config: &KafkaConfig,
        subscription: &Subscription,
        revoked: Arc<AtomicU64>,
    ) -> Result<Self, TransportError> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let paused = Arc::new(AtomicBool::new(false));
        let mut client = config.consumer_client();
        if client.get("auto.offset.reset").is_none() {
            // A new group starts at the beginning: nothing produced before the
            // first start is skipped.
            client.set("auto.offset.reset", "earliest");
        }
        if client.get("auto.commit.interval.ms").is_none() {
            // Stored (finished) offsets are committed every second: at most about
            // a second of work is repeated after a crash.
            client.set("auto.commit.interval.ms", "1000");
        }
        client
            .set("group.id", &subscription.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer<Ctx> = client
            .create_with_context(Ctx {
                tracker: tracker.clone(),
                paused: paused.clone(),
                revoked,
            })
            .map_err(|e| kafka_error("create consumer", e))?;
        let mut roles = HashMap::from([(subscription.source.clone(), Role::Main)]);
        for tier in &subscription.tiers {
            roles.insert(
                config
                    .topic_names()
                    .tier(&subscription.group, &subscription.source, tier),
                Role::Tier(tier.name().to_owned()),
            );
        }
        let topics: Vec<&str> = roles.keys().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error("subscribe", e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                consumer: Owned(Some(consumer)),
                tracker,
                settled: tokio::sync::Notify::new(),
                rewound: Mutex::new(Vec::new()),
            }),
            roles,
            source: subscription.source.clone(),
            partitions: HashMap::new(),
            turn: 0,
            paused,
            per_partition: config.partition_concurrency(),
        })
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn set_paused(&self, key: &(String, i32), q: &mut PartitionQueue, pause: bool) {
        if q.paused == pause {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&key.0, key.1);
        let r = if pause {
            self.shared.consumer().pause(&tpl)
        } else {
            self.shared.consumer().resume(&tpl)
        };
        match r {
            Ok(()) => q.paused = pause,
            Err(e) => {
                tracing::warn!(topic = %key.0, partition = key.1, pause, error = %e, "pause/resume")
            }
        }
    }

    /// Drops what belongs to revoked partitions and to partitions sought back.
    fn tidy(&mut self) {
        let rewound: Vec<_> = std::mem::take(
            &mut *self
                .shared
                .rewound
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (topic, partition, offset) in rewound {
            let key = (topic, partition);
            if let Some(mut q) = self.partitions.remove(&key)
                && !self.is_paused()
            {
                // While intake is paused the partition stays paused; with no
                // entry left, `resume` resumes it.
                self.set_paused(&key, &mut q, false);
            }
            // A zero timeout makes the seek asynchronous; librdkafka discards
            // messages fetched before it.
            if let Err(e) =
                self.shared
                    .consumer()
                    .seek(&key.0, key.1, Offset::Offset(offset), Duration::ZERO)
            {
                tracing::warn!(topic = %key.0, partition = key.1, offset, error = %e, "seek back for redelivery");
            }
        }
        let t = lock(&self.shared.tracker);
        self.partitions
            .retain(|(topic, partition), q| t.epoch(topic, *partition) == Some(q.epoch));
    }

    /// The next message that may go: its partition is idle and its head is due.
    /// Also pauses/resumes partitions by buffer size and due time.
    fn ready(&mut self, now: Instant) -> Option<Delivery> {
        let mut keys: Vec<(String, i32)> = self.partitions.keys().cloned().collect();
        keys.sort();
        if keys.is_empty() {
            return None;
        }
        let n = keys.len();
        for i in 0..n {
            let key = &keys[(self.turn + i) % n];
            let Some(mut q) = self.partitions.remove(key) else {
                continue;
            };
            let head_waiting = q
                .queue
                .front()
                .is_some_and(|f| f.due.is_some_and(|d| d > now));
            if head_waiting || q.queue.len() > PAUSE_ABOVE {
                self.set_paused(key, &mut q, true);
            } else if q.queue.len() < RESUME_BELOW {
                self.set_paused(key, &mut q, false);
            }
            let may = q.queue.front().is_some_and(|f| {
                lock(&self.shared.tracker).may_deliver_keyed(
                    &key.0,
                    key.1,
                    f.offset,
                    f.message.key().map(|k| &k[..]),
                    self.per_partition,
                )
            });
            let take = may && !head_waiting;
            let next = if take { q.queue.pop_front() } else { None };
            self.partitions.insert(key.clone(), q);
            if let Some(f) = next
                && let Some(d) = self.deliver(f.message, &key.0, key.1, f.offset)
            {
                self.turn = (self.turn + i + 1) % n;
                return Some(d);
            }
        }
        None
    }

    /// The next moment a buffered tier head becomes due. Heads already due
    /// are left out: they wait for their partition's in-flight message,
    /// whose settlement wakes the stream (a past instant here would spin).
    /// Nothing while paused: no head may go then anyway.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        if self.is_paused() {
            return None;
        }
        self.partitions
            .values()
            .filter_map(|q| q.queue.front().and_then(|f| f.due))
            .filter(|d| *d > now)
            .min()
    }

    fn deliver(
        &self,
        message: Message,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Option<Delivery> {
        let kind = match self.roles.get(topic) {
            Some(Role::Tier(name)) => SourceKind::RetryTier(name.clone()),
            _ => SourceKind::Main,
        };
        let (generation, redelivered) = {
            let mut t = lock(&self.shared.tracker);
            if !t.is_assigned(topic, partition) {
                return None;
            }
            t.delivered_keyed(topic, partition, offset, message.key().map(|k| &k[..]))
        };
        let info = SourceInfo {
            source: self.source.clone(),
            kind,
            partition: Some(partition),
            offset: Some(offset),
            redelivered,
            delivery_count: None,
        };
        let ack = KafkaAck {
            shared: self.shared.clone(),
            topic: topic.to_owned(),
            partition,
            offset,
            generation,
        };
        Some(Delivery::new(message, info, Box::new(ack)))
    }
}

/// When a tier message may be handled, on tokio's clock; `None` when due now
/// (or when `backstop-due-at` is missing or malformed: the runner counts that).
fn due_in(message: &Message) -> Option<Duration> {
    let due = parse_timestamp(message.headers().get_str(names::DUE_AT)?)?;
    due.duration_since(SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())
}

impl DeliveryStream for KafkaStream {
    async fn next_delivery(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            self.tidy();
            // Paused: keep polling (the member stays in its group and sees
            // rebalances) and buffer what was already on its way, but hand
            // out nothing.
            if !self.is_paused()
                && let Some(d) = self.ready(Instant::now())
            {
                return Some(Ok(d));
            }
            let next_due = self.next_due(Instant::now());
            let shared = self.shared.clone();
            let received = {
                let recv = shared.consumer().recv();
                let settled = shared.settled.notified();
                let due = async {
                    match next_due {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    m = recv => m.map(|m| (from_record(&m), m.topic().to_owned(), m.partition(), m.offset())),
                    () = settled => continue,
                    () = due => continue,
                }
            };
            let (message, topic, partition, offset) = match received {
                Ok(r) => r,
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    return Some(Err(TransportError::new(
                        TransportErrorKind::ConnectionLost,
                        format!("fatal consumer error: {code}"),
                    )));
                }
                Err(e) => {
                    // librdkafka reconnects by itself; transient errors are reported
                    // here for information.
                    tracing::warn!(error = %e, source = %self.source, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let due = match self.roles.get(&topic) {
                Some(Role::Tier(_)) => due_in(&message).map(|wait| Instant::now() + wait),
                _ => None,
            };
            let Some(epoch) = lock(&self.shared.tracker).epoch(&topic, partition) else {
                continue; // revoked meanwhile: the new owner fetches it
            };
            let q = self
                .partitions
                .entry((topic, partition))
                .or_insert_with(|| PartitionQueue {
                    epoch,
                    queue: VecDeque::new(),
                    paused: false,
                });
            if q.epoch != epoch {
                *q = PartitionQueue {
                    epoch,
                    queue: VecDeque::new(),
                    paused: false,
                };
            }
            q.queue.push_back(Fetched {
                message,
                offset,
                due,
            });
        }
    }

    fn pause(&mut self) {
        if self.paused.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.shared.consumer().assignment() {
            Ok(tpl) => {
                if let Err(e) = self.shared.consumer().pause(&tpl) {
                    tracing::warn!(error = %e, source = %self.source, "pause intake");
                }
            }
            Err(e) => tracing::warn!(error = %e, source = %self.source, "assignment for pause"),
        }
        tracing::debug!(source = %self.source, "intake paused");
    }

    fn resume(&mut self) {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return;
        }
        // Entries of an earlier assignment must not keep a partition of the
        // current one paused.
        self.tidy();
        // Partitions paused for their own reasons (a full buffer, a tier head
        // not yet due) stay paused; `ready` resumes them when it is time.
        let mut tpl = TopicPartitionList::new();
        match self.shared.consumer().assignment() {
            Ok(assigned) => {
                for e in assigned.elements() {
                    let key = (e.topic().to_owned(), e.partition());
                    if !self.partitions.get(&key).is_some_and(|q| q.paused) {
                        tpl.add_partition(e.topic(), e.partition());
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, source = %self.source, "assignment for resume"),
        }
        if let Err(e) = self.shared.consumer().resume(&tpl) {
            tracing::warn!(error = %e, source = %self.source, "resume intake");
        }
        tracing::debug!(source = %self.source, "intake resumed");
    }
}

struct KafkaAck {
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
}

impl Acknowledge for KafkaAck {
    fn ack(
        self: Box<Self>,
    ) -> backstop_core::transport::BoxFuture<'static, Result<(), TransportError>> {
        let settled = lock(&self.shared.tracker).acked(
            &self.topic,
            self.partition,
            self.offset,
            self.generation,
        );
        if let Settled::Store(next) = settled {
            self.shared.store(&self.topic, self.partition, next);
        }
        self.shared.settled.notify_one();
        Box::pin(std::future::ready(Ok(())))
    }

    fn nack(
        self: Box<Self>,
    ) -> backstop_core::transport::BoxFuture<'static, Result<(), TransportError>> {
        let rewind = lock(&self.shared.tracker).nacked(
            &self.topic,
            self.partition,
            self.offset,
            self.generation,
        );
        if let Some(to) = rewind {
            self.shared
                .rewound
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((self.topic.clone(), self.partition, to));
        }
        self.shared.settled.notify_one();
        Box::pin(std::future::ready(Ok(())))
    }
}
