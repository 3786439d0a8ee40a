//! `RabbitTransport`: every transport capability over one AMQP connection.

use crate::config::{QueueType, RabbitConfig, dlq_queue, redacted, tier_queue};
use crate::convert::{delivery_count, from_delivery, last_death_queue, now, properties};
use crate::settle::Settlements;
use crate::topology::declare_all;
use backstop_core::transport::BoxFuture;
use backstop_core::{
    Acknowledge, Backlog, ConfigError, DeadLetterPublisher, DeadLetterSource, DelayPublisher,
    DelayTier, Delivery, DeliveryStream, Inspect, Message, PublishError, Publisher, SourceInfo,
    SourceKind, Subscriber, Subscription, TransportError, TransportErrorKind,
};
use futures_util::StreamExt;
use lapin::Acker;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

struct Link {
    connection: Arc<Connection>,
    publish: Channel,
}

pub(crate) struct Inner {
    pub(crate) config: RabbitConfig,
    link: tokio::sync::Mutex<Option<Link>>,
}

/// RabbitMQ as a Backstop transport: publisher confirms on every publish
/// (mandatory, so an unroutable message is an error), manual acks, delay tiers
/// as TTL queues `<queue>.retry.<tier>` dead-lettering back to `<queue>`, and
/// the DLQ `<queue>.dlq`. A lost connection is replaced on next use.
#[derive(Clone)]
pub struct RabbitTransport {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lost(context: String, e: lapin::Error) -> TransportError {
    TransportError::new(TransportErrorKind::ConnectionLost, context).with_source(e)
}

/// What a failed connect most likely means, for its message: nothing
/// listening, or a broker that answered and refused the login.
/// The broker's channel-level refusal carried by `e`, if that is what it is
/// (`PRECONDITION_FAILED`, `NOT_FOUND`, ...): read from the error's type, not
/// its text.
pub(crate) fn soft_error(e: &lapin::Error) -> Option<lapin::protocol::AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            lapin::protocol::AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            lapin::protocol::AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

fn connect_hint(e: &lapin::Error) -> &'static str {
    match e.kind() {
        lapin::ErrorKind::IOError(_) => " (is RabbitMQ running?)",
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403 => {
            " (the broker refused the login: check the user, password and vhost)"
        }
        lapin::ErrorKind::ProtocolError(_) => " (the broker refused the connection)",
        _ => "",
    }
}

/// A failed publish: a message the broker refuses for what it is (over its
/// `max_message_size`, a malformed property) closes the channel with
/// PRECONDITION_FAILED, and sending it again cannot succeed; any other
/// failure is the link's.
fn publish_failed(context: String, e: lapin::Error) -> TransportError {
    if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
        TransportError::new(TransportErrorKind::Invalid, context).with_source(e)
    } else {
        lost(context, e)
    }
}

