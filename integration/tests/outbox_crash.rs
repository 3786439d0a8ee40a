//! A producer process sends through the outbox and prints the id of every
//! accepted send; it is killed with SIGKILL at a random moment, five times,
//! all on the same outbox file. Then a relay drains the file and every
//! acknowledged id is on the broker: zero losses (duplicates are allowed,
//! counted and reported).

use backstop::Subscription;
use backstop::outbox::{OutboxConfig, OutboxInspector, OutboxPublisher};
use backstop::rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use backstop::transport::{DeliveryStream, Subscriber};
use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};

const ROUNDS: usize = 5;
const PER_ROUND: u64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_producers_lose_no_acknowledged_send() {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let queue = format!("backstop-test.outbox-crash-{t}");
    let transport = RabbitTransport::new(RabbitConfig::from_env()).expect("config");
    let sub = Subscription::new(queue.clone(), "outbox-crash").with_prefetch(1000);
    transport.declare(&sub).await.unwrap_or_else(|e| {
        panic!("no RabbitMQ at 127.0.0.1:5672 ({e}): start it with `rabbitmq-server -detached` (or run ./scripts/test.sh)")
    });
    let dir = std::env::temp_dir().join(format!("backstop-outbox-crash-{t}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("outbox.db");

    let mut acked: HashSet<String> = HashSet::new();
    for round in 0..ROUNDS {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-producer"))
            .args([
                "--broker",
                "rabbitmq",
                "--destination",
                &queue,
                "--db",
                db.to_str().expect("utf-8 path"),
                "--count",
                &PER_ROUND.to_string(),
                "--concurrency",
                "64",
                "--print-acked",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start outbox-producer");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // A random moment: after some hundreds to thousands of accepted sends.
        let kill_after = fastrand_between(200, 12_000);
        let mut seen = 0u64;
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(id) = line.strip_prefix("acked ").filter(|id| id.len() == 36) {
                acked.insert(id.to_owned());
                seen += 1;
                if seen == kill_after {
                    child.start_kill().expect("SIGKILL");
                }
            }
        }
        let status = child.wait().await.expect("exit status");
        println!("round {round}: killed after {seen} acknowledged sends ({status})");
        assert!(
            seen >= kill_after.min(PER_ROUND),
            "round {round} produced too little"
        );
    }
    let left = OutboxInspector::open(&db)
        .expect("inspect")
        .status()
        .expect("status");
    println!(
        "{} acknowledged, {} pending on disk after the kills",
        acked.len(),
        left.pending
    );

    // A restarted relay delivers what the killed processes left.
    let outbox = OutboxPublisher::open(transport.clone(), OutboxConfig::new(&db))
        .await
        .expect("reopen outbox");
    assert!(
        outbox.wait_empty(Duration::from_secs(120)).await,
        "relay drained: {:?}",
        outbox.stats()
    );
    assert!(outbox.shutdown(Duration::from_secs(10)).await.flushed);

    let mut stream = transport.subscribe(&sub).await.expect("consume");
    let mut counts: HashMap<String, u32> = HashMap::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), stream.next_delivery()).await {
            Ok(Some(Ok(d))) => {
                let (m, _, ack) = d.into_parts();
                *counts.entry(m.id().expect("id").to_owned()).or_default() += 1;
                ack.ack().await.expect("ack");
            }
            Ok(other) => panic!("stream ended: {other:?}"),
            Err(_) => break,
        }
    }
    drop(stream);
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicates: u32 = counts.values().map(|n| n - 1).sum();
    println!(
        "on the broker: {} distinct, {duplicates} duplicates; acknowledged but missing: {}",
        counts.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged sends lost: {:?}",
        &lost[..lost.len().min(10)]
    );
    for q in [queue.clone(), dlq_queue(&queue)] {
        let _ = transport.delete_queue(&q).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fastrand_between(low: u64, high: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    low + nanos % (high - low)
}
