//! The worker in process on the in-memory broker (`broker = "memory"`): it
//! handles what is published, `/readyz` follows the broker check, a handler
//! section without a handler is refused, and the shutdown future drains it.

use backstop::memory::MemoryBroker;
use backstop::worker::{Started, Worker, WorkerConfig, WorkerError};
use backstop::{Context, HandlerError, Json, Message, Publisher, handler_fn};
use backstop_test::eventually_every;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn config(extra: &str) -> WorkerConfig {
    WorkerConfig::from_toml(&format!(
        r#"
broker = "memory"
group = "memory-worker"
[http]
listen = "127.0.0.1:0"
[health]
check_interval = "50ms"
[metrics]
enabled = false
{extra}
"#
    ))
    .expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_worker_handles_messages_and_follows_the_broker_check() {
    let broker = MemoryBroker::new();
    for n in 0..50u32 {
        broker
            .publish("numbers", Message::new(n.to_string()))
            .await
            .expect("publish");
    }
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Started>();
    let worker = Worker::new(config(
        "[handlers.numbers]\nconcurrency = 4\ntimeout = \"2s\"",
    ))
    .without_logging()
    .with_memory_broker(broker.clone())
    .with_handler(
        "numbers",
        handler_fn(move |Json(_n): Json<u32>, _ctx: Context| {
            let c = counter.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }),
    )
    .on_started(started_tx)
    .with_shutdown(async move {
        let _ = stop_rx.await;
    });
    let run = tokio::spawn(worker.run());
    let started = started_rx.await.expect("started");
    let readiness = started.readiness.clone();
    assert!(
        started.http.is_some_and(|a| a.port() != 0),
        "listens on a real port"
    );
    eventually_every(
        "every message handled",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let seen = seen.clone();
            async move { seen.load(Ordering::SeqCst) == 50 }
        },
    )
    .await;
    let wait = |what: &'static str, want: fn(&Result<(), String>) -> bool| {
        let r = readiness.clone();
        eventually_every(
            what,
            Duration::from_secs(5),
            Duration::from_millis(10),
            move || {
                let r = r.clone();
                async move { want(&r.ready()) }
            },
        )
    };
    wait("ready", Result::is_ok).await;
    assert!(readiness.live().is_ok());
    broker.set_unreachable(true);
    wait("not ready while unreachable", |r| {
        r.as_ref()
            .is_err_and(|why| why.contains("broker unreachable"))
    })
    .await;
    assert!(readiness.live().is_ok(), "still alive");
    broker.set_unreachable(false);
    wait("ready again", Result::is_ok).await;

    stop_tx.send(()).expect("worker running");
    let report = run.await.expect("joined").expect("ran");
    assert!(report.drained);
    assert_eq!(report.stats.ok, 50);
    assert!(
        readiness
            .ready()
            .is_err_and(|why| why.contains("shutting down")),
        "not ready once stopped"
    );
}

#[tokio::test]
async fn a_handler_section_without_a_handler_is_refused() {
    let worker = Worker::new(config("[handlers.ordres]\ntimeout = \"1s\""))
        .without_logging()
        .with_memory_broker(MemoryBroker::new())
        .with_handler(
            "orders",
            handler_fn(|_: Json<u32>, _: Context| async { Ok::<(), HandlerError>(()) }),
        );
    match worker.run().await {
        Err(WorkerError::Config(e)) => {
            assert_eq!(e.field, "handlers.ordres");
            assert!(e.reason.contains("no handler"), "{e}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_worker_without_a_broker_is_refused() {
    let worker = Worker::new(WorkerConfig::from_toml("").expect("valid"))
        .without_logging()
        .with_handler(
            "orders",
            handler_fn(|_: Json<u32>, _: Context| async { Ok::<(), HandlerError>(()) }),
        );
    match worker.run().await {
        Err(WorkerError::Config(e)) => assert_eq!(e.field, "broker"),
        other => panic!("expected a config error, got {other:?}"),
    }
}
