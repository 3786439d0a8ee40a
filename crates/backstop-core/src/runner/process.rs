//! The path of one delivery, step by step (each step a file of its own):
//! `trust` (headers and delivery limit), the circuit breaker's leave
//! (`held`), `claim` (dedupe), the handler call (`invoke`), `decide` (a
//! failure to its next step), `copy` and `route` (the replacement and its
//! way to a tier or the DLQ), `outcome` (what is counted at the end).

use super::claim::{Claimed, claim, dedupe_key, settle_claim};
use super::copy::{panic_stub, replacement};
use super::ctx::Ctx;
use super::decide::{Attempts, Next, Target, decide};
use super::held::Held;
use super::invoke::{Failed, invoke};
use super::outcome::{finish, origin_time, release};
use super::route::route_off;
use super::trust::{over_delivery_limit, retry_meta, trace_id};
use super::watch::Clock;
use crate::circuit::{Permit, Verdict};
use crate::delivered::Delivered;
use crate::error::DeadLetterReason;
use crate::handler::Context;
use crate::message::names;
use crate::observability::{OutcomeLabel, RouteMetrics};
use crate::stats::RunnerStats;
use crate::transport::{DeadLetterPublisher, DelayPublisher, Publisher, Settlement};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tower::retry::budget::Budget as _;
use tracing::{Instrument, field};

/// Handles one delivery until it is settled or its copy is on its way (see
/// `route_off`).
pub(super) async fn process<T>(
    ctx: &Ctx<T>,
    d: Arc<Delivered>,
    ack: Settlement,
    probe: Option<Permit>,
) where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    let probe = Held::new(ctx.route.circuits.as_ref(), probe);
    // It panicked outside the handler before: from the second time on,
    // nothing that may have panicked runs again (see `panics`).
    let panicked = ctx.route.panics.get(|| d.id().to_owned());
    if let Some(p) = panicked.as_ref().filter(|p| p.count >= 2) {
        let _in_flight = InFlight::new(ctx);
        drop(probe);
        let failed = Failed::outside_handler(&p.what);
        let target = Target::DeadLetter(DeadLetterReason::Permanent);
        let copy = panic_stub(ctx, &d, &failed, &target);
        route_off(ctx, copy, target, ack, failed).await;
        return;
    }
    let span = tracing::info_span!(
        "backstop.handle",
        messaging.system = ctx.system,
        messaging.destination.name = %d.source.source,
        messaging.message.id = %d.id_field(),
        backstop.handler = %ctx.route.name,
        backstop.attempt = field::Empty,
        backstop.outcome = field::Empty,
        trace_id = field::Empty,
    );
    // W3C trace context: the trace id joins this delivery's logs to the
    // producer's trace (the header itself travels on with every copy).
    if !span.is_disabled()
        && let Some(trace) = d
            .message
            .headers()
            .get_str(names::TRACEPARENT)
            .and_then(trace_id)
    {
        span.record("trace_id", trace);
    }
    if let Some(p) = &ctx.shared.propagation {
        p.on_consume(d.message.headers(), &span);
    }
    let _in_flight = InFlight::new(ctx);
    let injected = panicked.map(|p| Failed::outside_handler(&p.what));
    if span.is_disabled() {
        // No span to enter on every poll, and one move less of a future of
        // kilobytes per message.
        handle(ctx, d, ack, probe, injected).await;
    } else {
        handle(ctx, d, ack, probe, injected).instrument(span).await;
    }
}

/// Message `id` panicked outside the handler `during` its processing or
/// the routing of its copy (caught by the task that ran it): its
/// settlement gave it back as the panic unwound, and the ledger makes its
/// next delivery end it (see `panics`).
pub(super) fn panicked<T>(
    ctx: &Ctx<T>,
    id: &str,
    during: &str,
    payload: &(dyn std::any::Any + Send),
) {
    let at = super::panics::take_location().unwrap_or_else(|| "an unknown place".to_owned());
    let what = format!(
        "backstop panicked {during} at {at}: {}",
        super::panics::payload_text(payload)
    );
    let count = ctx.route.panics.record(id, what.clone());
    RunnerStats::bump(&ctx.shared.stats.panics);
    ctx.metrics.error(crate::error::ErrorClass::Panic);
    tracing::error!(
        message.id = %id,
        count,
        "{what}; the message is given back and ended when it comes again"
    );
}

