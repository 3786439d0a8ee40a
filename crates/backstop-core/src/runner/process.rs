//! The path of one delivery: identity, trust rule, attempts, decision, routing.

use super::delivered::Delivered;
use super::invoke::{Failed, Fallback, invoke};
use super::{Route, RunnerStats, Shared, panics, stub};
use crate::circuit::{self, Permit, Verdict};
use crate::dedupe::{Claim, Dedupe, DedupeKey};
use crate::error::DeadLetterReason;
use crate::handler::Context;
use crate::message::{Failure, Message, Origin, RetryMeta, fingerprint, names};
use crate::observability::{OutcomeLabel, RouteMetrics};
use crate::retry::{AttemptState, Decision, DelayTier, Outcome};
use crate::transport::{
    DeadLetterPublisher, DelayPublisher, PublishError, Publisher, Settlement, TransportErrorKind,
};
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::retry::budget::Budget;
use tracing::{Instrument, field};

pub(super) struct Ctx<T> {
    pub(super) shared: Arc<Shared<T>>,
    pub(super) route: Arc<Route>,
    pub(super) metrics: Arc<RouteMetrics>,
    pub(super) shutdown: CancellationToken,
    pub(super) system: &'static str,
    /// Routing of copies runs in tasks of its own, tracked for the drain,
    /// abandoned at the shutdown deadline...
    pub(super) tracker: TaskTracker,
    pub(super) hard: CancellationToken,
    /// ...and bounded: at most this many copies on their way per source.
    pub(super) routing: Arc<Semaphore>,
}

impl<T> Clone for Ctx<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            route: self.route.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            system: self.system,
            tracker: self.tracker.clone(),
            hard: self.hard.clone(),
            routing: self.routing.clone(),
        }
    }
}

