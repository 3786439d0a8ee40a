//! What a producer can still do on RabbitMQ by forging `x-death`: a message
//! whose `x-death` names one of the source's tier queues is taken for one
//! coming back from that tier, so its `backstop-*` attempt headers are
//! believed. It is still handled (the handler always runs); a forged
//! `backstop-delayed-attempts` past the last tier makes its first failure
//! final (DLQ, `exhausted`) instead of going through the remaining tiers.
//! The README says so next to the trust rule. (A negative
//! `x-delivery-count` is sent along too: it neither ends the message
//! unhandled nor stops it; `convert` ignores it and counts it.)

mod common;

use backstop_core::message::names;
use backstop_core::{Context, DelayTier, HandlerError, HandlerOptions, RetryPolicy, handler_fn};
use backstop_rabbitmq::tier_queue;
use backstop_test::{Harness, eventually, start};
use bytes::Bytes;
use common::RabbitBackend;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Publishes `payload` with a forged `x-death` naming `dead_from` and the
/// given extra string headers.
async fn publish_forged(
    url: &str,
    queue: &str,
    payload: &str,
    dead_from: &str,
    extra: &[(&str, &str)],
) {
    let mut death = FieldTable::default();
    death.insert(
        ShortString::from("queue"),
        AMQPValue::LongString(LongString::from(dead_from)),
    );
    death.insert(
        ShortString::from("reason"),
        AMQPValue::LongString(LongString::from("expired")),
    );
    death.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    headers.insert(
        ShortString::from("x-delivery-count"),
        AMQPValue::LongLongInt(-1),
    );
    for (k, v) in extra {
        headers.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    let props = BasicProperties::default().with_headers(headers);
    common::publish_amqp(url, queue, payload.as_bytes(), props).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_x_death_can_only_shorten_a_failing_messages_retries() {
    let backend = RabbitBackend::new();
    let tier = DelayTier::named("forged-1s", Duration::from_secs(1));
    let policy = RetryPolicy::default()
        .with_immediate_attempts(1)
        .with_tiers([tier.clone()]);
    let h = Harness::new(&backend, "forged-x-death", policy).await;
    let url = common::amqp_url();
    let tier_q = tier_queue(&h.source, &tier);
    let forged: &[(&str, &str)] = &[
        (names::ATTEMPT, "999"),
        (names::DELAYED_ATTEMPTS, "999"),
        (names::RETRY_TIER, "forged-1s"),
    ];
    publish_forged(&url, &h.source, "ok", &tier_q, forged).await;
    publish_forged(&url, &h.source, "fail", &tier_q, forged).await;
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = calls.clone();
    let handler = handler_fn(move |body: Bytes, _: Context| {
        let seen = seen.clone();
        async move {
            let body = String::from_utf8_lossy(&body).into_owned();
            seen.lock().expect("lock").push(body.clone());
            if body == "fail" {
                return Err(HandlerError::transient("down"));
            }
            Ok(())
        }
    });
    let running = start(
        h.runner(handler, HandlerOptions::default())
            .build()
            .expect("valid"),
    );
    eventually("both ended", Duration::from_secs(60), || async {
        calls.lock().expect("lock").len() == 2 && h.dlq().await.len() == 1
    })
    .await;
    let report = running.stop().await;
    let mut handled = calls.lock().expect("lock").clone();
    handled.sort();
    assert_eq!(handled, ["fail", "ok"], "both handled, each once");
    assert_eq!(report.stats.ok, 1);
    // The forged count made the first failure final: no tier hop.
    assert_eq!(report.stats.delayed, 0);
    let dead = h.dlq().await.remove(0);
    assert_eq!(
        dead.headers().get_str(names::DEAD_LETTER_REASON),
        Some("exhausted")
    );
}
