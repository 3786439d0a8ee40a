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

use crate::error::{ConfigError, ErrorClass};
use crate::stats::RunnerStats;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Failure-rate trigger: open when at least `minimum_calls` calls ended in
/// the last `window` and `threshold` (0 < t ≤ 1) of them failed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    /// Share of failed calls that opens the breaker.
    pub threshold: f64,
    /// The sliding window.
    pub window: Duration,
    /// Calls needed in the window before the rate counts.
    pub minimum_calls: u32,
}

/// Circuit-breaker settings for a handler
/// ([`HandlerOptions::with_circuit_breaker`](crate::HandlerOptions::with_circuit_breaker)).
///
/// ```
/// use backstop_core::CircuitBreaker;
/// use std::time::Duration;
/// let b = CircuitBreaker::default()
///     .with_consecutive_failures(Some(10))
///     .with_open_for(Duration::from_secs(2), Duration::from_secs(30));
/// assert!(b.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CircuitBreaker {
    consecutive_failures: Option<u32>,
    failure_rate: Option<FailureRate>,
    open_for: Duration,
    max_open_for: Duration,
    half_open_probes: u32,
}

impl Default for CircuitBreaker {
    /// Opens on 5 consecutive failures or on 50 % of at least 20 calls in
    /// 30 s; open for 5 s, doubling up to 60 s; 1 probe when half-open.
    fn default() -> Self {
        Self {
            consecutive_failures: Some(5),
            failure_rate: Some(FailureRate {
                threshold: 0.5,
                window: Duration::from_secs(30),
                minimum_calls: 20,
            }),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }
}

impl CircuitBreaker {
    /// Opens after this many failures in a row (`None`: no such trigger).
    #[must_use]
    pub fn with_consecutive_failures(mut self, n: Option<u32>) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// Opens on a failure rate over a sliding window (`None`: no such trigger).
    #[must_use]
    pub fn with_failure_rate(mut self, rate: Option<FailureRate>) -> Self {
        self.failure_rate = rate;
        self
    }

    /// The first open interval, and the cap it doubles up to after each
    /// failed probe.
    #[must_use]
    pub fn with_open_for(mut self, first: Duration, max: Duration) -> Self {
        self.open_for = first;
        self.max_open_for = max;
        self
    }

    /// Messages let through at once while half-open.
    #[must_use]
    pub fn with_half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n;
        self
    }

    /// Failures in a row that open the breaker.
    pub fn consecutive_failures(&self) -> Option<u32> {
        self.consecutive_failures
    }

    /// The failure-rate trigger.
    pub fn failure_rate(&self) -> Option<FailureRate> {
        self.failure_rate
    }

    /// The first open interval.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }

    /// The cap of the open interval.
    pub fn max_open_for(&self) -> Duration {
        self.max_open_for
    }

    /// Probes let through while half-open.
    pub fn half_open_probes(&self) -> u32 {
        self.half_open_probes
    }

