//! Settling one Kafka delivery: store the watermark for commit, or rewind.

use super::context::lock;
use super::lanes::Shared;
use backstop_core::transport::BoxFuture;
use backstop_core::{Acknowledge, TransportError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// An ack hands the watermark to librdkafka once it moved this far.
const STORE_STEP: i64 = 256;

pub(super) struct KafkaAck {
    pub(super) shared: Arc<Shared>,
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) generation: u64,
    /// How many deliveries of this partition are held with their lane: while
    /// one is, its holder asks the lane for what follows, so a settle need
    /// not wake the stream.
    pub(super) holders: Arc<AtomicU32>,
}

impl Acknowledge for KafkaAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        // Handed to librdkafka in steps; the stream flushes the rest every
        // `FLUSH_EVERY`, and before partitions go.
        let flush = lock(&self.shared.tracker).acked_flush(
            (&self.topic, self.partition),
            self.offset,
            self.generation,
            STORE_STEP,
        );
        if let Some(next) = flush {
            self.shared.store(&self.topic, self.partition, next);
        }
        if self.holders.load(Ordering::SeqCst) == 0 {
            self.shared.settled.notify_one();
        }
        backstop_core::transport::settled()
    }

    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        let rewind = lock(&self.shared.tracker).nacked(
            &self.topic,
            self.partition,
            self.offset,
            self.generation,
        );
        if let Some(to) = rewind {
            self.shared.rewind(&self.topic, self.partition, to);
        }
        self.shared.settled.notify_one();
        backstop_core::transport::settled()
    }

    fn release(&self) {
        lock(&self.shared.tracker).release(
            &self.topic,
            self.partition,
            self.offset,
            self.generation,
        );
        self.shared.settled.notify_one();
    }
}
