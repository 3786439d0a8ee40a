//! An in-memory broker implementing every transport capability, for tests, the
//! quickstart and local development. Delay tiers wait on tokio's clock, so tests
//! can run them under a paused clock; fault injection lets tests prove that
//! nothing is lost when routing fails.
//!
//! Semantics follow RabbitMQ: a delivery stays unacked until acked; a nack, a
//! dropped ack handle or a lost connection puts it back for redelivery with
//! `redelivered = true`; a delay tier `<source>.retry.<tier>` holds its messages
//! for the tier's delay and then returns them to `<source>`; the DLQ is
//! `<source>.dlq`.

use crate::message::Message;
use crate::retry::DelayTier;
use crate::transport::{
    Acknowledge, Backlog, BoxFuture, DeadLetterPublisher, DeadLetterSource, DelayPublisher,
    Delivery, DeliveryStream, Inspect, PublishError, Publisher, SourceInfo, SourceKind, Subscriber,
    Subscription, TransportError, TransportErrorKind,
};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;

mod stream;

use stream::MemoryAck;
pub use stream::MemoryStream;

/// The in-memory broker. Cheap to clone: clones share one broker.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("MemoryBroker")
            .field("queues", &st.queues.len())
            .field("generation", &st.generation)
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    fail_publish: AtomicU32,
    fail_delay: AtomicU32,
    fail_dead_letter: AtomicU32,
    /// Refuse (as `Invalid`) messages larger than this; 0 = no limit.
    max_message_bytes: std::sync::atomic::AtomicUsize,
    /// [`Inspect::check`] fails while set.
    unreachable: std::sync::atomic::AtomicBool,
    /// How long closing a stream takes, in milliseconds.
    close_delay_ms: std::sync::atomic::AtomicU64,
    /// Stream closes that ran to their end.
    closed: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// Refuses a message over the size limit, as Kafka's `message.max.bytes`.
    fn too_large(&self, message: Message) -> Result<Message, PublishError> {
        let max = self.max_message_bytes.load(Ordering::SeqCst);
        if max == 0 {
            return Ok(message);
        }
        let size = message_size(&message);
        if size <= max {
            return Ok(message);
        }
        Err(PublishError::new(
            TransportError::new(
                TransportErrorKind::Invalid,
                format!("message of {size} bytes is larger than the broker's limit of {max}"),
            ),
            message,
        ))
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues half-updated in a
        // way that loses messages (every update is a single push/pop), so go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    next_offset: i64,
    generation: u64,
}

impl State {
    fn queue(&mut self, name: &str) -> &mut Queue {
        self.queues.entry(name.to_owned()).or_default()
    }

    fn push(&mut self, name: &str, mut stored: Stored) {
        if stored.offset < 0 {
            stored.offset = self.next_offset;
            self.next_offset += 1;
        }
        let q = self.queue(name);
        q.ready.push_back(stored);
        q.notify.notify_waiters();
    }
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Stored>,
    unacked: HashMap<u64, Stored>,
    next_tag: u64,
    notify: Arc<Notify>,
}

#[derive(Clone)]
struct Stored {
    message: Message,
    offset: i64,
    redelivered: bool,
    via_tier: Option<String>,
    delivery_count: u32,
}

impl Stored {
    fn new(mut message: Message) -> Self {
        if message.timestamp().is_none() {
            message.set_timestamp(Some(SystemTime::now()));
        }
        Self {
            message,
            offset: -1,
            redelivered: false,
            via_tier: None,
            delivery_count: 0,
        }
    }
}

fn message_size(m: &Message) -> usize {
    m.payload().len()
        + m.key().map_or(0, |k| k.len())
        + m.headers()
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>()
}