/// Counts a delivery as in flight from intake to settlement, including when its
/// task is dropped at the shutdown deadline.
pub(super) struct InFlight<'a> {
    stats: &'a RunnerStats,
    metrics: &'a RouteMetrics,
}

impl<'a> InFlight<'a> {
    pub(super) fn new<T>(ctx: &'a Ctx<T>) -> Self {
        RunnerStats::bump(&ctx.shared.stats.in_flight);
        ctx.metrics.inflight.increment(1.0);
        Self {
            stats: &ctx.shared.stats,
            metrics: &ctx.metrics,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.inflight.decrement(1.0);
    }
}

/// The attempts of one delivery, as the README's "what happens to a
/// failure" table reads: trusted headers, the delivery limit, then per
/// attempt the breaker's leave, the dedupe claim, the handler, and on
/// failure the decision.
async fn handle<T>(
    ctx: &Ctx<T>,
    d: Arc<Delivered>,
    ack: Settlement,
    mut probe: Held<'_>,
    // The failure of the first attempt, when it panicked outside the handler.
    mut injected: Option<Failed>,
) where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    // Liveness: each step below restarts it; waits that are not stuck pause it.
    let mut clock = ctx.route.watch.clock();
    let mut attempts = Attempts::resumed(&retry_meta(ctx, &d));
    if let Some(failed) = over_delivery_limit(ctx, &d) {
        drop(probe);
        let failed_at = SystemTime::now();
        attempts.first_failed_at.get_or_insert(failed_at);
        let target = Target::DeadLetter(DeadLetterReason::DeliveryLimit);
        clock.pause();
        return copied(ctx, &d, ack, failed, (&attempts, failed_at), target).await;
    }
    // Off with info off (see `finish`).
    let span = if tracing::level_enabled!(tracing::Level::INFO) {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    };
    let key = ctx
        .route
        .dedupe
        .as_ref()
        .and_then(|dedupe| dedupe_key(ctx, dedupe, &d));
    loop {
        let Some(permit) = leave(ctx, &mut probe, &mut clock).await else {
            release(ack, "shutdown while the circuit breaker held the message").await;
            return;
        };
        // A step starts: a retry, or the end of a wait. (The first attempt
        // of a message without waits keeps the clock it started with: one
        // reading of the time per message.)
        if attempts.state.immediate > 0 || permit.is_some() || key.is_some() {
            clock.restart();
        }
        let owner = match claimed(ctx, key.as_deref(), &mut clock).await {
            Claimed::Go(owner) => Ok(owner),
            Claimed::Duplicate => {
                drop(permit);
                return duplicate(ctx, key.as_deref(), ack).await;
            }
            Claimed::Stop => {
                drop(permit);
                let why = "shutdown while another worker held the message's claim";
                return release(ack, why).await;
            }
            Claimed::Failed(f) => Err(f),
        };
        attempts.begin();
        span.record("backstop.attempt", attempts.attempt);
        let result = match owner {
            Ok(owner) => attempt(ctx, &d, &attempts, injected.take(), key.as_deref(), owner).await,
            Err(f) => Err(f),
        };
        let failed = match result {
            Ok(()) => return succeeded(ctx, &d, permit, ack).await,
            Err(failed) => failed,
        };
        let (target, failed_at) =
            match decide(ctx, &failed, permit, &mut attempts, &mut clock).await {
                Next::Retry => continue,
                Next::Skip => return skipped(ctx, &d, &failed, ack).await,
                Next::Release(why) => return release(ack, why).await,
                Next::Route(target, failed_at) => (target, failed_at),
            };
        // Waiting for a routing slot is not stuck; the routing has a clock
        // of its own.
        clock.pause();
        return copied(ctx, &d, ack, failed, (&attempts, failed_at), target).await;
    }
}

