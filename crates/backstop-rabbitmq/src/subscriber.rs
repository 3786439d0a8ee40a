//! Consuming: one consumer (and channel) per subscription, paused by
//! not pulling, closed once its settlements reached the broker.

use crate::ack::RabbitAck;
use crate::config::{QueueType, dlq_queue, tier_queue};
use crate::convert::{delivery_count, from_delivery, last_death_queue, now};
use crate::settle::Settlements;
use crate::topology::declare_all;
use crate::transport::{RabbitTransport, lost};
use backstop_core::{
    Delivery, DeliveryStream, SourceInfo, SourceKind, Subscriber, Subscription, TransportError,
};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A consumer on one queue; its channel closes when the stream is dropped, so
/// unacked deliveries go back to the queue.
pub struct RabbitStream {
    consumer: Consumer,
    channel: Channel,
    source: Arc<str>,
    tiers: HashMap<String, String>,
    quorum: bool,
    /// Intake paused by the runner (circuit open, or every slot busy).
    paused: bool,
    /// Closed by [`DeliveryStream::close`]: nothing left for the drop to do.
    closed: bool,
    /// Acks and nacks on their way to the broker.
    settlements: Arc<Settlements>,
}

impl fmt::Debug for RabbitStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitStream")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

pub(crate) fn close_later(channel: Channel) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = channel
                .close(200, ShortString::from("backstop: done"))
                .await;
        });
    }
}

impl Drop for RabbitStream {
    fn drop(&mut self) {
        if !self.closed {
            close_later(self.channel.clone());
        }
    }
}

impl Subscriber for RabbitTransport {
    type Stream = RabbitStream;

    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<RabbitStream, TransportError> {
        let channel = self.channel().await?;
        declare_all(&channel, self.inner.config.queue_type(), subscription).await?;
        self.declare_dead_letter_queue(&dlq_queue(&subscription.source))
            .await?;
        let prefetch = u16::try_from(subscription.prefetch.max(1)).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| lost("basic.qos".to_owned(), e))?;
        let consumer = channel
            .basic_consume(
                ShortString::from(subscription.source.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lost(format!("consume {:?}", subscription.source), e))?;
        Ok(RabbitStream {
            consumer,
            channel,
            source: subscription.source.as_str().into(),
            tiers: subscription
                .tiers
                .iter()
                .map(|t| (tier_queue(&subscription.source, t), t.name().to_owned()))
                .collect(),
            quorum: self.inner.config.queue_type() == QueueType::Quorum,
            paused: false,
            closed: false,
            settlements: Arc::default(),
        })
    }
}

impl DeliveryStream for RabbitStream {
    async fn next_delivery(&mut self) -> Option<Result<Delivery, TransportError>> {
        if self.paused {
            // RabbitMQ has no client-side flow control worth the name
            // (channel.flow is refused): paused intake leaves at most
            // `prefetch` deliveries waiting in the consumer, unacked, and the
            // rest of the backlog in the queue. lapin keeps the connection's
            // heartbeats going by itself.
            return std::future::pending().await;
        }
        match self.consumer.next().await? {
            Err(e) => Some(Err(lost(format!("consumer on {:?}", self.source), e))),
            Ok(d) => {
                // Back from a delay tier: RabbitMQ dead-lettered it from our tier queue.
                let kind = last_death_queue(&d.properties)
                    .and_then(|q| self.tiers.get(&q).cloned())
                    .map_or(SourceKind::Main, SourceKind::RetryTier);
                let info = SourceInfo::new(self.source.clone(), kind)
                    .redelivered(d.redelivered)
                    .delivered_times(delivery_count(&d.properties, self.quorum, &self.source));
                let mut message = from_delivery(d.data, &d.properties, d.routing_key.as_str());
                if message.timestamp().is_none() {
                    message.set_timestamp(Some(now()));
                }
                let ack = RabbitAck {
                    acker: Some(d.acker),
                    channel: None,
                    settlements: Some(self.settlements.clone()),
                };
                Some(Ok(Delivery::new(message, info, Box::new(ack))))
            }
        }
    }

    fn pause(&mut self) {
        self.paused = true;
    }

    fn resume(&mut self) {
        self.paused = false;
    }

    /// Cancels the consumer, then closes the channel and waits for the
    /// broker's close-ok: the acks sent before them on this channel are
    /// handled by then (a close left to a spawned task could be cut off by
    /// the process's exit, and the broker would requeue messages that were
    /// handled and acked).
    ///
    /// The cancel matters on quorum queues: a channel whose queue is slow
    /// to apply its commands (32 or more pending, as on a loaded broker)
    /// keeps further settlements to itself and sends them once the queue
    /// catches up; a channel closed meanwhile drops them, and the queue
    /// hands those acked messages out again. The cancel goes through the
    /// queue's log and its answer comes after the queue applied what came
    /// before it, which lets the channel send what it kept (newer RabbitMQ
    /// versions send it as part of the cancel) before the close arrives.
    async fn close(mut self) {
        self.closed = true;
        self.settlements.flushed().await;
        if let Err(e) = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!(error = %e, source = %self.source, "cancelling the consumer");
        }
        if let Err(e) = self
            .channel
            .close(200, ShortString::from("backstop: done"))
            .await
        {
            tracing::debug!(error = %e, source = %self.source, "closing the channel");
        }
    }
}
