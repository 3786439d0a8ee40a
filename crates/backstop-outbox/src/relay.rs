//! The relay: reads pending entries oldest first, publishes them with several
//! keys in flight but one entry per key at a time, and has the writer delete
//! an entry only after the broker confirmed it.

use crate::report::with_causes;
use crate::shared::{KeyedDestination, Shared};
use crate::store::{self, Entry};
use crate::writer::Command;
use backstop_core::{Backoff, PublishError, Publisher, TransportError, TransportErrorKind};
use futures_util::FutureExt as _;
use rusqlite::Connection;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Which entries must go out one after another: those of one key to one
/// destination. An entry without a key is ordered with nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Keyed(KeyedDestination),
    Single(i64),
}

/// What a panic said.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

fn lane(entry: &Entry) -> Lane {
    match entry.message.key() {
        Some(k) => Lane::Keyed((entry.destination.clone(), k.clone())),
        None => Lane::Single(entry.seq),
    }
}

pub(crate) struct Relay<P> {
    pub(crate) publisher: Arc<P>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) reader: Arc<Mutex<Connection>>,
    pub(crate) writer: mpsc::UnboundedSender<Command>,
    pub(crate) in_flight: usize,
    pub(crate) window: usize,
    pub(crate) backoff: Backoff,
    pub(crate) publish_timeout: Duration,
}

struct Attempt {
    lane: Lane,
    entry: Entry,
    result: Result<(), PublishError>,
}

/// The entries loaded from disk, by lane: which lanes may send next, which
/// wait for their entry in flight.
#[derive(Default)]
struct Window {
    lanes: HashMap<Lane, VecDeque<Entry>>,
    busy: HashSet<Lane>,
    ready: VecDeque<Lane>,
    /// Entries loaded and not yet settled.
    len: usize,
    /// seq -> created_at_ms of those, for the oldest-pending gauge.
    oldest: BTreeMap<i64, i64>,
    /// The last seq loaded, and whether the last load filled its batch.
    loaded_upto: i64,
    more: bool,
}

impl Window {
    fn add(&mut self, batch: Vec<Entry>, wanted: usize) {
        self.more = batch.len() == wanted;
        for entry in batch {
            self.loaded_upto = entry.seq;
            self.len += 1;
            self.oldest.insert(entry.seq, entry.created_at_ms);
            let l = lane(&entry);
            let queue = self.lanes.entry(l.clone()).or_default();
            queue.push_back(entry);
            if queue.len() == 1 && !self.busy.contains(&l) {
                self.ready.push_back(l);
            }
        }
    }

    /// The next entry that may go: the head of a lane with none in flight.
    fn next(&mut self) -> Option<(Lane, Entry)> {
        while let Some(l) = self.ready.pop_front() {
            if let Some(entry) = self.lanes.get_mut(&l).and_then(VecDeque::pop_front) {
                self.busy.insert(l.clone());
                return Some((l, entry));
            }
        }
        None
    }

    /// `entry` of lane `l` is done with (delivered or buried): the lane's
    /// next may go.
    fn settled(&mut self, l: &Lane, entry: &Entry) {
        self.len -= 1;
        self.oldest.remove(&entry.seq);
        self.busy.remove(l);
        match self.lanes.get(l) {
            Some(q) if !q.is_empty() => self.ready.push_back(l.clone()),
            _ => {
                self.lanes.remove(l);
            }
        }
    }

    fn oldest(&self) -> Option<i64> {
        self.oldest.values().next().copied()
    }
}

