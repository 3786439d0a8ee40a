//! Idempotent processing: a dedupe layer in front of the handler, keyed by
//! `backstop-message-id` (or a header such as `Idempotency-Key`).
//!
//! Before each handler call the runner *claims* the key with a processing
//! lease; after a success it marks the key *done* for the retention; after a
//! failure it *releases* the claim, so the retry (immediate, from a delay
//! tier, or a replay from the DLQ) can claim it again. A delivery whose key is
//! done is acked without calling the handler and counted as
//! `outcome="duplicate"`. A key claimed by another worker whose lease is live
//! waits until that worker finishes (or its lease runs out, when it crashed).
//!
//! Stores: [`MemoryDedupeStore`] (one process, tests), the SQLite store (one
//! node, survives restarts; feature `sqlite`) and the Redis store (shared by
//! every instance of a service; feature `redis`).
//!
//! ```
//! use backstop_core::dedupe::{Dedupe, MemoryDedupeStore};
//! use backstop_core::HandlerOptions;
//! use std::time::Duration;
//! let options = HandlerOptions::default().with_dedupe(
//!     Dedupe::new(MemoryDedupeStore::new())
//!         .with_key_header("Idempotency-Key")
//!         .with_retention(Duration::from_secs(48 * 3600)),
//! );
//! ```

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteDedupeStore;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisDedupeStore;

use crate::error::BoxError;
use crate::transport::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What a claim found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the key until it completes or releases it, or the
    /// lease runs out.
    Claimed,
    /// Processed already (within the retention): a duplicate.
    Done,
    /// Another claimant holds a live lease.
    Busy,
}

/// A dedupe store failed (unreachable, I/O). The runner treats it as a
/// transient failure of dependency `dedupe-store`.
#[derive(Debug, thiserror::Error)]
#[error("dedupe store: {context}")]
pub struct DedupeError {
    context: String,
    #[source]
    source: Option<BoxError>,
}

impl DedupeError {
    /// An error saying what failed.
    pub fn new(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// With its cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }
}

/// Where claims and done marks live. Keys arrive namespaced by the runner
/// (`<group>/<handler>/<key>`); `owner` is unique per claim, so a claimant
/// whose lease ran out cannot release someone else's claim.
pub trait DedupeStore: Send + Sync + 'static {
    /// Claims `key` for `owner` for `lease`, unless it is done or claimed
    /// by someone else with a live lease.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupeError>>;

    /// Marks `key` done for `retention` (whoever holds it now).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), DedupeError>>;

    /// Drops `owner`'s claim on `key`; nothing if someone else holds it or it
    /// is done.
    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupeError>>;
}

/// Where the dedupe key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DedupeKey {
    /// `backstop-message-id` (RabbitMQ: or AMQP's `message-id` property).
    /// Without one, Kafka derives an id from the record's position, so a
    /// redelivery is still recognised; a message with neither id nor
    /// position (a foreign RabbitMQ producer) is handled without dedupe,
    /// since an id made from its content would merge distinct messages.
    MessageId,
    /// This header; messages without it fall back to the message id.
    Header(String),
}

/// The dedupe layer of one handler
/// ([`HandlerOptions::with_dedupe`](crate::HandlerOptions::with_dedupe)).
#[derive(Clone)]
pub struct Dedupe {
    pub(crate) store: Arc<dyn DedupeStore>,
    pub(crate) key: DedupeKey,
    pub(crate) retention: Duration,
    pub(crate) lease: Option<Duration>,
}

impl fmt::Debug for Dedupe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedupe")
            .field("key", &self.key)
            .field("retention", &self.retention)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Default retention of done marks: 24 h.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl Dedupe {
    /// Dedupe by message id in `store`, retention 24 h, lease twice the
    /// handler's timeout (at least 10 s).
    pub fn new(store: impl DedupeStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// The same, with a store shared with other handlers.
    pub fn shared(store: Arc<dyn DedupeStore>) -> Self {
        Self {
            store,
            key: DedupeKey::MessageId,
            retention: DEFAULT_RETENTION,
            lease: None,
        }
    }

    /// Keys from this header (e.g. `Idempotency-Key`) instead of the message id.
    #[must_use]
    pub fn with_key_header(mut self, header: impl Into<String>) -> Self {
        self.key = DedupeKey::Header(header.into());
        self
    }

    /// How long a done key is remembered. Start-up rejects a retention
    /// shorter than the handler's longest delay tier; it should also cover
    /// the window in which dead letters may be replayed.
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a claim holds before another worker may take the message
    /// over (a crashed claimant). Must exceed the handler's timeout.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The lease for a handler with this timeout.
    pub(crate) fn lease_for(&self, timeout: Duration) -> Duration {
        self.lease
            .unwrap_or_else(|| (timeout * 2).max(Duration::from_secs(10)))
    }
}

#[derive(Debug)]
enum Entry {
    Claimed { owner: String, until: Instant },
    Done { until: Instant },
}

/// An in-process store (tests, single-process tools). Times are tokio's
/// clock, so the paused clock drives leases and retention.
#[derive(Debug, Default, Clone)]
pub struct MemoryDedupeStore {
    entries: Arc<Mutex<Entries>>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// Size after the last sweep of expired entries: the next sweep waits
    /// until the map has doubled, so sweeping stays amortised O(1).
    swept_at: usize,
}

impl MemoryDedupeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys currently marked done.
    pub fn done_len(&self) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .values()
            .filter(|e| matches!(e, Entry::Done { until } if *until > now))
            .count()
    }
}

