use super::TransportError;
use crate::message::Message;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// The message's outcome is decided and only its settlement remains (its
    /// delay-tier or DLQ copy is being published): what follows it in its
    /// [`Lane`] may be handed out meanwhile. The broker position still waits
    /// for [`ack`](Self::ack) (Kafka: the commit watermark stays below it).
    /// The default does nothing: a backend without lanes keeps no order.
    fn release(&self) {}
}

const _: Option<Box<dyn Acknowledge>> = None;

/// A delivery's settlement that cannot be lost: [`ack`](Self::ack),
/// [`nack`](Self::nack), or, when it is dropped unsettled (a panic unwinding
/// through its holder, a task dropped at the shutdown deadline, a code path
/// that forgot it), a nack of its own, so the broker hands the message out
/// again instead of holding its slot (RabbitMQ) or its partition's
/// watermark (Kafka) for ever.
pub struct Settlement {
    ack: Option<Box<dyn Acknowledge>>,
    /// When set by the time it is dropped: no nack (see
    /// [`leave_unsettled_when`](Self::leave_unsettled_when)).
    leave: Option<Arc<AtomicBool>>,
}

impl fmt::Debug for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("settled", &self.ack.is_none())
            .finish()
    }
}

impl Settlement {
    /// Guards `ack`.
    pub fn new(ack: Box<dyn Acknowledge>) -> Self {
        Self {
            ack: Some(ack),
            leave: None,
        }
    }

    /// Dropped unsettled once `flag` is set, it leaves the message to the
    /// broker instead of nacking it: a runner that abandons its unfinished
    /// work at the shutdown deadline lets the broker redeliver it (RabbitMQ
    /// when the channel closes, Kafka from the last commit), rather than
    /// handing it back to a consumer that is going away.
    pub fn leave_unsettled_when(&mut self, flag: Arc<AtomicBool>) {
        self.leave = Some(flag);
    }

    /// The message is done (see [`Acknowledge::ack`]).
    pub fn ack(mut self) -> BoxFuture<'static, Result<(), TransportError>> {
        self.ack.take().map_or_else(settled, Acknowledge::ack)
    }

    /// Gives the message back for redelivery (see [`Acknowledge::nack`]).
    pub fn nack(mut self) -> BoxFuture<'static, Result<(), TransportError>> {
        self.ack.take().map_or_else(settled, Acknowledge::nack)
    }

    /// See [`Acknowledge::release`].
    pub fn release(&self) {
        if let Some(ack) = &self.ack {
            ack.release();
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let Some(ack) = self.ack.take() else {
            return;
        };
        if self
            .leave
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
        {
            return;
        }
        tracing::warn!("a delivery was dropped unsettled: giving it back for redelivery");
        let nack = ack.nack();
        // Backends settle in the call or in the future; a future is run on
        // the runtime when there is one (there is, wherever deliveries are
        // handled), else dropped: the broker then redelivers when the
        // connection goes, as for any unacked message.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = nack.await {
                    tracing::warn!(%error, "nack of a delivery dropped unsettled failed");
                }
            });
        }
    }
}

/// An [`Acknowledge`] result that is already there (the settlement was done
/// in the call, or handed off): boxed without allocating, since the future
/// has no size.
pub fn settled() -> BoxFuture<'static, Result<(), TransportError>> {
    Box::pin(Settled)
}

/// The zero-sized future behind [`settled`].
struct Settled;

const _: () = assert!(std::mem::size_of::<Settled>() == 0);

impl Future for Settled {
    type Output = Result<(), TransportError>;

    fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The ordered lanes of a stream (Kafka: one per assigned partition).
///
/// After a delivery of a lane is settled, the task that handled it asks the
/// lane for what comes next and handles it at once: a busy partition goes on
/// without a hand-over through the stream or the scheduler.
pub trait Lanes: Send + Sync + 'static {
    /// The next delivery of lane `id` when it may be handled now (in order,
    /// due, intake not paused); `None` leaves the lane to the stream, which
    /// hands out its next message when that may go.
    fn next(self: Arc<Self>, id: u64) -> Option<Delivery>;

    /// The holder of a delivery of lane `id` lets the lane go without asking
    /// for the next one (shutdown, an open breaker, a routed copy, a
    /// delivery settled outside the runner): the stream takes over.
    fn leave(&self, id: u64);
}

const _: Option<Arc<dyn Lanes>> = None;

/// Which lane a delivery belongs to (see [`Lanes`]). Exactly one of
/// [`next`](Self::next) or a drop ends it: dropping it leaves the lane.
pub struct Lane {
    lanes: Option<Arc<dyn Lanes>>,
    id: u64,
}

impl fmt::Debug for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lane").field("id", &self.id).finish()
    }
}

impl Lane {
    /// Lane `id` of `lanes`.
    pub fn new(lanes: Arc<dyn Lanes>, id: u64) -> Self {
        Self {
            lanes: Some(lanes),
            id,
        }
    }

    /// The lane's next delivery, if it may be handled now.
    pub fn next(mut self) -> Option<Delivery> {
        self.lanes.take()?.next(self.id)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(lanes) = self.lanes.take() {
            lanes.leave(self.id);
        }
    }
}

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
#[non_exhaustive]
pub struct SourceInfo {
    /// The subscription's source (main topic/queue), also for tier deliveries.
    pub source: Arc<str>,
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
    pub fn main(source: impl Into<Arc<str>>) -> Self {
        Self::new(source, SourceKind::Main)
    }

    /// A delivery of `source` from a source of `kind`, with no position,
    /// not redelivered, not counted.
    pub fn new(source: impl Into<Arc<str>>, kind: SourceKind) -> Self {
        Self {
            source: source.into(),
            kind,
            partition: None,
            offset: None,
            redelivered: false,
            delivery_count: None,
        }
    }

    /// At this partition and offset.
    #[must_use]
    pub fn at(mut self, partition: Option<i32>, offset: Option<i64>) -> Self {
        self.partition = partition;
        self.offset = offset;
        self
    }

    /// Redelivered (or not), as the broker says.
    #[must_use]
    pub fn redelivered(mut self, redelivered: bool) -> Self {
        self.redelivered = redelivered;
        self
    }

    /// Delivered this many times, this delivery included, as the broker counts.
    #[must_use]
    pub fn delivered_times(mut self, count: Option<u32>) -> Self {
        self.delivery_count = count;
        self
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
    ack: Settlement,
    lane: Option<Lane>,
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
            ack: Settlement::new(ack),
            lane: None,
        }
    }

    /// The delivery belongs to `lane`: the runner asks it for the next
    /// delivery once this one is settled.
    #[must_use]
    pub fn with_lane(mut self, lane: Lane) -> Self {
        self.lane = Some(lane);
        self
    }

    /// Takes the delivery's lane, if it has one.
    pub fn take_lane(&mut self) -> Option<Lane> {
        self.lane.take()
    }

    /// Acks: the message is done. Its lane, if any, is left after that.
    pub async fn ack(self) -> Result<(), TransportError> {
        let Self { ack, lane, .. } = self;
        let acked = ack.ack().await;
        drop(lane);
        acked
    }

    /// Gives the message back for redelivery.
    pub async fn nack(self) -> Result<(), TransportError> {
        let Self { ack, lane, .. } = self;
        let nacked = ack.nack().await;
        drop(lane);
        nacked
    }

    /// Splits into message, source and the settlement (leaving the lane, if
    /// any: see [`take_lane`](Self::take_lane) to keep it).
    pub fn into_parts(self) -> (Message, SourceInfo, Settlement) {
        (self.message, self.source, self.ack)
    }
}
