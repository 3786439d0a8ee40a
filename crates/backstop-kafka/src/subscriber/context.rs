//! The consumer's context (rebalance callbacks keep the tracker in step with
//! the assignment) and its owner, which closes it off the async runtime.

use super::tracker::Tracker;
use rdkafka::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::topic_partition_list::TopicPartitionList;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The consumer context: keeps the tracker in step with the assignment.
pub(crate) struct Ctx {
    pub(super) tracker: Arc<Mutex<Tracker>>,
    /// The runner paused intake: partitions assigned meanwhile start paused.
    pub(super) paused: Arc<AtomicBool>,
    /// Revocations, counted for the transport.
    pub(super) revoked: Arc<AtomicU64>,
}

pub(super) fn lock(t: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
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
pub(super) struct Owned(pub(super) Option<StreamConsumer<Ctx>>);

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
