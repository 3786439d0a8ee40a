//! The circuit breaker: when a handler's dependency is down, stop taking
//! messages instead of burning their retries and flooding the DLQ.
//!
//! One breaker per handler, and one more per dependency a handler error names
//! ([`HandlerError::with_dependency`](crate::HandlerError::with_dependency)).
//! A breaker opens on `consecutive_failures` failures in a row, or when the
//! failure rate over a sliding window reaches a threshold (with a minimum
//! number of calls). While any breaker of a handler is open:
//! - intake pauses (the runner stops pulling; Kafka pauses the assigned
//!   partitions, RabbitMQ leaves the rest in the prefetch window);
//! - messages in flight that fail wait in the runner for the breaker instead of
//!   being retried, delayed or dead-lettered, and are not acked or committed;
//!   that attempt does not count against their retry policy.
//!
//! After the open interval the breaker is half-open: up to `half_open_probes`
//! messages are handled as probes. A probe's success closes it; a probe's
//! failure opens it again for twice the interval, up to `max_open_for`.
//! Permanent, poison and panic failures say nothing about a dependency and
//! never count. State changes are logged and exported as
//! `backstop_circuit_state{handler}` (0 closed, 1 half-open, 2 open; the worst
//! of the handler's breakers).
//!
//! A success counts for every breaker of the handler: the runner cannot know
//! which dependencies a successful call used. A named dependency's breaker
//! therefore suits a dependency every message needs; for one only some
//! messages need, a low failure-rate threshold (or a handler of its own for
//! those messages) opens it when it is down.
//!
//! The state machine is written here rather than taken from a crate: the
//! circuit-breaker crates (failsafe, recloser) reject calls while open, and
//! the runner needs to *wait* for a breaker (to pause intake and hold
//! messages), which they do not offer. Time is tokio's clock, so tests run
//! outages on the paused clock.

mod breaker;
mod config;
mod state;
#[cfg(test)]
mod tests;

pub use config::{CircuitBreaker, FailureRate};
pub use state::CircuitState;

use crate::error::ErrorClass;
use crate::stats::RunnerStats;
use breaker::{Breaker, Phase, Trip};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Does this failure class say something about a dependency?
pub(crate) fn counts(class: ErrorClass) -> bool {
    matches!(
        class,
        ErrorClass::Transient | ErrorClass::RetryAfter | ErrorClass::Timeout
    )
}

/// How one call ended, for the breakers.
#[derive(Debug)]
pub(crate) enum Verdict<'a> {
    Success,
    /// Failed on this dependency (`None`: the handler's own breaker).
    Failure(Option<&'a str>),
    /// Says nothing about the dependencies (permanent, poison, panic).
    Ignored,
}

/// Leave to call the handler once. Probes hold a half-open slot.
#[derive(Debug)]
pub(crate) struct Permit {
    /// (breaker, generation) for every breaker this call probes.
    probes: Vec<(Option<Arc<str>>, u64)>,
    /// The generation of every breaker when the permit was given, so a late
    /// result from an earlier period does not count.
    seen: Vec<(Option<Arc<str>>, u64)>,
}

impl Permit {
    /// This call probed `dep`'s breaker in its current period.
    fn probed(&self, inner: &Inner, dep: &Option<Arc<str>>) -> bool {
        self.probes
            .iter()
            .any(|(d, g)| d == dep && inner.breakers.get(d).is_some_and(|b| b.generation == *g))
    }

    /// `dep`'s breaker is in the period it was in when this permit was given
    /// (a late result from an earlier period does not count).
    fn current(&self, inner: &Inner, dep: &Option<Arc<str>>) -> bool {
        self.seen
            .iter()
            .find(|(d, _)| d == dep)
            .is_some_and(|(_, g)| inner.breakers.get(dep).is_some_and(|b| b.generation == *g))
    }
}

struct Inner {
    breakers: HashMap<Option<Arc<str>>, Breaker>,
    /// Messages waiting for a permit: while any wait, a half-open breaker takes
    /// its probes from them rather than from new intake.
    waiting: usize,
    opened: u64,
}

/// The breakers of one handler.
pub(crate) struct Circuits {
    config: CircuitBreaker,
    handler: Arc<str>,
    inner: Mutex<Inner>,
    changed: Notify,
    stats: Arc<RunnerStats>,
}

