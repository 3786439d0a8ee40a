//! One breaker's state machine: closed, open for an interval that doubles
//! per failed probe, half-open with a few probes.

use super::{CircuitBreaker, CircuitState};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(super) enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { out: u32 },
}

#[derive(Debug)]
pub(super) struct Breaker {
    pub(super) phase: Phase,
    /// Bumped on every state change.
    pub(super) generation: u64,
    pub(super) consecutive: u32,
    /// (end time, failed) of recent calls, for the rate trigger.
    pub(super) window: VecDeque<(Instant, bool)>,
    /// Failed probes since the breaker last closed: the interval doubles.
    pub(super) reopened: u32,
}

impl Breaker {
    pub(super) fn new() -> Self {
        Self {
            phase: Phase::Closed,
            generation: 0,
            consecutive: 0,
            window: VecDeque::new(),
            reopened: 0,
        }
    }

    pub(super) fn state(&self) -> CircuitState {
        match self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
            Phase::Open { .. } => CircuitState::Open,
        }
    }

    /// Closed again: a probe succeeded.
    pub(super) fn close(&mut self) {
        self.phase = Phase::Closed;
        self.generation += 1;
        self.consecutive = 0;
        self.window.clear();
        self.reopened = 0;
    }

    /// Counts how a call ended while closed; the trip when that opens it.
    pub(super) fn count(
        &mut self,
        config: &CircuitBreaker,
        now: Instant,
        failed: bool,
    ) -> Option<Trip> {
        if !failed {
            self.consecutive = 0;
            self.push(config, now, false);
            return None;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.push(config, now, true);
        self.tripped(config)
    }

    /// Opens for the interval `trip` calls for (doubled per failed probe,
    /// up to the cap), and returns it.
    pub(super) fn open(&mut self, trip: &Trip, config: &CircuitBreaker, now: Instant) -> Duration {
        if matches!(trip, Trip::ProbeFailed) {
            self.reopened = self.reopened.saturating_add(1);
        }
        let interval = open_interval(config, self.reopened);
        self.phase = Phase::Open {
            until: now + interval,
        };
        self.generation += 1;
        self.consecutive = 0;
        self.window.clear();
        interval
    }

    fn push(&mut self, config: &CircuitBreaker, now: Instant, failed: bool) {
        if let Some(rate) = &config.failure_rate {
            self.window.push_back((now, failed));
            while self
                .window
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > rate.window)
            {
                self.window.pop_front();
            }
        }
    }

    fn tripped(&self, config: &CircuitBreaker) -> Option<Trip> {
        if let Some(n) = config.consecutive_failures
            && self.consecutive >= n
        {
            return Some(Trip::Consecutive(self.consecutive));
        }
        if let Some(rate) = &config.failure_rate {
            let calls = self.window.len();
            let failed = self.window.iter().filter(|(_, f)| *f).count();
            if calls >= rate.minimum_calls as usize
                && failed as f64 >= rate.threshold * calls as f64
            {
                return Some(Trip::Rate { failed, calls });
            }
        }
        None
    }
}

/// Why a breaker opened, for the log.
pub(super) enum Trip {
    Consecutive(u32),
    Rate { failed: usize, calls: usize },
    ProbeFailed,
}

impl Trip {
    /// Why, for the log.
    pub(super) fn why(&self) -> String {
        match self {
            Trip::Consecutive(n) => format!("{n} consecutive failures"),
            Trip::Rate { failed, calls } => format!("{failed} of the last {calls} calls failed"),
            Trip::ProbeFailed => "the half-open probe failed".to_owned(),
        }
    }
}

fn open_interval(config: &CircuitBreaker, reopened: u32) -> Duration {
    let factor = 1u32.checked_shl(reopened.min(20)).unwrap_or(u32::MAX);
    config
        .open_for
        .saturating_mul(factor)
        .min(config.max_open_for)
}