impl RabbitTransport {
    /// Validates `config`; connects on first use.
    pub fn new(config: RabbitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                link: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// A connection and its publish channel (confirms on).
    async fn connect(&self) -> Result<(Connection, Channel), TransportError> {
        let url = self.inner.config.url();
        let shown = redacted(url);
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.inner.config.connection_name()));
        let connection = crate::wire::connect(url, props)
            .await
            .map_err(|e| lost(format!("connect to {shown}{}", connect_hint(&e)), e))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(|e| lost(format!("open channel on {shown}"), e))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| lost("enable publisher confirms".to_owned(), e))?;
        Ok((connection, publish))
    }

    async fn link(&self) -> Result<(Arc<Connection>, Channel), TransportError> {
        let mut guard = self.inner.link.lock().await;
        if let Some(l) = guard.as_ref()
            && l.connection.status().connected()
            && l.publish.status().connected()
        {
            return Ok((l.connection.clone(), l.publish.clone()));
        }
        let config = &self.inner.config;
        let shown = redacted(config.url());
        // Bounded: the lock is held meanwhile, and every publish waits on it.
        let (connection, publish) = tokio::time::timeout(config.connect_timeout(), self.connect())
            .await
            .map_err(|_| {
                TransportError::new(
                    TransportErrorKind::ConnectionLost,
                    format!(
                        "connect to {shown}: no answer within {:?} (is the address right and reachable?)",
                        config.connect_timeout()
                    ),
                )
            })??;
        let connection = Arc::new(connection);
        *guard = Some(Link {
            connection: connection.clone(),
            publish: publish.clone(),
        });
        Ok((connection, publish))
    }

    async fn forget_link(&self) {
        *self.inner.link.lock().await = None;
    }

    /// A fresh channel for one operation. A connection that died (closed by
    /// the broker, a protocol error, a restart) is replaced: up to three tries.
    pub(crate) async fn channel(&self) -> Result<Channel, TransportError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let (connection, _) = self.link().await?;
            match connection.create_channel().await {
                Ok(c) => return Ok(c),
                Err(e) if tries >= 3 => return Err(lost("open channel".to_owned(), e)),
                Err(e) => {
                    tracing::debug!(error = %e, tries, "opening an AMQP channel failed, reconnecting");
                    if !connection.status().connected() {
                        self.forget_link().await;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * tries)).await;
                }
            }
        }
    }

    /// Declares the queues of `subscription` (main, tiers, DLQ), idempotently.
    pub async fn declare(&self, subscription: &Subscription) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let r = declare_all(&channel, self.inner.config.queue_type(), subscription).await;
        let _ = channel.close(200, ShortString::from("declared")).await;
        r?;
        self.declare_dead_letter_queue(&dlq_queue(&subscription.source))
            .await
    }

    /// Ready messages in `queue` (passive declare), `None` when it does not exist.
    pub async fn ready_count(&self, queue: &str) -> Result<Option<u32>, TransportError> {
        let channel = self.channel().await?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let r = channel
            .queue_declare(ShortString::from(queue), opts, FieldTable::default())
            .await;
        let _ = channel.close(200, ShortString::from("done")).await;
        Ok(r.ok().map(|q| q.message_count()))
    }

    /// Deletes `queue` and its messages (tests and tooling).
    pub async fn delete_queue(&self, queue: &str) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let r = channel
            .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| lost(format!("delete queue {queue:?}"), e));
        let _ = channel.close(200, ShortString::from("done")).await;
        r
    }

    /// Publishes on the link's channel and waits for the confirm. A publish
    /// the channel refused to send (it was closed under it: the broker closed
    /// the connection, which the link learns only now) is sent once more on
    /// a fresh link: nothing reached the broker, so no duplicate.
    async fn send(&self, queue: &str, message: Message) -> Result<(), PublishError> {
        let props = properties(&message, queue);
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut tries = 0;
        let confirm = loop {
            tries += 1;
            let (_, channel) = match self.link().await {
                Ok(l) => l,
                Err(e) => return Err(PublishError::new(e, message)),
            };
            let published = channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    opts,
                    message.payload(),
                    props.clone(),
                )
                .await;
            match published {
                Ok(c) => break c,
                Err(e) => {
                    self.forget_link().await;
                    if tries < 2 && !channel.status().connected() {
                        tracing::debug!(error = %e, "publish channel closed; publishing on a fresh link");
                        continue;
                    }
                    return Err(PublishError::new(
                        publish_failed(format!("publish to {queue:?}"), e),
                        message,
                    ));
                }
            }
        };
        let outcome = tokio::time::timeout(self.inner.config.confirm_timeout(), confirm).await;
        let error = match outcome {
            Ok(Ok(Confirmation::Ack(None))) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => TransportError::new(
                TransportErrorKind::NotFound,
                format!("no queue {queue:?}: the message was returned unroutable"),
            ),
            Ok(Ok(Confirmation::Nack(_))) => TransportError::new(
                TransportErrorKind::Rejected,
                format!("the broker nacked the publish to {queue:?}"),
            ),
            Ok(Ok(Confirmation::NotRequested)) => TransportError::new(
                TransportErrorKind::Other,
                "publisher confirms are not enabled on the channel",
            ),
            Ok(Err(e)) => {
                self.forget_link().await;
                publish_failed(format!("confirm of the publish to {queue:?}"), e)
            }
            Err(_) => {
                self.forget_link().await;
                TransportError::new(
                    TransportErrorKind::Rejected,
                    format!("no confirm for the publish to {queue:?} in time"),
                )
            }
        };
        Err(PublishError::new(error, message))
    }
}

impl Publisher for RabbitTransport {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        self.send(destination, message).await
    }
}

impl DelayPublisher for RabbitTransport {
    async fn publish_delayed(
        &self,
        subscription: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> Result<(), PublishError> {
        self.send(&tier_queue(&subscription.source, tier), message)
            .await
    }
}

impl DeadLetterPublisher for RabbitTransport {
    fn dead_letter_destination(&self, subscription: &Subscription) -> String {
        dlq_queue(&subscription.source)
    }

