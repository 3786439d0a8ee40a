//! RabbitMQ is down (`rabbitmqctl stop_app`) while 10,000 sends arrive: every
//! one is accepted from disk; once the broker is back every one arrives, in
//! order per key, and nothing is left pending. Its own test binary, so no other
//! test shares the broker while it is down.

use backstop_core::transport::{DeliveryStream, Subscriber};
use backstop_core::{Backoff, Message, Subscription};
use backstop_outbox::{OutboxConfig, OutboxInspector, OutboxPublisher, Sent};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backstop_test::rabbitmqctl;

/// Starts the RabbitMQ app again however the test ends.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_sends_survive_a_broker_outage() {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let queue = format!("backstop-test.outbox-down-{t}-{}", std::process::id());
    let transport = RabbitTransport::new(RabbitConfig::from_env()).expect("config");
    let sub = Subscription::new(queue.clone(), "outbox").with_prefetch(500);
    transport.declare(&sub).await.unwrap_or_else(|e| {
        panic!("no RabbitMQ at 127.0.0.1:5672 ({e}): start it with `rabbitmq-server -detached` (or run ./scripts/test.sh)")
    });
    let dir = std::env::temp_dir().join(format!("backstop-outbox-down-{t}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("outbox.db");
    let outbox = Arc::new(
        OutboxPublisher::open(
            transport.clone(),
            OutboxConfig::new(&db)
                .with_relay_backoff(Backoff::exponential(
                    Duration::from_millis(50),
                    Duration::from_secs(1),
                ))
                .with_relay_publish_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("open outbox"),
    );

    let restart = Restart;
    rabbitmqctl(&["stop_app"]);
    let keys = 20u32;
    let per_key = 500u32;
    let started = Instant::now();
    let mut senders = Vec::new();
    for k in 0..keys {
        let outbox = outbox.clone();
        let queue = queue.clone();
        senders.push(tokio::spawn(async move {
            for n in 0..per_key {
                let m = Message::new(format!("{k}:{n}")).with_key(format!("customer-{k}"));
                let sent = outbox.send(&queue, m).await.expect("accepted from disk");
                assert!(matches!(sent, Sent::Stored { .. }));
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let total = u64::from(keys * per_key);
    println!(
        "{total} sends accepted with the broker down in {:.2?}",
        started.elapsed()
    );
    let stats = outbox.stats();
    assert!(stats.pending > 0, "nothing could be published: {stats:?}");
    assert!(
        stats.publish_failures > 0,
        "the relay kept trying: {stats:?}"
    );
    assert_eq!(
        OutboxInspector::open(&db)
            .expect("inspect")
            .status()
            .expect("status")
            .pending
            + stats.delivered,
        total,
        "every accepted send is on disk"
    );
    drop(restart);

    assert!(
        outbox.wait_empty(Duration::from_secs(120)).await,
        "relay drained after the broker came back: {:?}",
        outbox.stats()
    );
    let outbox = Arc::try_unwrap(outbox).expect("sole owner");
    assert!(outbox.shutdown(Duration::from_secs(10)).await.flushed);
    assert_eq!(
        OutboxInspector::open(&db)
            .expect("inspect")
            .status()
            .expect("status")
            .pending,
        0
    );

    // Read everything back: each message once at least, in order per key.
    let mut stream = transport.subscribe(&sub).await.expect("consume");
    let mut next: HashMap<u32, u32> = HashMap::new();
    let mut received = 0u64;
    let mut duplicates = 0u64;
    while received < total {
        let d = tokio::time::timeout(Duration::from_secs(30), stream.next_delivery())
            .await
            .expect("every message arrives")
            .expect("stream open")
            .expect("delivery");
        let (m, _, ack) = d.into_parts();
        let text = String::from_utf8_lossy(m.payload()).into_owned();
        let (k, n) = text.split_once(':').expect("k:n");
        let (k, n): (u32, u32) = (k.parse().expect("k"), n.parse().expect("n"));
        let want = next.entry(k).or_insert(0);
        if n < *want {
            duplicates += 1;
        } else {
            assert_eq!(n, *want, "key {k}: message {n} arrived before {}", *want);
            *want += 1;
            received += 1;
        }
        ack.ack().await.expect("ack");
    }
    drop(stream);
    println!("received {received} distinct, {duplicates} duplicates");
    assert_eq!(received, total);
    assert!(next.values().all(|n| *n == per_key));
    for q in [queue.clone(), dlq_queue(&queue)] {
        let _ = transport.delete_queue(&q).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
