//! Messages from producers that are not Backstop: AMQP's own `message-id`
//! property is the message's id (dedupe recognises a resend), and messages
//! with no id at all are never merged by content.

mod common;

use backstop_core::dedupe::{Dedupe, MemoryDedupeStore};
use backstop_core::{Context, HandlerOptions, handler_fn};
use backstop_test::{Backend, Harness, eventually, fast_policy, start};
use bytes::Bytes;
use common::RabbitBackend;
use lapin::BasicProperties;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn publish_raw(url: &str, queue: &str, payload: &str, message_id: Option<&str>) {
    let mut props = BasicProperties::default();
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    common::publish_amqp(url, queue, payload.as_bytes(), props).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_message_id_dedupes_and_id_less_messages_are_never_merged() {
    let backend = RabbitBackend::new();
    let h = Harness::new(&backend, "foreign", fast_policy()).await;
    let url = common::amqp_url();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let s = seen.clone();
    let handler = handler_fn(move |payload: Bytes, ctx: Context| {
        let s = s.clone();
        async move {
            let key = format!("{}|{}", String::from_utf8_lossy(&payload), ctx.message_id());
            *s.lock().expect("lock").entry(key).or_default() += 1;
            Ok(())
        }
    });
    let runner = h
        .runner(
            handler,
            HandlerOptions::default().with_dedupe(Dedupe::new(MemoryDedupeStore::new())),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let running = start(runner);
    // Sent twice with the same AMQP message-id: one handling.
    publish_raw(&url, &h.source, r#"{"invoice":7}"#, Some("inv-7")).await;
    publish_raw(&url, &h.source, r#"{"invoice":7}"#, Some("inv-7")).await;
    // Two real events that happen to be byte-equal, without any id: both run.
    publish_raw(&url, &h.source, r#"{"sku":"A","delta":1}"#, None).await;
    publish_raw(&url, &h.source, r#"{"sku":"A","delta":1}"#, None).await;
    eventually("four settled", Duration::from_secs(60), || async {
        let s = stats.snapshot();
        s.ok + s.duplicates == 4
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.stats.duplicates, 1, "the resend of inv-7");
    assert_eq!(report.stats.ok, 3);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.get(r#"{"invoice":7}|inv-7"#), Some(&1), "{seen:?}");
    let equal: u32 = seen
        .iter()
        .filter(|(k, _)| k.starts_with(r#"{"sku":"A","delta":1}|"#))
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(
        equal, 2,
        "byte-equal messages without an id both handled: {seen:?}"
    );
    assert_eq!(backend.pending(&h.source).await, 0);
}