impl fmt::Debug for Circuits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Circuits")
            .field("handler", &self.handler)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Circuits {
    pub(crate) fn new(config: CircuitBreaker, handler: Arc<str>, stats: Arc<RunnerStats>) -> Self {
        Self {
            config,
            handler,
            inner: Mutex::new(Inner {
                breakers: HashMap::from([(None, Breaker::new())]),
                waiting: 0,
                opened: 0,
            }),
            changed: Notify::new(),
            stats,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves breakers whose open interval has passed to half-open.
    fn tick(&self, inner: &mut Inner, now: Instant) {
        let mut changed = false;
        for (dep, b) in &mut inner.breakers {
            if let Phase::Open { until } = b.phase
                && now >= until
            {
                b.phase = Phase::HalfOpen { out: 0 };
                b.generation += 1;
                changed = true;
                tracing::info!(
                    handler = %self.handler,
                    dependency = dep.as_deref().unwrap_or("-"),
                    "circuit half-open: letting probes through"
                );
            }
        }
        if changed {
            self.publish(inner);
        }
    }

    /// The worst state of the handler's breakers.
    pub(crate) fn state(&self) -> CircuitState {
        let mut inner = self.lock();
        self.tick(&mut inner, Instant::now());
        worst(&inner)
    }

    /// How many times a breaker of this handler opened.
    #[cfg(test)]
    pub(crate) fn opened(&self) -> u64 {
        self.lock().opened
    }

    fn publish(&self, inner: &Inner) {
        self.export_state(worst(inner));
        self.changed.notify_waiters();
    }

    /// Sets `backstop_circuit_state` (through the recorder installed now:
    /// the runner calls this when it starts, state changes call it again).
    fn export_state(&self, state: CircuitState) {
        metrics::gauge!(
            crate::observability::names::CIRCUIT_STATE,
            "handler" => self.handler.to_string()
        )
        .set(state.gauge());
    }

    /// Exports the current state.
    pub(crate) fn export(&self) {
        let state = self.state();
        self.export_state(state);
    }

    /// The earliest moment an open breaker turns half-open.
    fn next_change(inner: &Inner) -> Option<Instant> {
        inner
            .breakers
            .values()
            .filter_map(|b| match b.phase {
                Phase::Open { until } => Some(until),
                _ => None,
            })
            .min()
    }

    fn try_permit(&self, inner: &mut Inner) -> Option<Permit> {
        if inner
            .breakers
            .values()
            .any(|b| matches!(b.phase, Phase::Open { .. }))
        {
            return None;
        }
        let limit = self.config.half_open_probes;
        if inner
            .breakers
            .values()
            .any(|b| matches!(b.phase, Phase::HalfOpen { out } if out >= limit))
        {
            return None;
        }
        let mut probes = Vec::new();
        let mut seen = Vec::with_capacity(inner.breakers.len());
        for (dep, b) in &mut inner.breakers {
            if let Phase::HalfOpen { out } = &mut b.phase {
                *out += 1;
                probes.push((dep.clone(), b.generation));
            }
            seen.push((dep.clone(), b.generation));
        }
        Some(Permit { probes, seen })
    }

    /// Waits until `check` (run under the lock, after the open → half-open
    /// transitions are applied) gives a value; otherwise until the next
    /// state change or the instant it names.
    async fn wait_for<R>(
        &self,
        mut check: impl FnMut(&mut Inner) -> Result<R, Option<Instant>>,
    ) -> R {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut inner = self.lock();
                self.tick(&mut inner, Instant::now());
                match check(&mut inner) {
                    Ok(r) => return r,
                    Err(next) => next,
                }
            };
            wait(notified, next).await;
        }
    }

    /// Waits until the handler may be called: no breaker open, and a probe
    /// slot on every half-open one.
    pub(crate) async fn permit(&self) -> Permit {
        let mut waiting: Option<Waiting<'_>> = None;
        self.wait_for(|inner| {
            if let Some(p) = self.try_permit(inner) {
                if let Some(w) = waiting.take() {
                    w.done(inner);
                    // Intake may be waiting for no one to wait.
                    self.changed.notify_waiters();
                }
                return Ok(p);
            }
            if waiting.is_none() {
                inner.waiting += 1;
                waiting = Some(Waiting(self));
            }
            Err(Self::next_change(inner))
        })
        .await
    }

    /// Waits until intake may pull another message: every breaker closed, or
    /// half-open with a free probe slot and no held message to probe with.
    pub(crate) async fn intake_ready(&self) {
        let limit = self.config.half_open_probes;
        self.wait_for(|inner| {
            let ok = inner.breakers.values().all(|b| match b.phase {
                Phase::Closed => true,
                Phase::Open { .. } => false,
                Phase::HalfOpen { out } => out < limit,
            }) && (worst(inner) == CircuitState::Closed || inner.waiting == 0);
            if ok {
                Ok(())
            } else {
                Err(Self::next_change(inner))
            }
        })
        .await;
    }

    /// Waits until a breaker of the handler is not closed (open or
    /// half-open): the intake loop then stops waiting for a delivery and
    /// goes back to its gate, which pauses the stream.
    pub(crate) async fn tripped(&self) {
        self.wait_for(|inner| {
            if worst(inner) == CircuitState::Closed {
                Err(None)
            } else {
                Ok(())
            }
        })
        .await;
    }

    /// Records how a call ended. Returns true when the message should be held
    /// (its failure counts and a breaker of the handler is not closed now):
    /// the caller waits for the next permit instead of spending an attempt.
    pub(crate) fn record(&self, permit: Permit, verdict: Verdict<'_>) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        self.tick(&mut inner, now);
        let before = worst(&inner);
        // Give back the probe slots this call held.
        for (dep, generation) in &permit.probes {
            if let Some(b) = inner.breakers.get_mut(dep)
                && b.generation == *generation
                && let Phase::HalfOpen { out } = &mut b.phase
            {
                *out = out.saturating_sub(1);
            }
        }
        match verdict {
            Verdict::Ignored => {}
            Verdict::Success => self.succeeded(&mut inner, &permit, now),
            Verdict::Failure(dep) => self.failed(&mut inner, &permit, dep, now),
        }
        let after = worst(&inner);
        if before != after || !permit.probes.is_empty() {
            self.publish(&inner);
        }
        matches!(verdict, Verdict::Failure(_)) && after != CircuitState::Closed
    }

    /// A success counts for every breaker of the handler (see the module
    /// docs): a probe's closes its breaker, others reset their count.
    fn succeeded(&self, inner: &mut Inner, permit: &Permit, now: Instant) {
        let deps: Vec<Option<Arc<str>>> = inner.breakers.keys().cloned().collect();
        for dep in deps {
            let probed = permit.probed(inner, &dep);
            let fresh = permit.current(inner, &dep);
            // One of the keys just listed: always there.
            let Some(b) = inner.breakers.get_mut(&dep) else {
                continue;
            };
            if probed {
                b.close();
                tracing::info!(
                    handler = %self.handler,
                    dependency = dep.as_deref().unwrap_or("-"),
                    "circuit closed: the probe succeeded"
                );
            } else if fresh && matches!(b.phase, Phase::Closed) {
                b.count(&self.config, now, false);
            }
        }
    }

    /// A failure counts for the breaker of its dependency (created on its
    /// first failure), when it is of the breaker's current period.
    fn failed(&self, inner: &mut Inner, permit: &Permit, dep: Option<&str>, now: Instant) {
        let key: Option<Arc<str>> = dep.map(Arc::from);
        // A new dependency gets its breaker below; until then it has no
        // generation to be probed in, and counts as fresh.
        let known = inner.breakers.contains_key(&key);
        let probed = permit.probed(inner, &key);
        // A dependency seen for the first time has no earlier period: every
        // call that failed on it before its breaker changed state counts,
        // also those whose permits predate the breaker (concurrent calls
        // failing together on a new dependency).
        let first_period = !permit.seen.iter().any(|(d, _)| *d == key)
            && inner.breakers.get(&key).is_some_and(|b| b.generation == 0);
        let fresh = !known || first_period || permit.current(inner, &key);
        let b = inner.breakers.entry(key).or_insert_with(Breaker::new);
        let trip = if probed {
            Some(Trip::ProbeFailed)
        } else if fresh && matches!(b.phase, Phase::Closed) {
            b.count(&self.config, now, true)
        } else {
            None
        };
        let Some(trip) = trip else { return };
        let interval = b.open(&trip, &self.config, now);
        inner.opened += 1;
        RunnerStats::bump(&self.stats.circuit_opened);
        tracing::warn!(
            handler = %self.handler,
            dependency = dep.unwrap_or("-"),
            open_for = ?interval,
            "circuit open ({}): intake paused, failing messages held",
            trip.why()
        );
    }
}

/// gives up (dropped at shutdown).
struct Waiting<'a>(&'a Circuits);

impl Waiting<'_> {
    /// Uncounts without locking (the caller holds the lock); the caller
    /// publishes the change.
    fn done(self, inner: &mut Inner) {
        inner.waiting -= 1;
        std::mem::forget(self);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.waiting -= 1;
        self.0.publish(&inner);
    }
}

fn worst(inner: &Inner) -> CircuitState {
    inner
        .breakers
        .values()
        .map(Breaker::state)
        .max()
        .unwrap_or(CircuitState::Closed)
}

async fn wait(
    notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    until: Option<Instant>,
) {
    match until {
        Some(t) => {
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(t) => {}
            }
        }
        None => notified.await,
    }
}
