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
use crate::convert::Arena;
use backstop_core::{
    Delivery, DeliveryStream, SourceKind, Subscription, TransportError, TransportErrorKind,
};
use context::Ctx;
use futures_util::FutureExt as _;
use lanes::Shared;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::TopicPartitionList;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracker::Tracker;

/// The delivery stream of one subscription. Partitions are handled
/// concurrently, each in order: a partition's next message is handed out only
/// after the previous one settled (acked, or its retry/DLQ copy on its way).
pub struct KafkaStream {
    shared: Arc<Shared>,
    /// Partitions assigned and not yet attached (filled by the rebalance
    /// callback).
    assigned: Arc<Mutex<Vec<(String, i32)>>>,
    /// When acked offsets were last handed to librdkafka's store.
    flushed_at: Instant,
    /// What each subscribed topic is: the main source, or a delay tier.
    kinds: HashMap<String, SourceKind>,
    source: String,
    /// Where messages that came through the consumer's own queue are copied.
    arena: Arena,
    /// The thread that makes the consumer's final commit and leaves the
    /// group, once the consumer's last reference goes.
    closed: Option<tokio::sync::oneshot::Receiver<std::thread::JoinHandle<()>>>,
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
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let wake = Arc::new(tokio::sync::Notify::new());
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
        // Every partition has a prefetch queue of its own (see `lanes`), so
        // librdkafka's limits, meant for one queue of the whole consumer,
        // apply per partition: lower defaults keep four partitions near what
        // one queue of the defaults holds. Set them to choose otherwise.
        for (property, per_partition) in PREFETCH_DEFAULTS {
            if client.get(property).is_none() {
                client.set(property, per_partition);
            }
        }
        client
            .set("group.id", &subscription.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer<Ctx> = client
            .create_with_context(Ctx {
                tracker: tracker.clone(),
                revoked,
                assigned: assigned.clone(),
                wake: wake.clone(),
                revoke_wait: config.revoke_wait(),
                closing: Arc::default(),
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
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        Ok(Self {
            shared: Arc::new(Shared::new(
                consumer,
                tracker,
                wake,
                subscription.source.as_str().into(),
                config.partition_concurrency(),
                closed_tx,
            )),
            assigned,
            flushed_at: Instant::now(),
            kinds,
            source: subscription.source.clone(),
            arena: Arena::default(),
            closed: Some(closed),
        })
    }
}

/// librdkafka's prefetch limits, per partition here (its defaults, 100,000
/// messages and 64 MiB, are for one queue of the whole consumer).
const PREFETCH_DEFAULTS: [(&str, &str); 2] = [
    ("queued.min.messages", "25000"),
    ("queued.max.messages.kbytes", "16384"),
];

/// Acked offsets reach librdkafka's store at least this often (it commits
/// the store every `auto.commit.interval.ms`, one second by default).
const FLUSH_EVERY: Duration = Duration::from_millis(100);

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
    fn kind(&self, topic: &str) -> SourceKind {
        self.kinds.get(topic).cloned().unwrap_or(SourceKind::Main)
    }

    /// Gives newly assigned partitions their own queue and resumes them
    /// (unless intake is paused: `resume` does it then).
    fn attach_assigned(&self) {
        let assigned =
            std::mem::take(&mut *self.assigned.lock().unwrap_or_else(|p| p.into_inner()));
        if assigned.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in assigned {
            if self.shared.attach(&topic, partition, self.kind(&topic)) {
                tpl.add_partition(&topic, partition);
            }
        }
        if !self.shared.is_paused()
            && let Err(e) = self.shared.consumer().resume(&tpl)
        {
            tracing::warn!(error = %e, source = %self.source, "resume assigned partitions");
        }
    }

    /// Serves the consumer's own queue without waiting: events, and any
    /// message fetched before its partition had a queue of its own.
    fn drain(&mut self) -> Result<(), TransportError> {
        for _ in 0..DRAIN_AT_ONCE {
            match self.shared.consumer().recv().now_or_never() {
                Some(Ok(m)) => {
                    let kind = self.kind(m.topic());
                    let f = lanes::fetched(&m, &kind, &mut self.arena);
                    self.shared.push(m.topic(), m.partition(), kind, f);
                }
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
            self.attach_assigned();
            if let Err(e) = self.drain() {
                return Some(Err(e));
            }
            self.shared.tidy();
            // Paused: keep polling (the member stays in its group and sees
            // rebalances), but hand out nothing.
            if !self.shared.is_paused()
                && let Some(d) = self.shared.ready(Instant::now())
            {
                return Some(Ok(d));
            }
            let next_due = self.shared.next_due(Instant::now());
            // Idle lanes are watched for their next message; the others are
            // taken care of by their holders.
            let idle = if self.shared.is_paused() {
                Vec::new()
            } else {
                self.shared.idle_queues()
            };
            let shared = self.shared.clone();
            let recv = shared.consumer().recv();
            let settled = shared.settled.notified();
            let due = async {
                match next_due {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let lane = async {
                if idle.is_empty() {
                    return std::future::pending().await;
                }
                let waits = idle
                    .iter()
                    .map(|(epoch, q)| Box::pin(async move { (*epoch, q.recv().await) }));
                futures_util::future::select_all(waits).await.0
            };
            if self.flushed_at.elapsed() >= FLUSH_EVERY {
                self.shared.flush();
                self.flushed_at = Instant::now();
            }
            let flush = tokio::time::sleep_until(self.flushed_at + FLUSH_EVERY);
            let received = tokio::select! {
                m = recv => m.map(|m| {
                    let kind = self.kind(m.topic());
                    let f = lanes::fetched(&m, &kind, &mut self.arena);
                    self.shared.push(m.topic(), m.partition(), kind, f);
                }),
                (epoch, m) = lane => m.map(|m| self.shared.push_to(epoch, &m)),
                () = settled => continue,
                () = due => continue,
                () = flush => continue,
            };
            if let Err(e) = received {
                if let Some(fatal) = fatal(e) {
                    return Some(Err(fatal));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Hands every acked offset to librdkafka, then closes the consumer on
    /// its own thread (a final synchronous commit, then the group leave)
    /// and waits until that is done: when the runner returns, the work it
    /// finished is committed and the partitions are free for the others.
    /// (The runner bounds the wait.)
    async fn close(mut self) {
        self.shared.flush();
        let closed = self.closed.take();
        // The last reference to the consumer goes with the stream, unless a
        // delivery abandoned at the deadline still holds one: then the
        // close happens when that goes, and the runner stops waiting.
        drop(self);
        if let Some(closed) = closed
            && let Ok(thread) = closed.await
        {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
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
        // Entries of an earlier assignment must not be resumed.
        self.shared.tidy();
        // Partitions without their own queue yet stay paused until they have one.
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in self.shared.attached() {
            tpl.add_partition(&topic, partition);
        }
        if let Err(e) = self.shared.consumer().resume(&tpl) {
            tracing::warn!(error = %e, source = %self.source, "resume intake");
        }
        tracing::debug!(source = %self.source, "intake resumed");
    }
}
