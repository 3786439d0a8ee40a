//! `run` returns a bounded time after its shutdown deadline, even when
//! abandoned work does not end because it blocks its thread.

use backstop_core::memory::MemoryBroker;
use backstop_core::{
    Context, HandlerError, HandlerOptions, Message, Publisher as _, Runner, handler_fn,
};
use bytes::Bytes;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_although_a_handler_blocks_its_thread() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("x")).await.unwrap();
    let (release, blocked) = mpsc::channel::<()>();
    let blocked = Arc::new(Mutex::new(blocked));
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(Mutex::new(Some(started_tx)));
    let handler = handler_fn(move |_: Bytes, _: Context| {
        let blocked = blocked.clone();
        let started_tx = started_tx.clone();
        async move {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            // A synchronous call that no cancellation reaches: it holds its
            // runtime thread until the test releases it.
            let _ = blocked
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(600));
            Ok::<(), HandlerError>(())
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_handler_options(
            "q",
            handler,
            HandlerOptions::default().with_timeout(Duration::from_secs(900)),
        )
        .with_shutdown_deadline(Duration::from_millis(100))
        .build()
        .unwrap();
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        runner.run(async move {
            let _ = started.await;
        }),
    )
    .await
    .expect("run did not return while a handler blocked its thread");
    assert!(!report.drained, "the blocked message was not drained");
    release.send(()).unwrap();
}

/// A stream whose close takes longer than the least close time (5 s), as
/// a busy broker's answer to a channel close does, is given what is left of
/// the shutdown deadline: a worker that exits when `run` returns does not
/// cut off settlements the broker had not read yet.
#[tokio::test(start_paused = true)]
async fn a_slow_close_gets_what_is_left_of_the_shutdown_deadline() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("x")).await.unwrap();
    broker.set_close_delay(Duration::from_secs(8));
    let handled = Arc::new(Mutex::new(0u32));
    let h = handled.clone();
    let handler = handler_fn(move |_: Bytes, _: Context| {
        let h = h.clone();
        async move {
            *h.lock().unwrap() += 1;
            Ok::<(), HandlerError>(())
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_handler("q", handler)
        .with_shutdown_deadline(Duration::from_secs(30))
        .build()
        .unwrap();
    let done = handled.clone();
    let report = runner
        .run(async move {
            while *done.lock().unwrap() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    assert!(report.drained);
    assert_eq!(broker.closed_streams(), 1, "the close ran to its end");
}
