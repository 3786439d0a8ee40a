//! Partition lanes on librdkafka's mock cluster: a message whose DLQ copy is
//! still being published does not hold the messages behind it, nor its
//! in-flight slot (only the commit waits for the confirm). How lanes share slots is tested in
//! backstop-core (`tests/lanes.rs`), where every lane's backlog is there
//! from the start.

mod common;

use backstop_core::{
    Context, DeadLetterPublisher, DelayPublisher, DelayTier, HandlerError, HandlerOptions, Message,
    PublishError, Publisher, RetryPolicy, Runner, Subscriber, Subscription, TransportError,
    handler_fn,
};
use backstop_kafka::{KafkaStream, KafkaTransport};
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Kafka, except that dead-letter publishes wait until the test opens them.
#[derive(Clone)]
struct HeldDlq {
    inner: KafkaTransport,
    open: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl Subscriber for HeldDlq {
    type Stream = KafkaStream;

    async fn subscribe(&self, subscription: &Subscription) -> Result<KafkaStream, TransportError> {
        self.inner.subscribe(subscription).await
    }
}

impl Publisher for HeldDlq {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        self.inner.publish(destination, message).await
    }
}

impl DelayPublisher for HeldDlq {
    async fn publish_delayed(
        &self,
        subscription: &Subscription,
        tier: &DelayTier,
        message: Message,
    ) -> Result<(), PublishError> {
        self.inner
            .publish_delayed(subscription, tier, message)
            .await
    }
}

impl DeadLetterPublisher for HeldDlq {
    fn dead_letter_destination(&self, subscription: &Subscription) -> String {
        self.inner.dead_letter_destination(subscription)
    }

    async fn publish_dead_letter(
        &self,
        subscription: &Subscription,
        message: Message,
    ) -> Result<(), PublishError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _open = self.open.acquire().await.expect("semaphore open");
        self.inner.publish_dead_letter(subscription, message).await
    }
}

async fn fill(servers: &str, topic: &str, partition: i32, payloads: &[Vec<u8>]) {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .expect("producer");
    let mut sends = Vec::with_capacity(payloads.len());
    for p in payloads {
        let record = rdkafka::producer::FutureRecord::<(), _>::to(topic)
            .partition(partition)
            .payload(p);
        sends.push(producer.send_result(record).expect("queued"));
    }
    for s in sends {
        s.await.expect("delivered").expect("acked");
    }
    std::thread::spawn(move || drop(producer));
}

/// The group's committed offset of partition 0 (`None`: nothing committed).
fn committed(servers: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let offset = got.find_partition(topic, 0).and_then(|e| match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    });
    std::thread::spawn(move || drop(consumer));
    offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_on_its_way_does_not_hold_its_partition() {
    const BEHIND: usize = 50;
    let (mock, servers) = common::Mock::start();
    let source = common::unique("lanes");
    let group = common::unique("lanes-group");
    mock.create_topic(&source, 1);
    mock.create_topic(&backstop_kafka::dlq_topic(&group, &source), 1);
    let mut payloads = vec![b"fail".to_vec()];
    payloads.extend((1..=BEHIND).map(|i| format!("ok {i}").into_bytes()));
    fill(&servers, &source, 0, &payloads).await;

    let transport = HeldDlq {
        inner: KafkaTransport::new(common::test_config(&servers)).expect("config"),
        open: Arc::new(Semaphore::new(0)),
        waiting: Arc::default(),
    };
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = handled.clone();
    let handler = handler_fn(move |body: Bytes, _: Context| {
        let h = h.clone();
        async move {
            if &body[..] == b"fail" {
                return Err(HandlerError::permanent("refused"));
            }
            h.lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&body).into_owned());
            Ok(())
        }
    });
    let runner = Runner::builder(transport.clone())
        .with_group(&group)
        .with_handler_options(
            &source,
            handler,
            // One slot: the copy on its way holds neither the partition
            // nor the slot.
            HandlerOptions::default()
                .with_concurrency(1)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let running = backstop_test::start(runner);
    backstop_test::eventually_every(
        "every message behind the failing one handled while its DLQ copy is held",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            transport.waiting.load(Ordering::SeqCst) == 1
                && handled.lock().expect("lock").len() == BEHIND
        },
    )
    .await;
    let order: Vec<String> = handled.lock().expect("lock").clone();
    let expected: Vec<String> = (1..=BEHIND).map(|i| format!("ok {i}")).collect();
    assert_eq!(order, expected, "the partition's order is kept");
    // Committing happens every 100 ms in these tests: give it a few rounds
    // to show that nothing passes the unsettled offset 0.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        committed(&servers, &group, &source).filter(|o| *o > 0),
        None,
        "nothing may be committed past the message whose copy is unconfirmed"
    );
    transport.open.add_permits(1);
    let end = i64::try_from(BEHIND + 1).expect("small");
    backstop_test::eventually_every(
        "the commit reaches the end once the DLQ copy is confirmed",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async { committed(&servers, &group, &source) == Some(end) },
    )
    .await;
    let report = running.stop().await;
    assert_eq!(report.stats.dead_lettered, 1);
    assert_eq!(report.stats.ok, u64::try_from(BEHIND).expect("small"));
    drop(mock);
}
