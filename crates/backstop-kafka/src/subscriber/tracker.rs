//! Offset watermarks: a partition's offset is stored for commit only up to the
//! lowest delivered-but-unsettled offset, so a crash never skips a message.

use foldhash::{HashMap, HashMapExt as _};
use std::collections::BTreeSet;

type Key = (String, i32);

/// In-flight offsets with how many deliveries of each are in flight, in
/// offset order: a sorted vector (offsets mostly arrive in order and few are
/// in flight at once), which keeps its room between messages where a
/// `BTreeMap` would allocate a node for every message of an idle partition.
#[derive(Debug, Default)]
struct InFlight(Vec<(i64, u32)>);

impl InFlight {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn lowest(&self) -> Option<i64> {
        self.0.first().map(|(o, _)| *o)
    }

    fn contains(&self, offset: i64) -> bool {
        self.0.binary_search_by_key(&offset, |(o, _)| *o).is_ok()
    }

    fn add(&mut self, offset: i64) {
        match self.0.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) => {
                if let Some((_, n)) = self.0.get_mut(i) {
                    *n = n.saturating_add(1);
                }
            }
            Err(i) => self.0.insert(i, (offset, 1)),
        }
    }

    /// One delivery of `offset` settled; true when none is left in flight.
    fn remove_one(&mut self, offset: i64) -> bool {
        let Ok(i) = self.0.binary_search_by_key(&offset, |(o, _)| *o) else {
            return false;
        };
        let left = self.0.get_mut(i).map_or(0, |(_, n)| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == 0 {
            self.0.remove(i);
        }
        left == 0
    }
}

#[derive(Debug, Default)]
struct Part {
    generation: u64,
    /// Delivered and not yet settled, with how many deliveries of each offset
    /// are in flight (a rewind can deliver an offset again while the first
    /// delivery is still being handled).
    in_flight: InFlight,
    /// One past the highest offset delivered.
    next: i64,
    /// Lowest offset given back (nack) and not yet delivered again.
    rewind: Option<i64>,
    /// What was last stored for commit.
    stored: i64,
    /// What was last handed to librdkafka's offset store (stores are
    /// batched: see [`Tracker::take_flush`]).
    flushed: i64,
    /// The keys of the in-flight offsets that have one (partition
    /// concurrency above 1: never two messages of one key at once).
    keys: HashMap<i64, Vec<u8>>,
    /// In-flight offsets whose outcome is decided (their copy is being
    /// published): they hold the watermark but no longer their partition.
    released: BTreeSet<i64>,
}

impl Part {
    /// In-flight deliveries that still hold their partition.
    fn busy(&self) -> usize {
        self.in_flight.len().saturating_sub(self.released.len())
    }

    fn committable(&self) -> i64 {
        let mut c = self.next;
        if let Some(lowest) = self.in_flight.lowest() {
            c = c.min(lowest);
        }
        if let Some(r) = self.rewind {
            c = c.min(r);
        }
        c
    }
}

/// Per-topic, per-partition values: looked up by `&str` without building
/// a key (this is on every message's path).
#[derive(Debug)]
struct ByPartition<V>(HashMap<String, HashMap<i32, V>>);

impl<V> Default for ByPartition<V> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<V> ByPartition<V> {
    fn get(&self, topic: &str, partition: i32) -> Option<&V> {
        self.0.get(topic)?.get(&partition)
    }

    fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut V> {
        self.0.get_mut(topic)?.get_mut(&partition)
    }

    fn insert(&mut self, (topic, partition): Key, v: V) {
        self.0.entry(topic).or_default().insert(partition, v);
    }

    fn remove(&mut self, topic: &str, partition: i32) -> Option<V> {
        let parts = self.0.get_mut(topic)?;
        let v = parts.remove(&partition);
        if parts.is_empty() {
            self.0.remove(topic);
        }
        v
    }
}

/// Per-partition bookkeeping of one consumer.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    parts: ByPartition<Part>,
    /// Assigned partitions and the epoch of their current assignment.
    assigned: ByPartition<u64>,
    generations: u64,
}

/// What to do after a settle.
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Store this offset (the next one to consume) for commit.
    Store(i64),
    /// Nothing new to store.
    Nothing,
    /// The delivery belongs to an assignment that is gone; ignored.
    Stale,
}