impl<T> Ctx<T> {
    /// Whether the task that settled a delivery may take its lane's next one
    /// itself. Not while shutting down, not while the breaker is anything
    /// but closed (intake decides about probes), not with a rate limit (its
    /// tokens are taken at intake).
    pub(super) fn may_go_on(&self) -> bool {
        !self.shared.health.shutting_down()
            && self.route.rate_limit.is_none()
            && self
                .route
                .circuits
                .as_ref()
                .is_none_or(|c| c.state() == circuit::CircuitState::Closed)
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
/// `None` when the header is malformed or the id is all zeros.
pub(crate) fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0'))
    .then_some(trace)
}

enum Target {
    Tier(DelayTier),
    DeadLetter(DeadLetterReason),
    /// A handler's park fallback.
    Park(String),
}

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
    // It panicked outside the handler before: from the second time on,
    // nothing that may have panicked runs again (see `panics`).
    let panicked = ctx.route.panics.get(|| d.id().to_owned());
    if let Some(p) = panicked.as_ref().filter(|p| p.count >= 2) {
        let _in_flight = InFlight::new(ctx);
        if let (Some(c), Some(permit)) = (&ctx.route.circuits, probe) {
            c.record(permit, Verdict::Ignored);
        }
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
    let at = panics::take_location().unwrap_or_else(|| "an unknown place".to_owned());
    let what = format!(
        "backstop panicked {during} at {at}: {}",
        panics::payload_text(payload)
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
struct InFlight<'a> {
    stats: &'a RunnerStats,
    metrics: &'a RouteMetrics,
}

impl<'a> InFlight<'a> {
    fn new<T>(ctx: &'a Ctx<T>) -> Self {
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

async fn handle<T>(
    ctx: &Ctx<T>,
    d: Arc<Delivered>,
    ack: Settlement,
    mut probe: Option<Permit>,
    // The failure of the first attempt, when it panicked outside the handler.
    mut injected: Option<Failed>,
) where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    let stats = &ctx.shared.stats;
    // Liveness: each step below restarts it; waits that are not stuck pause it.
    let mut clock = ctx.route.watch.clock();
    // Trust rule: attempt headers are believed only on framework-owned sources.
    let meta = if d.source.kind.is_owned() {
        let (meta, malformed) = RetryMeta::read(d.message.headers());
        for m in malformed {
            count_malformed(ctx, m.header, &m.reason);
        }
        meta
    } else {
        if let Some(note) = d.message.headers().get_str(names::DROPPED_HEADERS) {
            count_malformed(ctx, names::DROPPED_HEADERS, note);
        }
        RetryMeta::default()
    };
    if let (Some(limit), Some(count)) = (ctx.route.max_deliveries, d.source.delivery_count)
        && count > limit
    {
        if let (Some(c), Some(p)) = (&ctx.route.circuits, probe) {
            c.record(p, Verdict::Ignored);
        }
        let failed = Failed::delivery_limit(count, limit);
        ctx.metrics.error(failed.class);
        tracing::warn!(
            count,
            limit,
            "delivery limit exceeded: dead-lettering without handling"
        );
        let target = Target::DeadLetter(DeadLetterReason::DeliveryLimit);
        let state = AttemptState {
            immediate: 0,
            delayed: meta.delayed_attempts,
        };
        let failed_at = SystemTime::now();
        let copy = replacement(
            ctx,
            &d,
            &failed,
            Progress {
                attempt: meta.attempt,
                state,
                first_failed_at: meta.first_failed_at.or(Some(failed_at)),
                failed_at,
            },
            &target,
        );
        clock.pause();
        route_off(ctx, copy, target, ack, failed).await;
        return;
    }
    let mut state = AttemptState {
        immediate: 0,
        delayed: meta.delayed_attempts,
    };
    let mut attempt = meta.attempt;
    let mut first_failed_at = meta.first_failed_at;
    // Off with info off (see `finish`).
    let span = if tracing::level_enabled!(tracing::Level::INFO) {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    };
    let dedupe_key = ctx
        .route
        .dedupe
        .as_ref()
        .and_then(|dedupe| dedupe_key(ctx, dedupe, &d));
    'attempts: loop {
        // Circuit breaker: wait while it is open (not an attempt).
        let permit = match &ctx.route.circuits {
            Some(_) if probe.is_some() => probe.take(),
            Some(c) => {
                clock.pause();
                let got = tokio::select! {
                    biased;
                    p = c.permit() => Some(p),
                    () = ctx.shutdown.cancelled() => None,
                };
                match got {
                    Some(p) => Some(p),
                    None => {
                        release(ack, "shutdown while the circuit breaker held the message").await;
                        return;
                    }
                }
            }
            None => None,
        };
        // Dedupe: claim the key for this attempt (Ok(Some(owner)): held).
        // A step starts: a retry, or the end of a wait. (The first attempt
        // of a message without waits keeps the clock it started with: one
        // reading of the time per message.)
        if state.immediate > 0 || permit.is_some() || dedupe_key.is_some() {
            clock.restart();
        }
        if dedupe_key.is_some() {
            clock.pause();
        }
        let claimed = match (&ctx.route.dedupe, &dedupe_key) {
            (Some(d), Some(key)) => match claim(ctx, d, key).await {
                Claimed::Go(owner) => Ok(Some(owner)),
                Claimed::Duplicate => {
                    if let (Some(c), Some(p)) = (&ctx.route.circuits, permit) {
                        c.record(p, Verdict::Ignored);
                    }
                    finish(ctx, None, OutcomeLabel::Duplicate);
                    tracing::debug!(key = %key, "duplicate: already processed, acked without handling");
                    if let Err(error) = ack.ack().await {
                        tracing::warn!(%error, "ack of a duplicate failed; it will come again and be skipped again");
                    }
                    return;
                }
                Claimed::Stop => {
                    if let (Some(c), Some(p)) = (&ctx.route.circuits, permit) {
                        c.record(p, Verdict::Ignored);
                    }
                    release(
                        ack,
                        "shutdown while another worker held the message's claim",
                    )
                    .await;
                    return;
                }
                Claimed::Failed(f) => Err(f),
            },
            _ => Ok(None),
        };
        if dedupe_key.is_some() {
            clock.restart();
        }
        attempt = attempt.saturating_add(1);
        state.immediate += 1;
        span.record("backstop.attempt", attempt);
        let result = match claimed {
            Ok(owner) => {
                let handler_ctx = Context {
                    delivered: d.clone(),
                    attempt,
                    delayed_attempts: state.delayed,
                    scope: ctx.route.scope.clone(),
                };
                let started = Instant::now();
                let result = match injected.take() {
                    // The delivery that panicked was this attempt.
                    Some(failed) => Err(failed),
                    None => {
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
                if let (Some(owner), Some(d), Some(key)) = (&owner, &ctx.route.dedupe, &dedupe_key)
                {
                    settle_claim(d, key, owner, result.is_ok()).await;
                }
                result
            }
            Err(f) => Err(f),
        };

        let failed = match result {
            Ok(()) => {
                if let (Some(c), Some(p)) = (&ctx.route.circuits, permit) {
                    c.record(p, Verdict::Success);
                }
                if let Some(budget) = &ctx.route.budget {
                    budget.deposit();
                }
                finish(ctx, origin_time(&d.message), OutcomeLabel::Ok);
                ctx.route.panics.forget(|| d.id().to_owned());
                if let Err(error) = ack.ack().await {
                    tracing::warn!(%error, "ack failed after success; the broker will redeliver (at-least-once)");
                }
                return;
            }
            Err(failed) => failed,
        };
        let (target, failed_at) = 'decide: {
            if let Some(fallback) = &failed.fallback {
                // A fallback says nothing certain about the dependencies (a
                // handler may park precisely because one is down).
                if let (Some(c), Some(p)) = (&ctx.route.circuits, permit) {
                    c.record(p, Verdict::Ignored);
                }
                match fallback {
                    Fallback::Skip => {
                        finish(ctx, origin_time(&d.message), OutcomeLabel::Skipped);
                        tracing::info!(reason = %failed.message, "skipped by the handler");
                        if let Err(error) = ack.ack().await {
                            tracing::warn!(%error, "ack of a skipped message failed; the broker will redeliver");
                        }
                        return;
                    }
                    Fallback::Park(destination) => {
                        break 'decide (Target::Park(destination.clone()), SystemTime::now());
                    }
                }
            }
            RunnerStats::bump(&stats.handler_errors);
            ctx.metrics.error(failed.class);
            if let (Some(c), Some(p)) = (&ctx.route.circuits, permit) {
                let verdict = if circuit::counts(failed.class) {
                    Verdict::Failure(failed.dependency.as_deref())
                } else {
                    Verdict::Ignored
                };
                if c.record(p, verdict) {
                    // The dependency is down: wait for the breaker instead of
                    // spending this message's retries or dead-lettering it.
                    RunnerStats::bump(&stats.circuit_held);
                    tracing::debug!(class = %failed.class, error = %failed.message, "held by the open circuit breaker");
                    attempt -= 1;
                    state.immediate -= 1;
                    continue 'attempts;
                }
            }
            let failed_at = SystemTime::now();
            first_failed_at.get_or_insert(failed_at);
            let outcome = Outcome::Failed {
                class: failed.class,
                retry_after: failed.retry_after,
            };
            let decision = ctx.route.policy.decide(&outcome, state);
            tracing::info!(class = %failed.class, error = %failed.message, ?decision, "attempt failed");
            let target = match decision {
                Decision::Ack => {
                    // `decide` acks only successes; should a policy ever ack a failure,
                    // give the message back rather than drop it.
                    tracing::error!("retry policy acked a failure; releasing the message");
                    let _ = ack.nack().await;
                    return;
                }
                Decision::RetryNow(_)
                    if ctx.route.budget.as_ref().is_some_and(|b| !b.withdraw())
                        && let Decision::Delay(tier) =
                            ctx.route.policy.escalate(&outcome, state) =>
                {
                    // The retry budget is spent (an outage, not a blip): no more
                    // immediate retries for this one, straight to its delay tier.
                    RunnerStats::bump(&stats.budget_exhausted);
                    ctx.metrics.budget_exhausted.increment(1);
                    tracing::debug!(
                        tier = tier.name(),
                        "retry budget spent: skipping to the delay tier"
                    );
                    Target::Tier(tier)
                }
                Decision::RetryNow(after) => {
                    clock.restart();
                    let shutting_down = tokio::select! {
                        _ = tokio::time::sleep(after) => false,
                        _ = ctx.shutdown.cancelled() => true,
                    };
                    if !shutting_down {
                        RunnerStats::bump(&stats.retried);
                        ctx.metrics.outcome(OutcomeLabel::Retried);
                        continue 'attempts;
                    }
                    // Shutting down: do not hold the message through its backoff. Send it
                    // on its next delay-tier hop now, or, with no tier left, give it back
                    // to the broker rather than dead-letter it early.
                    match ctx.route.policy.escalate(&outcome, state) {
                        Decision::Delay(tier) => Target::Tier(tier),
                        _ => {
                            release(ack, "shutdown during backoff").await;
                            return;
                        }
                    }
                }
                Decision::Delay(tier) => Target::Tier(tier),
                Decision::DeadLetter(reason) => Target::DeadLetter(reason),
            };
            (target, failed_at)
        };
        let copy = replacement(
            ctx,
            &d,
            &failed,
            Progress {
                attempt,
                state,
                first_failed_at,
                failed_at,
            },
            &target,
        );
        // Waiting for a routing slot is not stuck; the routing has a clock
        // of its own.
        clock.pause();
        route_off(ctx, copy, target, ack, failed).await;
        return;
    }
}

/// Gives a message back to the broker for redelivery.
async fn release(ack: Settlement, why: &str) {
    tracing::info!("{why}: released for redelivery");
    if let Err(error) = ack.nack().await {
        tracing::warn!(%error, "nack failed; the broker redelivers unacked messages on reconnect");
    }
}

/// The store key: namespaced by group and handler, so two services (or two
/// handlers of one) reading the same message each handle it once.
/// `None` when the message has no key but one derived from its content: two
/// distinct messages with the same payload would look like duplicates, so
/// such a message is handled without dedupe (warned once per handler).
fn dedupe_key<T>(ctx: &Ctx<T>, dedupe: &Dedupe, d: &Delivered) -> Option<String> {
    let key = match &dedupe.key {
        DedupeKey::Header(h) => d.message.headers().get_str(h),
        DedupeKey::MessageId => None,
    };
    let key = match key {
        Some(k) => k,
        None if !d.content_id() => d.id(),
        None => {
            if !ctx
                .route
                .content_id_warned
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    "dedupe skipped: messages arrive without an id (no backstop-message-id, \
                     no AMQP message-id, no broker position); set one at the producer"
                );
            }
            return None;
        }
    };
    Some(format!(
        "{}/{}/{}",
        ctx.route.subscription.group, ctx.route.name, key
    ))
}

enum Claimed {
    /// Claimed by this owner.
    Go(String),
    Duplicate,
    Stop,
    Failed(Failed),
}

/// Claims `key`; while another worker holds a live claim, waits (it may
/// finish, or crash and let its lease run out).
async fn claim<T>(ctx: &Ctx<T>, d: &Dedupe, key: &str) -> Claimed {
    // Unique per claim, so a claimant whose lease ran out cannot release a
    // later claim; made only when dedupe is on.
    let owner = uuid::Uuid::now_v7().to_string();
    let lease = d.lease_for(ctx.route.timeout);
    let poll = (lease / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        match d.store.claim(key, &owner, lease).await {
            Ok(Claim::Claimed) => return Claimed::Go(owner),
            Ok(Claim::Done) => return Claimed::Duplicate,
            Ok(Claim::Busy) => {
                tracing::debug!(key, "claimed by another worker; waiting");
                tokio::select! {
                    () = tokio::time::sleep(poll) => {}
                    () = ctx.shutdown.cancelled() => return Claimed::Stop,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "dedupe store unavailable");
                return Claimed::Failed(Failed::dedupe_store(&e));
            }
        }
    }
}

/// After the handler ran: done on success (for the retention), released on
/// failure so a retry can claim it. A store error here only costs dedupe: a
/// done mark that did not stick lets a later duplicate through (logged).
async fn settle_claim(d: &Dedupe, key: &str, owner: &str, ok: bool) {
    let r = if ok {
        d.store.complete(key, owner, d.retention).await
    } else {
        d.store.release(key, owner).await
    };
    if let Err(error) = r {
        tracing::warn!(%error, key, ok, "dedupe store: could not record the outcome; the lease expires on its own");
    }
}

struct Progress {
    attempt: u32,
    state: AttemptState,
    first_failed_at: Option<SystemTime>,
    failed_at: SystemTime,
}

fn count_malformed<T>(ctx: &Ctx<T>, header: &'static str, reason: &str) {
    RunnerStats::bump(&ctx.shared.stats.malformed_headers);
    ctx.metrics.malformed_header(header);
    tracing::warn!(header, reason, "malformed framework header ignored");
}

fn origin_time(message: &Message) -> Option<SystemTime> {
    Origin::read(message.headers())
        .0
        .and_then(|o| o.timestamp)
        .or(message.timestamp())
}

fn finish<T>(ctx: &Ctx<T>, origin: Option<SystemTime>, outcome: OutcomeLabel) {
    let stats = &ctx.shared.stats;
    match outcome {
        OutcomeLabel::Ok => RunnerStats::bump(&stats.ok),
        OutcomeLabel::Delayed => RunnerStats::bump(&stats.delayed),
        OutcomeLabel::DeadLettered => RunnerStats::bump(&stats.dead_lettered),
        OutcomeLabel::FailedToRoute => RunnerStats::bump(&stats.failed_to_route),
        OutcomeLabel::Retried => RunnerStats::bump(&stats.retried),
        OutcomeLabel::Duplicate => RunnerStats::bump(&stats.duplicates),
        OutcomeLabel::Parked => RunnerStats::bump(&stats.parked),
        OutcomeLabel::Skipped => RunnerStats::bump(&stats.skipped),
        OutcomeLabel::Unroutable => RunnerStats::bump(&stats.unroutable),
    }
    ctx.metrics.outcome(outcome);
    // The handling span is an info span: with info off (the usual warn
    // level of a busy consumer) there is nothing to record, and looking
    // the current span up costs more than the rest of this function.
    if tracing::level_enabled!(tracing::Level::INFO) {
        tracing::Span::current().record("backstop.outcome", outcome.as_str());
    }
    if matches!(outcome, OutcomeLabel::Ok | OutcomeLabel::DeadLettered)
        && let Some(age) = origin.and_then(|t| SystemTime::now().duration_since(t).ok())
    {
        ctx.metrics.end_to_end.record(age.as_secs_f64());
    }
}

/// The copy that replaces the original in a tier or the DLQ: identity, key,
/// payload and application headers kept; origin set once; attempt headers
/// rewritten; failure headers replaced.
fn replacement<T>(
    ctx: &Ctx<T>,
    d: &Delivered,
    failed: &Failed,
    p: Progress,
    target: &Target,
) -> Message {
    let (message, source) = (&d.message, &d.source);
    let mut copy = message.clone();
    if copy.id().is_none() {
        // Derived on consume: the copy carries it, so its next delivery,
        // replays and dedupe see the same id.
        copy.headers_mut()
            .insert(names::MESSAGE_ID, d.id().to_owned());
    }
    bound_id(ctx, &mut copy);
    // Trust rule (HEADERS.md): origin headers are believed only on sources
    // the framework owns. On a main source they are what a producer wrote:
    // replaced by the delivery this worker received, so nobody picks where
    // a replay publishes.
    let kept = source.kind.is_owned() && {
        let (origin, malformed) = Origin::read(copy.headers());
        for m in malformed {
            count_malformed(ctx, m.header, &m.reason);
        }
        origin.is_some()
    };
    let headers = copy.headers_mut();
    if !kept {
        Origin {
            source: source.source.to_string(),
            partition: source.partition,
            offset: source.offset,
            timestamp: message.timestamp(),
            group: Some(ctx.route.subscription.group.clone()),
        }
        .write(headers);
    }
    let (delayed_attempts, retry_tier, due_at, reason) = match target {
        Target::Tier(tier) => (
            p.state.delayed + 1,
            Some(tier.name().to_owned()),
            Some(ceil_millis(p.failed_at + tier.delay())),
            None,
        ),
        Target::DeadLetter(reason) => (p.state.delayed, None, None, Some(*reason)),
        Target::Park(_) => (p.state.delayed, None, None, None),
    };
    RetryMeta {
        attempt: p.attempt,
        delayed_attempts,
        retry_tier,
        due_at,
        first_failed_at: p.first_failed_at,
    }
    .write(headers);
    failure(ctx, failed, p.failed_at, reason).write(headers);
    if let Some(p) = &ctx.shared.propagation {
        p.on_publish(headers, &tracing::Span::current());
    }
    copy
}

/// The DLQ copy of a message whose processing panicked again: its own key,
/// payload and headers with the framework's attempt and origin headers
/// left as they came, its id, and the failure headers. Nothing else is
/// read or written, so whatever panicked on the usual path is not on this
/// one.
fn panic_stub<T>(ctx: &Ctx<T>, d: &Delivered, failed: &Failed, target: &Target) -> Message {
    let mut copy = d.message.clone();
    let headers = copy.headers_mut();
    if d.message.id().is_none() {
        headers.insert(names::MESSAGE_ID, d.id().to_owned());
    }
    bound_id(ctx, &mut copy);
    let headers = copy.headers_mut();
    let reason = match target {
        Target::DeadLetter(reason) => Some(*reason),
        Target::Tier(_) | Target::Park(_) => None,
    };
    failure(ctx, failed, SystemTime::now(), reason).write(headers);
    copy
}

/// A copy's id over 4 KiB is malformed: counted, and replaced by its
/// digest (HEADERS.md, "Limits").
fn bound_id<T>(ctx: &Ctx<T>, copy: &mut Message) {
    if let Some(short) = copy.id().and_then(stub::bounded_id) {
        count_malformed(
            ctx,
            names::MESSAGE_ID,
            "longer than 4 KiB: replaced by its SHA-256",
        );
        copy.headers_mut().insert(names::MESSAGE_ID, short);
    }
}

/// The failure headers of a copy.
fn failure<T>(
    ctx: &Ctx<T>,
    failed: &Failed,
    failed_at: SystemTime,
    dead_letter_reason: Option<DeadLetterReason>,
) -> Failure {
    Failure {
        class: failed.class,
        error_type: failed.error_type.clone(),
        message: failed.message.clone(),
        chain: failed.chain.clone(),
        fingerprint: fingerprint(failed.class, &failed.error_type, &failed.message),
        failed_at,
        handler: ctx.route.name.to_string(),
        host: ctx.shared.host.clone(),
        dead_letter_reason,
    }
}

async fn send<T>(ctx: &Ctx<T>, target: &Target, copy: Message) -> Result<(), PublishError>
where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    let sub = &ctx.route.subscription;
    match target {
        Target::Tier(tier) => ctx.shared.transport.publish_delayed(sub, tier, copy).await,
        Target::DeadLetter(_) => ctx.shared.transport.publish_dead_letter(sub, copy).await,
        Target::Park(destination) => ctx.shared.transport.publish(destination, copy).await,
    }
}

