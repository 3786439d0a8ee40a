//! What happens to a message: handled, retried in process or through a
//! tier, dead-lettered with every header, by error class, hint and timeout.

use super::*;

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

    assert_failure_headers(&dead);
}

/// The failure headers of the exhausted dead letter: the error, its chain
/// and fingerprint, the handler and host, the reason, each header once.
fn assert_failure_headers(dead: &Message) {
    assert_eq!(header(dead, names::ERROR_CLASS), "transient");
    assert!(header(dead, names::ERROR_TYPE).ends_with("InventoryDown"));
    assert_eq!(
        header(dead, names::ERROR_MESSAGE),
        "inventory service unavailable"
    );
    assert_eq!(
        header(dead, names::ERROR_CHAIN),
        "inventory service unavailable\nconnection refused (port 8080)"
    );
    let fp = header(dead, names::ERROR_FINGERPRINT);
    assert!(
        fp.len() == 16 && fp.bytes().all(|c| c.is_ascii_hexdigit()),
        "{fp}"
    );
    assert_eq!(header(dead, names::HANDLER), "conformance");
    assert!(!header(dead, names::HOST).is_empty());
    assert_eq!(header(dead, names::DEAD_LETTER_REASON), "exhausted");
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