impl Tracker {
    pub(crate) fn assign(&mut self, partitions: impl IntoIterator<Item = Key>) {
        for key in partitions {
            self.parts.remove(&key.0, key.1);
            self.generations += 1;
            self.assigned.insert(key, self.generations);
        }
    }

    pub(crate) fn revoke(&mut self, partitions: impl IntoIterator<Item = Key>) {
        for (topic, partition) in partitions {
            self.parts.remove(&topic, partition);
            self.assigned.remove(&topic, partition);
        }
    }

    /// Deliveries of `partitions` delivered and not yet settled.
    pub(crate) fn in_flight(&self, partitions: &[Key]) -> usize {
        partitions
            .iter()
            .filter_map(|(t, p)| self.parts.get(t, *p))
            .map(|part| part.in_flight.len())
            .sum()
    }

    #[cfg(test)]
    pub(crate) fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.assigned.get(topic, partition).is_some()
    }

    /// The epoch of the partition's current assignment; `None` when not assigned.
    /// Anything buffered under another epoch is stale.
    pub(crate) fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        self.assigned.get(topic, partition).copied()
    }

    /// One message of a partition at a time (`limit` 1).
    #[cfg(test)]
    pub(crate) fn may_deliver(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.may_deliver_keyed(topic, partition, offset, None, 1)
    }

    #[cfg(test)]
    /// Whether the message at `offset` may be handed out now: no rewind is
    /// pending past it (after a nack only the rewound offset may come next),
    /// and with `limit` 1 nothing of its partition is unsettled (one at a
    /// time, in order). Above 1, it may go while up to `limit - 1` others are
    /// being handled, unless one of them has its key (keyless messages have
    /// no order to keep). Only the head of a partition goes, so messages of
    /// one key start in offset order.
    pub(crate) fn may_deliver_keyed(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        limit: usize,
    ) -> bool {
        self.parts
            .get(topic, partition)
            .is_none_or(|p| Self::may_go(p, offset, key, limit))
    }

    /// The lane's one step per message: when the partition is still assigned
    /// under `epoch` and the message at `offset` may go
    /// ([`may_deliver_keyed`](Self::may_deliver_keyed)), records it as
    /// delivered ([`delivered_keyed`](Self::delivered_keyed)) and returns the
    /// generation and whether it is a redelivery; else `None`, recording
    /// nothing. One lookup of the assignment and one of the partition.
    pub(crate) fn take(
        &mut self,
        (topic, partition): (&str, i32),
        epoch: u64,
        offset: i64,
        key: Option<&[u8]>,
        limit: usize,
    ) -> Option<(u64, bool)> {
        if self.epoch(topic, partition) != Some(epoch) {
            return None;
        }
        let Some(part) = self.parts.get_mut(topic, partition) else {
            // First delivery of this assignment: nothing can hold it back.
            return Some(self.delivered_keyed(topic, partition, offset, key));
        };
        if !Self::may_go(part, offset, key, limit) {
            return None;
        }
        Some(Self::deliver(part, offset, key))
    }

    fn may_go(p: &Part, offset: i64, key: Option<&[u8]>, limit: usize) -> bool {
        let room = if limit <= 1 {
            p.busy() == 0
        } else {
            p.busy() < limit && key.is_none_or(|k| !p.keys.values().any(|v| v.as_slice() == k))
        };
        room && p.rewind.is_none_or(|r| offset <= r)
    }

    fn deliver(part: &mut Part, offset: i64, key: Option<&[u8]>) -> (u64, bool) {
        let redelivered = offset < part.next;
        part.in_flight.add(offset);
        // The offset comes from the broker: no overflow on i64::MAX.
        part.next = part.next.max(offset.saturating_add(1));
        if part.rewind.is_some_and(|r| offset <= r) {
            part.rewind = None;
        }
        if let Some(k) = key {
            part.keys.insert(offset, k.to_vec());
        }
        (part.generation, redelivered)
    }

    /// [`delivered`](Self::delivered), remembering the message's key while it
    /// is in flight.
    pub(crate) fn delivered_keyed(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
    ) -> (u64, bool) {
        if self.parts.get(topic, partition).is_none() {
            self.generations += 1;
            let part = Part {
                generation: self.generations,
                next: offset,
                stored: offset,
                flushed: offset,
                ..Part::default()
            };
            self.parts.insert((topic.to_owned(), partition), part);
        }
        match self.parts.get_mut(topic, partition) {
            Some(part) => Self::deliver(part, offset, key),
            // Inserted just above. Generation 0 is never handed out, so an
            // ack presenting it would be ignored as stale.
            None => (0, false),
        }
    }

    #[cfg(test)]
    /// Records a delivery; returns the generation the ack handle must present,
    /// and whether this offset was delivered before in this assignment (a
    /// redelivery after a nack).
    pub(crate) fn delivered(&mut self, topic: &str, partition: i32, offset: i64) -> (u64, bool) {
        self.delivered_keyed(topic, partition, offset, None)
    }

    fn part(&mut self, topic: &str, partition: i32, generation: u64) -> Option<&mut Part> {
        self.parts
            .get_mut(topic, partition)
            .filter(|p| p.generation == generation)
    }

    fn remove_one(part: &mut Part, offset: i64) {
        if part.in_flight.remove_one(offset) {
            part.keys.remove(&offset);
            part.released.remove(&offset);
        }
    }

    #[cfg(test)]
    /// The delivery at `offset` is done.
    pub(crate) fn acked(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Settled {
        let Some(part) = self.part(topic, partition, generation) else {
            return Settled::Stale;
        };
        Self::remove_one(part, offset);
        let c = part.committable();
        if c > part.stored {
            part.stored = c;
            Settled::Store(c)
        } else {
            Settled::Nothing
        }
    }

    /// [`acked`](Self::acked), then [`take_flush`](Self::take_flush) when
    /// the watermark moved: the offset to hand to librdkafka now, if any.
    /// One lookup.
    pub(crate) fn acked_flush(
        &mut self,
        (topic, partition): (&str, i32),
        offset: i64,
        generation: u64,
        min_step: i64,
    ) -> Option<i64> {
        let part = self.part(topic, partition, generation)?;
        Self::remove_one(part, offset);
        let c = part.committable();
        if c <= part.stored {
            return None;
        }
        part.stored = c;
        Self::flush_step(part, min_step)
    }

    fn flush_step(part: &mut Part, min_step: i64) -> Option<i64> {
        (part.stored.saturating_sub(part.flushed) >= min_step).then(|| {
            part.flushed = part.stored;
            part.stored
        })
    }

    /// The delivery at `offset` no longer holds its partition (nor its key):
    /// what follows may go while its copy is published. The watermark still
    /// waits for its ack.
    pub(crate) fn release(&mut self, topic: &str, partition: i32, offset: i64, generation: u64) {
        if let Some(part) = self.part(topic, partition, generation)
            && part.in_flight.contains(offset)
        {
            part.released.insert(offset);
            part.keys.remove(&offset);
        }
    }

    #[cfg(test)]
    /// The partition's stored offset, when it is at least `min_step` past
    /// what was last handed to librdkafka (which it now is).
    pub(crate) fn take_flush(&mut self, topic: &str, partition: i32, min_step: i64) -> Option<i64> {
        Self::flush_step(self.parts.get_mut(topic, partition)?, min_step)
    }

    /// Every stored offset not yet handed to librdkafka (which it now is).
    pub(crate) fn take_flushes(&mut self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (topic, parts) in &mut self.parts.0 {
            for (partition, part) in parts.iter_mut() {
                if part.stored > part.flushed {
                    part.flushed = part.stored;
                    out.push((topic.clone(), *partition, part.stored));
                }
            }
        }
        out
    }

    /// The delivery at `offset` is given back: the caller seeks the partition to
    /// the returned offset so it is delivered again; nothing at or past it is
    /// stored until then.
    pub(crate) fn nacked(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Option<i64> {
        let part = self.part(topic, partition, generation)?;
        Self::remove_one(part, offset);
        let rewind = part.rewind.map_or(offset, |r| r.min(offset));
        part.rewind = Some(rewind);
        Some(rewind)
    }

    /// Offsets to store for commit now (used before giving partitions up).
    #[cfg(test)]
    pub(crate) fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts.get(topic, partition).map(Part::committable)
    }
}

#[cfg(test)]
mod tests;