/// Headers carry milliseconds: round a due time up, so that a consumer honouring
/// `backstop-due-at` never wakes before the full delay has passed.
fn ceil_millis(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let sub_ms = since.subsec_nanos() % 1_000_000;
    if sub_ms == 0 {
        t
    } else {
        t + std::time::Duration::from_nanos(u64::from(1_000_000 - sub_ms))
    }
}

/// Publishes the replacement (with a few tries), and only once the broker has
/// confirmed it acks the original. If it cannot be published, the original is
/// given back to the broker for redelivery: at-least-once, nothing lost.
/// Publishes the copy and settles the original in a task of its own: the
/// message's outcome is decided, so neither its in-flight slot nor what
/// follows it in its lane waits for the broker's confirm (only the commit
/// does: [`Settlement::release`]). Waits only for a routing permit.
async fn route_off<T>(ctx: &Ctx<T>, copy: Message, target: Target, ack: Settlement, failed: Failed)
where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    let Ok(permit) = ctx.routing.clone().acquire_owned().await else {
        return; // never closed
    };
    ack.release();
    let ctx = ctx.clone();
    let span = tracing::Span::current();
    let tracker = ctx.tracker.clone();
    tracker.spawn(async move {
        let _permit = permit;
        let _in_flight = InFlight::new(&ctx);
        let _clock = ctx.route.watch.clock();
        // The copy carries the message's id (see `replacement`).
        let id = copy.id().map(str::to_owned);
        let routed = AssertUnwindSafe(
            route(&ctx, copy, target, ack, &failed, id.as_deref()).instrument(span),
        )
        .catch_unwind();
        tokio::select! {
            biased;
            () = ctx.hard.cancelled() => RunnerStats::bump(&ctx.shared.stats.abandoned),
            r = routed => {
                // The settlement gave the original back as the panic unwound.
                if let (Err(payload), Some(id)) = (r, id) {
                    panicked(&ctx, &id, "routing a copy", payload.as_ref());
                }
            }
        }
    });
}

