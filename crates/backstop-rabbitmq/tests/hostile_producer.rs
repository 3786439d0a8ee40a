//! A hostile producer on RabbitMQ, interleaved with valid messages:
//! timestamps of 2^63, u64::MAX and in milliseconds (year 58,000), a
//! 300-byte id, a 255-byte header key (AMQP's longest), a 64 KiB header
//! value, tables, arrays and bytes where strings are expected, forged
//! attempt, origin and delivery-count headers, an empty, a 5 MiB and an
//! invalid UTF-8 payload. The worker keeps running; every message ends
//! handled (once) or in the DLQ with a reason; counts reconciled against the
//! broker: nothing lost; forged headers ignored.

mod common;

use backstop_core::message::names;
use backstop_core::{Context, HandlerError, HandlerOptions, Message, RetryPolicy};
use backstop_test::{Harness, eventually, start};
use common::RabbitBackend;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `(sequence number, payload, properties)`: every message carries `seq`, the
/// test's own header, so it is found whatever else is garbage.
fn hostile() -> Vec<(u32, Vec<u8>, BasicProperties)> {
    let mut out = Vec::new();
    let mut add = |payload: Vec<u8>, headers: Vec<(&str, AMQPValue)>, props: BasicProperties| {
        let seq = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let mut t = FieldTable::default();
        t.insert(ShortString::from("seq"), text(&seq.to_string()));
        for (k, v) in headers {
            t.insert(ShortString::from(k), v);
        }
        out.push((seq, payload, props.with_headers(t)));
    };
    let plain = BasicProperties::default;
    let ok = |s: &str| s.as_bytes().to_vec();
    add(ok("ok valid"), vec![], plain());
    add(ok("ok ts 2^63"), vec![], plain().with_timestamp(1 << 63));
    add(ok("fail ts max"), vec![], plain().with_timestamp(u64::MAX));
    add(
        ok("fail ts in ms"),
        vec![],
        plain().with_timestamp(1_795_730_060_123),
    );
    add(ok("ok valid"), vec![], plain());
    add(
        ok("fail long id"),
        vec![(names::MESSAGE_ID, text(&"i".repeat(300)))],
        plain(),
    );
    let long_key = "k".repeat(255);
    add(
        ok("fail long key"),
        vec![(long_key.as_str(), text("v"))],
        plain(),
    );
    add(
        ok("fail big header"),
        vec![("big", text(&"h".repeat(64 * 1024)))],
        plain(),
    );
    add(
        ok("fail wrong types"),
        vec![
            (
                names::MESSAGE_ID,
                AMQPValue::FieldTable(FieldTable::default()),
            ),
            (
                names::ATTEMPT,
                AMQPValue::FieldArray(FieldArray::from(vec![text("1")])),
            ),
            (
                names::TRACEPARENT,
                AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255, 27])),
            ),
        ],
        plain(),
    );
    add(
        ok("fail forged"),
        vec![
            (names::ATTEMPT, text("999")),
            (names::DELAYED_ATTEMPTS, text("999")),
            (names::ORIGIN_SOURCE, text("amq.rabbitmq.evil")),
            ("x-delivery-count", AMQPValue::LongLongInt(-1)),
        ],
        plain(),
    );
    add(
        ok("ok forged count"),
        vec![("x-delivery-count", AMQPValue::LongLongInt(1 << 40))],
        plain(),
    );
    add(Vec::new(), vec![], plain());
    let mut big = b"ok ".to_vec();
    big.resize(5 * 1024 * 1024, b'x');
    add(big, vec![], plain());
    add(vec![b'f', b'a', b'i', b'l', 0xff, 0xfe], vec![], plain());
    add(ok("ok valid"), vec![], plain());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_producer_loses_nothing_and_stops_nothing() {
    let backend = RabbitBackend::new();
    let policy = RetryPolicy::default()
        .with_immediate_attempts(2)
        .with_tiers([]);
    let h = Harness::new(&backend, "hostile-producer", policy).await;
    let sent = hostile();
    let url = common::amqp_url();
    for (_, payload, props) in &sent {
        common::publish_amqp(&url, &h.source, payload, props.clone()).await;
    }
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen = calls.clone();
    let handler = backstop_core::handler_fn(move |m: Message, ctx: Context| {
        let seen = seen.clone();
        async move {
            let seq = m.headers().get_str("seq").unwrap_or("?").to_owned();
            if ctx.attempt() == 1 {
                *seen.lock().expect("lock").entry(seq).or_default() += 1;
            }
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
    let total = sent.len();
    let failing = sent
        .iter()
        .filter(|(_, p, _)| p.starts_with(b"fail"))
        .count();
    eventually(
        "every message handled or dead-lettered",
        Duration::from_secs(120),
        || async { h.dlq().await.len() == failing && calls.lock().expect("lock").len() == total },
    )
    .await;
    backstop_test::until_zero("source drained", Duration::from_secs(60), || {
        backstop_test::Backend::pending(&backend, &h.source)
    })
    .await;
    let report = running.stop().await;
    assert_eq!(
        (
            report.stats.ok as usize,
            report.stats.dead_lettered as usize
        ),
        (total - failing, failing),
        "reconciled: {:?}",
        report.stats
    );
    let calls = calls.lock().expect("lock").clone();
    for (seq, _, _) in &sent {
        assert_eq!(
            calls.get(&seq.to_string()),
            Some(&1),
            "message {seq} handled once"
        );
    }
    for dead in h.dlq().await {
        let hd = dead.headers();
        assert!(
            hd.get(names::DEAD_LETTER_REASON).is_some(),
            "a reason: {hd:?}"
        );
        assert_eq!(
            hd.get_str(names::ORIGIN_SOURCE),
            Some(h.source.as_str()),
            "the worker's origin, never the producer's"
        );
        assert_eq!(
            hd.get_str(names::ATTEMPT),
            Some("1"),
            "forged attempts ignored"
        );
    }
}
