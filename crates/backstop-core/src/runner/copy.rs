//! The copy that replaces a message in a delay tier, a park destination or
//! the DLQ (HEADERS.md): what it keeps of the original and which framework
//! headers it gets.

use super::ctx::Ctx;
use super::decide::{Attempts, Target};
use super::invoke::Failed;
use super::stub;
use super::trust::count_malformed;
use crate::delivered::Delivered;
use crate::error::DeadLetterReason;
use crate::message::{Failure, Message, Origin, RetryMeta, fingerprint, names};
use std::time::SystemTime;

/// The copy that replaces the original in a tier or the DLQ: identity, key,
/// payload and application headers kept; origin set once; attempt headers
/// rewritten; failure headers replaced.
pub(super) fn replacement<T>(
    ctx: &Ctx<T>,
    d: &Delivered,
    failed: &Failed,
    (attempts, failed_at): (&Attempts, SystemTime),
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
    let delayed = attempts.state.delayed;
    let (delayed_attempts, retry_tier, due_at, reason) = match target {
        Target::Tier(tier) => (
            delayed.saturating_add(1),
            Some(tier.name().to_owned()),
            Some(ceil_millis(failed_at + tier.delay())),
            None,
        ),
        Target::DeadLetter(reason) => (delayed, None, None, Some(*reason)),
        Target::Park(_) => (delayed, None, None, None),
    };
    RetryMeta {
        attempt: attempts.attempt,
        delayed_attempts,
        retry_tier,
        due_at,
        first_failed_at: attempts.first_failed_at,
    }
    .write(headers);
    failure(ctx, failed, failed_at, reason).write(headers);
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
pub(super) fn panic_stub<T>(
    ctx: &Ctx<T>,
    d: &Delivered,
    failed: &Failed,
    target: &Target,
) -> Message {
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
