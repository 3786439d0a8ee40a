//! The RabbitMQ worker example end to end against the local broker: the DLQ
//! holds exactly the invalid orders with their headers and the main queue ends
//! empty; a worker killed with SIGKILL mid-stream loses nothing after a restart.

use backstop::DeadLetterSource;
use backstop::DelayTier;
use backstop::message::names;
use backstop::rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue, tier_queue};
use backstop_examples::demo::{Behaviour, DemoOrder};
use backstop_examples::rabbitmq_worker::{self, Args};
use backstop_test::eventually_every;
use clap::Parser;
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn unique(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("backstop-test.{prefix}-{t}-{}", std::process::id())
}

fn args(queue: &str, extra: &[&str]) -> Args {
    let mut argv = vec!["worker", "--queue", queue, "--tiers", "300ms,600ms"];
    argv.extend_from_slice(extra);
    Args::parse_from(argv)
}

fn transport() -> RabbitTransport {
    RabbitTransport::new(RabbitConfig::from_env()).expect("config")
}

async fn ready(t: &RabbitTransport, queue: &str) -> u32 {
    t.ready_count(queue)
        .await
        .expect("RabbitMQ reachable (start it with `rabbitmq-server -detached`)")
        .unwrap_or(0)
}

async fn cleanup(t: &RabbitTransport, queue: &str, tiers: &[Duration]) {
    for d in tiers {
        let _ = t
            .delete_queue(&tier_queue(queue, &DelayTier::new(*d)))
            .await;
    }
    let _ = t.delete_queue(&dlq_queue(queue)).await;
    let _ = t.delete_queue(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_dead_letters_exactly_the_invalid_orders() {
    let queue = unique("demo-orders");
    let dir = std::env::temp_dir().join(unique("backstop-demo"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("handled.log");
    let log_arg = log.to_str().expect("utf-8 path").to_owned();
    let a = args(
        &queue,
        &[
            "--permanent-every",
            "20",
            "--flaky-every",
            "7",
            "--handled-log",
            &log_arg,
        ],
    );
    let handled = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let ids = rabbitmq_worker::produce(&a, 1_000).await.expect("produce");
    let t = transport();
    let dlq = dlq_queue(&queue);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let a = a.clone();
        tokio::spawn(async move {
            rabbitmq_worker::work(&a, async move {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    eventually_every(
        "50 dead letters and an empty queue",
        Duration::from_secs(120),
        Duration::from_millis(200),
        // Ready counts miss prefetched (unacked) messages: also wait for every
        // valid order to be handled.
        || async {
            handled() >= 950 && ready(&t, &dlq).await == 50 && ready(&t, &queue).await == 0
        },
    )
    .await;
    let _ = stop_tx.send(());
    let report = worker.await.expect("join").expect("worker");
    assert!(report.drained);
    assert_eq!(report.stats.dead_lettered, 50);
    assert_eq!(report.stats.ok, 950);
    assert_eq!(ready(&t, &queue).await, 0, "main queue empty");

    let dead = t.browse(&dlq, 1_000).await.expect("browse");
    assert_eq!(dead.len(), 50);
    let mut seen = HashSet::new();
    for m in &dead {
        let order: DemoOrder = serde_json::from_slice(m.payload()).expect("payload kept");
        assert_eq!(order.behaviour, Behaviour::Permanent);
        assert!(seen.insert(order.id));
        let h = m.headers();
        assert_eq!(h.get_str(names::DEAD_LETTER_REASON), Some("permanent"));
        assert_eq!(h.get_str(names::ERROR_CLASS), Some("permanent"));
        assert_eq!(h.get_str(names::ORIGIN_SOURCE), Some(queue.as_str()));
        assert_eq!(h.get_str(names::ATTEMPT), Some("1"));
        assert!(h.get_str(names::ERROR_FINGERPRINT).is_some());
        assert!(ids.iter().any(|id| Some(id.as_str()) == m.id()));
    }
    assert_eq!(
        ready(&t, &dlq).await,
        50,
        "browsing leaves the DLQ as it was"
    );
    cleanup(&t, &queue, &a.tiers).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_nothing_after_restart() {
    let queue = unique("crash-orders");
    let a = args(&queue, &["--permanent-every", "0", "--flaky-every", "0"]);
    let ids = rabbitmq_worker::produce(&a, 2_000).await.expect("produce");
    let dir = std::env::temp_dir().join(unique("backstop-crash"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("handled.log");
    let worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rabbitmq-demo-worker"))
            .args(["--queue", &queue, "--tiers", "300ms", "--concurrency", "16"])
            .args(["--handled-log", log.to_str().expect("utf-8 path")])
            .kill_on_drop(true)
            .spawn()
            .expect("start worker")
    };
    let handled = || std::fs::read_to_string(&log).unwrap_or_default();
    let t = transport();

    let mut first = worker();
    eventually_every(
        "the first worker to handle some",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async { handled().lines().count() >= 300 },
    )
    .await;
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");
    let before = handled().lines().count();
    assert!(before < ids.len(), "killed mid-stream");

    let mut second = worker();
    eventually_every(
        "the restarted worker to finish",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            // Every id, not a count: a line cut off by the SIGKILL is no id.
            let text = handled();
            let got: HashSet<&str> = text.lines().collect();
            ids.iter().all(|id| got.contains(id.as_str())) && ready(&t, &queue).await == 0
        },
    )
    .await;
    let status = backstop_integration::terminate(&mut second, Duration::from_secs(60)).await;
    assert!(status.success(), "worker exit status {status}");

    let text = handled();
    let got: HashSet<&str> = text.lines().collect();
    let missing = ids.iter().filter(|id| !got.contains(id.as_str())).count();
    assert_eq!(missing, 0, "messages lost");
    println!(
        "rabbitmq crash test: {before} handled before SIGKILL, {} handled twice, 0 lost",
        text.lines().count() - got.len()
    );
    cleanup(&t, &queue, &a.tiers).await;
    let _ = std::fs::remove_dir_all(&dir);
}
