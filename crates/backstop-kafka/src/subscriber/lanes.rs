//! The partitions' buffers and their lanes: fetched messages wait here in
//! offset order; the stream hands out a partition's head when the partition
//! is idle, and the task that settles a delivery takes the next head itself
//! ([`Lanes`]), so a busy partition goes on without a hand-over per message.

use super::ack::KafkaAck;
use super::context::{Ctx, Owned, lock};
use super::tracker::Tracker;
use backstop_core::{Delivery, Lane, Lanes, Message, SourceInfo, SourceKind};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Above this many buffered messages a partition is paused; below
/// `RESUME_BELOW` it is resumed (librdkafka refetches from where it stopped).
/// Every pause drops librdkafka's prefetched data for the partition and a
/// resume refetches it, so the band is wide: a narrow one (256/64) cut the
/// no-op consume rate on the mock cluster from about 59,000 to 2,000 msg/s.
const PAUSE_ABOVE: usize = 4096;
const RESUME_BELOW: usize = 1024;

/// A fetched message waiting for its turn.
pub(super) struct Fetched {
    pub(super) message: Message,
    pub(super) offset: i64,
    /// Tier messages wait until due (tokio clock).
    pub(super) due: Option<Instant>,
}

/// One assigned partition: its fetched messages in offset order.
struct PartitionQueue {
    topic: Arc<str>,
    partition: i32,
    kind: SourceKind,
    queue: VecDeque<Fetched>,
    paused: bool,
    /// Deliveries of this partition held with their lane (see `KafkaAck`).
    holders: Arc<AtomicU32>,
}

/// The buffers, by assignment epoch (the lane id): a partition assigned
/// again gets a new epoch, so nothing of an earlier assignment mixes in.
#[derive(Default)]
pub(super) struct Buffers {
    parts: HashMap<u64, PartitionQueue>,
    /// Epochs in the order the stream visits them (round robin from `turn`).
    order: Vec<u64>,
    turn: usize,
}

/// What the stream, its lanes and its ack handles share.
pub(super) struct Shared {
    pub(super) consumer: Owned,
    pub(super) tracker: Arc<Mutex<Tracker>>,
    /// Woken when the stream has something to do: a lane was left, a
    /// delivery given back or released, a settle nobody follows up.
    pub(super) settled: tokio::sync::Notify,
    /// Partitions to seek back after a nack, and the offset: the stream drops
    /// their buffered messages and seeks, so they are fetched again in order.
    rewound: Mutex<Vec<(Arc<str>, i32, i64)>>,
    buffers: Mutex<Buffers>,
    /// The subscription's source (main topic), for every delivery.
    source: String,
    /// Intake paused by the runner; shared with the rebalance callback.
    pub(super) paused: Arc<AtomicBool>,
    /// Messages of one partition in flight at once.
    per_partition: usize,
}

impl Shared {
    pub(super) fn new(
        consumer: StreamConsumer<Ctx>,
        tracker: Arc<Mutex<Tracker>>,
        source: String,
        paused: Arc<AtomicBool>,
        per_partition: usize,
    ) -> Self {
        Self {
            consumer: Owned(Some(consumer)),
            tracker,
            settled: tokio::sync::Notify::new(),
            rewound: Mutex::new(Vec::new()),
            buffers: Mutex::new(Buffers::default()),
            source,
            paused,
            per_partition,
        }
    }

    pub(super) fn consumer(&self) -> &StreamConsumer<Ctx> {
        self.consumer
            .0
            .as_ref()
            .expect("consumer present until drop")
    }

