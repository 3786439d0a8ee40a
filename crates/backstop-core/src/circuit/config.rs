//! A circuit breaker's settings ([`CircuitBreaker`], [`FailureRate`]) and
//! their validation.

use crate::error::ConfigError;
use std::time::Duration;

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
    pub(super) consecutive_failures: Option<u32>,
    pub(super) failure_rate: Option<FailureRate>,
    pub(super) open_for: Duration,
    pub(super) max_open_for: Duration,
    pub(super) half_open_probes: u32,
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
