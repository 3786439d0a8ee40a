//! The consumer side: one consumer-group member per subscription, reading the
//! source and its retry-tier topics, committing offsets only up to the lowest
//! unfinished offset of each partition.
//!
//! - `context`: rebalance callbacks and the consumer's owner;
//! - `lanes`: per-partition buffers, handed out by the stream when a
//!   partition is idle and taken over by the task that settles a delivery;
//! - `ack`: settling a delivery (watermark store, rewind, release);
//! - `tracker`: the per-partition watermark bookkeeping.

mod ack;
mod context;
mod lanes;
mod tracker;

use crate::config::KafkaConfig;
use crate::convert::from_record;
use backstop_core::message::{names, parse_timestamp};
use backstop_core::{
    Delivery, DeliveryStream, Message, SourceKind, Subscription, TransportError, TransportErrorKind,
};
use context::Ctx;
use futures_util::FutureExt as _;
use lanes::{Fetched, Shared};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::TopicPartitionList;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracker::Tracker;

/// The delivery stream of one subscription. Partitions are handled
/// concurrently, each in order: a partition's next message is handed out only
/// after the previous one settled (acked, or its retry/DLQ copy on its way).
pub struct KafkaStream {
    shared: Arc<Shared>,
    /// What each subscribed topic is: the main source, or a delay tier.
    kinds: HashMap<String, SourceKind>,
    source: String,
}

impl fmt::Debug for KafkaStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaStream")
            .field("source", &self.source)
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
        let mut kinds = HashMap::from([(subscription.source.clone(), SourceKind::Main)]);
        for tier in &subscription.tiers {
            kinds.insert(
                config
                    .topic_names()
                    .tier(&subscription.group, &subscription.source, tier),
                SourceKind::RetryTier(tier.name().to_owned()),
            );
        }
        let topics: Vec<&str> = kinds.keys().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error("subscribe", e))?;
        Ok(Self {
            shared: Arc::new(Shared::new(
                consumer,
                tracker,
                subscription.source.clone(),
                paused,
                config.partition_concurrency(),
            )),
            kinds,
            source: subscription.source.clone(),
        })
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

/// At most this many messages are taken from librdkafka at once without
/// waiting, before the stream looks for work again.
const DRAIN_AT_ONCE: usize = 1024;

/// A consumer error: fatal ones end the stream (the runner subscribes
/// again); librdkafka recovers from the others by itself, so they are only
/// reported.
fn fatal(e: KafkaError) -> Option<TransportError> {
    if let KafkaError::MessageConsumptionFatal(code) = e {
        return Some(TransportError::new(
            TransportErrorKind::ConnectionLost,
            format!("fatal consumer error: {code}"),
        ));
    }
    tracing::warn!(error = %e, "consumer error");
    None
}

impl KafkaStream {
    /// Buffers a received message in its partition's lane.
    fn buffer(&self, m: &BorrowedMessage<'_>) {
        let message = from_record(m);
        let topic = m.topic();
        let kind = self.kinds.get(topic).cloned().unwrap_or(SourceKind::Main);
        let due = match kind {
            SourceKind::RetryTier(_) => due_in(&message).map(|wait| Instant::now() + wait),
            _ => None,
        };
        self.shared.push(
            topic,
            m.partition(),
            kind,
            Fetched {
                message,
                offset: m.offset(),
                due,
            },
        );
    }

    /// Buffers what librdkafka has ready, without waiting.
    fn drain(&self) -> Result<(), TransportError> {
        for _ in 0..DRAIN_AT_ONCE {
            match self.shared.consumer().recv().now_or_never() {
                Some(Ok(m)) => self.buffer(&m),
                Some(Err(e)) => {
                    if let Some(fatal) = fatal(e) {
                        return Err(fatal);
                    }
                    break;
                }
                None => break,
            }
        }
        Ok(())
    }
}

impl DeliveryStream for KafkaStream {
    async fn next_delivery(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            // What librdkafka already has is buffered first, so every
            // partition's lane sees its messages and the round robin can
            // pick among them.
            if let Err(e) = self.drain() {
                return Some(Err(e));
            }
            self.shared.tidy();
            // Paused: keep polling (the member stays in its group and sees
            // rebalances) and buffer what was already on its way, but hand
            // out nothing.
            if !self.shared.is_paused()
                && let Some(d) = self.shared.ready(Instant::now())
            {
                return Some(Ok(d));
            }
            let next_due = self.shared.next_due(Instant::now());
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
                    m = recv => m.map(|m| self.buffer(&m)),
                    () = settled => continue,
                    () = due => continue,
                }
            };
            if let Err(e) = received {
                if let Some(fatal) = fatal(e) {
                    return Some(Err(fatal));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn pause(&mut self) {
        if self.shared.paused.swap(true, Ordering::SeqCst) {
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
        if !self.shared.paused.swap(false, Ordering::SeqCst) {
            return;
        }
        // Entries of an earlier assignment must not keep a partition of the
        // current one paused.
        self.shared.tidy();
        // Partitions paused for their own reasons (a full buffer, a tier head
        // not yet due) stay paused; the stream resumes them when it is time.
        let mut tpl = TopicPartitionList::new();
        match self.shared.consumer().assignment() {
            Ok(assigned) => {
                for e in assigned.elements() {
                    if !self.shared.holds_paused(e.topic(), e.partition()) {
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
