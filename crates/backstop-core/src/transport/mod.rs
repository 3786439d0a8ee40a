//! Transport capabilities as small traits. A backend implements the ones it can;
//! the runner needs [`Subscriber`], [`DelayPublisher`] and [`DeadLetterPublisher`],
//! the CLI needs [`DeadLetterSource`] and [`Publisher`]. No broker type appears here.

mod delivery;
mod error;

pub use delivery::{
    Acknowledge, BoxFuture, Delivery, Lane, Lanes, Settlement, SourceInfo, SourceKind, settled,
};
pub use error::{PublishError, TransportError, TransportErrorKind};

use crate::message::Message;
use crate::retry::DelayTier;
use std::future::Future;
use std::time::Duration;

/// What a runner consumes: one source (topic/queue) for one consumer group,
/// with the delay tiers its handler's policy uses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The main topic or queue.
    pub source: String,
    /// Consumer group (Kafka) / consuming service name.
    pub group: String,
    /// The delay tiers the backend must provide for this source.
    pub tiers: Vec<DelayTier>,
    /// How many unacknowledged deliveries the backend may hand out at once
    /// (basic.qos on RabbitMQ); the runner sets four per in-flight slot of
    /// the source, so the broker's round trip does not idle the handlers.
    pub prefetch: usize,
}

impl Subscription {
    /// `source` read by `group`, without delay tiers, with a prefetch window
    /// of 64 (what the runner sets for its default 16 in-flight slots).
    pub fn new(source: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            group: group.into(),
            tiers: Vec::new(),
            prefetch: 64,
        }
    }

    /// With these delay tiers, shortest first.
    #[must_use]
    pub fn with_tiers(mut self, tiers: impl IntoIterator<Item = DelayTier>) -> Self {
        self.tiers = tiers.into_iter().collect();
        self
    }

    /// With this prefetch window.
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }
}

/// Publishes a message and waits for the broker's confirmation.
///
/// On failure the message is handed back inside [`PublishError`], so the
/// caller can retry or spool it: nothing is lost on an error path.
///
/// ```
/// # #[cfg(feature = "memory")] {
/// use backstop_core::{Message, Publisher, memory::MemoryBroker};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let broker = MemoryBroker::new();
/// broker.publish("orders", Message::new("hello")).await.expect("confirmed");
/// assert_eq!(broker.ready_len("orders"), 1);
/// # });
/// # }
/// ```
pub trait Publisher: Send + Sync + 'static {
    /// Publishes to `destination`; returns once the broker confirmed it.
    fn publish(
        &self,
        destination: &str,
        message: Message,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Everything a [`Runner`](crate::Runner) needs of a backend: subscribe,
/// and publish to a queue, a delay tier and the DLQ. Implemented for every
/// type that has the four capabilities, so a bound reads `T: Transport`.
pub trait Transport: Subscriber + DelayPublisher + DeadLetterPublisher + Publisher {}

impl<T> Transport for T where T: Subscriber + DelayPublisher + DeadLetterPublisher + Publisher {}

/// Opens delivery streams.
pub trait Subscriber: Send + Sync + 'static {
    /// The stream of deliveries.
    type Stream: DeliveryStream;

    /// `messaging.system` for spans: `kafka`, `rabbitmq`, `memory`.
    fn system(&self) -> &'static str {
        "unknown"
    }

    /// Subscribes; for backends whose tiers are separate topics (Kafka), the
    /// stream also yields the tier deliveries, each once it is due.
    fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> impl Future<Output = Result<Self::Stream, TransportError>> + Send;
}

/// A stream of deliveries. `None` means the stream ended (connection gone);
/// the runner then subscribes again with backoff.
pub trait DeliveryStream: Send + 'static {
    /// The next delivery.
    fn next_delivery(
        &mut self,
    ) -> impl Future<Output = Option<Result<Delivery, TransportError>>> + Send + '_;

    /// The runner stops taking messages for a while (a circuit breaker is
    /// open, or every in-flight slot has been busy for a second). Until
    /// [`resume`](Self::resume), `next_delivery` should hand out nothing and
    /// only keep the connection serviced (Kafka: pause the assigned
    /// partitions and keep polling, so the member stays in its group), so
    /// the broker keeps the backlog. A stream that ignores this may yield one
    /// more delivery, which the runner holds unhandled until intake resumes.
    fn pause(&mut self) {}

    /// Intake goes on after [`pause`](Self::pause).
    fn resume(&mut self) {}

    /// Ends the stream once the runner has settled every delivery it took:
    /// a backend whose settlements travel on the stream's connection makes
    /// sure they reached the broker before it lets go (RabbitMQ: the channel
    /// is closed and its close confirmed, and the broker handles a channel's
    /// frames in order). The runner waits for it, within a deadline. The
    /// default just drops the stream.
    fn close(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        drop(self);
        std::future::ready(())
    }
}

