//! State shared by senders, the writer and the relay: counters against the
//! caps, per-key pending counts, wake-ups, metrics.

use bytes::Bytes;
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use tokio::sync::Notify;

use backstop_core::observability::names::{
    OUTBOX_OLDEST_AGE_SECONDS as OLDEST_AGE, OUTBOX_PENDING as PENDING,
    OUTBOX_PUBLISH_FAILURES_TOTAL as PUBLISH_FAILURES,
};

pub(crate) type KeyedDestination = (String, Bytes);

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) max_entries: u64,
    pub(crate) max_bytes: u64,
    /// Entries accepted or being written, not yet confirmed by the broker.
    pub(crate) entries: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Keyed entries waiting, per (destination, key): a direct send of such a
    /// key must queue behind them. Kept only in DirectWithFallback mode (in
    /// Durable mode every send queues anyway).
    pub(crate) track_keys: bool,
    pub(crate) keys: Mutex<HashMap<KeyedDestination, u32>>,
    pub(crate) closed: AtomicBool,
    /// The relay has something new on disk.
    pub(crate) new_data: Notify,
    /// Room was made under the caps.
    pub(crate) space: Notify,
    /// Creation time (ms) of the oldest pending entry, 0 when none.
    pub(crate) oldest_ms: AtomicI64,
    pub(crate) commits: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) pending_gauge: Gauge,
    pub(crate) oldest_gauge: Gauge,
    pub(crate) failures_counter: Counter,
}

impl Shared {
    pub(crate) fn new(label: &str, max_entries: u64, max_bytes: u64, track_keys: bool) -> Self {
        let labels = [("outbox", label.to_owned())];
        Self {
            max_entries,
            max_bytes,
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            track_keys,
            keys: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            new_data: Notify::new(),
            space: Notify::new(),
            oldest_ms: AtomicI64::new(0),
            commits: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            pending_gauge: metrics::gauge!(PENDING, &labels),
            oldest_gauge: metrics::gauge!(OLDEST_AGE, &labels),
            failures_counter: metrics::counter!(PUBLISH_FAILURES, &labels),
        }
    }

    /// Takes room for one entry of `size` bytes; `Err(field)` names the cap
    /// that is reached.
    pub(crate) fn reserve(&self, size: u64) -> Result<(), &'static str> {
        let entries = self.entries.fetch_add(1, Ordering::AcqRel) + 1;
        let bytes = self.bytes.fetch_add(size, Ordering::AcqRel) + size;
        // One entry is always allowed into an empty outbox, whatever its size.
        let over = if entries > self.max_entries {
            Some("max_pending_entries")
        } else if bytes > self.max_bytes && entries > 1 {
            Some("max_pending_bytes")
        } else {
            None
        };
        match over {
            Some(field) => {
                self.release(1, size);
                Err(field)
            }
            None => Ok(()),
        }
    }

    pub(crate) fn release(&self, entries: u64, bytes: u64) {
        self.entries.fetch_sub(entries, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.space.notify_waiters();
    }

    pub(crate) fn key_added(&self, key: &KeyedDestination) {
        if !self.track_keys {
            return;
        }
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        *keys.entry(key.clone()).or_insert(0) += 1;
    }

    pub(crate) fn key_done(&self, key: &KeyedDestination) {
        if !self.track_keys {
            return;
        }
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                keys.remove(key);
            }
        }
    }

    pub(crate) fn key_waiting(&self, key: &KeyedDestination) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    pub(crate) fn publish_gauges(&self) {
        #[allow(clippy::cast_precision_loss)]
        self.pending_gauge
            .set(self.entries.load(Ordering::Acquire) as f64);
    }

    pub(crate) fn set_oldest(&self, created_ms: Option<i64>) {
        let ms = created_ms.unwrap_or(0);
        self.oldest_ms.store(ms, Ordering::Release);
        let age = if ms == 0 {
            0.0
        } else {
            #[allow(clippy::cast_precision_loss)]
            let secs = (crate::store::now_ms() - ms).max(0) as f64 / 1000.0;
            secs
        };
        self.oldest_gauge.set(age);
    }
}
