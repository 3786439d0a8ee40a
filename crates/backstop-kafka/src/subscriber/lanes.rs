//! The partitions' lanes. Each assigned partition has a queue of its own in
//! librdkafka (split off the consumer's), and a small buffer here filled
//! from it in batches. The stream hands out a partition's head when the
//! partition is idle; the task that settles a delivery takes the next head
//! itself ([`Lanes`]), so a busy partition goes on without a hand-over per
//! message. Backpressure is just not reading: librdkafka stops fetching a
//! partition whose queue is full and keeps what it prefetched (pausing
//! would throw that away and refetch it).

use super::ack::KafkaAck;
use super::context::{Ctx, Owned, Split, lock};
use super::tracker::Tracker;
use crate::convert::{Arena, from_record};
use backstop_core::message::{names, parse_timestamp};
use backstop_core::{Delivery, Lane, Lanes, Message, SourceInfo, SourceKind};
use foldhash::HashMap;
use futures_util::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A fill takes at most this many messages from a partition's queue...
const FILL_MESSAGES: usize = 256;
/// ...and stops once the buffer holds this many payload and key bytes.
const FILL_BYTES: usize = 1 << 20;

/// A fetched message waiting for its turn.
pub(super) struct Fetched {
    pub(super) message: Message,
    pub(super) offset: i64,
    /// Tier messages wait until due (tokio clock).
    pub(super) due: Option<Instant>,
}

impl Fetched {
    fn size(&self) -> usize {
        self.message
            .payload()
            .len()
            .saturating_add(self.message.key().map_or(0, |k| k.len()))
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

/// A received record, converted, with its due time when it is a tier's.
pub(super) fn fetched(m: &BorrowedMessage<'_>, kind: &SourceKind, arena: &mut Arena) -> Fetched {
    let message = from_record(m, arena);
    let due = match kind {
        SourceKind::RetryTier(_) => {
            due_in(&message).and_then(|wait| Instant::now().checked_add(wait))
        }
        _ => None,
    };
    Fetched {
        message,
        offset: m.offset(),
        due,
    }
}

/// One assigned partition: its queue in librdkafka and its buffer here.
struct PartitionQueue {
    topic: Arc<str>,
    partition: i32,
    kind: SourceKind,
    split: Option<Arc<Split>>,
    queue: VecDeque<Fetched>,
    bytes: usize,
    /// Deliveries of this partition held with their lane (see `KafkaAck`).
    holders: Arc<AtomicU32>,
    /// Where its payloads and keys are copied to.
    arena: Arena,
}

impl PartitionQueue {
    fn push(&mut self, f: Fetched) {
        self.bytes = self.bytes.saturating_add(f.size());
        self.queue.push_back(f);
    }

    fn pop(&mut self) -> Option<Fetched> {
        let f = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(f.size());
        Some(f)
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }

    /// Takes what the partition's queue has ready, without waiting, up to
    /// the fill bounds.
    fn fill(&mut self) {
        let Some(split) = self.split.clone() else {
            return;
        };
        // One stream for the whole fill: each `recv` would register and
        // unregister a waker (two locks) per message.
        let mut stream = split.stream();
        for _ in 0..FILL_MESSAGES {
            if self.bytes >= FILL_BYTES {
                break;
            }
            match stream.next().now_or_never().flatten() {
                Some(Ok(m)) => {
                    let f = fetched(&m, &self.kind, &mut self.arena);
                    self.push(f);
                }
                Some(Err(e)) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "partition queue");
                    break;
                }
                None => break,
            }
        }
    }
}

/// The buffers, by assignment epoch (the lane id): a partition assigned
/// again gets a new epoch, so nothing of an earlier assignment mixes in.
#[derive(Default)]
pub(super) struct Buffers {
    parts: HashMap<u64, PartitionQueue>,
    /// Epochs in the order the stream visits them (round robin from `turn`).
    order: Vec<u64>,
    turn: usize,
    /// Every partition queue split off so far, kept for the consumer's life:
    /// a partition assigned again reuses its queue (a second split of one
    /// partition would share librdkafka's queue, and dropping either would
    /// turn off the wake-ups of both).
    splits: HashMap<(String, i32), Arc<Split>>,
}