/// Publishes to a broker-side delay tier of a subscription.
pub trait DelayPublisher: Send + Sync + 'static {
    /// Publishes `message` to `tier`; it comes back to the subscription after the
    /// tier's delay. Returns once the broker confirmed it. A tier whose
    /// messages the broker cannot hold back (Kafka) holds each until its
    /// `backstop-due-at` header, which the runner writes as the failure time
    /// plus the delay (HEADERS.md); a message without it is due at once.
    fn publish_delayed(
        &self,
        subscription: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Publishes to the dead-letter queue of a subscription.
pub trait DeadLetterPublisher: Send + Sync + 'static {
    /// The DLQ's name for this subscription.
    fn dead_letter_destination(&self, subscription: &Subscription) -> String;

    /// Publishes `message` to the DLQ; returns once the broker confirmed it.
    fn publish_dead_letter(
        &self,
        subscription: &Subscription,
        message: Message,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Reads a DLQ: browse without removing, or take one message to replay or purge
/// (removed only when its [`Delivery`] is acked).
pub trait DeadLetterSource: Send + Sync + 'static {
    /// Up to `limit` messages from `dlq`, oldest first, without removing them.
    fn browse(
        &self,
        dlq: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, TransportError>> + Send;

    /// Takes the next message; ack removes it, nack or drop leaves it.
    fn take(
        &self,
        dlq: &str,
    ) -> impl Future<Output = Result<Option<Delivery>, TransportError>> + Send;
}

/// True for client properties (librdkafka's above all) whose values must
/// never be shown, nor written in a config file: `sasl.password`,
/// `ssl.key.password`, `ssl.key.pem`, `ssl.keystore.password`,
/// `sasl.oauthbearer.client.secret`, `sasl.oauthbearer.config`,
/// `sasl.jaas.config` and the like.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "sasl.jaas",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "private",
        "token",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// A broker URL with its password replaced by `***`, for logs, errors and
/// `Debug` (`amqp://app:s3cret@host/%2f` → `amqp://app:***@host/%2f`), and
/// `pass`/`password` query parameters too (Redis). Any character may stand
/// in a password, encoded or not (`/`, `@`, `?`, `:`): the user info is
/// everything up to the last `@`, and of it only the user name before the
/// first `:` is shown (nothing, when that could hold a query).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    out.push_str("://");
    let tail = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => {
            match userinfo.split_once(':') {
                Some((user, _)) if !user.contains(['?', '=', '&', '#']) => {
                    out.push_str(user);
                    out.push_str(":***@");
                }
                Some(_) => out.push_str("***@"),
                None if userinfo.contains(['?', '=', '&', '#']) => out.push_str("***@"),
                None => {
                    out.push_str(userinfo);
                    out.push('@');
                }
            }
            tail
        }
        None => rest,
    };
    let Some((before, query)) = tail.split_once('?') else {
        out.push_str(tail);
        return out;
    };
    out.push_str(before);
    out.push('?');
    for (i, param) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match param.split_once('=') {
            Some((name, _))
                if name.eq_ignore_ascii_case("pass") || name.eq_ignore_ascii_case("password") =>
            {
                out.push_str(name);
                out.push_str("=***");
            }
            _ => out.push_str(param),
        }
    }
    out
}

/// Reads a broker's state for a worker's health probes and backlog gauges
/// (`/readyz`, `backstop_consumer_lag`, `backstop_queue_depth`,
/// `backstop_retry_backlog`, `backstop_dlq_depth`,
/// `backstop_dlq_oldest_age_seconds`). Never changes what it reads: no
/// message is taken, redelivered or counted as a delivery by a reading.
pub trait Inspect: Send + Sync + 'static {
    /// Succeeds when the broker answers now (a metadata request, an open
    /// connection); fails with the reason otherwise.
    fn check(&self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The backlog of one subscription: its main source, each delay tier and
    /// its DLQ. A part the backend cannot read is left `None`/empty.
    fn backlog(
        &self,
        subscription: &Subscription,
    ) -> impl Future<Output = Result<Backlog, TransportError>> + Send;
}

/// What [`Inspect::backlog`] read for one subscription.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Kafka: per partition of the main topic, the high watermark minus the
    /// group's committed offset.
    pub lag: Vec<(i32, u64)>,
    /// Queues (RabbitMQ, memory): ready messages in the main queue.
    pub depth: Option<u64>,
    /// Messages waiting in each delay tier, by tier name.
    pub tiers: Vec<(String, u64)>,
    /// The DLQ's name.
    pub dlq: String,
    /// Dead letters waiting in the DLQ.
    pub dlq_depth: Option<u64>,
    /// Age of the oldest waiting dead letter (from its `backstop-failed-at`),
    /// `None` when the DLQ is empty or the backend cannot tell without
    /// disturbing it.
    pub dlq_oldest_age: Option<Duration>,
}

impl Backlog {
    /// An empty reading for the DLQ `dlq`.
    pub fn new(dlq: impl Into<String>) -> Self {
        Self {
            dlq: dlq.into(),
            ..Self::default()
        }
    }
}