/// The message goes on as a copy to `target` (see `route_off`).
async fn copied<T>(
    ctx: &Ctx<T>,
    d: &Delivered,
    ack: Settlement,
    failed: Failed,
    at: (&Attempts, SystemTime),
    target: Target,
) where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    let copy = replacement(ctx, d, &failed, at, &target);
    route_off(ctx, copy, target, ack, failed).await;
}

/// Already handled (dedupe): acked without handling.
async fn duplicate<T>(ctx: &Ctx<T>, key: Option<&str>, ack: Settlement) {
    finish(ctx, None, OutcomeLabel::Duplicate);
    tracing::debug!(key = ?key, "duplicate: already processed, acked without handling");
    if let Err(error) = ack.ack().await {
        tracing::warn!(%error, "ack of a duplicate failed; it will come again and be skipped again");
    }
}

/// The circuit breaker's leave for an attempt (waiting for it is not an
/// attempt): the probe intake took for this message, or a permit once no
/// breaker is open. `None`: shutdown came first.
async fn leave<'a, T>(
    ctx: &'a Ctx<T>,
    probe: &mut Held<'a>,
    clock: &mut Clock<'_>,
) -> Option<Held<'a>> {
    let Some(c) = &ctx.route.circuits else {
        return Some(Held::none());
    };
    if probe.is_some() {
        return Some(std::mem::replace(probe, Held::none()));
    }
    clock.pause();
    tokio::select! {
        biased;
        p = c.permit() => Some(Held::new(Some(c), Some(p))),
        () = ctx.shutdown.cancelled() => None,
    }
}

/// The dedupe claim for an attempt; waiting on the store is not stuck.
async fn claimed<T>(ctx: &Ctx<T>, key: Option<&str>, clock: &mut Clock<'_>) -> Claimed {
    if key.is_none() {
        return Claimed::Go(None);
    }
    clock.pause();
    let claimed = claim(ctx, key).await;
    clock.restart();
    claimed
}

/// One handler call (or the panic injected for it), timed; the claim
/// settled with its result.
async fn attempt<T>(
    ctx: &Ctx<T>,
    d: &Arc<Delivered>,
    attempts: &Attempts,
    injected: Option<Failed>,
    key: Option<&str>,
    owner: Option<String>,
) -> Result<(), Failed> {
    let result = match injected {
        // The delivery that panicked was this attempt.
        Some(failed) => Err(failed),
        None => {
            let handler_ctx = Context {
                delivered: d.clone(),
                attempt: attempts.attempt,
                delayed_attempts: attempts.state.delayed,
                scope: ctx.route.scope.clone(),
            };
            let started = Instant::now();
            let result = invoke(
                ctx.route.handler.as_ref(),
                ctx.route.timeout,
                started,
                &d.message,
                handler_ctx,
            )
            .await;
            ctx.metrics.duration.record(started.elapsed().as_secs_f64());
            result
        }
    };
    if let (Some(key), Some(owner)) = (key, owner) {
        settle_claim(ctx, key, &owner, result.is_ok()).await;
    }
    result
}

/// The handler succeeded: counted everywhere, then acked.
async fn succeeded<T>(ctx: &Ctx<T>, d: &Delivered, permit: Held<'_>, ack: Settlement) {
    permit.record(Verdict::Success);
    if let Some(budget) = &ctx.route.budget {
        budget.deposit();
    }
    finish(ctx, origin_time(&d.message), OutcomeLabel::Ok);
    ctx.route.panics.forget(|| d.id().to_owned());
    if let Err(error) = ack.ack().await {
        tracing::warn!(%error, "ack failed after success; the broker will redeliver (at-least-once)");
    }
}

/// The handler skipped the message: acked without a copy.
async fn skipped<T>(ctx: &Ctx<T>, d: &Delivered, failed: &Failed, ack: Settlement) {
    finish(ctx, origin_time(&d.message), OutcomeLabel::Skipped);
    tracing::info!(reason = %failed.message, "skipped by the handler");
    if let Err(error) = ack.ack().await {
        tracing::warn!(%error, "ack of a skipped message failed; the broker will redeliver");
    }
}
