//! Faults injected into the real broker, not into the client: a DLQ that
//! refuses publishes (a full queue under a `max-length`, `reject-publish`
//! policy, so the broker nacks), a tier queue an operator deleted (the
//! mandatory publish comes back unroutable), a connection the broker closes
//! (`rabbitmqctl close_connection`), and RabbitMQ's own quorum delivery limit.

mod common;

use backstop_core::message::names;
use backstop_core::transport::DeadLetterSource;
use backstop_core::{
    Backoff, Context, HandlerError, HandlerOptions, Message, RetryPolicy, handler_fn,
};
use backstop_rabbitmq::QueueType;
use backstop_test::{Backend, Harness, Recorder, eventually, fast_policy, start, until_zero};
use bytes::Bytes;
use common::{Policy, RabbitBackend, close_connections_named};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const REFUSE: &str = r#"{"max-length":0,"overflow":"reject-publish"}"#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn options() -> HandlerOptions {
    HandlerOptions::default()
        .with_name("faults")
        .with_timeout(Duration::from_secs(5))
        // These tests make the broker redeliver on purpose; the delivery-limit
        // guard has its own conformance test.
        .with_max_deliveries(None)
}

fn order(n: u32) -> Message {
    Message::new(format!(r#"{{"n":{n}}}"#))
}

async fn dlq_len(h: &Harness<backstop_rabbitmq::RabbitTransport>) -> usize {
    h.dlq().await.len()
}

/// The DLQ refuses the copy (the broker nacks it): the original is not acked,
/// it comes back and is routed again; once the DLQ accepts, exactly one copy
/// lands there and the source is empty. Classic queues: RabbitMQ 3.10 quorum
/// queues keep a policy's length limit after the policy is cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_queue_refusing_publishes_keeps_the_original() {
    let b = RabbitBackend::with_queue_type(QueueType::Classic);
    let h = Harness::new(&b, "dlq-refused", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(|_: &Context| Err(HandlerError::permanent("bad order")));
    let runner = h
        .runner(handler, options())
        .with_route_retries(2, Backoff::exponential(ms(5), ms(20)))
        // Given back on every delivery, never kept locally: see
        // `a_dlq_that_keeps_refusing_ends_in_the_unroutable_store`.
        .with_unroutable_after(u32::MAX)
        .build()
        .expect("valid");
    let stats = runner.stats();
    let original = order(1);
    let id = original.id().expect("id").to_owned();
    let refusing = Policy::on_queue(&h.dlq_name(), REFUSE);
    h.publish(original).await;
    let running = start(runner);
    eventually("the broker refused the DLQ copy twice", WAIT, || async {
        stats.snapshot().failed_to_route >= 2
    })
    .await;
    assert_eq!(stats.snapshot().dead_lettered, 0);
    drop(refusing);
    eventually("dead-lettered once the DLQ accepts", WAIT, || async {
        h.dlq().await.iter().any(|m| m.id() == Some(id.as_str()))
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert_eq!(report.stats.dead_lettered, 1);
    let calls = rec.calls_for(&id);
    assert!(
        calls.len() >= 3,
        "handled on every redelivery: {}",
        calls.len()
    );
    assert!(
        calls[1..].iter().all(|c| c.redelivered),
        "broker redeliveries"
    );
    let copies = h.dlq().await;
    assert_eq!(copies.len(), 1, "exactly one DLQ copy");
    assert_eq!(copies[0].id(), Some(id.as_str()));
    assert_eq!(
        copies[0].headers().get_str(names::DEAD_LETTER_REASON),
        Some("permanent")
    );
}

/// A DLQ that keeps refusing (a length policy with `reject-publish`): the
/// message is given back and handled again only a bounded number of times
/// (`with_unroutable_after`, default 5), then kept whole in the local
/// unroutable store and acked; the messages behind it are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_that_keeps_refusing_ends_in_the_unroutable_store() {
    let b = RabbitBackend::new();
    let h = Harness::new(&b, "dlq-refusing", fast_policy()).await;
    let dir = std::env::temp_dir().join(common::unique("unroutable"));
    let rec = Recorder::default();
    let handler = rec.handler(|ctx: &Context| {
        if ctx.message().payload().starts_with(br#"{"n":1}"#) {
            Err(HandlerError::permanent("bad order"))
        } else {
            Ok(())
        }
    });
    let runner = h
        .runner(handler, options())
        .with_route_retries(2, Backoff::exponential(ms(5), ms(20)))
        .with_unroutable_dir(&dir)
        .build()
        .expect("valid");
    let stats = runner.stats();
    let refusing = Policy::on_queue(&h.dlq_name(), REFUSE);
    let bad = order(1);
    let id = bad.id().expect("id").to_owned();
    h.publish(bad).await;
    h.publish(order(2)).await;
    let running = start(runner);
    eventually("kept in the unroutable store", WAIT, || async {
        stats.snapshot().unroutable == 1
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    drop(refusing);
    assert_eq!(
        rec.calls_for(&id).len(),
        5,
        "handled a bounded number of times"
    );
    assert_eq!((report.stats.ok, report.stats.dead_lettered), (1, 0));
    let kept = backstop_core::unroutable::UnroutableStore::new(&dir)
        .list()
        .expect("store");
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].message.id(), Some(id.as_str()));
    assert_eq!(kept[0].destination, h.dlq_name());
    assert_eq!(dlq_len(&h).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A delay-tier queue is gone (an operator deleted it): the mandatory publish
/// comes back unroutable, the original is not acked and comes back; once the
/// queue exists again the message takes its tier hop and is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_tier_queue_keeps_the_original() {
    let b = RabbitBackend::new();
    let policy: RetryPolicy = fast_policy().with_immediate_attempts(1);
    let tier = policy.tiers()[0].clone();
    let h = Harness::new(&b, "tier-gone", policy).await;
    let rec = Recorder::default();
    // The handler waits for the go before failing, so the tier queue can be
    // deleted after the runner declared it on subscribe.
    let go = Arc::new(AtomicBool::new(false));
    let r = rec.clone();
    let gate = go.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let (r, gate) = (r.clone(), gate.clone());
        async move {
            r.record(&ctx);
            if ctx.source().kind.is_owned() {
                return Ok(());
            }
            while !gate.load(Ordering::SeqCst) {
                tokio::time::sleep(ms(10)).await;
            }
            Err(HandlerError::transient("inventory down"))
        }
    });
    let runner = h
        .runner(handler, options())
        .with_route_retries(2, Backoff::exponential(ms(5), ms(20)))
        // Given back on every delivery, never kept locally: see
        // `a_dlq_that_keeps_refusing_ends_in_the_unroutable_store`.
        .with_unroutable_after(u32::MAX)
        .build()
        .expect("valid");
    let stats = runner.stats();
    h.publish(order(1)).await;
    let running = start(runner);
    eventually("handler called", WAIT, || async { rec.len() == 1 }).await;
    h.transport
        .delete_queue(&backstop_rabbitmq::tier_queue(&h.source, &tier))
        .await
        .expect("delete the tier queue");
    go.store(true, Ordering::SeqCst);
    eventually("the tier copy came back unroutable twice", WAIT, || async {
        stats.snapshot().failed_to_route >= 2
    })
    .await;
    assert_eq!(stats.snapshot().delayed, 0);
    h.transport
        .declare(&h.subscription())
        .await
        .expect("declare the tier queue again");
    eventually("handled from the tier", WAIT, || async {
        rec.calls().iter().any(|c| c.kind.is_owned())
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert_eq!(report.stats.delayed, 1);
    assert_eq!(report.stats.ok, 1);
    assert_eq!(dlq_len(&h).await, 0);
}

/// The broker closes the worker's connection mid-stream: the runner
/// resubscribes, the publisher reconnects, unacked deliveries come back, and
/// every message is handled, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_by_the_broker_recovers_without_loss() {
    let b = RabbitBackend::new();
    let h = Harness::new(&b, "closed", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.slow_handler(ms(20));
    let running = start(
        h.runner(handler, options().with_concurrency(4))
            .with_resubscribe_backoff(Backoff::exponential(ms(50), ms(500)))
            .build()
            .expect("valid"),
    );
    for n in 0..50 {
        h.publish(order(n)).await;
    }
    eventually("some handled", WAIT, || async { rec.len() >= 10 }).await;
    let closed = close_connections_named(b.config().connection_name());
    assert!(closed >= 1, "the broker closed the worker's connection");
    // Publishing reconnects too.
    for n in 50..60 {
        h.publish(order(n)).await;
    }
    eventually("all 60 handled", WAIT, || async { rec.distinct() == 60 }).await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert!(report.stats.ok >= 60);
    assert_eq!(dlq_len(&h).await, 0);
}

/// RabbitMQ's own delivery limit (a policy here; RabbitMQ 4 sets 20 by default
/// on quorum queues) dead-letters into `<queue>.dlq` instead of dropping the
/// message, with `x-death` saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_delivery_limit_dead_letters_instead_of_dropping() {
    let b = RabbitBackend::new();
    let h = Harness::new(&b, "broker-limit", fast_policy()).await;
    let _limit = Policy::on_queue(&h.source, r#"{"delivery-limit":1}"#);
    let original = order(1);
    let id = original.id().expect("id").to_owned();
    h.publish(original).await;
    let mut returned = 0;
    while let Some(d) = h.transport.take(&h.source).await.expect("basic.get") {
        returned += 1;
        assert!(
            returned <= 5,
            "the broker never enforced its delivery limit"
        );
        let (_, _, ack) = d.into_parts();
        ack.nack().await.expect("nack with requeue");
        tokio::time::sleep(ms(100)).await;
    }
    eventually("dead-lettered by the broker", WAIT, || async {
        dlq_len(&h).await == 1
    })
    .await;
    let dead = h.dlq().await.remove(0);
    assert_eq!(dead.id(), Some(id.as_str()));
    assert_eq!(
        dead.headers().get_str("x-first-death-reason"),
        Some("delivery_limit"),
        "{:?}",
        dead.headers()
    );
    assert_eq!(b.pending(&h.source).await, 0);
}

/// A publish the broker refuses for what it is, here a message over its
/// `max_message_size` (128 MiB on RabbitMQ 3.x, 16 MiB on 4.x): the broker
/// closes the channel with PRECONDITION_FAILED, read from the AMQP reply,
/// not from its text, and the refusal is `Invalid` (sending it again
/// cannot succeed: the runner cuts such a copy down instead). The
/// transport publishes again afterwards, on a new channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_over_the_brokers_max_size_is_refused_as_invalid() {
    use backstop_core::{Publisher, TransportErrorKind};
    let b = RabbitBackend::new();
    let queue = b.fresh_source("too-large", "faults", &[]).await;
    let t = b.transport().await;
    let huge = Message::new(vec![b'x'; 129 << 20]);
    let refused = t
        .publish(&queue, huge)
        .await
        .expect_err("the broker refuses a message over its max size");
    assert_eq!(
        refused.error.kind(),
        TransportErrorKind::Invalid,
        "{refused:?}"
    );
    assert_eq!(
        refused.message.payload().len(),
        129 << 20,
        "handed back whole"
    );
    t.publish(&queue, order(1))
        .await
        .expect("the next publish goes through");
}