    fn buffers(&self) -> MutexGuard<'_, Buffers> {
        self.buffers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub(super) fn store(&self, topic: &str, partition: i32, offset: i64) {
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

    pub(super) fn rewind(&self, topic: &Arc<str>, partition: i32, offset: i64) {
        self.rewound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((topic.clone(), partition, offset));
    }

    fn set_paused(&self, q: &mut PartitionQueue, pause: bool) {
        if q.paused == pause {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&q.topic, q.partition);
        let r = if pause {
            self.consumer().pause(&tpl)
        } else {
            self.consumer().resume(&tpl)
        };
        match r {
            Ok(()) => q.paused = pause,
            Err(e) => {
                tracing::warn!(topic = %q.topic, partition = q.partition, pause, error = %e, "pause/resume")
            }
        }
    }

    /// Whether the partition is paused for its own reasons (a full buffer,
    /// a tier head not yet due): intake's resume leaves it paused.
    pub(super) fn holds_paused(&self, topic: &str, partition: i32) -> bool {
        self.buffers()
            .parts
            .values()
            .any(|q| q.paused && q.partition == partition && &*q.topic == topic)
    }

    /// Buffers a fetched message of the partition's current assignment.
    pub(super) fn push(&self, topic: &str, partition: i32, kind: SourceKind, fetched: Fetched) {
        let Some(epoch) = lock(&self.tracker).epoch(topic, partition) else {
            return; // revoked meanwhile: the new owner fetches it
        };
        let mut b = self.buffers();
        let b = &mut *b;
        let q = b.parts.entry(epoch).or_insert_with(|| {
            b.order.push(epoch);
            PartitionQueue {
                topic: topic.into(),
                partition,
                kind,
                queue: VecDeque::new(),
                paused: false,
                holders: Arc::new(AtomicU32::new(0)),
            }
        });
        q.queue.push_back(fetched);
    }

    /// Drops what belongs to revoked partitions and to partitions sought back.
    pub(super) fn tidy(&self) {
        let rewound: Vec<_> =
            std::mem::take(&mut *self.rewound.lock().unwrap_or_else(|p| p.into_inner()));
        let mut b = self.buffers();
        for (topic, partition, offset) in rewound {
            let found = b
                .parts
                .iter()
                .find(|(_, q)| q.partition == partition && q.topic == topic)
                .map(|(e, _)| *e);
            if let Some(epoch) = found
                && let Some(mut q) = b.parts.remove(&epoch)
                && !self.is_paused()
            {
                // While intake is paused the partition stays paused; with no
                // entry left, `resume` resumes it.
                self.set_paused(&mut q, false);
            }
            // A zero timeout makes the seek asynchronous; librdkafka discards
            // messages fetched before it.
            if let Err(e) =
                self.consumer()
                    .seek(&topic, partition, Offset::Offset(offset), Duration::ZERO)
            {
                tracing::warn!(topic = %topic, partition, offset, error = %e, "seek back for redelivery");
            }
        }
        let t = lock(&self.tracker);
        let b = &mut *b;
        b.parts
            .retain(|epoch, q| t.epoch(&q.topic, q.partition) == Some(*epoch));
        let parts = &b.parts;
        b.order.retain(|e| parts.contains_key(e));
    }

    /// The next message that may go, visiting partitions round robin: its
    /// partition has room and its head is due. Also pauses/resumes
    /// partitions by buffer size and due time.
    pub(super) fn ready(self: &Arc<Self>, now: Instant) -> Option<Delivery> {
        let mut b = self.buffers();
        let n = b.order.len();
        for i in 0..n {
            let epoch = b.order[(b.turn + i) % n];
            if let Some(d) = self.take(&mut b, epoch, now) {
                b.turn = (b.turn + i + 1) % n;
                return Some(d);
            }
        }
        None
    }

    /// The head of lane `epoch`, if it may go now.
    fn take(self: &Arc<Self>, b: &mut Buffers, epoch: u64, now: Instant) -> Option<Delivery> {
        let q = b.parts.get_mut(&epoch)?;
        let head_waiting = q
            .queue
            .front()
            .is_some_and(|f| f.due.is_some_and(|d| d > now));
        if head_waiting || q.queue.len() > PAUSE_ABOVE {
            self.set_paused(q, true);
        } else if q.queue.len() < RESUME_BELOW {
            self.set_paused(q, false);
        }
        if head_waiting {
            return None;
        }
        let mut t = lock(&self.tracker);
        let f = q.queue.front()?;
        if t.epoch(&q.topic, q.partition) != Some(epoch)
            || !t.may_deliver_keyed(
                &q.topic,
                q.partition,
                f.offset,
                f.message.key().map(|k| &k[..]),
                self.per_partition,
            )
        {
            return None;
        }
        let f = q.queue.pop_front()?;
        let (generation, redelivered) = t.delivered_keyed(
            &q.topic,
            q.partition,
            f.offset,
            f.message.key().map(|k| &k[..]),
        );
        drop(t);
        q.holders.fetch_add(1, Ordering::SeqCst);
        let info = SourceInfo {
            source: self.source.clone(),
            kind: q.kind.clone(),
            partition: Some(q.partition),
            offset: Some(f.offset),
            redelivered,
            delivery_count: None,
        };
        let ack = KafkaAck {
            shared: self.clone(),
            topic: q.topic.clone(),
            partition: q.partition,
            offset: f.offset,
            generation,
            holders: q.holders.clone(),
        };
        let lanes: Arc<dyn Lanes> = self.clone();
        Some(Delivery::new(f.message, info, Box::new(ack)).with_lane(Lane::new(lanes, epoch)))
    }

    /// The next moment a buffered tier head becomes due. Heads already due
    /// are left out: they wait for their partition's in-flight message,
    /// whose settlement wakes the stream (a past instant here would spin).
    /// Nothing while paused: no head may go then anyway.
    pub(super) fn next_due(&self, now: Instant) -> Option<Instant> {
        if self.is_paused() {
            return None;
        }
        self.buffers()
            .parts
            .values()
            .filter_map(|q| q.queue.front().and_then(|f| f.due))
            .filter(|d| *d > now)
            .min()
    }

    /// A holder of lane `epoch` lets it go.
    fn unhold(&self, b: &Buffers, epoch: u64) {
        if let Some(q) = b.parts.get(&epoch) {
            q.holders.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Lanes for Shared {
    fn next(self: Arc<Self>, id: u64) -> Option<Delivery> {
        let mut b = self.buffers();
        self.unhold(&b, id);
        let next = if self.is_paused() {
            None
        } else {
            self.take(&mut b, id, Instant::now())
        };
        if next.is_none() && b.parts.get(&id).is_some_and(|q| !q.queue.is_empty()) {
            // Left with messages waiting (not due, or not this task's turn):
            // the stream decides when they go.
            self.settled.notify_one();
        }
        next
    }

    fn leave(&self, id: u64) {
        self.unhold(&self.buffers(), id);
        self.settled.notify_one();
    }
}
