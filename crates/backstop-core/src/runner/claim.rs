//! Dedupe: one claim in the store per attempt, so a message two workers
//! (or two deliveries) hold at once is handled once.

use super::ctx::Ctx;
use super::invoke::Failed;
use crate::dedupe::{Claim, Dedupe, DedupeKey};
use crate::delivered::Delivered;
use std::time::Duration;

/// The store key: namespaced by group and handler, so two services (or two
/// handlers of one) reading the same message each handle it once.
/// `None` when the message has no key but one derived from its content: two
/// distinct messages with the same payload would look like duplicates, so
/// such a message is handled without dedupe (warned once per handler).
pub(super) fn dedupe_key<T>(ctx: &Ctx<T>, dedupe: &Dedupe, d: &Delivered) -> Option<String> {
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

pub(super) enum Claimed {
    /// Go on with the attempt: claimed by this owner (`None`: no dedupe).
    Go(Option<String>),
    Duplicate,
    Stop,
    Failed(Failed),
}

/// Claims `key` (nothing to claim without one); while another worker holds
/// a live claim, waits (it may finish, or crash and let its lease run out).
pub(super) async fn claim<T>(ctx: &Ctx<T>, key: Option<&str>) -> Claimed {
    let (Some(d), Some(key)) = (&ctx.route.dedupe, key) else {
        return Claimed::Go(None);
    };
    // Unique per claim, so a claimant whose lease ran out cannot release a
    // later claim; made only when dedupe is on.
    let owner = uuid::Uuid::now_v7().to_string();
    let lease = d.lease_for(ctx.route.timeout);
    let poll = (lease / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        match d.store.claim(key, &owner, lease).await {
            Ok(Claim::Claimed) => return Claimed::Go(Some(owner)),
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
pub(super) async fn settle_claim<T>(ctx: &Ctx<T>, key: &str, owner: &str, ok: bool) {
    let Some(d) = &ctx.route.dedupe else { return };
    let r = if ok {
        d.store.complete(key, owner, d.retention).await
    } else {
        d.store.release(key, owner).await
    };
    if let Err(error) = r {
        tracing::warn!(%error, key, ok, "dedupe store: could not record the outcome; the lease expires on its own");
    }
}
