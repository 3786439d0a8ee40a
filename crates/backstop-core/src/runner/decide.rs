//! What a failed attempt leads to (the README's "what happens to a
//! failure"): the handler's fallback, the circuit breaker holding the
//! message, an immediate retry after its backoff, the retry budget sending
//! it on to its delay tier, the tier, or the DLQ.

use super::ctx::Ctx;
use super::held::Held;
use super::invoke::{Failed, Fallback};
use super::watch::Clock;
use crate::circuit::{self, Verdict};
use crate::error::DeadLetterReason;
use crate::message::RetryMeta;
use crate::observability::OutcomeLabel;
use crate::retry::{AttemptState, Decision, DelayTier, Outcome};
use crate::stats::RunnerStats;
use std::time::SystemTime;
use tower::retry::budget::Budget as _;

/// Where a message's copy goes.
pub(super) enum Target {
    Tier(DelayTier),
    DeadLetter(DeadLetterReason),
    /// A handler's park fallback.
    Park(String),
}

/// A message's attempts so far: from its headers (an owned source's), then
/// counted here.
#[derive(Clone, Copy, Debug)]
pub(super) struct Attempts {
    /// Handler calls over the message's life.
    pub(super) attempt: u32,
    pub(super) state: AttemptState,
    pub(super) first_failed_at: Option<SystemTime>,
}

impl Attempts {
    pub(super) fn resumed(meta: &RetryMeta) -> Self {
        Self {
            attempt: meta.attempt,
            state: AttemptState {
                immediate: 0,
                delayed: meta.delayed_attempts,
            },
            first_failed_at: meta.first_failed_at,
        }
    }

    pub(super) fn begin(&mut self) {
        self.attempt = self.attempt.saturating_add(1);
        self.state.immediate = self.state.immediate.saturating_add(1);
    }

    /// The attempt did not count (the circuit breaker held the message).
    fn undo(&mut self) {
        self.attempt = self.attempt.saturating_sub(1);
        self.state.immediate = self.state.immediate.saturating_sub(1);
    }
}

/// What the path does after a failed attempt.
pub(super) enum Next {
    /// Another attempt now (after the backoff, or once the breaker lets it).
    Retry,
    /// Acked without a copy: the handler skipped it.
    Skip,
    /// Given back to the broker.
    Release(&'static str),
    /// A copy to `Target`, failed at this time.
    Route(Target, SystemTime),
}

/// Decides what follows the failed attempt `failed`; waits out an
/// immediate retry's backoff (unless shutting down).
pub(super) async fn decide<T>(
    ctx: &Ctx<T>,
    failed: &Failed,
    permit: Held<'_>,
    attempts: &mut Attempts,
    clock: &mut Clock<'_>,
) -> Next {
    if let Some(fallback) = &failed.fallback {
        // A fallback says nothing certain about the dependencies (a handler
        // may park precisely because one is down): the permit goes unrecorded.
        drop(permit);
        return match fallback {
            Fallback::Skip => Next::Skip,
            Fallback::Park(destination) => {
                Next::Route(Target::Park(destination.clone()), SystemTime::now())
            }
        };
    }
    let stats = &ctx.shared.stats;
    RunnerStats::bump(&stats.handler_errors);
    ctx.metrics.error(failed.class);
    let verdict = if circuit::counts(failed.class) {
        Verdict::Failure(failed.dependency.as_deref())
    } else {
        Verdict::Ignored
    };
    if permit.record(verdict) {
        // The dependency is down: wait for the breaker instead of spending
        // this message's retries or dead-lettering it.
        RunnerStats::bump(&stats.circuit_held);
        tracing::debug!(class = %failed.class, error = %failed.message, "held by the open circuit breaker");
        attempts.undo();
        return Next::Retry;
    }
    let failed_at = SystemTime::now();
    attempts.first_failed_at.get_or_insert(failed_at);
    let outcome = Outcome::Failed {
        class: failed.class,
        retry_after: failed.retry_after,
    };
    let decision = ctx.route.policy.decide(&outcome, attempts.state);
    tracing::info!(class = %failed.class, error = %failed.message, ?decision, "attempt failed");
    let target = match decision {
        // `decide` acks only successes; should a policy ever ack a failure,
        // give the message back rather than drop it.
        Decision::Ack => {
            tracing::error!("retry policy acked a failure; releasing the message");
            return Next::Release("the retry policy acked a failure");
        }
        Decision::RetryNow(_) if let Some(tier) = budget_spent(ctx, &outcome, attempts.state) => {
            Target::Tier(tier)
        }
        Decision::RetryNow(after) => {
            clock.restart();
            return backoff(ctx, after, &outcome, attempts.state, failed_at).await;
        }
        Decision::Delay(tier) => Target::Tier(tier),
        Decision::DeadLetter(reason) => Target::DeadLetter(reason),
    };
    Next::Route(target, failed_at)
}

/// The tier an immediate retry goes to instead when the retry budget is
/// spent (an outage, not a blip): no more immediate retries for this one.
fn budget_spent<T>(ctx: &Ctx<T>, outcome: &Outcome, state: AttemptState) -> Option<DelayTier> {
    // Withdrawn here, once per retry the policy asks for.
    if ctx.route.budget.as_ref().is_none_or(|b| b.withdraw()) {
        return None;
    }
    let Decision::Delay(tier) = ctx.route.policy.escalate(outcome, state) else {
        return None;
    };
    RunnerStats::bump(&ctx.shared.stats.budget_exhausted);
    ctx.metrics.budget_exhausted.increment(1);
    tracing::debug!(
        tier = tier.name(),
        "retry budget spent: skipping to the delay tier"
    );
    Some(tier)
}

/// Waits out an immediate retry's backoff. Shutting down, the message is
/// not held through it: it goes on its next delay-tier hop now, or, with
/// no tier left, back to the broker rather than to the DLQ early.
async fn backoff<T>(
    ctx: &Ctx<T>,
    after: std::time::Duration,
    outcome: &Outcome,
    state: AttemptState,
    failed_at: SystemTime,
) -> Next {
    let shutting_down = tokio::select! {
        () = tokio::time::sleep(after) => false,
        () = ctx.shutdown.cancelled() => true,
    };
    if !shutting_down {
        RunnerStats::bump(&ctx.shared.stats.retried);
        ctx.metrics.outcome(OutcomeLabel::Retried);
        return Next::Retry;
    }
    match ctx.route.policy.escalate(outcome, state) {
        Decision::Delay(tier) => Next::Route(Target::Tier(tier), failed_at),
        _ => Next::Release("shutdown during backoff"),
    }
}
