//! The behaviours every backend must show. Each function panics on a violation.

use crate::{Backend, Harness, Recorder, eventually, start, until_zero};
use backstop_core::message::{format_timestamp, names, parse_timestamp};
use backstop_core::{
    Backoff, Context, DelayPublisher, DelayTier, HandlerError, HandlerOptions, Json, Message,
    RetryPolicy, SourceKind, handler_fn,
};
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

const WAIT: Duration = Duration::from_secs(60);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The policy the suite uses: 3 immediate attempts with 1..10 ms backoff, tiers
/// `200ms, 400ms`, retry-after hints up to 500 ms waited in process.
pub fn fast_policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(3)
        .with_backoff(Backoff::exponential(ms(1), ms(10)))
        .with_tiers([DelayTier::new(ms(200)), DelayTier::new(ms(400))])
        .with_retry_after_inline_max(ms(500))
}

fn options() -> HandlerOptions {
    HandlerOptions::default()
        .with_name("conformance")
        .with_timeout(Duration::from_secs(5))
}

#[derive(serde::Deserialize)]
struct Order {
    n: u32,
}

fn order(n: u32) -> Message {
    Message::new(format!(r#"{{"n":{n}}}"#))
}

#[derive(Debug)]
struct InventoryDown(std::io::Error);

impl fmt::Display for InventoryDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("inventory service unavailable")
    }
}

impl std::error::Error for InventoryDown {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

async fn dlq_len<T>(h: &Harness<T>) -> usize
where
    T: backstop_core::Publisher
        + backstop_core::Subscriber
        + DelayPublisher
        + backstop_core::DeadLetterPublisher
        + backstop_core::DeadLetterSource
        + Clone,
{
    h.dlq().await.len()
}

fn header<'a>(m: &'a Message, name: &str) -> &'a str {
    m.headers()
        .get_str(name)
        .unwrap_or_else(|| panic!("DLQ message lacks {name}: {:?}", m.headers()))
}

