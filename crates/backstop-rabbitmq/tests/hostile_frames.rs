//! Headers that no client library would send, written frame by frame
//! (`backstop_test::raw_amqp`) and passed on by RabbitMQ as they are: a
//! table nested 20,000 levels deep (100 KiB; lapin's parser recurses per
//! level and overflowed its I/O thread's stack at 5,000, aborting the
//! whole process, so every member of a consumer group died in turn on the
//! same message), and a header key that is not UTF-8 (lapin fails the
//! connection on it, and the message came back first on the next one, for
//! ever), and a routing key that is not UTF-8, through a fanout exchange
//! (the same). Backstop mends them before lapin reads them: the messages are
//! handled or dead-lettered like any other, with the header
//! `backstop-dropped-headers` saying what was dropped; the other headers
//! arrive intact.

mod common;

use backstop_core::{Context, HandlerError, HandlerOptions, Message, RetryPolicy};
use backstop_test::raw_amqp::{nested_headers, publish, publish_to, string_entry, with_entries};
use backstop_test::{Harness, eventually, start};
use common::RabbitBackend;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DROPPED: &str = "backstop-dropped-headers";

/// Per message: handler calls, the `backstop-dropped-headers` note, and
/// whether its other headers arrived.
type Seen = (u32, Option<String>, bool);

/// `(seq, raw headers table, payload)`.
fn hostile() -> Vec<(String, Vec<u8>, &'static [u8])> {
    let seq = |n: u32| string_entry("seq", &n.to_string());
    let deep = nested_headers("deep", 20_000);
    let mut bad_key = vec![2, 0xff, 0xfe, b'S', 0, 0, 0, 1, b'x'];
    bad_key.extend_from_slice(&string_entry("also", "kept"));
    let empty = [0u8, 0, 0, 0];
    vec![
        ("0".into(), with_entries(&empty, &[seq(0)]), b"ok plain"),
        ("1".into(), with_entries(&deep, &[seq(1)]), b"ok deep"),
        ("2".into(), with_entries(&deep, &[seq(2)]), b"fail deep"),
        (
            "3".into(),
            with_entries(&empty, &[seq(3), bad_key]),
            b"ok bad key",
        ),
        ("4".into(), with_entries(&empty, &[seq(4)]), b"ok plain"),
        (
            "5".into(),
            with_entries(&empty, &[seq(5)]),
            b"ok bad routing key",
        ),
    ]
}

/// A fanout exchange bound to `queue`, through which a routing key of any
/// bytes reaches it.
async fn fanout_to(queue: &str) -> (lapin::Connection, String) {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let exchange = format!("{queue}.fanout");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: false,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("exchange");
    ch.queue_bind(
        queue.into(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .expect("bind");
    (conn, exchange)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_lapin_cannot_read_are_mended_not_fatal() {
    let backend = RabbitBackend::new();
    let policy = RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([]);
    let h = Harness::new(&backend, "hostile-frames", policy).await;
    let sent = hostile();
    let login = common::amqp_login();
    let (admin, exchange) = fanout_to(&h.source).await;
    for (_, headers, payload) in &sent {
        if payload.ends_with(b"routing key") {
            publish_to(&login, &exchange, &[0xff, b'r'], headers, payload)
        } else {
            publish(&login, &h.source, headers, payload)
        }
        .expect("raw publish confirmed");
    }
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let record = seen.clone();
    let handler = backstop_core::handler_fn(move |m: Message, _: Context| {
        let record = record.clone();
        async move {
            let hd = m.headers();
            let seq = hd.get_str("seq").unwrap_or("?").to_owned();
            let note = hd.get_str(DROPPED).map(str::to_owned);
            let kept = hd.get_str("also").is_some() || !m.payload().ends_with(b"bad key");
            let mut seen = record.lock().expect("lock");
            let entry = seen.entry(seq).or_insert((0, None, false));
            *entry = (entry.0 + 1, note, kept);
            if m.payload().starts_with(b"fail") {
                return Err(HandlerError::permanent("hostile input"));
            }
            Ok(())
        }
    });
    let running = start(
        h.runner(handler, HandlerOptions::default())
            .build()
            .expect("valid"),
    );
    eventually(
        "every message handled or dead-lettered",
        Duration::from_secs(120),
        || async { h.dlq().await.len() == 1 && seen.lock().expect("lock").len() == sent.len() },
    )
    .await;
    backstop_test::until_zero("source drained", Duration::from_secs(60), || {
        backstop_test::Backend::pending(&backend, &h.source)
    })
    .await;
    let report = running.stop().await;
    assert_eq!((report.stats.ok, report.stats.dead_lettered), (5, 1));
    assert!(report.stats.malformed_headers >= 4, "{:?}", report.stats);
    let seen = seen.lock().expect("lock").clone();
    for (seq, _, payload) in &sent {
        let (calls, note, kept) = seen.get(seq).cloned().expect("handled");
        assert_eq!(calls, 1, "message {seq} handled once");
        let mended = !payload.ends_with(b"plain");
        assert_eq!(note.is_some(), mended, "message {seq}: {note:?}");
        assert!(kept, "message {seq}: its other headers arrive intact");
    }
    let note = seen.get("1").and_then(|s| s.1.clone()).unwrap_or_default();
    assert!(
        note.contains("\"deep\""),
        "the note names the header: {note}"
    );
    let note = seen.get("5").and_then(|s| s.1.clone()).unwrap_or_default();
    assert!(note.contains("routing key"), "{note}");
    let dead = h.dlq().await;
    let hd = dead.first().expect("one dead letter").headers();
    assert_eq!(hd.get_str("seq"), Some("2"));
    assert!(
        hd.get_str(DROPPED).is_some(),
        "the DLQ copy says what was dropped"
    );
    let ch = admin.create_channel().await.expect("channel");
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}
