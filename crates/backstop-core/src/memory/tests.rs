use super::*;
use bytes::Bytes;

fn sub(source: &str, tiers: &[DelayTier]) -> Subscription {
    Subscription::new(source, "g")
        .with_tiers(tiers.to_vec())
        .with_prefetch(10)
}

async fn next(stream: &mut MemoryStream) -> Delivery {
    stream
        .next_delivery()
        .await
        .expect("stream open")
        .expect("delivery")
}

#[tokio::test(start_paused = true)]
async fn delay_tier_holds_for_its_delay_then_returns_to_the_source() {
    let broker = MemoryBroker::new();
    let tier = DelayTier::new(Duration::from_secs(30));
    let s = sub("q", std::slice::from_ref(&tier));
    broker
        .publish_delayed(&s, &tier, Message::new("m"))
        .await
        .unwrap();
    assert_eq!(broker.ready_len("q.retry.30s"), 1);
    assert_eq!(broker.pending(), 1);
    let mut stream = broker.subscribe(&s).await.unwrap();
    let start = tokio::time::Instant::now();
    let d = next(&mut stream).await;
    assert!(start.elapsed() >= Duration::from_secs(30));
    assert_eq!(d.source.kind, SourceKind::RetryTier("30s".into()));
    assert_eq!(broker.ready_len("q.retry.30s"), 0);
    d.ack().await.unwrap();
    assert_eq!(broker.pending(), 0);
}

#[tokio::test]
async fn nack_and_dropped_handles_redeliver() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("a")).await.unwrap();
    let mut stream = broker.subscribe(&sub("q", &[])).await.unwrap();
    let d = next(&mut stream).await;
    assert!(!d.source.redelivered);
    assert_eq!(broker.unacked_len("q"), 1);
    d.nack().await.unwrap();
    let d = next(&mut stream).await;
    assert!(d.source.redelivered);
    assert_eq!(d.source.delivery_count, Some(2));
    drop(d);
    let d = next(&mut stream).await;
    assert_eq!(d.source.delivery_count, Some(3));
    d.ack().await.unwrap();
    assert_eq!(broker.pending(), 0);
}

#[tokio::test]
async fn dropped_connection_requeues_in_order_and_fails_old_acks() {
    let broker = MemoryBroker::new();
    for p in ["1", "2", "3"] {
        broker.publish("q", Message::new(p)).await.unwrap();
    }
    let mut stream = broker.subscribe(&sub("q", &[])).await.unwrap();
    let first = next(&mut stream).await;
    let second = next(&mut stream).await;
    broker.drop_connection();
    let err = first.ack().await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::ConnectionLost);
    assert!(matches!(stream.next_delivery().await, Some(Err(_))));
    assert!(
        stream.next_delivery().await.is_none(),
        "a dead stream stays ended"
    );
    drop(second);
    let mut fresh = broker.subscribe(&sub("q", &[])).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let d = next(&mut fresh).await;
        order.push((d.message.payload().clone(), d.source.redelivered));
        d.ack().await.unwrap();
    }
    assert_eq!(
        order,
        [
            (Bytes::from_static(b"1"), true),
            (Bytes::from_static(b"2"), true),
            (Bytes::from_static(b"3"), false)
        ]
    );
}

#[tokio::test]
async fn injected_faults_hand_the_message_back_then_clear() {
    let broker = MemoryBroker::new();
    let s = sub("q", &[]);
    broker.fail_next_dead_letter_publishes(2);
    for _ in 0..2 {
        let e = broker
            .publish_dead_letter(&s, Message::new("x").with_id("id-1"))
            .await
            .unwrap_err();
        assert_eq!(e.into_message().id(), Some("id-1"));
    }
    broker
        .publish_dead_letter(&s, Message::new("x"))
        .await
        .unwrap();
    assert_eq!(broker.ready_len("q.dlq"), 1);
    broker.fail_next_publishes(1);
    assert!(broker.publish("q", Message::new("y")).await.is_err());
    assert!(broker.publish("q", Message::new("y")).await.is_ok());
}

#[tokio::test]
async fn dlq_browse_keeps_and_take_removes_on_ack_only() {
    let broker = MemoryBroker::new();
    let s = sub("q", &[]);
    for id in ["a", "b"] {
        broker
            .publish_dead_letter(&s, Message::new("x").with_id(id))
            .await
            .unwrap();
    }
    let seen = broker.browse("q.dlq", 10).await.unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(broker.ready_len("q.dlq"), 2);
    let d = broker.take("q.dlq").await.unwrap().unwrap();
    assert_eq!(d.source.kind, SourceKind::DeadLetter);
    drop(d);
    assert_eq!(broker.ready_len("q.dlq"), 2, "not acked: still there");
    let d = broker.take("q.dlq").await.unwrap().unwrap();
    d.ack().await.unwrap();
    assert_eq!(broker.ready_len("q.dlq"), 1);
    assert_eq!(broker.pending(), 0, "DLQ contents are not pending work");
}
