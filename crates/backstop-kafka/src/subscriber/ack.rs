//! Settling one Kafka delivery: store the watermark for commit, or rewind.

use super::context::lock;
use super::lanes::Shared;
use super::tracker::Settled;
use backstop_core::transport::BoxFuture;
use backstop_core::{Acknowledge, TransportError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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
        let settled = lock(&self.shared.tracker).acked(
            &self.topic,
            self.partition,
            self.offset,
            self.generation,
        );
        if let Settled::Store(next) = settled {
            self.shared.store(&self.topic, self.partition, next);
        }
        if self.holders.load(Ordering::SeqCst) == 0 {
            self.shared.settled.notify_one();
        }
        Box::pin(std::future::ready(Ok(())))
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
        Box::pin(std::future::ready(Ok(())))
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
