//! Shutdown: drained, stopped at the deadline, or during a backoff.

use super::*;

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