impl<P: Publisher> Relay<P> {
    /// Publishes until `drain` is cancelled and nothing is pending, or until
    /// the task is aborted (entries then stay on disk for the next start).
    pub(crate) async fn run(self, drain: CancellationToken) {
        let mut window = Window {
            more: true,
            ..Window::default()
        };
        let mut tasks: JoinSet<Attempt> = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Refill in large batches once half the window is free, not one
            // entry per completed publish (a query per message would be the
            // relay's bottleneck).
            if window.more && window.len <= self.window / 2 {
                let want = self.window - window.len;
                match self.load(window.loaded_upto, want).await {
                    Ok(batch) => {
                        window.add(batch, want);
                        self.shared.set_oldest(window.oldest());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "outbox relay: reading pending entries failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            while tasks.len() < self.in_flight
                && let Some((l, entry)) = window.next()
            {
                self.spawn(&mut tasks, l, entry, Duration::ZERO);
            }
            // Draining: done when nothing is pending at all, including sends
            // still being written and deletes still being committed.
            let draining = drain.is_cancelled();
            if draining && self.shared.entries.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::select! {
                Some(done) = tasks.join_next() => {
                    let Ok(attempt) = done else {
                        // Cannot happen (the task catches its publisher's
                        // panic); were it to, the entry stays on disk and
                        // goes out after a restart.
                        tracing::error!("outbox relay: a publish task failed");
                        continue;
                    };
                    self.finished(attempt, &mut window, &mut tasks);
                }
                () = self.shared.new_data.notified() => window.more = true,
                () = drain.cancelled(), if !draining => {}
                () = self.shared.space.notified(), if draining => window.more = true,
                _ = tick.tick() => self.shared.set_oldest(window.oldest()),
            }
        }
    }

    /// A publish ended: confirmed (the entry is deleted), refused for good
    /// (buried in `outbox_dead`), or failed (tried again after a backoff).
    fn finished(&self, attempt: Attempt, window: &mut Window, tasks: &mut JoinSet<Attempt>) {
        let Attempt {
            lane: l,
            mut entry,
            result,
        } = attempt;
        match result {
            Ok(()) => {
                self.shared.delivered.fetch_add(1, Ordering::Relaxed);
                let _ = self.writer.send(Command::Delete {
                    seq: entry.seq,
                    size: entry.size,
                });
                self.settled(window, &l, &entry);
            }
            Err(e) if e.error.kind() == TransportErrorKind::Invalid => {
                let reason = with_causes(&e.error);
                tracing::error!(seq = entry.seq, destination = %entry.destination, %reason,
                    "outbox: the broker refuses this message for good; moved to outbox_dead");
                self.shared.dead.fetch_add(1, Ordering::Relaxed);
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
                self.shared.failures_counter.increment(1);
                let _ = self.writer.send(Command::Bury {
                    seq: entry.seq,
                    size: entry.size,
                    reason,
                });
                self.settled(window, &l, &entry);
            }
            Err(e) => {
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
                self.shared.failures_counter.increment(1);
                let error = with_causes(&e.error);
                entry.attempts = entry.attempts.saturating_add(1);
                let delay = self.backoff.delay(entry.attempts);
                tracing::warn!(seq = entry.seq, destination = %entry.destination,
                    attempts = entry.attempts, %error, ?delay, "outbox publish failed; will retry");
                let _ = self.writer.send(Command::Failure {
                    seq: entry.seq,
                    error,
                });
                self.spawn(tasks, l, entry, delay);
            }
        }
    }

    fn settled(&self, window: &mut Window, l: &Lane, entry: &Entry) {
        window.settled(l, entry);
        if let Lane::Keyed(k) = l {
            self.shared.key_done(k);
        }
    }

    fn spawn(&self, tasks: &mut JoinSet<Attempt>, lane: Lane, entry: Entry, delay: Duration) {
        let publisher = self.publisher.clone();
        let timeout = self.publish_timeout;
        tasks.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // A clone per attempt (cheap: the payload is shared) so that a
            // publish that never answers can be abandoned without losing it.
            // A publisher that panics fails this attempt like any other
            // error: the task still reports, so its key's lane goes on and
            // a drain ends.
            let publish =
                AssertUnwindSafe(publisher.publish(&entry.destination, entry.message.clone()))
                    .catch_unwind();
            let result = match tokio::time::timeout(timeout, publish).await {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(PublishError::new(
                    TransportError::new(
                        TransportErrorKind::Other,
                        format!("the publisher panicked: {}", panic_text(panic.as_ref())),
                    ),
                    entry.message.clone(),
                )),
                Err(_) => Err(PublishError::new(
                    TransportError::new(
                        TransportErrorKind::Rejected,
                        format!("no confirm within {timeout:?}"),
                    ),
                    entry.message.clone(),
                )),
            };
            Attempt {
                lane,
                entry,
                result,
            }
        });
    }

    async fn load(&self, after: i64, limit: usize) -> Result<Vec<Entry>, String> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            store::load_after(&conn, after, limit).map_err(|e| with_causes(&e))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