fn take_fault(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn injected(message: Message, what: &str) -> Result<(), PublishError> {
    Err(PublishError::new(
        TransportError::new(
            TransportErrorKind::Rejected,
            format!("injected fault: {what} publish not confirmed"),
        ),
        message,
    ))
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The delay-tier queue of `source`: `<source>.retry.<tier>`.
    pub fn tier_queue(source: &str, tier: &DelayTier) -> String {
        format!("{source}.retry.{}", tier.name())
    }

    /// The DLQ of `source`: `<source>.dlq`.
    pub fn dlq(source: &str) -> String {
        format!("{source}.dlq")
    }

    // ---- fault injection ----

    /// The next `n` plain publishes fail (the message is handed back).
    pub fn fail_next_publishes(&self, n: u32) {
        self.inner.fail_publish.store(n, Ordering::SeqCst);
    }

    /// The next `n` delay-tier publishes fail.
    pub fn fail_next_delay_publishes(&self, n: u32) {
        self.inner.fail_delay.store(n, Ordering::SeqCst);
    }

    /// The next `n` DLQ publishes fail.
    pub fn fail_next_dead_letter_publishes(&self, n: u32) {
        self.inner.fail_dead_letter.store(n, Ordering::SeqCst);
    }

    /// Refuses every publish larger than `bytes` (payload, key and headers)
    /// with [`TransportErrorKind::Invalid`], as a broker's message size limit
    /// does; `None` lifts the limit.
    pub fn set_max_message_bytes(&self, bytes: Option<usize>) {
        self.inner
            .max_message_bytes
            .store(bytes.unwrap_or(0), Ordering::SeqCst);
    }

    /// Drops every consumer connection: open streams fail, acks on their
    /// deliveries fail, and every unacked delivery goes back to its queue
    /// (front, in order, marked redelivered), as RabbitMQ does on channel loss.
    pub fn drop_connection(&self) {
        let mut st = self.inner.lock();
        st.generation += 1;
        for q in st.queues.values_mut() {
            let mut back: Vec<Stored> = q.unacked.drain().map(|(_, s)| s).collect();
            back.sort_by_key(|s| std::cmp::Reverse(s.offset));
            for mut s in back {
                s.redelivered = true;
                q.ready.push_front(s);
            }
            q.notify.notify_waiters();
        }
    }

    /// While `true`, [`Inspect::check`] fails as if the broker were down
    /// (readiness tests); deliveries and publishes are not affected.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.inner.unreachable.store(unreachable, Ordering::SeqCst);
    }

    /// Closing a stream takes this long from now on, as a busy broker's
    /// answer to a channel close does.
    pub fn set_close_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.inner.close_delay_ms.store(ms, Ordering::SeqCst);
    }

    // ---- inspection ----

    /// Stream closes that ran to their end (not cut off by a deadline).
    pub fn closed_streams(&self) -> u64 {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Messages ready in `queue`.
    pub fn ready_len(&self, queue: &str) -> usize {
        self.inner
            .lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.ready.len())
    }

    /// Messages delivered from `queue` and not yet acked.
    pub fn unacked_len(&self, queue: &str) -> usize {
        self.inner
            .lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.unacked.len())
    }

    /// Copies of the ready messages of `queue`, oldest first.
    pub fn messages(&self, queue: &str) -> Vec<Message> {
        self.inner
            .lock()
            .queues
            .get(queue)
            .map(|q| q.ready.iter().map(|s| s.message.clone()).collect())
            .unwrap_or_default()
    }

    /// Every queue that exists, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.inner.lock().queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// Messages not yet settled anywhere but in a DLQ: ready or unacked in main
    /// and tier queues. Zero means every message has reached a final state.
    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .queues
            .iter()
            .filter(|(name, _)| !name.ends_with(".dlq"))
            .map(|(_, q)| q.ready.len() + q.unacked.len())
            .sum()
    }

    /// Waits until [`pending`](Self::pending) is zero (polls on tokio's clock).
    pub async fn wait_idle(&self) {
        while self.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn deliver(
        &self,
        queue: &str,
        kind_for: impl Fn(&Stored) -> SourceKind,
        source: &str,
        generation: Option<u64>,
    ) -> Option<Result<Delivery, TransportError>> {
        let mut st = self.inner.lock();
        let current = st.generation;
        if generation.is_some_and(|g| g != current) {
            return Some(Err(TransportError::new(
                TransportErrorKind::ConnectionLost,
                "memory broker connection dropped",
            )));
        }
        let q = st.queue(queue);
        let mut stored = q.ready.pop_front()?;
        stored.delivery_count += 1;
        let tag = q.next_tag;
        q.next_tag += 1;
        let info = SourceInfo {
            source: source.into(),
            kind: kind_for(&stored),
            partition: None,
            offset: Some(stored.offset),
            redelivered: stored.redelivered,
            delivery_count: Some(stored.delivery_count),
        };
        let message = stored.message.clone();
        q.unacked.insert(tag, stored);
        let ack = MemoryAck {
            inner: self.inner.clone(),
            queue: queue.to_owned(),
            tag,
            generation: current,
            settled: false,
        };
        Some(Ok(Delivery::new(message, info, Box::new(ack))))
    }
}

