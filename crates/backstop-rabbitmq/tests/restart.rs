//! The broker restarts (`rabbitmqctl stop_app` / `start_app`) while thousands of
//! messages are in flight: the worker recovers by itself and every message is
//! handled at least once. Its own test binary, so no other test shares the
//! broker while it is down.

mod common;

use backstop_core::{
    Context, HandlerOptions, Message, Publisher, RetryPolicy, Runner, Subscription, handler_fn,
};
use backstop_rabbitmq::{RabbitConfig, RabbitTransport, dlq_queue};
use backstop_test::{eventually_every, start};
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let transport = RabbitTransport::new(RabbitConfig::from_env()).expect("config");
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let queue = format!("backstop-test.restart-{t}-{}", std::process::id());
    let sub = Subscription::new(queue.clone(), "restart").with_prefetch(64);
    transport
        .declare(&sub)
        .await
        .expect("declare (is RabbitMQ running? `rabbitmq-server -detached`)");
    let total = 5_000usize;
    let mut ids = HashSet::new();
    for n in 0..total {
        let m = Message::new(format!("{n}"));
        ids.insert(m.id().expect("id").to_owned());
        transport.publish(&queue, m).await.expect("publish");
    }
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let s = seen.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let s = s.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.lock().expect("lock").insert(ctx.message_id().to_owned());
            Ok(())
        }
    });
    let runner = Runner::builder(transport.clone())
        .with_group("restart")
        .with_handler_options(
            queue.clone(),
            handler,
            HandlerOptions::default()
                .with_concurrency(64)
                .with_policy(RetryPolicy::default().with_tiers([])),
        )
        .build()
        .expect("valid");
    let running = start(runner);
    eventually_every(
        "some handled",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async { seen.lock().expect("lock").len() >= 500 },
    )
    .await;

    common::rabbitmqctl(&["stop_app"]);
    let before_restart = seen.lock().expect("lock").len();
    assert!(before_restart < total, "the restart must happen mid-stream");
    tokio::time::sleep(Duration::from_secs(2)).await;
    common::rabbitmqctl(&["start_app"]);
    common::rabbitmqctl(&["await_startup"]);

    eventually_every(
        "every message handled after the restart",
        Duration::from_secs(180),
        Duration::from_millis(200),
        || async { seen.lock().expect("lock").len() == total },
    )
    .await;
    eventually_every(
        "queue drained",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async { transport.ready_count(&queue).await.ok().flatten() == Some(0) },
    )
    .await;
    let report = running.stop().await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, ids, "every published message was handled");
    println!(
        "restart test: {before_restart} handled before stop_app, {} in all, {} handler successes (the rest are redeliveries)",
        seen.len(),
        report.stats.ok
    );
    let _ = transport.delete_queue(&queue).await;
    let _ = transport.delete_queue(&dlq_queue(&queue)).await;
}