/// Writes `keep` (its copy for `what` refused: `why`) to the local
/// unroutable store; `Err` when the store could not keep it either (the
/// original is then given back).
async fn keep_unroutable<T>(
    ctx: &Ctx<T>,
    keep: &Message,
    what: &str,
    why: &str,
    id: Option<&str>,
) -> Result<(), ()>
where
    T: DeadLetterPublisher,
{
    let destination = ctx
        .shared
        .transport
        .dead_letter_destination(&ctx.route.subscription);
    match ctx.shared.unroutable.write(keep, &destination, why).await {
        Ok(path) => {
            tracing::error!(error = %why, path = %path.display(), "{what} would not take the message; it is kept in the local unroutable store (`backstop unroutable list`)");
            if let Some(id) = id {
                ctx.route.panics.forget(|| id.to_owned());
            }
            Ok(())
        }
        Err(io) => {
            tracing::error!(error = %io, store = %ctx.shared.unroutable.dir().display(), "{what} would not take the message and the unroutable store could not keep it");
            Err(())
        }
    }
}

/// Acks an original kept in the unroutable store.
async fn settle_kept(ack: Settlement) {
    if let Err(error) = ack.ack().await {
        tracing::warn!(%error, "ack of the original failed after it was stored; a duplicate may follow (at-least-once)");
    }
}