impl Publisher for MemoryBroker {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        if take_fault(&self.inner.fail_publish) {
            return injected(message, "plain");
        }
        let message = self.inner.too_large(message)?;
        self.inner.lock().push(destination, Stored::new(message));
        Ok(())
    }
}

impl DelayPublisher for MemoryBroker {
    async fn publish_delayed(
        &self,
        subscription: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> Result<(), PublishError> {
        if take_fault(&self.inner.fail_delay) {
            return injected(message, "delay-tier");
        }
        let message = self.inner.too_large(message)?;
        let tier_queue = Self::tier_queue(&subscription.source, tier);
        let offset = {
            let mut st = self.inner.lock();
            st.push(&tier_queue, Stored::new(message));
            st.queue(&tier_queue).ready.back().map_or(-1, |s| s.offset)
        };
        let inner = self.inner.clone();
        let source = subscription.source.clone();
        let (delay, tier_name) = (tier.delay(), tier.name().to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = inner.lock();
            let q = st.queue(&tier_queue);
            if let Some(pos) = q.ready.iter().position(|s| s.offset == offset)
                && let Some(mut stored) = q.ready.remove(pos)
            {
                stored.via_tier = Some(tier_name);
                stored.redelivered = false;
                stored.offset = -1;
                st.push(&source, stored);
            }
        });
        Ok(())
    }
}

impl DeadLetterPublisher for MemoryBroker {
    fn dead_letter_destination(&self, subscription: &Subscription) -> String {
        Self::dlq(&subscription.source)
    }

    async fn publish_dead_letter(
        &self,
        subscription: &Subscription,
        message: Message,
    ) -> Result<(), PublishError> {
        if take_fault(&self.inner.fail_dead_letter) {
            return injected(message, "dead-letter");
        }
        let message = self.inner.too_large(message)?;
        self.inner
            .lock()
            .push(&Self::dlq(&subscription.source), Stored::new(message));
        Ok(())
    }
}

impl Inspect for MemoryBroker {
    async fn check(&self) -> Result<(), TransportError> {
        if self.inner.unreachable.load(Ordering::SeqCst) {
            return Err(TransportError::new(
                TransportErrorKind::ConnectionLost,
                "the in-memory broker is set unreachable",
            ));
        }
        Ok(())
    }

    async fn backlog(&self, subscription: &Subscription) -> Result<Backlog, TransportError> {
        let source = &subscription.source;
        let dlq = Self::dlq(source);
        let mut b = Backlog::new(dlq.clone());
        let st = self.inner.lock();
        let ready = |q: &str| st.queues.get(q).map_or(0, |q| q.ready.len() as u64);
        b.depth = Some(ready(source));
        b.tiers = subscription
            .tiers
            .iter()
            .map(|t| (t.name().to_owned(), ready(&Self::tier_queue(source, t))))
            .collect();
        b.dlq_depth = Some(ready(&dlq));
        b.dlq_oldest_age = st.queues.get(&dlq).and_then(|q| {
            q.ready
                .iter()
                .filter_map(|s| {
                    s.message
                        .headers()
                        .get_str(crate::message::names::FAILED_AT)
                        .and_then(crate::message::parse_timestamp)
                })
                .min()
                .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
        });
        Ok(b)
    }
}

impl DeadLetterSource for MemoryBroker {
    async fn browse(&self, dlq: &str, limit: usize) -> Result<Vec<Message>, TransportError> {
        Ok(self.messages(dlq).into_iter().take(limit).collect())
    }

    async fn take(&self, dlq: &str) -> Result<Option<Delivery>, TransportError> {
        self.deliver(dlq, |_| SourceKind::DeadLetter, dlq, None)
            .transpose()
    }
}

#[cfg(test)]
mod tests;
