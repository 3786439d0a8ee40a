//! # backstop-outbox
//!
//! A producer whose accepted sends are never lost: [`OutboxPublisher`] wraps
//! any Backstop [`Publisher`] (Kafka, RabbitMQ, in-memory) with a disk-backed
//! outbox.
//!
//! - [`send`](OutboxPublisher::send) returns once the message is on local disk
//!   (SQLite, WAL, `synchronous=FULL`: the commit is fsynced). One writer
//!   thread does **group commit**: every send queued while a commit runs goes
//!   into the next one, so many concurrent sends share one fsync, and each
//!   caller is answered after the commit that holds its message.
//! - A relay publishes pending entries oldest first, with several keys in
//!   flight but one entry per (destination, key) at a time, so per-key order
//!   holds; it retries with exponential backoff and full jitter (capped), and
//!   deletes an entry only after the broker confirmed it. An entry the broker
//!   refuses for good (too large, malformed: `TransportErrorKind::Invalid`)
//!   moves to the `outbox_dead` table with the reason, and the key moves on.
//! - Every message carries a `backstop-message-id` before it touches disk, so
//!   a resend after a crash has the same id and consumers can dedupe.
//! - Caps on pending entries and bytes: at the cap `send` fails fast with
//!   [`SendErrorKind::Full`] (or waits, [`WhenFull::Wait`]); nothing already
//!   accepted is ever dropped, the disk never grows without bound.
//! - On open the relay resumes whatever is pending; [`shutdown`](OutboxPublisher::shutdown)
//!   flushes with a deadline and leaves the rest on disk for the next start.
//! - Metrics: `backstop_outbox_pending`, `backstop_outbox_oldest_age_seconds`,
//!   `backstop_outbox_publish_failures_total` (label `outbox`).
//!
//! Delivery is at-least-once: an entry published but not yet deleted when the
//! process dies is published again after the restart, with the same id.
//!
//! Failures the relay retries (with backoff, forever, counted in
//! `backstop_outbox_publish_failures_total`): a lost connection, a nack, no
//! confirm within `relay_publish_timeout`, a destination that does not exist
//! (an operator may create it). Only a refusal of the message itself
//! (`TransportErrorKind::Invalid`) ends in `outbox_dead`. One process at a
//! time may open a given outbox file for sending; any number may inspect it.
//!
//! ```
//! use backstop_core::{Message, memory::MemoryBroker};
//! use backstop_outbox::{OutboxConfig, OutboxPublisher};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("outbox-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let broker = MemoryBroker::new();
//! let outbox = OutboxPublisher::open(broker.clone(), OutboxConfig::new(dir.join("orders.db")))
//!     .await
//!     .unwrap();
//! outbox.send("orders", Message::new("42").with_key("customer-7")).await.unwrap();
//! let report = outbox.shutdown(std::time::Duration::from_secs(5)).await;
//! assert_eq!(report.left_pending, 0);
//! assert_eq!(broker.messages("orders").len(), 1);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # });
//! ```
//!
//! ## The file
//!
//! One SQLite file (plus its `-wal` and `-shm` while open), readable with the
//! `sqlite3` tool or [`OutboxInspector`]:
//!
//! | table | column | meaning |
//! |---|---|---|
//! | `outbox_meta` | `key`, `value` | `schema_version` = 1 |
//! | `outbox_pending` | `seq` | send order (AUTOINCREMENT, never reused) |
//! | | `destination` | topic or queue |
//! | | `message_id` | `backstop-message-id` |
//! | | `msg_key` | record key / routing key (BLOB, NULL when none) |
//! | | `payload` | BLOB |
//! | | `headers` | JSON array of `[name, value]`; value a string, `null`, or `{"hex": "..."}` when not UTF-8 |
//! | | `msg_timestamp_ms` | the message's timestamp (ms since the epoch) or NULL |
//! | | `created_at_ms` | when `send` accepted it |
//! | | `size` | bytes counted against `max_pending_bytes` |
//! | | `attempts`, `last_error` | failed publish attempts so far, the last error |
//! | `outbox_dead` | the same columns, `attempts`, `reason`, `dead_at_ms` | entries the broker refused for good |
//!
//! ```sh
//! sqlite3 outbox.db "SELECT seq, destination, attempts, last_error FROM outbox_pending ORDER BY seq LIMIT 10"
//! ```

mod config;
mod error;
mod relay;
mod report;
mod shared;
mod store;
mod writer;

pub use config::{Mode, OutboxConfig, WhenFull};
pub use error::{OpenError, SendError, SendErrorKind};
pub use store::{OutboxInspector, OutboxStatus, SCHEMA_VERSION, StorageError, StoredEntry};

use backstop_core::message::names;
use backstop_core::{Message, PublishError, Publisher, TransportError, TransportErrorKind};
use bytes::Bytes;
use shared::Shared;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use writer::Command;

