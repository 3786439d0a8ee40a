//! Bounds and layers: in-flight work, the circuit breaker, dedupe.

use super::*;

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

/// A handler that fails with the inventory down while `down` is set, and
/// counts its successes in `succeeded` after.
fn inventory_handler(
    rec: &Recorder,
    down: Arc<std::sync::atomic::AtomicBool>,
    succeeded: Arc<AtomicUsize>,
) -> impl backstop_core::Handler<Payload = bytes::Bytes> {
    rec.handler(move |_: &Context| {
        if down.load(Ordering::SeqCst) {
            return Err(HandlerError::transient(InventoryDown(std::io::Error::other(
                "connection refused",
            )))
            .with_dependency("inventory"));
        }
        succeeded.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
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
    let handler = inventory_handler(&rec, down.clone(), succeeded.clone());
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
