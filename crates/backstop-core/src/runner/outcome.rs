//! How a message's path ends: its outcome counted (stats, metrics, the
//! handling span, end-to-end latency), or the message given back.

use super::ctx::Ctx;
use crate::message::{Message, Origin};
use crate::observability::OutcomeLabel;
use crate::stats::RunnerStats;
use crate::transport::Settlement;
use std::time::SystemTime;

/// When the message first entered the system: its origin's timestamp (a
/// copy's), else its own.
pub(super) fn origin_time(message: &Message) -> Option<SystemTime> {
    Origin::read(message.headers())
        .0
        .and_then(|o| o.timestamp)
        .or(message.timestamp())
}

pub(super) fn finish<T>(ctx: &Ctx<T>, origin: Option<SystemTime>, outcome: OutcomeLabel) {
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

/// Gives a message back to the broker for redelivery.
pub(super) async fn release(ack: Settlement, why: &str) {
    tracing::info!("{why}: released for redelivery");
    if let Err(error) = ack.nack().await {
        tracing::warn!(%error, "nack failed; the broker redelivers unacked messages on reconnect");
    }
}