/// How a send was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// On disk (fsynced) as entry `seq`; the relay publishes it.
    Stored {
        /// Its position in the outbox.
        seq: i64,
    },
    /// Published directly and confirmed by the broker
    /// ([`Mode::DirectWithFallback`]).
    Published,
}

/// What [`OutboxPublisher::shutdown`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushReport {
    /// Entries still on disk; the next start publishes them.
    pub left_pending: u64,
    /// Whether everything pending was published before the deadline.
    pub flushed: bool,
}

/// Counters of one outbox since it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxStats {
    /// Entries waiting for the broker (including sends being written).
    pub pending: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Entries the relay got confirmed.
    pub delivered: u64,
    /// Entries moved to `outbox_dead`.
    pub dead: u64,
    /// Failed publish attempts.
    pub publish_failures: u64,
    /// Transactions committed (each is one fsync): fewer than sends when
    /// group commit works.
    pub commits: u64,
}

/// A [`Publisher`] whose accepted sends survive broker outages and crashes.
pub struct OutboxPublisher<P> {
    publisher: Arc<P>,
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Command>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    relay: Mutex<Option<JoinHandle<()>>>,
    drain: CancellationToken,
    config: OutboxConfig,
}

impl<P> fmt::Debug for OutboxPublisher<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxPublisher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> OutboxPublisher<P> {
    /// Opens (or creates) the outbox file and starts the writer and the relay,
    /// which resumes whatever is pending.
    pub async fn open(publisher: P, config: OutboxConfig) -> Result<Self, OpenError> {
        config.validate()?;
        let path = config.path.clone();
        let track_keys = matches!(config.mode, Mode::DirectWithFallback { .. });
        let (conn, reader, totals, keys) = tokio::task::spawn_blocking(move || {
            let conn = store::open_writer(&path)?;
            let totals = store::pending_totals(&conn)
                .map_err(|e| StorageError::new("count pending entries", e))?;
            let keys = if track_keys {
                store::pending_keys(&conn)
                    .map_err(|e| StorageError::new("count pending keys", e))?
            } else {
                Vec::new()
            };
            let reader = store::open_reader(&path)?;
            Ok::<_, StorageError>((conn, reader, totals, keys))
        })
        .await
        .map_err(|e| StorageError::msg(format!("open task: {e}")))??;
        let shared = Arc::new(Shared::new(
            &config.label(),
            config.max_pending_entries,
            config.max_pending_bytes,
            track_keys,
        ));
        shared.entries.store(totals.0, Ordering::Release);
        shared.bytes.store(totals.1, Ordering::Release);
        {
            let mut map = shared.keys.lock().unwrap_or_else(|p| p.into_inner());
            for (destination, key, n) in keys {
                map.insert((destination, key), n);
            }
        }
        shared.publish_gauges();
        if totals.0 > 0 {
            tracing::info!(pending = totals.0, path = %config.path.display(), "outbox: resuming pending entries");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_shared = shared.clone();
        let max_batch = config.max_batch;
        let writer_thread = std::thread::Builder::new()
            .name("backstop-outbox-writer".into())
            .spawn(move || writer::run(conn, rx, writer_shared, max_batch))
            .map_err(|e| StorageError::msg(format!("start the writer thread: {e}")))?;
        let publisher = Arc::new(publisher);
        let drain = CancellationToken::new();
        let relay = relay::Relay {
            publisher: publisher.clone(),
            shared: shared.clone(),
            reader: Arc::new(Mutex::new(reader)),
            writer: tx.clone(),
            in_flight: config.relay_in_flight,
            window: config.relay_window,
            backoff: config.relay_backoff,
            publish_timeout: config.relay_publish_timeout,
        };
        let relay = tokio::spawn(relay.run(drain.clone()));
        Ok(Self {
            publisher,
            shared,
            writer: tx,
            writer_thread: Mutex::new(Some(writer_thread)),
            relay: Mutex::new(Some(relay)),
            drain,
            config,
        })
    }

    /// Accepts `message` for `destination`: returns once it is on disk
    /// ([`Sent::Stored`]) or, in [`Mode::DirectWithFallback`], confirmed by the
    /// broker ([`Sent::Published`]). A message without a `backstop-message-id`
    /// gets a UUIDv7 first.
    pub async fn send(&self, destination: &str, mut message: Message) -> Result<Sent, SendError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(SendError::new(
                SendErrorKind::Closed,
                "the outbox is shutting down",
                message,
            ));
        }
        if message.id().is_none() {
            message
                .headers_mut()
                .insert(names::MESSAGE_ID, uuid::Uuid::now_v7().to_string());
        }
        if let Some(p) = &self.config.trace_propagation
            && !message.headers().contains(names::TRACEPARENT)
        {
            p.on_publish(message.headers_mut(), &tracing::Span::current());
        }
        if let Mode::DirectWithFallback { timeout } = self.config.mode {
            let queued_key = message.key().is_some_and(|k| {
                self.shared
                    .key_waiting(&(destination.to_owned(), k.clone()))
            });
            if !queued_key {
                let copy = message.clone();
                match tokio::time::timeout(timeout, self.publisher.publish(destination, copy)).await
                {
                    Ok(Ok(())) => return Ok(Sent::Published),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e.error, "direct publish failed; spooling to the outbox");
                    }
                    Err(_) => {
                        tracing::debug!(
                            ?timeout,
                            "direct publish timed out; spooling to the outbox"
                        );
                    }
                }
            }
        }
        self.store(destination, message).await
    }

    async fn store(&self, destination: &str, message: Message) -> Result<Sent, SendError> {
        let size = store::entry_size(destination, &message);
        if let Err(detail) = self.reserve(size).await {
            return Err(SendError::new(SendErrorKind::Full, detail, message));
        }
        let keyed = message
            .key()
            .filter(|_| self.shared.track_keys)
            .map(|k| (destination.to_owned(), k.clone()));
        if let Some(k) = &keyed {
            self.shared.key_added(k);
        }
        let (reply, answer) = oneshot::channel();
        let command = Command::Insert {
            destination: destination.to_owned(),
            message,
            size,
            reply,
        };
        let undo = |shared: &Shared| {
            if let Some(k) = &keyed {
                shared.key_done(k);
            }
        };
        if let Err(mpsc::error::SendError(Command::Insert { message, .. })) =
            self.writer.send(command)
        {
            self.shared.release(1, size);
            undo(&self.shared);
            return Err(SendError::new(
                SendErrorKind::Closed,
                "the outbox writer has stopped",
                message,
            ));
        }
        match answer.await {
            Ok(Ok(seq)) => Ok(Sent::Stored { seq }),
            Ok(Err((error, message))) => {
                undo(&self.shared);
                Err(SendError::storage(error, message))
            }
            Err(_) => {
                undo(&self.shared);
                Err(SendError::new(
                    SendErrorKind::Storage,
                    "the outbox writer stopped before answering",
                    Message::from_parts(None, Bytes::new(), backstop_core::Headers::new()),
                ))
            }
        }
    }

    async fn reserve(&self, size: u64) -> Result<(), String> {
        let full = |field: &str| {
            format!(
                "outbox full: {} entries / {} bytes pending ({field} reached); \
                 the broker is not keeping up or is down",
                self.shared.entries.load(Ordering::Acquire),
                self.shared.bytes.load(Ordering::Acquire),
            )
        };
        match self.config.when_full {
            WhenFull::Fail => self.shared.reserve(size).map_err(full),
            WhenFull::Wait(max) => {
                let deadline = tokio::time::Instant::now() + max;
                loop {
                    let space = self.shared.space.notified();
                    match self.shared.reserve(size) {
                        Ok(()) => return Ok(()),
                        Err(field) => {
                            if tokio::time::timeout_at(deadline, space).await.is_err() {
                                return Err(full(field));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Counters since open.
    pub fn stats(&self) -> OutboxStats {
        let s = &self.shared;
        OutboxStats {
            pending: s.entries.load(Ordering::Acquire),
            pending_bytes: s.bytes.load(Ordering::Acquire),
            delivered: s.delivered.load(Ordering::Relaxed),
            dead: s.dead.load(Ordering::Relaxed),
            publish_failures: s.failures.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
        }
    }

    /// Waits until nothing is pending or `timeout` passes; true when empty.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let space = self.shared.space.notified();
            if self.shared.entries.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, space).await.is_err() {
                return self.shared.entries.load(Ordering::Acquire) == 0;
            }
        }
    }

    /// Stops accepting sends, publishes what is pending until `deadline`, then
    /// stops the relay and the writer. What was not published stays on disk.
    pub async fn shutdown(self, deadline: Duration) -> FlushReport {
        self.shared.closed.store(true, Ordering::Release);
        self.drain.cancel();
        let relay = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut flushed = false;
        if let Some(mut relay) = relay {
            match tokio::time::timeout(deadline, &mut relay).await {
                Ok(_) => flushed = true,
                Err(_) => {
                    relay.abort();
                    let _ = relay.await;
                }
            }
        }
        let thread = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let shared = self.shared.clone();
        drop(self);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let left_pending = shared.entries.load(Ordering::Acquire);
        FlushReport {
            left_pending,
            flushed: flushed && left_pending == 0,
        }
    }
}

impl<P> Drop for OutboxPublisher<P> {
    fn drop(&mut self) {
        // Without shutdown: stop the relay; pending entries stay on disk.
        if let Some(relay) = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take() {
            relay.abort();
        }
    }
}

impl<P: Publisher> Publisher for OutboxPublisher<P> {
    /// `send`, with a refusal as a [`PublishError`] (kind `Rejected` when
    /// full, `Other` otherwise) handing the message back.
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        match self.send(destination, message).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let kind = match e.kind() {
                    SendErrorKind::Full => TransportErrorKind::Rejected,
                    _ => TransportErrorKind::Other,
                };
                let detail = report::with_causes(&e);
                Err(PublishError::new(
                    TransportError::new(kind, detail),
                    e.into_message(),
                ))
            }
        }
    }
}