/// What the stream, its lanes and its ack handles share.
pub(super) struct Shared {
    pub(super) owned: Owned,
    pub(super) tracker: Arc<Mutex<Tracker>>,
    /// Woken when the stream has something to do: a partition assigned or
    /// left, a delivery given back or released, a settle nobody follows up.
    pub(super) settled: Arc<tokio::sync::Notify>,
    /// Partitions to seek back after a nack, and the offset: the stream drops
    /// their buffered messages and seeks, so they are fetched again in order.
    rewound: Mutex<Vec<(Arc<str>, i32, i64)>>,
    buffers: Mutex<Buffers>,
    /// The subscription's source (main topic), for every delivery.
    source: Arc<str>,
    /// Intake paused by the runner.
    pub(super) paused: AtomicBool,
    /// Messages of one partition in flight at once.
    per_partition: usize,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // What was acked reaches librdkafka's store before the final commit.
        self.flush();
        // The partition queues hold the consumer too: they go with it, on
        // the close thread (see `Owned`).
        let splits = std::mem::take(&mut self.buffers().splits);
        self.owned.splits.extend(splits.into_values());
    }
}

impl Shared {
    pub(super) fn new(
        consumer: StreamConsumer<Ctx>,
        tracker: Arc<Mutex<Tracker>>,
        settled: Arc<tokio::sync::Notify>,
        source: Arc<str>,
        per_partition: usize,
        closed: tokio::sync::oneshot::Sender<std::thread::JoinHandle<()>>,
    ) -> Self {
        Self {
            owned: Owned {
                consumer: Some(Arc::new(consumer)),
                splits: Vec::new(),
                closed: Some(closed),
            },
            tracker,
            settled,
            rewound: Mutex::new(Vec::new()),
            buffers: Mutex::new(Buffers::default()),
            source,
            paused: AtomicBool::new(false),
            per_partition,
        }
    }

    pub(super) fn consumer(&self) -> &Arc<StreamConsumer<Ctx>> {
        self.owned
            .consumer
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

    /// Hands every stored offset not yet handed over to librdkafka, in one
    /// call (acks hand them over in steps of `STORE_STEP`).
    pub(super) fn flush(&self) {
        let flushes = lock(&self.tracker).take_flushes();
        if flushes.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &flushes {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(error = %e, "offset list");
            }
        }
        if let Err(e) = self.consumer().store_offsets(&tpl) {
            tracing::debug!(error = %e, "store offsets");
        }
    }

    pub(super) fn rewind(&self, topic: &Arc<str>, partition: i32, offset: i64) {
        self.rewound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((topic.clone(), partition, offset));
    }

    /// Gives a newly assigned partition its own queue (splitting it off the
    /// consumer's, or taking the one it had under an earlier assignment)
    /// and a lane; returns whether it may be resumed.
    pub(super) fn attach(&self, topic: &str, partition: i32, kind: SourceKind) -> bool {
        let Some(epoch) = lock(&self.tracker).epoch(topic, partition) else {
            return false; // revoked meanwhile
        };
        let mut b = self.buffers();
        let b = &mut *b;
        if b.parts.contains_key(&epoch) {
            return true; // attached already (see `push`)
        }
        let key = (topic.to_owned(), partition);
        let split = match b.splits.get(&key) {
            Some(s) => s.clone(),
            None => match self.consumer().split_partition_queue(topic, partition) {
                Some(s) => {
                    let s = Arc::new(s);
                    b.splits.insert(key, s.clone());
                    s
                }
                None => {
                    tracing::warn!(topic, partition, "no queue of its own for the partition");
                    return false;
                }
            },
        };
        b.order.push(epoch);
        b.parts.insert(
            epoch,
            PartitionQueue {
                topic: topic.into(),
                partition,
                kind,
                split: Some(split),
                queue: VecDeque::new(),
                bytes: 0,
                holders: Arc::new(AtomicU32::new(0)),
                arena: Arena::default(),
            },
        );
        true
    }

    /// Buffers a message that came through the consumer's own queue. None
    /// should (a partition is paused from its assignment until it has a
    /// queue of its own, and librdkafka drops what it fetched before the
    /// pause), but one that does is kept in order: its partition gets its
    /// lane now, before anything of its own queue is read.
    pub(super) fn push(&self, topic: &str, partition: i32, kind: SourceKind, fetched: Fetched) {
        let Some(epoch) = lock(&self.tracker).epoch(topic, partition) else {
            return; // revoked meanwhile: the new owner fetches it
        };
        if !self.buffers().parts.contains_key(&epoch) {
            tracing::debug!(
                topic,
                partition,
                "message on the consumer's queue: attaching its partition"
            );
            self.attach(topic, partition, kind);
        }
        if let Some(q) = self.buffers().parts.get_mut(&epoch) {
            q.push(fetched);
        }
    }

