//! Idempotent processing against real services: RabbitMQ with the Redis dedupe
//! store shared by two worker instances, and the SQLite store across a worker
//! restart. Every message arrives three times (producer retries / replays, and
//! broker redeliveries of a worker that stops mid-message); the handler's side
//! effect happens once.

use backstop::dedupe::{Dedupe, RedisDedupeStore, SqliteDedupeStore};
use backstop::rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use backstop::{
    Context, HandlerOptions, Message, Publisher, RetryPolicy, RunReport, Runner, Subscription,
    handler_fn,
};
use backstop_test::eventually;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

fn unique(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("backstop-test.{prefix}-{t}-{}", std::process::id())
}

const REDIS: &str = "redis://127.0.0.1:6379";

async fn redis_store(prefix: &str) -> RedisDedupeStore {
    RedisDedupeStore::connect(REDIS)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {REDIS}: {e} (start it with `redis-server --daemonize yes`, or run ./scripts/test.sh)")
        })
        .with_prefix(format!("{prefix}:"))
}

fn transport(name: &str) -> RabbitTransport {
    RabbitTransport::new(RabbitConfig::from_env().with_connection_name(name)).expect("config")
}

async fn declare(t: &RabbitTransport, queue: &str) {
    t.declare(&Subscription::new(queue.to_owned(), "billing").with_prefetch(8))
        .await
        .expect("RabbitMQ at 127.0.0.1:5672 (rabbitmq-server -detached, or ./scripts/test.sh)");
}

type Effects = Arc<Mutex<HashMap<String, u32>>>;

