//! Faults injected into the broker: a refused copy keeps its original, a
//! lost connection loses nothing.

use super::*;

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
