//! What a delivery is believed: its broker count, its attempt headers
//! on a main source, malformed framework headers.

use super::*;

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