    /// Checks the fields; the error names the bad one (under `circuit_breaker.`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |f: &str| format!("circuit_breaker.{f}");
        if self.consecutive_failures.is_none() && self.failure_rate.is_none() {
            return Err(ConfigError::new(
                field("consecutive_failures"),
                "set consecutive_failures or failure_rate (or leave the breaker off)",
            ));
        }
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError::new(
                field("consecutive_failures"),
                "must be at least 1",
            ));
        }
        if let Some(r) = &self.failure_rate {
            if !(r.threshold > 0.0 && r.threshold <= 1.0) {
                return Err(ConfigError::new(
                    field("failure_rate.threshold"),
                    "must be in (0, 1]",
                ));
            }
            if r.window < Duration::from_secs(1) {
                return Err(ConfigError::new(
                    field("failure_rate.window"),
                    "must be at least 1 s",
                ));
            }
            if r.minimum_calls == 0 {
                return Err(ConfigError::new(
                    field("failure_rate.minimum_calls"),
                    "must be at least 1",
                ));
            }
        }
        if self.open_for.is_zero() {
            return Err(ConfigError::new(
                field("open_for"),
                "must be greater than zero",
            ));
        }
        if self.max_open_for < self.open_for {
            return Err(ConfigError::new(
                field("max_open_for"),
                "must be at least open_for",
            ));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::new(
                field("half_open_probes"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// A few probes go through.
    HalfOpen,
    /// Intake paused, failing messages held.
    Open,
}

impl CircuitState {
    /// The `backstop_circuit_state` value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }

    /// `closed`, `half-open`, `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half-open",
            Self::Open => "open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { out: u32 },
}

#[derive(Debug)]
struct Breaker {
    phase: Phase,
    /// Bumped on every state change.
    generation: u64,
    consecutive: u32,
    /// (end time, failed) of recent calls, for the rate trigger.
    window: VecDeque<(Instant, bool)>,
    /// Failed probes since the breaker last closed: the interval doubles.
    reopened: u32,
}

impl Breaker {
    fn new() -> Self {
        Self {
            phase: Phase::Closed,
            generation: 0,
            consecutive: 0,
            window: VecDeque::new(),
            reopened: 0,
        }
    }

    fn state(&self) -> CircuitState {
        match self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
            Phase::Open { .. } => CircuitState::Open,
        }
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

/// Why a breaker opened, for the log.
enum Trip {
    Consecutive(u32),
    Rate { failed: usize, calls: usize },
    ProbeFailed,
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
        let Permit { probes, seen } = permit;
        // Give back the probe slots this call held.
        for (dep, generation) in &probes {
            if let Some(b) = inner.breakers.get_mut(dep)
                && b.generation == *generation
                && let Phase::HalfOpen { out } = &mut b.phase
            {
                *out = out.saturating_sub(1);
            }
        }
        let current = |inner: &Inner, dep: &Option<Arc<str>>| {
            seen.iter()
                .find(|(d, _)| d == dep)
                .is_some_and(|(_, g)| inner.breakers.get(dep).is_some_and(|b| b.generation == *g))
        };
        match verdict {
            Verdict::Ignored => {}
            Verdict::Success => {
                let deps: Vec<Option<Arc<str>>> = inner.breakers.keys().cloned().collect();
                for dep in deps {
                    let probed = probes.iter().any(|(d, g)| {
                        *d == dep && inner.breakers.get(&dep).is_some_and(|b| b.generation == *g)
                    });
                    let fresh = current(&inner, &dep);
                    // One of the keys just listed: always there.
                    let Some(b) = inner.breakers.get_mut(&dep) else {
                        continue;
                    };
                    if probed {
                        b.phase = Phase::Closed;
                        b.generation += 1;
                        b.consecutive = 0;
                        b.window.clear();
                        b.reopened = 0;
                        tracing::info!(
                            handler = %self.handler,
                            dependency = dep.as_deref().unwrap_or("-"),
                            "circuit closed: the probe succeeded"
                        );
                    } else if fresh && matches!(b.phase, Phase::Closed) {
                        b.consecutive = 0;
                        push(b, &self.config, now, false);
                    }
                }
            }
            Verdict::Failure(dep) => {
                let key: Option<Arc<str>> = dep.map(Arc::from);
                // A new dependency gets its breaker below; until then it has
                // no generation to be probed in, and counts as fresh.
                let known = inner.breakers.contains_key(&key);
                let probed = probes.iter().any(|(d, g)| {
                    *d == key && inner.breakers.get(d).is_some_and(|b| b.generation == *g)
                });
                // A dependency seen for the first time has no earlier period:
                // every call that failed on it before its breaker changed
                // state counts, also those whose permits predate the breaker
                // (concurrent calls failing together on a new dependency).
                let first_period = !seen.iter().any(|(d, _)| *d == key)
                    && inner.breakers.get(&key).is_some_and(|b| b.generation == 0);
                let fresh = !known || first_period || current(&inner, &key);
                let config = self.config;
                let b = inner
                    .breakers
                    .entry(key.clone())
                    .or_insert_with(Breaker::new);
                let trip = if probed {
                    Some(Trip::ProbeFailed)
                } else if fresh && matches!(b.phase, Phase::Closed) {
                    b.consecutive += 1;
                    push(b, &config, now, true);
                    tripped(b, &config)
                } else {
                    None
                };
                if let Some(trip) = trip {
                    if matches!(trip, Trip::ProbeFailed) {
                        b.reopened += 1;
                    }
                    let interval = open_interval(&config, b.reopened);
                    b.phase = Phase::Open {
                        until: now + interval,
                    };
                    b.generation += 1;
                    b.consecutive = 0;
                    b.window.clear();
                    inner.opened += 1;
                    RunnerStats::bump(&self.stats.circuit_opened);
                    let why = match trip {
                        Trip::Consecutive(n) => format!("{n} consecutive failures"),
                        Trip::Rate { failed, calls } => {
                            format!("{failed} of the last {calls} calls failed")
                        }
                        Trip::ProbeFailed => "the half-open probe failed".to_owned(),
                    };
                    tracing::warn!(
                        handler = %self.handler,
                        dependency = dep.unwrap_or("-"),
                        open_for = ?interval,
                        "circuit open ({why}): intake paused, failing messages held"
                    );
                }
            }
        }
        let after = worst(&inner);
        if before != after || !probes.is_empty() {
            self.publish(&inner);
        }
        matches!(verdict, Verdict::Failure(_)) && after != CircuitState::Closed
    }
}

/// A message counted as waiting for a permit; uncounted when it gets one or
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

fn push(b: &mut Breaker, config: &CircuitBreaker, now: Instant, failed: bool) {
    if let Some(rate) = &config.failure_rate {
        b.window.push_back((now, failed));
        while b
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > rate.window)
        {
            b.window.pop_front();
        }
    }
}

fn tripped(b: &Breaker, config: &CircuitBreaker) -> Option<Trip> {
    if let Some(n) = config.consecutive_failures
        && b.consecutive >= n
    {
        return Some(Trip::Consecutive(b.consecutive));
    }
    if let Some(rate) = &config.failure_rate {
        let calls = b.window.len();
        let failed = b.window.iter().filter(|(_, f)| *f).count();
        if calls >= rate.minimum_calls as usize && failed as f64 >= rate.threshold * calls as f64 {
            return Some(Trip::Rate { failed, calls });
        }
    }
    None
}

fn open_interval(config: &CircuitBreaker, reopened: u32) -> Duration {
    let factor = 1u32.checked_shl(reopened.min(20)).unwrap_or(u32::MAX);
    config
        .open_for
        .saturating_mul(factor)
        .min(config.max_open_for)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> CircuitBreaker {
        CircuitBreaker::default()
            .with_consecutive_failures(Some(3))
            .with_failure_rate(None)
            .with_open_for(Duration::from_secs(1), Duration::from_secs(4))
    }

    async fn fail(c: &Circuits, dep: Option<&str>) -> bool {
        let p = c.permit().await;
        c.record(p, Verdict::Failure(dep))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let c = Circuits::new(quick(), "h".into(), Default::default());
        assert!(!fail(&c, None).await);
        assert!(!fail(&c, None).await);
        let p = c.permit().await;
        c.record(p, Verdict::Success);
        assert!(!fail(&c, None).await);
        assert!(!fail(&c, None).await);
        assert_eq!(c.state(), CircuitState::Closed);
        assert!(fail(&c, None).await, "the third failure in a row holds");
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(c.opened(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_failures_never_open_it() {
        let c = Circuits::new(quick(), "h".into(), Default::default());
        for _ in 0..20 {
            let p = c.permit().await;
            assert!(!c.record(p, Verdict::Ignored));
        }
        assert_eq!(c.state(), CircuitState::Closed);
        assert!(!counts(ErrorClass::Permanent));
        assert!(!counts(ErrorClass::Poison));
        assert!(!counts(ErrorClass::Panic));
        assert!(counts(ErrorClass::Timeout));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probe_failure_doubles_the_interval_up_to_the_cap() {
        let c = Circuits::new(quick(), "h".into(), Default::default());
        for _ in 0..3 {
            fail(&c, None).await;
        }
        let opened = Instant::now();
        // Open for 1 s: the permit waits for half-open.
        let probe = c.permit().await;
        assert_eq!(opened.elapsed(), Duration::from_secs(1));
        assert_eq!(c.state(), CircuitState::HalfOpen);
        // A second caller waits: one probe at a time.
        let second = tokio::time::timeout(Duration::from_millis(10), c.permit()).await;
        assert!(second.is_err(), "only one probe while half-open");
        assert!(c.record(probe, Verdict::Failure(None)));
        assert_eq!(c.state(), CircuitState::Open);
        let reopened = Instant::now();
        let probe = c.permit().await;
        assert_eq!(reopened.elapsed(), Duration::from_secs(2), "doubled");
        c.record(probe, Verdict::Failure(None));
        let t = Instant::now();
        let probe = c.permit().await;
        assert_eq!(t.elapsed(), Duration::from_secs(4));
        c.record(probe, Verdict::Failure(None));
        let t = Instant::now();
        let probe = c.permit().await;
        assert_eq!(t.elapsed(), Duration::from_secs(4), "capped");
        assert!(!c.record(probe, Verdict::Success));
        assert_eq!(c.state(), CircuitState::Closed);
        // Closed again: the interval starts from the beginning.
        for _ in 0..3 {
            fail(&c, None).await;
        }
        let t = Instant::now();
        let _ = c.permit().await;
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_needs_the_minimum_calls_and_forgets_old_calls() {
        let config = CircuitBreaker::default()
            .with_consecutive_failures(None)
            .with_failure_rate(Some(FailureRate {
                threshold: 0.5,
                window: Duration::from_secs(10),
                minimum_calls: 10,
            }));
        let c = Circuits::new(config, "h".into(), Default::default());
        // Alternate: 50 % failures, but the minimum is reached only at call 10.
        for i in 0..9 {
            let p = c.permit().await;
            let v = if i % 2 == 0 {
                Verdict::Failure(None)
            } else {
                Verdict::Success
            };
            assert!(!c.record(p, v), "call {i}");
        }
        // Old calls leave the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        let p = c.permit().await;
        assert!(!c.record(p, Verdict::Failure(None)));
        assert_eq!(c.state(), CircuitState::Closed);
        for i in 0..9 {
            assert_eq!(c.state(), CircuitState::Closed, "call {i}");
            let p = c.permit().await;
            let v = if i % 2 == 0 {
                Verdict::Failure(None)
            } else {
                Verdict::Success
            };
            c.record(p, v);
        }
        assert_eq!(c.state(), CircuitState::Open, "6 of the last 10 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_named_dependency_has_its_own_breaker_and_pauses_the_handler() {
        let c = Circuits::new(quick(), "h".into(), Default::default());
        fail(&c, Some("inventory")).await;
        fail(&c, None).await;
        fail(&c, Some("inventory")).await;
        assert_eq!(c.state(), CircuitState::Closed, "2 + 1: neither reached 3");
        assert!(fail(&c, Some("inventory")).await);
        assert_eq!(c.state(), CircuitState::Open);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), c.intake_ready())
                .await
                .is_err(),
            "intake paused"
        );
        let probe = c.permit().await;
        c.record(probe, Verdict::Success);
        assert_eq!(c.state(), CircuitState::Closed);
        c.intake_ready().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_result_from_before_the_opening_does_not_count() {
        let c = Circuits::new(quick(), "h".into(), Default::default());
        let late = c.permit().await;
        for _ in 0..3 {
            fail(&c, None).await;
        }
        let probe = c.permit().await;
        // The slow call that started while closed fails now: not a probe.
        assert!(c.record(late, Verdict::Failure(None)), "held: not closed");
        assert_eq!(c.state(), CircuitState::HalfOpen);
        c.record(probe, Verdict::Success);
        assert_eq!(c.state(), CircuitState::Closed);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = CircuitBreaker::default()
            .with_consecutive_failures(Some(0))
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "circuit_breaker.consecutive_failures");
        let e = CircuitBreaker::default()
            .with_open_for(Duration::from_secs(10), Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "circuit_breaker.max_open_for");
        let e = CircuitBreaker::default()
            .with_half_open_probes(0)
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "circuit_breaker.half_open_probes");
        let e = CircuitBreaker::default()
            .with_failure_rate(Some(FailureRate {
                threshold: 1.5,
                window: Duration::from_secs(10),
                minimum_calls: 5,
            }))
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "circuit_breaker.failure_rate.threshold");
    }
}
