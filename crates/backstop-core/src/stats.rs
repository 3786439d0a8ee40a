//! A runner's live counters (see [`RunnerStats`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of a runner, readable while it runs (tests, examples, health).
/// The same events also go to the `metrics` facade.
#[derive(Debug, Default)]
pub struct RunnerStats {
    pub(crate) ok: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) delayed: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) failed_to_route: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) malformed_headers: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
    pub(crate) circuit_opened: AtomicU64,
    pub(crate) circuit_held: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) unroutable: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

/// A copy of [`RunnerStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Messages handled successfully (acked).
    pub ok: u64,
    /// Immediate in-process retries made.
    pub retried: u64,
    /// Messages sent to a delay tier (confirmed).
    pub delayed: u64,
    /// Messages sent to the DLQ (confirmed).
    pub dead_lettered: u64,
    /// Replacements that could not be published: original released for redelivery.
    pub failed_to_route: u64,
    /// Failed handler invocations, every class.
    pub handler_errors: u64,
    /// Framework headers that failed to parse.
    pub malformed_headers: u64,
    /// Deliveries dropped unacked at the shutdown deadline (they will be redelivered).
    pub abandoned: u64,
    /// Immediate retries refused by the retry budget (the message went on to
    /// its delay tier instead).
    pub budget_exhausted: u64,
    /// Times a circuit breaker opened (any breaker of any handler).
    pub circuit_opened: u64,
    /// Failures absorbed by a breaker that was not closed: the message waited
    /// for it instead of spending an attempt.
    pub circuit_held: u64,
    /// Deliveries the dedupe store knew as done: acked without handling.
    pub duplicates: u64,
    /// Messages a handler parked (copy confirmed, original acked).
    pub parked: u64,
    /// Messages a handler skipped with a reason (acked).
    pub skipped: u64,
    /// Messages whose DLQ refused even their stub for good: written to the
    /// local unroutable store, then acked.
    pub unroutable: u64,
    /// Panics outside the handler (in Backstop or a backend, triggered by
    /// a message): each gave its message back; see the runner's docs.
    pub panics: u64,
    /// Deliveries taken from the broker and not yet settled.
    pub in_flight: u64,
}

impl RunnerStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            ok: self.ok.load(Relaxed),
            retried: self.retried.load(Relaxed),
            delayed: self.delayed.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            failed_to_route: self.failed_to_route.load(Relaxed),
            handler_errors: self.handler_errors.load(Relaxed),
            malformed_headers: self.malformed_headers.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            budget_exhausted: self.budget_exhausted.load(Relaxed),
            circuit_opened: self.circuit_opened.load(Relaxed),
            circuit_held: self.circuit_held.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            parked: self.parked.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            unroutable: self.unroutable.load(Relaxed),
            panics: self.panics.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
