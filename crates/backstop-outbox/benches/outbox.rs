//! Durable outbox sends against raw confirmed publishes to the same RabbitMQ
//! in the same run: `cargo bench -p backstop-outbox --bench outbox`.
//!
//! - raw: lapin, one channel with publisher confirms, up to 256 publishes
//!   awaiting their confirm at once (what a tuned producer does without an
//!   outbox);
//! - outbox: `OutboxPublisher` (Durable mode: every send fsynced before it
//!   returns, group commit) with 256 concurrent senders; the relay publishes to
//!   the same broker meanwhile. Reported: accepted sends/s, p50/p99 send
//!   latency, and the end-to-end rate until the broker confirmed every entry.
//!
//! `BENCH_MESSAGES` sets the count (default 20,000). The goal: durable sends
//! at least half the raw confirmed publish rate.

use backstop_core::{Message, Publisher, Subscription};
use backstop_outbox::{OutboxConfig, OutboxPublisher};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WINDOW: usize = 256;

async fn raw(url: &str, queue: &str, n: u64, payload: &Bytes) -> f64 {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let started = Instant::now();
    let mut waiting: FuturesUnordered<lapin::PublisherConfirm> = FuturesUnordered::new();
    for _ in 0..n {
        if waiting.len() == WINDOW {
            waiting.next().await.expect("pending").expect("confirm");
        }
        let confirm = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        waiting.push(confirm);
    }
    while let Some(c) = waiting.next().await {
        c.expect("confirm");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = ch.close(200, ShortString::from("done")).await;
    rate
}

/// The same publishes through Backstop's `RabbitTransport` (what the relay
/// uses), 256 at once: separates the transport's cost from the outbox's.
async fn transport(t: &RabbitTransport, queue: &str, n: u64, payload: &Bytes) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WINDOW {
        let (t, next, queue, payload) =
            (t.clone(), next.clone(), queue.to_owned(), payload.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                t.publish(&queue, Message::new(payload.clone()))
                    .await
                    .expect("confirmed");
            }
        }));
    }
    for task in tasks {
        task.await.expect("publisher");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

struct OutboxRun {
    send_rate: f64,
    end_to_end_rate: f64,
    p50: Duration,
    p99: Duration,
    commits: u64,
}

async fn outbox(t: &RabbitTransport, queue: &str, n: u64, payload: &Bytes) -> OutboxRun {
    let dir = std::env::temp_dir().join(format!("backstop-outbox-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let outbox = Arc::new(
        OutboxPublisher::open(t.clone(), OutboxConfig::new(dir.join("outbox.db")))
            .await
            .expect("open"),
    );
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..WINDOW {
        let (outbox, next, queue, payload) = (
            outbox.clone(),
            next.clone(),
            queue.to_owned(),
            payload.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let m = Message::new(payload.clone());
                let t0 = Instant::now();
                outbox.send(&queue, m).await.expect("accepted");
                latencies.push(t0.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for s in senders {
        latencies.extend(s.await.expect("sender"));
    }
    let sent = started.elapsed();
    assert!(outbox.wait_empty(Duration::from_secs(300)).await, "drained");
    let drained = started.elapsed();
    let commits = outbox.stats().commits;
    let outbox = Arc::try_unwrap(outbox).expect("sole owner");
    outbox.shutdown(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    OutboxRun {
        send_rate: n as f64 / sent.as_secs_f64(),
        end_to_end_rate: n as f64 / drained.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        commits,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let n: u64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let config = RabbitConfig::from_env();
    let url = std::env::var(backstop_rabbitmq::AMQP_URL_ENV)
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let t = RabbitTransport::new(config).expect("config");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let payload = Bytes::from(vec![b'x'; 200]);
    let mut queues = Vec::new();
    let mut declare = |name: String| {
        queues.push(name.clone());
        name
    };
    let raw_q = declare(format!("backstop-bench.outbox-raw-{stamp}"));
    let box_q = declare(format!("backstop-bench.outbox-{stamp}"));
    let via_q = declare(format!("backstop-bench.outbox-transport-{stamp}"));
    for q in [&raw_q, &box_q, &via_q] {
        t.declare(&Subscription {
            source: q.clone(),
            group: "bench".into(),
            tiers: vec![],
            prefetch: 1,
        })
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (rabbitmq-server -detached)");
    }
    let raw_rate = raw(&url, &raw_q, n, &payload).await;
    let via_rate = transport(&t, &via_q, n, &payload).await;
    let run = outbox(&t, &box_q, n, &payload).await;
    println!(
        "{n} messages of {} bytes, {WINDOW} in flight, RabbitMQ on this machine",
        payload.len()
    );
    println!("raw confirmed publishes (lapin): {raw_rate:>9.0} msg/s");
    println!(
        "RabbitTransport publishes:       {via_rate:>9.0} msg/s  ratio {:.2}",
        via_rate / raw_rate
    );
    println!(
        "outbox durable sends (fsynced):  {:>9.0} msg/s  ratio {:.2}  p50 {:.2?}  p99 {:.2?}  ({} commits for {n} sends)",
        run.send_rate,
        run.send_rate / raw_rate,
        run.p50,
        run.p99,
        run.commits
    );
    println!(
        "outbox end to end (confirmed):   {:>9.0} msg/s  ratio {:.2}",
        run.end_to_end_rate,
        run.end_to_end_rate / raw_rate
    );
    for q in queues {
        let _ = t.delete_queue(&q).await;
        let _ = t.delete_queue(&dlq_queue(&q)).await;
    }
}
