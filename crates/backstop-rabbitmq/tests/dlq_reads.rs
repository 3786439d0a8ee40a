//! Reading a DLQ never counts toward a delivery limit: the DLQ is a classic
//! queue whatever the main queue's type, so a `delivery-limit` policy on it
//! (RabbitMQ 4 sets 20 on quorum queues by default) cannot drop a dead letter
//! however often `dlq list` reads it. The control shows why: the same reading
//! of a quorum queue under the same policy ends its messages.

mod common;

use backstop_core::{DeadLetterSource, Message, Publisher, RetryPolicy, Subscription};
use backstop_rabbitmq::dlq_queue;
use backstop_test::{Harness, eventually};
use common::{Policy, RabbitBackend};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn ids(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.id().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_readings_of_a_dlq_under_a_delivery_limit_lose_nothing() {
    let b = RabbitBackend::new();
    let h = Harness::new(&b, "dlq-reads", RetryPolicy::default()).await;
    let dlq = dlq_queue(&h.source);
    let letters: Vec<Message> = (0..3).map(|i| Message::new(format!("dead {i}"))).collect();
    for m in &letters {
        h.transport
            .publish(&dlq, m.clone())
            .await
            .expect("dead letter confirmed");
    }
    let _limit = Policy::on_queue(&dlq, r#"{"delivery-limit":1}"#);
    for reading in 0..50 {
        let seen = h.transport.browse(&dlq, 100).await.expect("browse the DLQ");
        assert_eq!(
            ids(&seen),
            ids(&letters),
            "reading {reading}: every dead letter, in order"
        );
    }
    assert_eq!(
        h.transport.ready_count(&dlq).await.expect("depth"),
        Some(3),
        "nothing dropped by the delivery limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_readings_of_a_quorum_queue_under_that_limit_end_its_messages() {
    let b = RabbitBackend::new();
    let h = Harness::new(&b, "quorum-reads", RetryPolicy::default()).await;
    for i in 0..3 {
        h.publish(Message::new(format!("m {i}"))).await;
    }
    let _limit = Policy::on_queue(&h.source, r#"{"delivery-limit":1}"#);
    // Each reading is a get and a return, which a quorum queue counts; past
    // the limit the broker dead-letters the message (the main queue has a
    // dead-letter target; a DLQ would have none and drop it).
    // A closed channel's returns reach a quorum queue through its log, so
    // the main queue can read empty for a moment after a reading: only the
    // DLQ holding every message says the limit struck.
    let mut readings = 0;
    eventually("the limit moves every message to the DLQ", WAIT, || {
        readings += 1;
        let t = h.transport.clone();
        let source = h.source.clone();
        let h = &h;
        async move {
            let _ = t.browse(&source, 100).await.expect("browse");
            h.dlq().await.len() == 3
        }
    })
    .await;
    assert!(readings >= 2, "one reading cannot pass a limit of 1");
    assert_eq!(
        h.transport.ready_count(&h.source).await.expect("depth"),
        Some(0),
        "nothing left on the main queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_dlq_of_an_earlier_backstop_is_kept_with_its_letters() {
    let b = RabbitBackend::new();
    let t = b.config().clone();
    let transport = backstop_rabbitmq::RabbitTransport::new(t).expect("config");
    let source = common::unique("legacy-dlq");
    let dlq = dlq_queue(&source);
    let subscription =
        |source: &str| Subscription::new(source.to_owned(), "legacy".to_owned()).with_prefetch(1);
    // What an earlier Backstop made: `<source>.dlq` as a quorum queue.
    transport
        .declare(&subscription(&dlq))
        .await
        .expect("a quorum queue named like the DLQ");
    let letter = Message::new("kept");
    transport
        .publish(&dlq, letter.clone())
        .await
        .expect("confirmed");
    transport
        .declare(&subscription(&source))
        .await
        .expect("a DLQ of another type is kept, not an error");
    let seen = transport.browse(&dlq, 10).await.expect("still readable");
    assert_eq!(ids(&seen), ids(std::slice::from_ref(&letter)));
    for q in [source.clone(), dlq.clone(), dlq_queue(&dlq)] {
        let _ = transport.delete_queue(&q).await;
    }
}