/// Every message is handled once and acked; nothing reaches the DLQ.
pub async fn happy_path<B: Backend>(b: &B) {
    let h = Harness::new(b, "happy", fast_policy()).await;
    let rec = Recorder::default();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (r, s) = (rec.clone(), seen.clone());
    let handler = handler_fn(move |Json(o): Json<Order>, ctx: Context| {
        let (r, s) = (r.clone(), s.clone());
        async move {
            r.record(&ctx);
            s.lock().expect("lock").push(o.n);
            Ok(())
        }
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    for n in 0..20 {
        h.publish(order(n)).await;
    }
    eventually("20 messages handled", WAIT, || async {
        rec.distinct() == 20
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert_eq!(report.stats.ok, 20);
    assert_eq!(rec.len(), 20, "each message handled exactly once");
    let mut got = seen.lock().expect("lock").clone();
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert_eq!(dlq_len(&h).await, 0);
}

/// A transient failure is retried in process and then succeeds.
pub async fn transient_then_success_immediately<B: Backend>(b: &B) {
    let h = Harness::new(b, "blip", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |ctx: &Context| {
        if ctx.attempt() == 1 {
            return Err(HandlerError::transient("connection reset"));
        }
        Ok(())
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    for n in 0..5 {
        h.publish(order(n)).await;
    }
    eventually("5 messages ok", WAIT, || async {
        rec.calls().iter().filter(|c| c.attempt == 2).count() == 5
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.stats.ok, 5);
    assert_eq!(report.stats.retried, 5);
    assert_eq!(report.stats.delayed, 0);
    assert_eq!(report.stats.handler_errors, 5);
    for c in rec.calls() {
        assert_eq!(
            c.kind,
            SourceKind::Main,
            "immediate retries stay in process"
        );
    }
    assert_eq!(dlq_len(&h).await, 0);
}

/// Failing beyond the immediate attempts goes through the first delay tier,
/// which holds it for the tier's delay, then succeeds.
pub async fn transient_then_success_through_delay_tier<B: Backend>(b: &B) {
    let h = Harness::new(b, "tier", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |ctx: &Context| {
        if ctx.attempt() <= 3 {
            return Err(HandlerError::transient("still down"));
        }
        Ok(())
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    let m = order(1);
    let id = m.id().expect("id").to_owned();
    h.publish(m).await;
    eventually("handled after one tier", WAIT, || async {
        rec.calls_for(&id).len() == 4
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    let calls = rec.calls_for(&id);
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(calls[3].delayed, 1);
    assert_eq!(calls[3].kind, SourceKind::RetryTier("200ms".into()));
    let waited = calls[3].at - calls[2].at;
    assert!(waited >= ms(200), "tier delay not honoured: {waited:?}");
    assert_eq!(report.stats.delayed, 1);
    assert_eq!(report.stats.retried, 2);
    assert_eq!(report.stats.ok, 1);
    assert_eq!(dlq_len(&h).await, 0);
}

/// Always failing: 3 immediate attempts per tier visit, both tiers, then the DLQ
/// with every HEADERS.md header, identity and application data intact.
pub async fn exhausted_goes_to_dlq_with_every_header<B: Backend>(b: &B) {
    let h = Harness::new(b, "exhaust", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |_: &Context| {
        Err(HandlerError::transient(InventoryDown(
            std::io::Error::other("connection refused (port 8080)"),
        )))
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    let before = SystemTime::now() - Duration::from_secs(1);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let m = order(7)
        .with_key("customer-42")
        .with_header("tenant", "acme")
        .with_header(names::TRACEPARENT, traceparent);
    let id = m.id().expect("id").to_owned();
    h.publish(m).await;
    eventually("message dead-lettered", WAIT, || async {
        dlq_len(&h).await == 1
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert_eq!(rec.calls_for(&id).len(), 9, "3 attempts x (main + 2 tiers)");
    assert_eq!(report.stats.dead_lettered, 1);
    assert_eq!(report.stats.delayed, 2);

    let dead = h.dlq().await.remove(0);
    assert_eq!(dead.id(), Some(id.as_str()));
    if b.features().keeps_keys {
        assert_eq!(dead.key().map(|k| &k[..]), Some(&b"customer-42"[..]));
    }
    assert_eq!(&dead.payload()[..], br#"{"n":7}"#);
    assert_eq!(header(&dead, "tenant"), "acme");
    assert_eq!(header(&dead, names::TRACEPARENT), traceparent);

    assert_eq!(header(&dead, names::ORIGIN_SOURCE), h.source);
    assert_eq!(header(&dead, names::ORIGIN_GROUP), h.group);
    if let Some(ts) = dead.headers().get_str(names::ORIGIN_TIMESTAMP) {
        assert!(parse_timestamp(ts).is_some(), "origin timestamp {ts}");
    }

    assert_eq!(header(&dead, names::ATTEMPT), "9");
    assert_eq!(header(&dead, names::DELAYED_ATTEMPTS), "2");
    assert!(
        !dead.headers().contains(names::RETRY_TIER),
        "DLQ copy travels no tier"
    );
    assert!(!dead.headers().contains(names::DUE_AT));
    let first = parse_timestamp(header(&dead, names::FIRST_FAILED_AT)).expect("first-failed-at");
    let last = parse_timestamp(header(&dead, names::FAILED_AT)).expect("failed-at");
    assert!(before <= first && first <= last, "{first:?} .. {last:?}");

    assert_eq!(header(&dead, names::ERROR_CLASS), "transient");
    assert!(header(&dead, names::ERROR_TYPE).ends_with("InventoryDown"));
    assert_eq!(
        header(&dead, names::ERROR_MESSAGE),
        "inventory service unavailable"
    );
    assert_eq!(
        header(&dead, names::ERROR_CHAIN),
        "inventory service unavailable\nconnection refused (port 8080)"
    );
    let fp = header(&dead, names::ERROR_FINGERPRINT);
    assert!(
        fp.len() == 16 && fp.bytes().all(|c| c.is_ascii_hexdigit()),
        "{fp}"
    );
    assert_eq!(header(&dead, names::HANDLER), "conformance");
    assert!(!header(&dead, names::HOST).is_empty());
    assert_eq!(header(&dead, names::DEAD_LETTER_REASON), "exhausted");
    for name in names::FAILURE_HEADERS
        .iter()
        .chain(names::ATTEMPT_HEADERS.iter())
        .chain([names::MESSAGE_ID, names::ORIGIN_SOURCE].iter())
    {
        let n = dead.headers().iter().filter(|e| e.key == *name).count();
        assert!(n <= 1, "{name} appears {n} times: replaced, never appended");
    }
    let _ = format_timestamp(SystemTime::now());
}

/// A permanent failure is dead-lettered after one attempt.
pub async fn permanent_dead_letters_at_once<B: Backend>(b: &B) {
    let h = Harness::new(b, "perm", fast_policy()).await;
    let rec = Recorder::default();
    let handler =
        rec.handler(move |_: &Context| Err(HandlerError::permanent("quantity must be positive")));
    let running = start(h.runner(handler, options()).build().expect("valid"));
    h.publish(order(3)).await;
    eventually("dead-lettered", WAIT, || async { dlq_len(&h).await == 1 }).await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert_eq!(rec.len(), 1, "no retries for a permanent error");
    assert_eq!(report.stats.retried, 0);
    assert_eq!(report.stats.delayed, 0);
    let dead = h.dlq().await.remove(0);
    assert_eq!(header(&dead, names::ERROR_CLASS), "permanent");
    assert_eq!(header(&dead, names::DEAD_LETTER_REASON), "permanent");
    assert_eq!(header(&dead, names::ATTEMPT), "1");
    assert_eq!(header(&dead, names::DELAYED_ATTEMPTS), "0");
    assert_eq!(
        header(&dead, names::ERROR_MESSAGE),
        "quantity must be positive"
    );
}

/// A payload that cannot be decoded never reaches the handler and goes to the
/// DLQ as `poison`, byte for byte.
pub async fn poison_payload_dead_letters<B: Backend>(b: &B) {
    let h = Harness::new(b, "poison", fast_policy()).await;
    let rec = Recorder::default();
    let r = rec.clone();
    let handler = handler_fn(move |Json(_): Json<Order>, ctx: Context| {
        let r = r.clone();
        async move {
            r.record(&ctx);
            Ok(())
        }
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    let raw: &[u8] = b"\xff\x00{not json";
    h.publish(Message::new(Bytes::from_static(raw))).await;
    h.publish(order(1)).await;
    eventually("poison dead-lettered", WAIT, || async {
        dlq_len(&h).await == 1
    })
    .await;
    eventually("good one handled", WAIT, || async { rec.len() == 1 }).await;
    let report = running.stop().await;
    assert_eq!(report.stats.ok, 1);
    assert_eq!(report.stats.retried, 0, "poison is never retried");
    let dead = h.dlq().await.remove(0);
    assert_eq!(&dead.payload()[..], raw);
    assert_eq!(header(&dead, names::ERROR_CLASS), "poison");
    assert_eq!(header(&dead, names::DEAD_LETTER_REASON), "poison");
    assert!(header(&dead, names::ERROR_MESSAGE).starts_with("cannot decode payload"));
    assert!(header(&dead, names::ERROR_TYPE).contains("serde_json"));
}

/// A panic is caught, classified `panic`, and retried like a transient failure.
pub async fn panic_is_caught_and_classified<B: Backend>(b: &B) {
    let policy = fast_policy().with_immediate_attempts(2).with_tiers([]);
    let h = Harness::new(b, "panic", policy).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |ctx: &Context| {
        if ctx.attempt() > 0 {
            panic!("boom in handler");
        }
        Ok(())
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    h.publish(order(1)).await;
    eventually("dead-lettered", WAIT, || async { dlq_len(&h).await == 1 }).await;
    let report = running.stop().await;
    assert_eq!(rec.len(), 2, "a panic is retried like a transient error");
    assert_eq!(report.stats.handler_errors, 2);
    let dead = h.dlq().await.remove(0);
    assert_eq!(header(&dead, names::ERROR_CLASS), "panic");
    assert_eq!(header(&dead, names::DEAD_LETTER_REASON), "exhausted");
    assert!(header(&dead, names::ERROR_MESSAGE).contains("boom in handler"));
}

/// A handler exceeding its timeout fails as `timeout` and is retried.
pub async fn timeout_is_enforced_and_classified<B: Backend>(b: &B) {
    let policy = fast_policy().with_immediate_attempts(2).with_tiers([]);
    let h = Harness::new(b, "timeout", policy).await;
    let rec = Recorder::default();
    let r = rec.clone();
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let r = r.clone();
        async move {
            r.record(&ctx);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    });
    let running = start(
        h.runner(handler, options().with_timeout(ms(150)))
            .build()
            .expect("valid"),
    );
    h.publish(order(1)).await;
    eventually("dead-lettered", WAIT, || async { dlq_len(&h).await == 1 }).await;
    let report = running.stop().await;
    assert_eq!(rec.len(), 2);
    assert_eq!(report.stats.handler_errors, 2);
    let dead = h.dlq().await.remove(0);
    assert_eq!(header(&dead, names::ERROR_CLASS), "timeout");
    assert!(header(&dead, names::ERROR_MESSAGE).contains("150ms"));
}

/// Fails once with a 300 ms `retry_after` hint, then succeeds; returns the
/// calls (checked to be at least 300 ms apart) and the report.
async fn retry_after_once<B: Backend>(
    b: &B,
    prefix: &str,
    policy: RetryPolicy,
) -> (Vec<crate::Call>, backstop_core::RunReport) {
    let h = Harness::new(b, prefix, policy).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |ctx: &Context| {
        if ctx.attempt() == 1 {
            return Err(HandlerError::retry_after(ms(300), "429 too many requests"));
        }
        Ok(())
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    h.publish(order(1)).await;
    eventually("handled", WAIT, || async { rec.len() == 2 }).await;
    let report = running.stop().await;
    let calls = rec.calls();
    assert!(calls[1].at - calls[0].at >= ms(300), "hint not respected");
    (calls, report)
}

/// A short `retry_after` hint is waited out in process, at least as long as asked.
pub async fn retry_after_short_hint_waits_in_process<B: Backend>(b: &B) {
    let (calls, report) = retry_after_once(b, "hint", fast_policy()).await;
    assert_eq!(calls[1].kind, SourceKind::Main);
    assert_eq!(report.stats.retried, 1);
    assert_eq!(report.stats.ok, 1);
}

/// A long `retry_after` hint goes to the first tier at least that long.
pub async fn retry_after_long_hint_goes_to_a_long_enough_tier<B: Backend>(b: &B) {
    let policy = fast_policy().with_retry_after_inline_max(ms(100));
    let (calls, report) = retry_after_once(b, "hint-tier", policy).await;
    assert_eq!(calls[1].kind, SourceKind::RetryTier("400ms".into()));
    assert_eq!(report.stats.delayed, 1);
    assert_eq!(report.stats.ok, 1);
}

fn require_faults<B: Backend>(b: &B) -> &dyn crate::Faults {
    assert!(
        b.features().fault_injection,
        "this behaviour needs fault injection; run it on a backend whose Features enable it"
    );
    b.faults()
        .expect("Features::fault_injection is set but faults() returned None")
}

/// When the DLQ publish is not confirmed, the original is not acked: it is
/// redelivered and routed on a later delivery. Nothing is lost.
pub async fn dead_letter_publish_failure_redelivers_original<B: Backend>(b: &B) {
    let faults = require_faults(b);
    let h = Harness::new(b, "dlq-fail", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |_: &Context| Err(HandlerError::permanent("bad order")));
    let runner = h
        .runner(handler, options())
        .with_route_retries(2, Backoff::exponential(ms(1), ms(5)))
        .build()
        .expect("valid");
    h.publish(order(1)).await;
    // Two tries on the first delivery fail, one more on the second.
    faults.fail_next_dead_letter_publishes(3);
    let running = start(runner);
    eventually("dead-lettered after redelivery", WAIT, || async {
        dlq_len(&h).await == 1
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    let calls = rec.calls();
    assert_eq!(calls.len(), 2, "handled again after redelivery");
    assert!(
        calls[1].redelivered,
        "second delivery is a broker redelivery"
    );
    assert_eq!(report.stats.failed_to_route, 1);
    assert_eq!(report.stats.dead_lettered, 1);
    assert_eq!(dlq_len(&h).await, 1, "exactly one DLQ copy");
}

/// The same for a delay-tier publish.
pub async fn delay_publish_failure_redelivers_original<B: Backend>(b: &B) {
    let faults = require_faults(b);
    let policy = fast_policy().with_immediate_attempts(1);
    let h = Harness::new(b, "tier-fail", policy).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |ctx: &Context| {
        if ctx.attempt() == 1 || !ctx.source().kind.is_owned() {
            return Err(HandlerError::transient("down"));
        }
        Ok(())
    });
    let runner = h
        .runner(handler, options())
        .with_route_retries(1, Backoff::exponential(ms(1), ms(5)))
        .build()
        .expect("valid");
    h.publish(order(1)).await;
    faults.fail_next_delay_publishes(1);
    let running = start(runner);
    eventually("handled from the tier", WAIT, || async {
        rec.calls().iter().any(|c| c.kind.is_owned())
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    let calls = rec.calls();
    assert_eq!(
        calls.len(),
        3,
        "fail, (route fails) redelivered fail, tier ok"
    );
    assert!(calls[1].redelivered);
    assert_eq!(report.stats.failed_to_route, 1);
    assert_eq!(report.stats.delayed, 1);
    assert_eq!(report.stats.ok, 1);
    assert_eq!(dlq_len(&h).await, 0);
}

/// Shutdown stops intake and lets in-flight messages finish and ack.
pub async fn graceful_shutdown_drains_in_flight<B: Backend>(b: &B) {
    let h = Harness::new(b, "drain", fast_policy()).await;
    let rec = Recorder::default();
    let finished = Arc::new(AtomicUsize::new(0));
    let (r, f) = (rec.clone(), finished.clone());
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let (r, f) = (r.clone(), f.clone());
        async move {
            r.record(&ctx);
            tokio::time::sleep(ms(300)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let running = start(
        h.runner(handler, options().with_concurrency(4))
            .build()
            .expect("valid"),
    );
    for n in 0..4 {
        h.publish(order(n)).await;
    }
    eventually("4 in flight", WAIT, || async { rec.len() == 4 }).await;
    let report = running.stop().await;
    assert!(
        report.drained,
        "in-flight work finished before the deadline"
    );
    assert_eq!(finished.load(Ordering::SeqCst), 4);
    assert_eq!(report.stats.ok, 4);
    eventually("all acked", WAIT, || async {
        b.pending(&h.source).await == 0
    })
    .await;
}

/// Work unfinished at the shutdown deadline is not acked and is redelivered.
pub async fn shutdown_deadline_leaves_unfinished_unacked<B: Backend>(b: &B) {
    let h = Harness::new(b, "deadline", fast_policy()).await;
    let rec = Recorder::default();
    let stuck = rec.slow_handler(Duration::from_secs(3));
    let running = start(
        h.runner(stuck, options())
            .with_shutdown_deadline(ms(200))
            .build()
            .expect("valid"),
    );
    h.publish(order(1)).await;
    eventually("started", WAIT, || async { rec.len() == 1 }).await;
    let report = running.stop().await;
    assert!(!report.drained);
    assert_eq!(report.stats.abandoned, 1);
    assert_eq!(report.stats.ok, 0);
    assert_eq!(
        report.stats.in_flight, 0,
        "abandoned work is no longer in flight"
    );

    let again = Recorder::default();
    let quick = again.handler(move |_: &Context| Ok(()));
    let running = start(h.runner(quick, options()).build().expect("valid"));
    eventually("redelivered to the next worker", WAIT, || async {
        again.len() == 1
    })
    .await;
    eventually("acked", WAIT, || async { b.pending(&h.source).await == 0 }).await;
    let report = running.stop().await;
    assert_eq!(report.stats.ok, 1);
    assert_eq!(again.calls()[0].id, rec.calls()[0].id);
}

/// A message the broker keeps redelivering unsettled (here: abandoned at the
/// shutdown deadline twice, as a crashing worker would leave it) goes to the
/// DLQ with reason `delivery-limit` once it passes the handler's
/// `max_deliveries`, without the handler being called again. On a backend
/// that does not count deliveries the guard never fires and the message is
/// handled.
pub async fn delivery_limit_dead_letters_without_handling<B: Backend>(b: &B) {
    let h = Harness::new(b, "delivery-limit", fast_policy()).await;
    let limited = || options().with_max_deliveries(Some(2));
    let rec = Recorder::default();
    h.publish(order(1)).await;
    for run in 1..=2 {
        let stuck = rec.slow_handler(Duration::from_secs(3));
        let running = start(
            h.runner(stuck, limited())
                .with_shutdown_deadline(ms(100))
                .build()
                .expect("valid"),
        );
        eventually("delivered again", WAIT, || async { rec.len() == run }).await;
        let report = running.stop().await;
        assert_eq!(report.stats.abandoned, 1, "run {run} abandons it unsettled");
    }
    let again = Recorder::default();
    let quick = again.handler(move |_: &Context| Ok(()));
    let running = start(h.runner(quick, limited()).build().expect("valid"));
    if b.features().counts_deliveries {
        eventually("dead-lettered", WAIT, || async { dlq_len(&h).await == 1 }).await;
        until_zero("source drained", WAIT, || b.pending(&h.source)).await;
        let report = running.stop().await;
        assert_eq!(again.len(), 0, "the handler is not called a third time");
        assert_eq!(report.stats.dead_lettered, 1);
        let dead = h.dlq().await.remove(0);
        assert_eq!(header(&dead, names::DEAD_LETTER_REASON), "delivery-limit");
        assert_eq!(header(&dead, names::ERROR_CLASS), "poison");
        assert_eq!(header(&dead, names::ERROR_TYPE), "backstop::DeliveryLimit");
        assert!(
            header(&dead, names::ERROR_MESSAGE).contains("delivered 3 times"),
            "{}",
            header(&dead, names::ERROR_MESSAGE)
        );
        assert_eq!(dead.id(), Some(rec.calls()[0].id.as_str()));
    } else {
        eventually("handled: no count, no guard", WAIT, || async {
            again.len() == 1
        })
        .await;
        until_zero("source drained", WAIT, || b.pending(&h.source)).await;
        let report = running.stop().await;
        assert_eq!(report.stats.ok, 1);
        assert_eq!(dlq_len(&h).await, 0);
    }
}

/// Attempt headers on a main source are ignored and reset: an outside producer
/// cannot forge `backstop-attempt: 999` to skip retries.
pub async fn forged_attempt_headers_ignored_on_main_source<B: Backend>(b: &B) {
    let h = Harness::new(b, "forged", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |ctx: &Context| {
        let attempt = ctx.attempt();
        if ctx.headers().get_str("kind") == Some("permanent") {
            return Err(HandlerError::permanent("nope"));
        }
        if attempt == 1 {
            return Err(HandlerError::transient("blip"));
        }
        Ok(())
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    let forge = |m: Message| {
        m.with_header(names::ATTEMPT, "999")
            .with_header(names::DELAYED_ATTEMPTS, "999")
            .with_header(names::RETRY_TIER, "5m")
    };
    let retried = forge(order(1));
    let retried_id = retried.id().expect("id").to_owned();
    h.publish(retried).await;
    h.publish(forge(order(2)).with_header("kind", "permanent"))
        .await;
    eventually("both done", WAIT, || async {
        rec.calls_for(&retried_id).len() == 2 && dlq_len(&h).await == 1
    })
    .await;
    let report = running.stop().await;
    let calls = rec.calls_for(&retried_id);
    assert_eq!(calls[0].attempt, 1, "forged attempt ignored");
    assert_eq!(calls[0].delayed, 0, "forged delayed-attempts ignored");
    assert_eq!(calls[1].attempt, 2);
    assert_eq!(report.stats.ok, 1);
    let dead = h.dlq().await.remove(0);
    assert_eq!(header(&dead, names::ATTEMPT), "1");
    assert_eq!(header(&dead, names::DELAYED_ATTEMPTS), "0");
}

/// On a framework-owned source, a malformed attempt header is counted and
/// treated as absent; the message is still handled.
pub async fn malformed_tier_headers_counted_and_ignored<B: Backend>(b: &B) {
    let h = Harness::new(b, "malformed", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(move |_: &Context| Ok(()));
    let running = start(h.runner(handler, options()).build().expect("valid"));
    let m = order(1)
        .with_header(names::ATTEMPT, "three")
        .with_header(names::DELAYED_ATTEMPTS, "1")
        .with_header(names::DUE_AT, "soon");
    let tier = fast_policy().tiers()[0].clone();
    h.transport
        .publish_delayed(&h.subscription(), &tier, m)
        .await
        .expect("tier publish confirmed");
    eventually("handled from the tier", WAIT, || async { rec.len() == 1 }).await;
    let report = running.stop().await;
    let call = &rec.calls()[0];
    assert!(call.kind.is_owned());
    assert_eq!(call.attempt, 1, "malformed attempt treated as absent");
    assert_eq!(call.delayed, 1, "the well-formed header is still read");
    assert_eq!(report.stats.malformed_headers, 2);
    assert_eq!(report.stats.ok, 1);
}

/// No more than the configured number of messages are in flight at once.
pub async fn in_flight_is_bounded<B: Backend>(b: &B) {
    let h = Harness::new(b, "bounded", fast_policy()).await;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (n2, p2, d2) = (now.clone(), peak.clone(), done.clone());
    let handler = handler_fn(move |_: Bytes, _ctx: Context| {
        let (n, p, d) = (n2.clone(), p2.clone(), d2.clone());
        async move {
            let current = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(current, Ordering::SeqCst);
            tokio::time::sleep(ms(50)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    // A backlog first, keyed so that partitioned backends spread it (Kafka's
    // sticky partitioner can put keyless records all on one partition,
    // which a backend handles one at a time).
    for n in 0..12 {
        h.publish(order(n).with_key(format!("k{n}"))).await;
    }
    let running = start(
        h.runner(handler, options().with_concurrency(3))
            .build()
            .expect("valid"),
    );
    eventually("all handled", WAIT, || async {
        done.load(Ordering::SeqCst) == 12
    })
    .await;
    running.stop().await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "peak in flight {peak} > 3");
    assert!(peak >= 2, "work did run concurrently (peak {peak})");
}

/// The connection drops mid-stream: the runner resubscribes by itself, unacked
/// deliveries come back, and every message is handled at least once.
pub async fn connection_loss_recovers_without_loss<B: Backend>(b: &B) {
    let faults = require_faults(b);
    let h = Harness::new(b, "reconnect", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.slow_handler(ms(20));
    let running = start(
        h.runner(handler, options().with_concurrency(4))
            .build()
            .expect("valid"),
    );
    for n in 0..50 {
        h.publish(order(n)).await;
    }
    eventually("some handled", WAIT, || async { rec.len() >= 10 }).await;
    faults.drop_connection();
    eventually("all 50 handled", WAIT, || async { rec.distinct() == 50 }).await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    running.stop().await;
    assert_eq!(dlq_len(&h).await, 0);
}

/// Shutdown during an immediate-retry backoff does not hold the message through
/// its wait: it goes on its next delay-tier hop at once, and comes back later.
pub async fn shutdown_during_backoff_moves_to_delay_tier<B: Backend>(b: &B) {
    let h = Harness::new(b, "backoff-stop", fast_policy()).await;
    let rec = Recorder::default();
    let r = rec.clone();
    // A 400 ms hint is waited in process (inline max 500 ms): a known backoff.
    let handler = handler_fn(move |_: Bytes, ctx: Context| {
        let r = r.clone();
        async move {
            r.record(&ctx);
            Err(HandlerError::retry_after(ms(400), "busy"))
        }
    });
    let running = start(h.runner(handler, options()).build().expect("valid"));
    let m = order(1);
    let id = m.id().expect("id").to_owned();
    h.publish(m).await;
    eventually("first attempt", WAIT, || async { rec.len() == 1 }).await;
    let stopping = tokio::time::Instant::now();
    let report = running.stop().await;
    assert!(
        stopping.elapsed() < ms(400),
        "shutdown waited out the backoff"
    );
    assert!(report.drained);
    assert_eq!(report.stats.retried, 0);
    assert_eq!(report.stats.delayed, 1);
    assert_eq!(rec.len(), 1);

    let again = Recorder::default();
    let ok = again.handler(move |_: &Context| Ok(()));
    let running = start(h.runner(ok, options()).build().expect("valid"));
    eventually("back from the tier", WAIT, || async { again.len() == 1 }).await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    running.stop().await;
    let call = &again.calls()[0];
    assert_eq!(call.id, id);
    assert_eq!(call.kind, SourceKind::RetryTier("400ms".into()));
    assert_eq!(call.attempt, 2);
    assert_eq!(call.delayed, 1);
}

/// With no delay tier left, shutdown during a backoff gives the message back to
/// the broker (never an early dead letter).
pub async fn shutdown_during_backoff_without_tiers_releases<B: Backend>(b: &B) {
    let h = Harness::new(b, "backoff-release", fast_policy().with_tiers([])).await;
    let rec = Recorder::default();
    let handler = rec.handler(|_: &Context| Err(HandlerError::retry_after(ms(400), "busy")));
    let running = start(h.runner(handler, options()).build().expect("valid"));
    h.publish(order(1)).await;
    eventually("first attempt", WAIT, || async { rec.len() == 1 }).await;
    let report = running.stop().await;
    assert!(report.drained);
    assert_eq!(report.stats.dead_lettered, 0);
    assert_eq!(report.stats.ok, 0);

    let ok = rec.handler(move |_: &Context| Ok(()));
    let running = start(h.runner(ok, options()).build().expect("valid"));
    eventually("redelivered", WAIT, || async { rec.len() == 2 }).await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    running.stop().await;
    let calls = rec.calls();
    assert_eq!(calls[1].id, calls[0].id, "the same message came back");
    assert_eq!(dlq_len(&h).await, 0);
}

/// A dependency outage with a circuit breaker: intake pauses (the backlog
/// stays in the broker, nothing is acked/committed, retried into a tier or
/// dead-lettered), half-open probes go on, and after recovery everything is
/// handled.
pub async fn circuit_breaker_pauses_intake_during_an_outage<B: Backend>(b: &B) {
    const TOTAL: usize = 40;
    const CONCURRENCY: usize = 4;
    let h = Harness::new(b, "breaker", fast_policy()).await;
    let rec = Recorder::default();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let succeeded = Arc::new(AtomicUsize::new(0));
    let (d, s) = (down.clone(), succeeded.clone());
    let handler = rec.handler(move |_: &Context| {
        if d.load(Ordering::SeqCst) {
            return Err(HandlerError::transient(InventoryDown(std::io::Error::other(
                "connection refused",
            )))
            .with_dependency("inventory"));
        }
        s.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let runner = h
        .runner(
            handler,
            options()
                .with_concurrency(CONCURRENCY)
                .with_circuit_breaker(
                    backstop_core::CircuitBreaker::default()
                        .with_consecutive_failures(Some(3))
                        .with_open_for(ms(300), ms(600)),
                ),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    // What the backend may hold unacked in its consumer (RabbitMQ's
    // basic.qos): the rest of the backlog stays in the broker.
    let window = runner.subscriptions().first().map_or(0, |s| s.prefetch);
    for n in 0..TOTAL {
        h.publish(order(n as u32).with_id(format!("breaker-{n}")))
            .await;
    }
    let running = start(runner);
    eventually("the breaker opened", WAIT, || async {
        stats.snapshot().circuit_opened >= 1
    })
    .await;
    // The outage goes on for a while; probes fail and reopen the breaker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = stats.snapshot();
    assert!(
        during.circuit_opened >= 2,
        "half-open probes failed and reopened it: {during:?}"
    );
    assert_eq!(during.ok, 0);
    assert_eq!(during.delayed, 0, "nothing sent to a retry tier");
    assert_eq!(during.dead_lettered, 0, "nothing dead-lettered");
    assert!(
        rec.distinct() <= CONCURRENCY,
        "intake paused: {} distinct messages reached the handler",
        rec.distinct()
    );
    // Nothing acked or committed: the backlog is still in the broker (RabbitMQ
    // reports ready messages only, so the prefetch window it handed out is
    // not counted there).
    let pending = b.pending(&h.source).await;
    assert!(
        (TOTAL.saturating_sub(window)..=TOTAL).contains(&pending),
        "{pending} of {TOTAL} still pending during the outage (prefetch window {window})"
    );
    let probes = rec.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rec.len() > probes, "probes go on while it is open");
    down.store(false, Ordering::SeqCst);
    eventually("everything handled after recovery", WAIT, || async {
        succeeded.load(Ordering::SeqCst) >= TOTAL
    })
    .await;
    until_zero("source drained", WAIT, || b.pending(&h.source)).await;
    let report = running.stop().await;
    assert_eq!(report.stats.ok as usize, TOTAL);
    assert_eq!(report.stats.dead_lettered, 0);
    assert_eq!(report.stats.delayed, 0);
    assert_eq!(rec.distinct(), TOTAL);
    assert_eq!(dlq_len(&h).await, 0);
}

/// Every message arrives three times (same `backstop-message-id`): with a
/// dedupe layer the handler runs once per message, and the copies are acked
/// as duplicates.
pub async fn dedupe_handles_each_message_once<B: Backend>(b: &B) {
    const DISTINCT: usize = 15;
    let h = Harness::new(b, "dedupe", fast_policy()).await;
    let rec = Recorder::default();
    let handler = rec.handler(|_: &Context| Ok(()));
    let store = backstop_core::dedupe::MemoryDedupeStore::new();
    let runner = h
        .runner(
            handler,
            options().with_dedupe(backstop_core::dedupe::Dedupe::new(store.clone())),
        )
        .build()
        .expect("valid");
    let stats = runner.stats();
    let running = start(runner);
    for round in 0..3 {
        for n in 0..DISTINCT {
            h.publish(order((round * 100 + n) as u32).with_id(format!("dedupe-{n}")))
                .await;
        }
    }
    eventually("every copy settled", WAIT, || async {
        let s = stats.snapshot();
        s.ok + s.duplicates == 3 * DISTINCT as u64
    })
    .await;
    let report = running.stop().await;
    assert_eq!(rec.len(), DISTINCT, "the handler ran once per message id");
    assert_eq!(rec.distinct(), DISTINCT);
    assert_eq!(report.stats.duplicates, 2 * DISTINCT as u64);
    assert_eq!(store.done_len(), DISTINCT);
    assert_eq!(dlq_len(&h).await, 0);
}
