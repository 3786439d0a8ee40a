//! The consumer's context (rebalance callbacks keep the tracker in step with
//! the assignment) and its owner, which closes it off the async runtime.

use super::tracker::Tracker;
use rdkafka::ClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The consumer context: keeps the tracker in step with the assignment.
pub(crate) struct Ctx {
    pub(super) tracker: Arc<Mutex<Tracker>>,
    /// Revocations, counted for the transport.
    pub(super) revoked: Arc<AtomicU64>,
    /// Partitions assigned and not yet given a queue of their own: the
    /// stream splits them off and resumes them.
    pub(super) assigned: Arc<Mutex<Vec<(String, i32)>>>,
    /// Wakes the stream (shared with it).
    pub(super) wake: Arc<tokio::sync::Notify>,
    /// How long a revocation waits for the revoked partitions' work in
    /// flight ([`crate::KafkaConfig::with_revoke_wait`]).
    pub(super) revoke_wait: Duration,
    /// Set when the consumer is being closed: the runner has drained (or
    /// abandoned) its work already, so the revocation of the close does not
    /// wait.
    pub(super) closing: Arc<AtomicBool>,
}

/// How often a waiting revocation looks at the tracker again.
const REVOKE_POLL: Duration = Duration::from_millis(5);

/// A partition's own message queue, split off the consumer's.
pub(super) type Split = StreamPartitionQueue<Ctx>;

pub(super) fn lock(t: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn keys(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl Ctx {
    /// Waits until nothing of `partitions` is in flight, or the revoke wait
    /// is over. This is librdkafka's callback, on the thread that polls the
    /// consumer, which is a runtime worker: the wait runs in
    /// `block_in_place`, so the worker's other tasks (the handlers whose acks
    /// end the wait, the timers they sleep on) move to another thread
    /// meanwhile. On a current-thread runtime nothing else could run, so
    /// there is no wait.
    fn await_in_flight(&self, partitions: &[(String, i32)]) {
        if self.revoke_wait.is_zero() || self.closing.load(Ordering::Relaxed) {
            return;
        }
        let current_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if current_thread {
            tracing::debug!("revocation on a current-thread runtime: in-flight work not awaited");
            return;
        }
        let wait = || {
            let started = Instant::now();
            let mut left = lock(&self.tracker).in_flight(partitions);
            while left > 0 && started.elapsed() < self.revoke_wait {
                std::thread::sleep(REVOKE_POLL);
                left = lock(&self.tracker).in_flight(partitions);
            }
            (left, started.elapsed())
        };
        // `block_in_place` refuses (panics) where blocking is not allowed (a
        // `LocalSet`): no unwinding into librdkafka, and no wait then.
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(wait)
        }));
        match waited {
            Ok((0, took)) if took > REVOKE_POLL => {
                tracing::info!(waited = ?took, "revocation waited for in-flight work");
            }
            Ok((0, _)) => {}
            Ok((left, _)) => tracing::warn!(
                in_flight = left,
                waited = ?self.revoke_wait,
                "partitions revoked with work still in flight: the new owner redelivers it"
            ),
            Err(_) => tracing::debug!("revocation where blocking is not allowed: not awaited"),
        }
    }
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Stored offsets of finished work are committed by librdkafka before
            // the partitions go (auto commit on revoke); acks still in flight
            // for them become stale and the new owner redelivers that work.
            let revoked = keys(tpl);
            tracing::info!(partitions = ?revoked, "partitions revoked");
            self.revoked.fetch_add(1, Ordering::Relaxed);
            self.await_in_flight(&revoked);
            let mut t = lock(&self.tracker);
            // Acked work not yet handed to librdkafka's store goes now, so
            // the commit on revoke includes it.
            let flushes = t.take_flushes();
            t.revoke(revoked);
            drop(t);
            if !flushes.is_empty() {
                let mut store = TopicPartitionList::new();
                for (topic, partition, offset) in &flushes {
                    if let Err(e) =
                        store.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    {
                        tracing::warn!(error = %e, "offset list");
                    }
                }
                if let Err(e) = consumer.store_offsets(&store) {
                    tracing::debug!(error = %e, "store offsets on revoke");
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?keys(tpl), "partitions assigned");
                lock(&self.tracker).assign(keys(tpl));
                // Paused until the stream has split the partition's queue
                // off (then nothing is fetched into the consumer's queue);
                // the stream resumes it unless intake is paused.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pause on assign");
                }
                self.assigned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(keys(tpl));
                self.wake.notify_one();
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Owns the consumer and its partitions' queues (each holds the consumer
/// too). Dropping a consumer after manual offset work can block for
/// `session.timeout.ms` or longer (rust-rdkafka issues 611, 597), so the
/// final close runs on its own thread, never on an async worker: the queues
/// go first, then the consumer, whose last reference that thread holds.
pub(super) struct Owned {
    pub(super) consumer: Option<Arc<StreamConsumer<Ctx>>>,
    pub(super) splits: Vec<Arc<Split>>,
    /// Given the close thread, so the stream's `close` can wait for the
    /// final commit and the group leave to be done.
    pub(super) closed: Option<tokio::sync::oneshot::Sender<std::thread::JoinHandle<()>>>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let splits = std::mem::take(&mut self.splits);
        let closed = self.closed.take();
        if let Some(consumer) = self.consumer.take() {
            consumer.context().closing.store(true, Ordering::Relaxed);
            let spawned = std::thread::Builder::new()
                .name("backstop-kafka-close".into())
                .spawn(move || {
                    drop(splits);
                    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                        tracing::debug!(error = %e, "final commit on close");
                    }
                    // The last reference: closing leaves the group, so its
                    // partitions go to the other members at once.
                    drop(consumer);
                });
            match spawned {
                Ok(thread) => {
                    if let Some(closed) = closed {
                        let _ = closed.send(thread);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not spawn the consumer close thread"),
            }
        }
    }
}
