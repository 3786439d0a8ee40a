//! A slow partition does not hold the others back: on librdkafka's mock
//! cluster (tansu served explicitly partitioned records too slowly to say),
//! partition 0 takes 100 ms a message while partition 1 takes nothing, and
//! partition 1's whole backlog is handled while partition 0 has barely begun.

mod common;

use backstop_core::{Context, HandlerOptions, RetryPolicy, Runner, handler_fn};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_partition_does_not_hold_the_others_back() {
    const SLOW_N: usize = 3_000;
    const FAST_N: usize = 12_000;
    let (mock, servers) = common::Mock::start();
    let source = common::unique("skew");
    let group = common::unique("skew-group");
    mock.create_topic(&source, 2);
    mock.create_topic(&backstop_kafka::dlq_topic(&group, &source), 2);
    // Fetches of at most 64 KiB a partition (some 600 records of 100 B):
    // partition 0's buffer fills in steps while partition 1 still has most
    // of its records in the broker.
    let transport = backstop_kafka::KafkaTransport::new(
        common::test_config(&servers).with_property("max.partition.fetch.bytes", "65536"),
    )
    .expect("config");
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .expect("producer");
    let body = vec![b'x'; 100];
    for (partition, n) in [(0, SLOW_N), (1, FAST_N)] {
        let mut sends = Vec::with_capacity(n);
        for i in 0..n {
            let key = format!("k{i}");
            let record = rdkafka::producer::FutureRecord::to(&source)
                .partition(partition)
                .key(&key)
                .payload(&body);
            sends.push(producer.send_result(record).expect("queued"));
        }
        for s in sends {
            s.await.expect("delivered").expect("acked");
        }
    }
    std::thread::spawn(move || drop(producer));
    let done: Arc<Mutex<BTreeMap<i32, usize>>> = Arc::default();
    let d = done.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let d = d.clone();
        async move {
            let p = ctx.source().partition.expect("partition");
            if p == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            *d.lock().expect("lock").entry(p).or_default() += 1;
            Ok(())
        }
    });
    let runner = Runner::builder(transport)
        .with_group(group)
        .with_handler_options(
            source,
            handler,
            HandlerOptions::default()
                .with_concurrency(8)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let running = backstop_test::start(runner);
    let count = |p: i32| done.lock().expect("lock").get(&p).copied().unwrap_or(0);
    backstop_test::eventually_every(
        "partition 1 handled all of its records",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { count(1) >= FAST_N },
    )
    .await;
    let slow = count(0);
    running.stop().await;
    assert!(
        slow < SLOW_N / 2,
        "partition 0 is slow (10 a second): the others must not have waited for it ({slow} handled)"
    );
    drop(mock);
}
