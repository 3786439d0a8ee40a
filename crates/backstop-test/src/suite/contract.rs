//! The transport contract on its own, without a runner (as Watermill's
//! pub/sub tests check it): an ack removes a message, a nack and a dropped
//! delivery give it back, a paused stream hands out nothing, and a delayed
//! publish comes back after its delay.

use super::{WAIT, fast_policy, ms, order};
use crate::{Backend, Harness, until_zero};
use backstop_core::message::{format_timestamp, names};
use backstop_core::{
    DeadLetterSource, DelayPublisher, Delivery, DeliveryStream, Message, SourceKind, Transport,
};
use std::time::{Duration, SystemTime};
use tokio::time::{Instant, timeout};

/// How long a paused stream is watched for a delivery it must not hand out.
const QUIET: Duration = Duration::from_secs(2);

async fn subscribe<T: Transport + DeadLetterSource + Clone>(h: &Harness<T>) -> T::Stream {
    h.transport
        .subscribe(&h.subscription())
        .await
        .expect("subscribed")
}

/// The stream's next delivery; panics when none comes within [`WAIT`].
async fn next<S: DeliveryStream>(stream: &mut S, what: &str) -> Delivery {
    match timeout(WAIT, stream.next_delivery()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("{what}: the stream failed: {e:?}"),
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: no delivery within {WAIT:?}"),
    }
}

fn id(m: &Message) -> String {
    m.id().expect("every test message has an id").to_owned()
}

/// An acked message is gone: a new subscription of the group gets the next
/// message, not it, and the source has nothing pending.
pub async fn transport_ack_removes_the_message<B: Backend>(b: &B) {
    let h = Harness::new(b, "contract-ack", fast_policy()).await;
    h.publish(order(1)).await;
    let mut stream = subscribe(&h).await;
    let first = next(&mut stream, "the published message").await;
    first.ack().await.expect("acked");
    stream.close().await;
    until_zero("acked message gone", WAIT, || b.pending(&h.source)).await;
    let second = order(2);
    let second_id = id(&second);
    h.publish(second).await;
    let mut stream = subscribe(&h).await;
    let d = next(&mut stream, "the message after the acked one").await;
    assert_eq!(id(&d.message), second_id, "an acked message came back");
    d.ack().await.expect("acked");
    stream.close().await;
}

/// A nacked message is handed out again.
pub async fn transport_nack_redelivers<B: Backend>(b: &B) {
    comes_back(b, "contract-nack", "a nack", |d| async move {
        d.nack().await.expect("nacked");
    })
    .await;
}

/// A delivery dropped without ack or nack (a bug, a panic) is given back
/// and handed out again: it is never leaked.
pub async fn transport_dropped_delivery_redelivers<B: Backend>(b: &B) {
    comes_back(b, "contract-drop", "a drop", |d| async move { drop(d) }).await;
}

/// A message left by `settle` is handed out again on the same stream.
async fn comes_back<B, F, Fut>(b: &B, prefix: &str, after: &str, settle: F)
where
    B: Backend,
    F: FnOnce(Delivery) -> Fut,
    Fut: Future<Output = ()>,
{
    let h = Harness::new(b, prefix, fast_policy()).await;
    let m = order(1);
    let m_id = id(&m);
    h.publish(m).await;
    let mut stream = subscribe(&h).await;
    let d = next(&mut stream, "the published message").await;
    assert_eq!(id(&d.message), m_id);
    settle(d).await;
    let again = next(&mut stream, "the message given back").await;
    assert_eq!(id(&again.message), m_id, "lost after {after}");
    again.ack().await.expect("acked");
    stream.close().await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
}

/// A paused stream hands out nothing (the broker keeps the message); after
/// resume the message comes.
pub async fn transport_pause_yields_nothing<B: Backend>(b: &B) {
    let h = Harness::new(b, "contract-pause", fast_policy()).await;
    h.publish(order(1)).await;
    let mut stream = subscribe(&h).await;
    // The first message shows the stream is live (Kafka: joined its group).
    next(&mut stream, "the first message")
        .await
        .ack()
        .await
        .expect("acked");
    stream.pause();
    let held = order(2);
    let held_id = id(&held);
    h.publish(held).await;
    if let Ok(got) = timeout(QUIET, stream.next_delivery()).await {
        let what = got.map(|d| d.map(|d| id(&d.message)));
        panic!("a paused stream handed out {what:?}");
    }
    stream.resume();
    let d = next(&mut stream, "the message published while paused").await;
    assert_eq!(id(&d.message), held_id);
    d.ack().await.expect("acked");
    stream.close().await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
}

/// A message published to a delay tier comes back to the subscription,
/// marked as from that tier, no sooner than the tier's delay. It carries
/// `backstop-due-at` as the runner writes it (Kafka's tiers wait for it;
/// RabbitMQ's and the memory broker's hold a message for the tier's delay).
pub async fn transport_delayed_publish_returns_after_its_delay<B: Backend>(b: &B) {
    let h = Harness::new(b, "contract-delay", fast_policy()).await;
    let sub = h.subscription();
    let mut stream = subscribe(&h).await;
    let tier = h
        .policy
        .tiers()
        .first()
        .expect("the suite's policy has tiers");
    let sent = Instant::now();
    let due = SystemTime::now() + tier.delay();
    let due = format_timestamp(due).expect("now plus a tier delay is representable");
    let m = order(1).with_header(names::DUE_AT, due);
    let m_id = id(&m);
    h.transport
        .publish_delayed(&sub, tier, m)
        .await
        .expect("delayed publish confirmed");
    let d = next(&mut stream, "the delayed message").await;
    let waited = sent.elapsed();
    assert_eq!(id(&d.message), m_id);
    assert_eq!(d.source.kind, SourceKind::RetryTier(tier.name().into()));
    // `backstop-due-at` is written in whole milliseconds: allow that much.
    assert!(
        waited + ms(1) >= tier.delay(),
        "came back after {waited:?}, before the tier's {:?}",
        tier.delay()
    );
    d.ack().await.expect("acked");
    stream.close().await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
}