impl DedupeStore for MemoryDedupeStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupeError>> {
        let now = Instant::now();
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if guard.map.len() > (2 * guard.swept_at).max(4096) {
            guard.map.retain(|_, e| match e {
                Entry::Claimed { until, .. } | Entry::Done { until } => *until > now,
            });
            guard.swept_at = guard.map.len();
        }
        let entries = &mut guard.map;
        let found = match entries.get(key) {
            Some(Entry::Done { until }) if *until > now => Claim::Done,
            Some(Entry::Claimed { until, .. }) if *until > now => Claim::Busy,
            _ => {
                entries.insert(
                    key.to_owned(),
                    Entry::Claimed {
                        owner: owner.to_owned(),
                        until: now + lease,
                    },
                );
                Claim::Claimed
            }
        };
        Box::pin(std::future::ready(Ok(found)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        _owner: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        let until = Instant::now() + retention;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .insert(key.to_owned(), Entry::Done { until });
        Box::pin(std::future::ready(Ok(())))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupeError>> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(guard.map.get(key), Some(Entry::Claimed { owner: o, .. }) if o == owner) {
            guard.map.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Checks a store against the [`DedupeStore`] contract: claim, busy, release,
/// done, lease expiry, retention expiry. `wait` must let `d` pass for the
/// store (sleep for real stores, advance the paused clock for the memory
/// store). Used by every store's tests.
#[doc(hidden)]
pub async fn check_store_contract<S, W, F>(store: &S, prefix: &str, wait: W)
where
    S: DedupeStore + ?Sized,
    W: Fn(Duration) -> F,
    F: std::future::Future<Output = ()>,
{
    let k = |n: &str| format!("{prefix}/{n}");
    let lease = Duration::from_millis(1500);
    let keep = Duration::from_millis(1500);
    let a = k("a");
    assert_eq!(
        store.claim(&a, "w1", lease).await.expect("claim"),
        Claim::Claimed
    );
    assert_eq!(
        store.claim(&a, "w2", lease).await.expect("claim"),
        Claim::Busy
    );
    store
        .release(&a, "w2")
        .await
        .expect("release by a stranger");
    assert_eq!(
        store.claim(&a, "w2", lease).await.expect("claim"),
        Claim::Busy,
        "a stranger's release leaves the claim"
    );
    store.release(&a, "w1").await.expect("release");
    assert_eq!(
        store.claim(&a, "w2", lease).await.expect("claim"),
        Claim::Claimed
    );
    store.complete(&a, "w2", keep).await.expect("complete");
    assert_eq!(
        store.claim(&a, "w3", lease).await.expect("claim"),
        Claim::Done
    );
    store.release(&a, "w2").await.expect("release after done");
    assert_eq!(
        store.claim(&a, "w3", lease).await.expect("claim"),
        Claim::Done,
        "release does not undo done"
    );
    let b = k("b");
    assert_eq!(
        store.claim(&b, "w1", lease).await.expect("claim"),
        Claim::Claimed
    );
    wait(Duration::from_millis(1700)).await;
    assert_eq!(
        store.claim(&b, "w2", lease).await.expect("claim"),
        Claim::Claimed,
        "an expired lease can be taken over"
    );
    assert_eq!(
        store.claim(&a, "w3", lease).await.expect("claim"),
        Claim::Claimed,
        "done is forgotten after the retention"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn memory_store_keeps_the_contract() {
        let store = MemoryDedupeStore::new();
        check_store_contract(&store, "t", |d| tokio::time::sleep(d)).await;
    }
}
