//! No-op-handler consume rate of Backstop's RabbitMQ runner against raw lapin
//! (same prefetch, one awaited manual ack per message), on the same broker in
//! the same run: `cargo bench -p backstop-rabbitmq --bench consume`.
//! `BENCH_MESSAGES` sets the count (default 20,000).

use backstop_core::{
    Context, HandlerOptions, Message, Publisher, RetryPolicy, Runner, Subscription, handler_fn,
};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PREFETCH: u16 = 64;

async fn fill(t: &RabbitTransport, queue: &str, n: usize) {
    let payload = Bytes::from(vec![b'x'; 200]);
    let mut pending = Vec::new();
    for _ in 0..n {
        let (t, q, m) = (t.clone(), queue.to_owned(), Message::new(payload.clone()));
        pending.push(tokio::spawn(async move { t.publish(&q, m).await }));
        if pending.len() == 512 {
            for p in pending.drain(..) {
                p.await.expect("join").expect("publish");
            }
        }
    }
    for p in pending {
        p.await.expect("join").expect("publish");
    }
}

async fn raw(url: &str, queue: &str, n: usize) -> f64 {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut count = 0;
    let mut start = None;
    while count < n {
        let d = consumer.next().await.expect("open").expect("delivery");
        start.get_or_insert_with(Instant::now);
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        count += 1;
    }
    let _ = ch.close(200, ShortString::from("done")).await;
    (n - 1) as f64 / start.expect("started").elapsed().as_secs_f64()
}

async fn backstop(t: &RabbitTransport, queue: &str, n: usize) -> f64 {
    let runner = Runner::builder(t.clone())
        .with_group("bench")
        .with_max_in_flight(PREFETCH as usize)
        .with_handler_options(
            queue,
            handler_fn(|_: Bytes, _: Context| async { Ok(()) }),
            HandlerOptions::default()
                .with_concurrency(PREFETCH as usize)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    while stats.snapshot().ok == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let start = Instant::now();
    while (stats.snapshot().ok as usize) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let rate = (n - 1) as f64 / start.elapsed().as_secs_f64();
    let _ = tx.send(());
    run.await.expect("runner");
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let config = RabbitConfig::from_env();
    let url = std::env::var(backstop_rabbitmq::AMQP_URL_ENV)
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let t = RabbitTransport::new(config).expect("config");
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let queue = format!("backstop-bench.{ms}");
    let sub = Subscription {
        source: queue.clone(),
        group: "bench".into(),
        tiers: vec![],
        prefetch: PREFETCH as usize,
    };
    t.declare(&sub)
        .await
        .expect("declare (is RabbitMQ running?)");
    fill(&t, &queue, n).await;
    let raw_rate = raw(&url, &queue, n).await;
    fill(&t, &queue, n).await;
    let ours = backstop(&t, &queue, n).await;
    println!(
        "rabbitmq (quorum, prefetch {PREFETCH}) {n} msgs  raw lapin {raw_rate:.0} msg/s  backstop {ours:.0} msg/s  ratio {:.2}",
        ours / raw_rate
    );
    let _ = t.delete_queue(&queue).await;
    let _ = t.delete_queue(&dlq_queue(&queue)).await;
}