/// A worker whose side effect (counting the id) happens after `takes`.
fn worker(
    t: RabbitTransport,
    queue: &str,
    dedupe: Dedupe,
    effects: Effects,
    takes: Duration,
    deadline: Duration,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<RunReport>,
    Arc<backstop::RunnerStats>,
) {
    let runner = Runner::builder(t)
        .with_group("billing")
        .with_shutdown_deadline(deadline)
        .with_handler_options(
            queue,
            handler_fn(move |_: Bytes, ctx: Context| {
                let effects = effects.clone();
                async move {
                    tokio::time::sleep(takes).await;
                    *effects
                        .lock()
                        .expect("effects")
                        .entry(ctx.message_id().to_owned())
                        .or_default() += 1;
                    Ok(())
                }
            }),
            HandlerOptions::default()
                .with_concurrency(8)
                .with_timeout(Duration::from_secs(1))
                .with_policy(RetryPolicy::default().with_tiers([]))
                .with_dedupe(dedupe.with_lease(Duration::from_secs(3))),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(runner.run(async move {
        let _ = rx.await;
    }));
    (tx, join, stats)
}

async fn publish_copies(t: &RabbitTransport, queue: &str, ids: std::ops::Range<usize>, copy: u32) {
    for n in ids {
        t.publish(
            queue,
            Message::new(format!(r#"{{"order":{n},"copy":{copy}}}"#)).with_id(format!("order-{n}")),
        )
        .await
        .expect("publish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_shared_by_two_workers_handles_each_message_once() {
    const N: usize = 60;
    let queue = unique("dedupe-redis");
    let admin = transport(&unique("dedupe-admin"));
    declare(&admin, &queue).await;
    let prefix = unique("backstop:dedupe-test");
    let effects: Effects = Arc::default();
    // Two instances of the service, each with its own connection and its own
    // Redis connection, sharing the store. A starts first and takes work.
    let (stop_a, a, a_stats) = worker(
        transport(&unique("dedupe-a")),
        &queue,
        Dedupe::new(redis_store(&prefix).await),
        effects.clone(),
        Duration::from_millis(300),
        Duration::from_millis(10),
    );
    // Three copies of every message: the first two now.
    publish_copies(&admin, &queue, 0..N, 1).await;
    publish_copies(&admin, &queue, 0..N, 2).await;
    eventually("worker A busy", Duration::from_secs(30), || async {
        a_stats.snapshot().in_flight >= 4
    })
    .await;
    // Worker A stops with a 10 ms deadline while it holds messages mid-way
    // (alone, it needs seconds for the queue): RabbitMQ redelivers them to
    // B, which waits for A's claims to run out. B starts only now: started
    // earlier, on a loaded machine it could drain the queue before A's
    // stop, leaving A nothing in flight.
    let _ = stop_a.send(());
    let report_a = a.await.expect("worker A");
    let (stop_b, b, _) = worker(
        transport(&unique("dedupe-b")),
        &queue,
        Dedupe::new(redis_store(&prefix).await),
        effects.clone(),
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    // The third copy (a replay) after that.
    publish_copies(&admin, &queue, 0..N, 3).await;
    eventually("every message handled", Duration::from_secs(60), || async {
        effects.lock().expect("effects").len() == N
    })
    .await;
    eventually("queue drained", Duration::from_secs(60), || async {
        admin.ready_count(&queue).await.ok().flatten() == Some(0)
    })
    .await;
    // Give stragglers a moment: a duplicate would show as a second effect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_b.send(());
    let report_b = b.await.expect("worker B");
    let effects = effects.lock().expect("effects").clone();
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "side effects repeated: {twice:?}");
    assert_eq!(effects.len(), N);
    assert!(
        report_a.stats.abandoned > 0,
        "worker A stopped with messages in flight, which RabbitMQ redelivered"
    );
    let settled = report_a.stats.ok
        + report_b.stats.ok
        + report_a.stats.duplicates
        + report_b.stats.duplicates;
    assert_eq!(
        settled,
        3 * N as u64,
        "every copy settled once, as a success or a duplicate: {:?} {:?}",
        report_a.stats,
        report_b.stats
    );
    assert_eq!(
        admin.ready_count(&dlq_queue(&queue)).await.ok().flatten(),
        Some(0)
    );
    let _ = admin.delete_queue(&dlq_queue(&queue)).await;
    let _ = admin.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_remembers_across_a_worker_restart() {
    const N: usize = 40;
    let queue = unique("dedupe-sqlite");
    let admin = transport(&unique("dedupe-admin"));
    declare(&admin, &queue).await;
    let dir = std::env::temp_dir().join(unique("backstop-dedupe"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("dedupe.sqlite");
    let effects: Effects = Arc::default();

    // First run: every message once.
    publish_copies(&admin, &queue, 0..N, 1).await;
    let (stop, first, _) = worker(
        transport(&unique("dedupe-first")),
        &queue,
        Dedupe::new(SqliteDedupeStore::open(&path).expect("open store")),
        effects.clone(),
        Duration::from_millis(5),
        Duration::from_secs(10),
    );
    eventually("first run handled all", Duration::from_secs(60), || async {
        effects.lock().expect("effects").len() == N
    })
    .await;
    let _ = stop.send(());
    let first = first.await.expect("first run");
    assert_eq!(first.stats.ok, N as u64);

    // The same messages come again twice (replays), plus N new ones; a new
    // worker process opens the same store file.
    publish_copies(&admin, &queue, 0..N, 2).await;
    publish_copies(&admin, &queue, 0..N, 3).await;
    publish_copies(&admin, &queue, N..2 * N, 1).await;
    let (stop, second, _) = worker(
        transport(&unique("dedupe-second")),
        &queue,
        Dedupe::new(SqliteDedupeStore::open(&path).expect("reopen store")),
        effects.clone(),
        Duration::from_millis(5),
        Duration::from_secs(10),
    );
    eventually(
        "second run settled all",
        Duration::from_secs(60),
        || async {
            admin.ready_count(&queue).await.ok().flatten() == Some(0)
                && effects.lock().expect("effects").len() == 2 * N
        },
    )
    .await;
    let _ = stop.send(());
    let second = second.await.expect("second run");
    assert_eq!(second.stats.ok, N as u64, "only the new messages ran");
    assert_eq!(second.stats.duplicates, 2 * N as u64);
    let effects = effects.lock().expect("effects").clone();
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
    let _ = admin.delete_queue(&dlq_queue(&queue)).await;
    let _ = admin.delete_queue(&queue).await;
    let _ = std::fs::remove_dir_all(&dir);
}
