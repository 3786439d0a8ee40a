//! Routing a copy: published (tried a few times, cut down when refused for
//! good), then the original acked; kept in the local unroutable store when
//! no destination will take it; the original given back otherwise.

use super::ctx::Ctx;
use super::decide::Target;
use super::invoke::Failed;
use super::outcome::{finish, origin_time};
use super::process::{InFlight, panicked};
use super::stub;
use crate::error::DeadLetterReason;
use crate::message::{Message, names};
use crate::observability::OutcomeLabel;
use crate::stats::RunnerStats;
use crate::transport::{
    DeadLetterPublisher, DelayPublisher, PublishError, Publisher, Settlement, TransportErrorKind,
};
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::time::SystemTime;
use tracing::Instrument as _;

/// Publishes the copy and settles the original in a task of its own (see
/// `route`: the original is acked only once the broker confirmed the copy,
/// given back when it cannot be published; at-least-once, nothing lost): the
/// message's outcome is decided, so neither its in-flight slot nor what
/// follows it in its lane waits for the broker's confirm (only the commit
/// does: [`Settlement::release`]). Waits only for a routing permit.
pub(super) async fn route_off<T>(
    ctx: &Ctx<T>,
    copy: Message,
    target: Target,
    ack: Settlement,
    failed: Failed,
) where
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

/// A copy on its way: where to, and how far it has been cut down.
struct Way {
    target: Target,
    /// The destination, for logs.
    what: String,
    outcome: OutcomeLabel,
    cut: Cut,
    /// The copy as first refused, kept for the unroutable store.
    whole: Option<Message>,
}

impl Way {
    fn new(target: Target) -> Self {
        let (outcome, what) = match &target {
            Target::Tier(tier) => (OutcomeLabel::Delayed, format!("delay tier {}", tier.name())),
            Target::DeadLetter(reason) => (OutcomeLabel::DeadLettered, format!("DLQ ({reason})")),
            Target::Park(destination) => (OutcomeLabel::Parked, format!("parking {destination}")),
        };
        Self {
            target,
            what,
            outcome,
            cut: Cut::Whole,
            whole: None,
        }
    }

    /// Refused for good, most likely too large once the failure headers
    /// were added (the original fitted): the copy cut down one step, to be
    /// tried again at once. A message whose copy never fits still ends, in
    /// the DLQ, never in a loop of redeliveries and handler runs.
    fn cut_down(&mut self, mut copy: Message, refused: &str) -> Message {
        if self.whole.is_none() {
            self.whole = Some(copy.clone());
        }
        let what = &self.what;
        self.cut = match (self.cut, &self.target) {
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
                self.target = Target::DeadLetter(reason);
                self.what = format!("DLQ ({reason})");
                self.outcome = OutcomeLabel::DeadLettered;
                Cut::Redirected
            }
            (Cut::Slim | Cut::Redirected, _) | (Cut::Stub, _) => {
                tracing::error!(error = %refused, "{what} refused the copy; dead-lettering a stub (headers, payload size and SHA-256, no payload)");
                copy = stub::payload_stub(copy);
                Cut::Stub
            }
        };
        copy
    }
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
    let origin = origin_time(&copy);
    let attempts = ctx.shared.route_attempts;
    let mut way = Way::new(target);
    let mut n = 0;
    while n < attempts {
        n += 1;
        match send(ctx, &way.target, copy).await {
            Ok(()) => return sent(ctx, &way, origin, failed, id, ack).await,
            Err(e) if e.error.kind() == TransportErrorKind::Invalid && way.cut != Cut::Stub => {
                let refused = e.error.to_string();
                copy = way.cut_down(e.into_message(), &refused);
                n -= 1;
            }
            Err(e) if e.error.kind() == TransportErrorKind::Invalid => {
                // Even the stub refused, for good: no redelivery can end
                // otherwise. Kept locally, whole, then the original goes.
                let refused = e.error.to_string();
                let keep = way.whole.take().unwrap_or_else(|| e.into_message());
                if keep_unroutable(ctx, &keep, &way.what, &refused, id)
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
                tracing::warn!(error = %e.error, attempt = n, attempts, "publishing to {} failed", way.what);
                copy = e.into_message();
                if n < attempts {
                    tokio::time::sleep(ctx.shared.route_backoff.delay(n)).await;
                }
            }
        }
    }
    unrouted(ctx, way, copy, origin, id, ack).await;
}

/// The copy is confirmed: the original is acked.
async fn sent<T>(
    ctx: &Ctx<T>,
    way: &Way,
    origin: Option<SystemTime>,
    failed: &Failed,
    id: Option<&str>,
    ack: Settlement,
) {
    finish(ctx, origin, way.outcome);
    let what = &way.what;
    if matches!(way.target, Target::DeadLetter(_) | Target::Park(_)) {
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
}

/// No try published the copy: the original is given back, unless the same
/// message came back unroutable delivery after delivery (its destination
/// will not take it): then it is kept locally rather than go round for ever.
async fn unrouted<T>(
    ctx: &Ctx<T>,
    way: Way,
    copy: Message,
    origin: Option<SystemTime>,
    id: Option<&str>,
    ack: Settlement,
) where
    T: DeadLetterPublisher,
{
    let what = &way.what;
    if let Some(id) = id {
        let rounds = ctx.route.unrouted.record(id, what.clone());
        if rounds >= ctx.shared.unroutable_after {
            let keep = way.whole.unwrap_or(copy);
            let why = format!("{what} refused the copy on {rounds} deliveries");
            if keep_unroutable(ctx, &keep, what, &why, Some(id))
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