/// How far a refused copy has been cut down (see `stub`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    Whole,
    /// Failure headers cut.
    Slim,
    /// Refused by its tier or park destination even slimmed: to the DLQ.
    Redirected,
    /// The payload left out.
    Stub,
}

/// `id`: the copy's message id, forgotten by the panic ledger once the
/// original is settled.
async fn route<T>(
    ctx: &Ctx<T>,
    mut copy: Message,
    target: Target,
    ack: Settlement,
    failed: &Failed,
    id: Option<&str>,
) where
    T: DelayPublisher + DeadLetterPublisher + Publisher,
{
    let (outcome, what) = match &target {
        Target::Tier(tier) => (OutcomeLabel::Delayed, format!("delay tier {}", tier.name())),
        Target::DeadLetter(reason) => (OutcomeLabel::DeadLettered, format!("DLQ ({reason})")),
        Target::Park(destination) => (OutcomeLabel::Parked, format!("parking {destination}")),
    };
    let origin = origin_time(&copy);
    let attempts = ctx.shared.route_attempts;
    let (mut target, mut what, mut outcome) = (target, what, outcome);
    let mut cut = Cut::Whole;
    // The copy as first refused, kept for the unroutable store.
    let mut whole: Option<Message> = None;
    let mut n = 0;
    while n < attempts {
        n += 1;
        match send(ctx, &target, copy).await {
            Ok(()) => {
                finish(ctx, origin, outcome);
                if matches!(target, Target::DeadLetter(_) | Target::Park(_)) {
                    tracing::warn!(class = %failed.class, error = %failed.message, "dead-lettered to {what}");
                } else {
                    tracing::info!(class = %failed.class, error = %failed.message, "sent to {what}");
                }
                if let Some(id) = id {
                    ctx.route.panics.forget(|| id.to_owned());
                    ctx.route.unrouted.forget(|| id.to_owned());
                }
                if let Err(error) = ack.ack().await {
                    tracing::warn!(%error, "ack of the original failed after its copy was confirmed; a duplicate may follow (at-least-once)");
                }
                return;
            }
            Err(e) if e.error.kind() == TransportErrorKind::Invalid && cut != Cut::Stub => {
                // Refused for good, most likely too large once the failure
                // headers were added (the original fitted): cut the copy
                // down step by step and try again at once. A message whose
                // copy never fits still ends, in the DLQ, never in a loop
                // of redeliveries and handler runs.
                let refused = e.error.to_string();
                copy = e.into_message();
                if whole.is_none() {
                    whole = Some(copy.clone());
                }
                n -= 1;
                cut = match (cut, &target) {
                    (Cut::Whole, _) => {
                        tracing::warn!(error = %refused, "{what} refused the copy; retrying with the error chain dropped and the message cut");
                        copy = stub::slim(copy);
                        Cut::Slim
                    }
                    (Cut::Slim, Target::Tier(_) | Target::Park(_)) => {
                        tracing::warn!(error = %refused, "{what} refused even the slimmed copy; dead-lettering it instead");
                        let reason = DeadLetterReason::Permanent;
                        copy.headers_mut()
                            .insert(names::DEAD_LETTER_REASON, reason.as_str());
                        target = Target::DeadLetter(reason);
                        (what, outcome) = (format!("DLQ ({reason})"), OutcomeLabel::DeadLettered);
                        Cut::Redirected
                    }
                    (Cut::Slim | Cut::Redirected, _) | (Cut::Stub, _) => {
                        tracing::error!(error = %refused, "{what} refused the copy; dead-lettering a stub (headers, payload size and SHA-256, no payload)");
                        copy = stub::payload_stub(copy);
                        Cut::Stub
                    }
                };
            }
            Err(e) if e.error.kind() == TransportErrorKind::Invalid => {
                // Even the stub refused, for good: no redelivery can end
                // otherwise. Kept locally, whole, then the original goes.
                let refused = e.error.to_string();
                let keep = whole.take().unwrap_or_else(|| e.into_message());
                if keep_unroutable(ctx, &keep, &what, &refused, id)
                    .await
                    .is_ok()
                {
                    finish(ctx, origin, OutcomeLabel::Unroutable);
                    settle_kept(ack).await;
                    return;
                }
                copy = keep;
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e.error, attempt = n, attempts, "publishing to {what} failed");
                copy = e.into_message();
                if n < attempts {
                    tokio::time::sleep(ctx.shared.route_backoff.delay(n)).await;
                }
            }
        }
    }
    // The same message unroutable delivery after delivery: its destination
    // will not take it; keep it locally rather than go round for ever.
    if let Some(id) = id {
        let rounds = ctx.route.unrouted.record(id, what.clone());
        if rounds >= ctx.shared.unroutable_after {
            let keep = whole.unwrap_or(copy);
            let why = format!("{what} refused the copy on {rounds} deliveries");
            if keep_unroutable(ctx, &keep, &what, &why, Some(id))
                .await
                .is_ok()
            {
                ctx.route.unrouted.forget(|| id.to_owned());
                finish(ctx, origin, OutcomeLabel::Unroutable);
                settle_kept(ack).await;
                return;
            }
        }
    }
    finish(ctx, origin, OutcomeLabel::FailedToRoute);
    tracing::error!("could not publish to {what}; the original is released for redelivery");
    if let Err(error) = ack.nack().await {
        tracing::warn!(%error, "nack failed; the broker redelivers unacked messages on reconnect");
    }
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{t}-00f067aa0ba902b7-01")), Some(t));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }
}
