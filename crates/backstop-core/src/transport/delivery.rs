use super::TransportError;
use crate::message::Message;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

/// A boxed `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Settles one delivery with the broker. Object-safe: deliveries carry it boxed.
///
/// Dropping a handle without calling either method must leave the message to be
/// redelivered (RabbitMQ: unacked until the channel closes; Kafka: not committed).
pub trait Acknowledge: Send + 'static {
    /// The message is done (handled, or its replacement is confirmed).
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;
    /// Give the message back for redelivery.
    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;
}

const _: Option<Box<dyn Acknowledge>> = None;

/// Which kind of source a delivery came from. Attempt headers are only trusted
/// on sources the framework owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// The main topic/queue: anyone may publish here, attempt headers are ignored.
    Main,
    /// Back from this delay tier (framework-owned).
    RetryTier(String),
    /// A dead-letter queue (framework-owned).
    DeadLetter,
}

impl SourceKind {
    /// True when attempt headers may be believed.
    pub fn is_owned(&self) -> bool {
        !matches!(self, Self::Main)
    }
}

/// Where a delivery came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceInfo {
    /// The subscription's source (main topic/queue), also for tier deliveries.
    pub source: String,
    /// Main, tier or DLQ.
    pub kind: SourceKind,
    /// Kafka partition.
    pub partition: Option<i32>,
    /// Kafka offset, or the broker's sequence number.
    pub offset: Option<i64>,
    /// The broker says it delivered this message before.
    pub redelivered: bool,
    /// How many times the broker has delivered this message, this delivery
    /// included (1 on the first), when the broker counts (RabbitMQ quorum
    /// queues: `x-delivery-count` + 1; the in-memory broker).
    pub delivery_count: Option<u32>,
}

impl SourceInfo {
    /// A main-source delivery with no position.
    pub fn main(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            kind: SourceKind::Main,
            partition: None,
            offset: None,
            redelivered: false,
            delivery_count: None,
        }
    }
}

/// One message handed out by a broker, with the handle that settles it.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Where it came from.
    pub source: SourceInfo,
    /// When the broker received it, if known.
    pub received_at: Option<SystemTime>,
    ack: Box<dyn Acknowledge>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery from its parts.
    pub fn new(message: Message, source: SourceInfo, ack: Box<dyn Acknowledge>) -> Self {
        Self {
            received_at: message.timestamp(),
            message,
            source,
            ack,
        }
    }

    /// Acks: the message is done.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.ack.ack().await
    }

    /// Gives the message back for redelivery.
    pub async fn nack(self) -> Result<(), TransportError> {
        self.ack.nack().await
    }

    /// Splits into message, source and the ack handle.
    pub fn into_parts(self) -> (Message, SourceInfo, Box<dyn Acknowledge>) {
        (self.message, self.source, self.ack)
    }
}
