//! The consumer side: one consumer-group member per subscription, reading the
//! source and its retry-tier topics, committing offsets only up to the lowest
//! unfinished offset of each partition.

mod tracker;

use crate::config::KafkaConfig;
use crate::convert::from_record;
use crate::names::tier_topic;
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
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracker::{Settled, Tracker};

/// The consumer context: keeps the tracker in step with the assignment.
pub(crate) struct Ctx {
    tracker: Arc<Mutex<Tracker>>,
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
            lock(&self.tracker).revoke(keys(tpl));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?keys(tpl), "partitions assigned");
                lock(&self.tracker).assign(keys(tpl));
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

/// A message from a tier partition that is not due yet; its partition is paused.
struct Held {
    message: Message,
    topic: String,
    partition: i32,
    offset: i64,
    due: Instant,
}

/// The delivery stream of one subscription.
pub struct KafkaStream {
    shared: Arc<Shared>,
    roles: HashMap<String, Role>,
    source: String,
    held: Vec<Held>,
}

impl fmt::Debug for KafkaStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaStream")
            .field("source", &self.source)
            .field("held", &self.held.len())
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
    ) -> Result<Self, TransportError> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let mut client = config.client();
        if client.get("auto.offset.reset").is_none() {
            // A new group starts at the beginning: nothing produced before the
            // first start is skipped.
            client.set("auto.offset.reset", "earliest");
        }
        client
            .set("group.id", &subscription.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer<Ctx> = client
            .create_with_context(Ctx {
                tracker: tracker.clone(),
            })
            .map_err(|e| kafka_error("create consumer", e))?;
        let mut roles = HashMap::from([(subscription.source.clone(), Role::Main)]);
        for tier in &subscription.tiers {
            roles.insert(
                tier_topic(&subscription.group, &subscription.source, tier),
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
            }),
            roles,
            source: subscription.source.clone(),
            held: Vec::new(),
        })
    }

    fn partition_list(topic: &str, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        tpl
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
        let generation = {
            let mut t = lock(&self.shared.tracker);
            if !t.is_assigned(topic, partition) {
                return None;
            }
            t.delivered(topic, partition, offset)
        };
        let info = SourceInfo {
            source: self.source.clone(),
            kind,
            partition: Some(partition),
            offset: Some(offset),
            redelivered: false,
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
            let now = Instant::now();
            if let Some(i) = self.held.iter().position(|h| h.due <= now) {
                let h = self.held.swap_remove(i);
                let tpl = Self::partition_list(&h.topic, h.partition);
                if let Err(e) = self.shared.consumer().resume(&tpl) {
                    tracing::warn!(topic = %h.topic, partition = h.partition, error = %e, "resume");
                }
                match self.deliver(h.message, &h.topic, h.partition, h.offset) {
                    Some(d) => return Some(Ok(d)),
                    None => continue, // revoked while waiting: the new owner has it
                }
            }
            let next_due = self.held.iter().map(|h| h.due).min();
            let received = {
                let recv = self.shared.consumer().recv();
                let m = match next_due {
                    Some(due) => tokio::select! {
                        m = recv => m,
                        _ = tokio::time::sleep_until(due) => continue,
                    },
                    None => recv.await,
                };
                m.map(|m| {
                    (
                        from_record(&m),
                        m.topic().to_owned(),
                        m.partition(),
                        m.offset(),
                    )
                })
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
            if matches!(self.roles.get(&topic), Some(Role::Tier(_)))
                && let Some(wait) = due_in(&message)
            {
                // Tier partitions are FIFO by due time: pause this one until its
                // head is due; librdkafka refetches from here on resume.
                let tpl = Self::partition_list(&topic, partition);
                if let Err(e) = self.shared.consumer().pause(&tpl) {
                    tracing::warn!(%topic, partition, error = %e, "pause");
                }
                self.held.push(Held {
                    message,
                    topic,
                    partition,
                    offset,
                    due: Instant::now() + wait,
                });
                continue;
            }
            if let Some(d) = self.deliver(message, &topic, partition, offset) {
                return Some(Ok(d));
            }
        }
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
        Box::pin(std::future::ready(Ok(())))
    }

    fn nack(
        self: Box<Self>,
    ) -> backstop_core::transport::BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let rewind = lock(&self.shared.tracker).nacked(
                &self.topic,
                self.partition,
                self.offset,
                self.generation,
            );
            let Some(to) = rewind else {
                return Ok(());
            };
            // Seek blocks briefly inside librdkafka: keep it off the async workers.
            let shared = self.shared.clone();
            let (topic, partition) = (self.topic.clone(), self.partition);
            tokio::task::spawn_blocking(move || {
                shared.consumer().seek(
                    &topic,
                    partition,
                    Offset::Offset(to),
                    Duration::from_secs(5),
                )
            })
            .await
            .map_err(|e| {
                TransportError::new(TransportErrorKind::Other, "seek task").with_source(e)
            })?
            .map_err(|e| kafka_error("seek back for redelivery", e))
        })
    }
}