    /// Buffers a message received from lane `epoch`'s queue.
    pub(super) fn push_to(&self, epoch: u64, m: &BorrowedMessage<'_>) {
        if let Some(q) = self.buffers().parts.get_mut(&epoch) {
            let f = fetched(m, &q.kind, &mut q.arena);
            q.push(f);
        }
    }

    /// The queues of the lanes nobody holds and whose buffer is empty: the
    /// stream waits on them.
    pub(super) fn idle_queues(&self) -> Vec<(u64, Arc<Split>)> {
        self.buffers()
            .parts
            .iter()
            .filter(|(_, q)| q.queue.is_empty() && q.holders.load(Ordering::SeqCst) == 0)
            .filter_map(|(e, q)| q.split.clone().map(|s| (*e, s)))
            .collect()
    }

    /// Drops what belongs to revoked partitions and to partitions sought back.
    pub(super) fn tidy(&self) {
        let rewound: Vec<_> =
            std::mem::take(&mut *self.rewound.lock().unwrap_or_else(|p| p.into_inner()));
        let mut b = self.buffers();
        for (topic, partition, offset) in rewound {
            for q in b.parts.values_mut() {
                if q.partition == partition && q.topic == topic {
                    q.clear();
                }
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
    /// partition has room and its head is due.
    pub(super) fn ready(self: &Arc<Self>, now: Instant) -> Option<Delivery> {
        let mut b = self.buffers();
        let n = b.order.len();
        for i in 0..n {
            let epoch = b.order[(b.turn + i) % n];
            if let Some(d) = self.take(&mut b, epoch, Some(now)) {
                b.turn = (b.turn + i + 1) % n;
                return Some(d);
            }
        }
        None
    }

    /// The head of lane `epoch`, if it may go now.
    fn take(
        self: &Arc<Self>,
        b: &mut Buffers,
        epoch: u64,
        now: Option<Instant>,
    ) -> Option<Delivery> {
        let q = b.parts.get_mut(&epoch)?;
        if q.queue.is_empty() {
            q.fill();
        }
        // The clock is read only for a tier head (a task taking the next
        // message of its lane passes no time).
        if q.queue
            .front()?
            .due
            .is_some_and(|d| d > now.unwrap_or_else(Instant::now))
        {
            return None; // a tier head not yet due: the stream's timer
        }
        let f = q.queue.front()?;
        // Keys are kept only where they matter: more than one in flight.
        let key = f.message.key().filter(|_| self.per_partition > 1);
        let (generation, redelivered) = lock(&self.tracker).take(
            (&q.topic, q.partition),
            epoch,
            f.offset,
            key.map(|k| &k[..]),
            self.per_partition,
        )?;
        let f = q.pop()?;
        q.holders.fetch_add(1, Ordering::SeqCst);
        let info = SourceInfo::new(self.source.clone(), q.kind.clone())
            .at(Some(q.partition), Some(f.offset))
            .redelivered(redelivered);
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

    /// The partitions whose queue is attached (intake's resume resumes
    /// these; the others wait for their queue).
    pub(super) fn attached(&self) -> Vec<(Arc<str>, i32)> {
        self.buffers()
            .parts
            .values()
            .map(|q| (q.topic.clone(), q.partition))
            .collect()
    }
}

impl Lanes for Shared {
    fn next(self: Arc<Self>, id: u64) -> Option<Delivery> {
        let mut b = self.buffers();
        if let Some(q) = b.parts.get(&id) {
            q.holders.fetch_sub(1, Ordering::SeqCst);
        }
        let next = if self.is_paused() {
            None
        } else {
            self.take(&mut b, id, None)
        };
        if next.is_none() {
            // Left (nothing ready, or not due, or not this task's turn): the
            // stream decides when what follows goes.
            self.settled.notify_one();
        }
        next
    }

    fn leave(&self, id: u64) {
        if let Some(q) = self.buffers().parts.get(&id) {
            q.holders.fetch_sub(1, Ordering::SeqCst);
        }
        self.settled.notify_one();
    }
}