    async fn publish_dead_letter(
        &self,
        subscription: &Subscription,
        message: Message,
    ) -> Result<(), PublishError> {
        self.send(&dlq_queue(&subscription.source), message).await
    }
}

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
                let info = SourceInfo {
                    source: self.source.clone(),
                    kind,
                    partition: None,
                    offset: None,
                    redelivered: d.redelivered,
                    delivery_count: delivery_count(&d.properties, self.quorum, &self.source),
                };
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

pub(crate) struct RabbitAck {
    pub(crate) acker: Option<Acker>,
    /// For DLQ takes: the channel the message was fetched on.
    pub(crate) channel: Option<Channel>,
    /// For subscriptions: settlements are pipelined through these.
    pub(crate) settlements: Option<Arc<Settlements>>,
}

impl Acknowledge for RabbitAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if let (Some(s), Some(a)) = (&self.settlements, self.acker.take()) {
            // Pipelined: the frame is handed to lapin now; a failure means a
            // redelivery (the channel is gone), never a loss.
            s.start(async move {
                match a.ack(BasicAckOptions::default()).await {
                    Ok(true) => {}
                    // lapin sends nothing for an acker already used or whose
                    // channel failed: say so (it was silent).
                    Ok(false) => tracing::warn!(
                        "ack not sent: the delivery's acker was used or its channel failed; \
                         the message will be redelivered"
                    ),
                    Err(e) => {
                        tracing::debug!(error = %e, "ack not sent; the message will be redelivered");
                    }
                }
            });
            return backstop_core::transport::settled();
        }
        let acker = self.acker.take();
        let channel = self.channel.take();
        Box::pin(async move {
            let r = match acker {
                Some(a) => a
                    .ack(BasicAckOptions::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| lost("ack".to_owned(), e)),
                None => Ok(()),
            };
            if let Some(c) = channel {
                close_later(c);
            }
            r
        })
    }

    fn nack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if let (Some(s), Some(a)) = (&self.settlements, self.acker.take()) {
            s.start(async move {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(e) = a.nack(requeue).await {
                    tracing::debug!(error = %e, "nack not sent; the channel's close requeues the message");
                }
            });
            return backstop_core::transport::settled();
        }
        let acker = self.acker.take();
        let channel = self.channel.take();
        Box::pin(async move {
            let r = match acker {
                Some(a) => a
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| lost("nack".to_owned(), e)),
                None => Ok(()),
            };
            if let Some(c) = channel {
                close_later(c);
            }
            r
        })
    }
}

impl Drop for RabbitAck {
    fn drop(&mut self) {
        // Unsettled: left unacked; the broker redelivers it when the channel closes.
        if let Some(c) = self.channel.take() {
            close_later(c);
        }
    }
}

impl Inspect for RabbitTransport {
    /// Opens (and closes) a channel, connecting first if the link is down.
    async fn check(&self) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let _ = channel.close(200, ShortString::from("checked")).await;
        Ok(())
    }

    /// Ready messages of the main queue, each tier queue and the DLQ (passive
    /// declares). The oldest dead letter's age is read by peeking at the
    /// DLQ's head only when the DLQ is a classic queue (as Backstop declares
    /// it): a quorum queue counts a peek (a get then a requeue) as a
    /// delivery, and under a delivery limit peeking would eventually drop
    /// the dead letter.
    async fn backlog(&self, subscription: &Subscription) -> Result<Backlog, TransportError> {
        let source = &subscription.source;
        let dlq = dlq_queue(source);
        let mut backlog = Backlog::new(dlq.clone());
        backlog.depth = self.ready_count(source).await?.map(u64::from);
        for tier in &subscription.tiers {
            if let Some(n) = self.ready_count(&tier_queue(source, tier)).await? {
                backlog.tiers.push((tier.name().to_owned(), u64::from(n)));
            }
        }
        backlog.dlq_depth = self.ready_count(&dlq).await?.map(u64::from);
        if backlog.dlq_depth.unwrap_or(0) > 0
            && self.dead_letter_queue_kind(&dlq).await? == crate::dead_letters::DlqKind::Classic
        {
            backlog.dlq_oldest_age = self
                .browse(&dlq, 1)
                .await?
                .first()
                .and_then(|m| {
                    m.headers()
                        .get_str(backstop_core::message::names::FAILED_AT)
                })
                .and_then(backstop_core::message::parse_timestamp)
                .map(|t| {
                    std::time::SystemTime::now()
                        .duration_since(t)
                        .unwrap_or_default()
                });
        }
        Ok(backlog)
    }
}
