//! The retry budget: immediate retries limited to a share of recent successes
//! plus a small floor, so an outage cannot turn into a retry storm. Built on
//! tower's `TpsBudget` (the token bucket of gRPC retry throttling).

use crate::error::ConfigError;
use std::time::Duration;
use tower::retry::budget::TpsBudget;

/// How many immediate retries a handler may spend.
///
/// Every success deposits `ratio` of a retry; every immediate retry withdraws
/// one; `min_per_sec` retries per second are always allowed (the floor), and
/// deposits expire after `window`. When the budget is spent, a failing message
/// skips its remaining immediate attempts and goes to its next delay tier
/// (with no tier left it keeps its immediate retries: the budget never
/// dead-letters early). Counted in `backstop_retry_budget_exhausted_total`.
///
/// ```
/// use backstop_core::RetryBudget;
/// use std::time::Duration;
/// let b = RetryBudget::new(Duration::from_secs(10), 5, 0.1);
/// assert!(b.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct RetryBudget {
    #[cfg_attr(
        feature = "serde",
        serde(deserialize_with = "crate::config_serde::duration")
    )]
    window: Duration,
    min_per_sec: u32,
    ratio: f32,
}

impl Default for RetryBudget {
    /// 10 s window, 10 retries per second floor, 20 % of successes.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl RetryBudget {
    /// A budget over `window` (1 to 60 s) with a floor of `min_per_sec`
    /// retries per second and `ratio` (0 to 1000) retries per success.
    pub fn new(window: Duration, min_per_sec: u32, ratio: f32) -> Self {
        Self {
            window,
            min_per_sec,
            ratio,
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Retries a second allowed whatever the successes.
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// Retries allowed per success.
    pub fn ratio(&self) -> f32 {
        self.ratio
    }

    /// The most retries a burst of failures with no success can spend.
    pub fn floor(&self) -> u64 {
        u64::from(self.min_per_sec) * self.window.as_secs()
    }

    /// Checks the fields; the error names the bad one (under `retry_budget.`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "retry_budget.window",
                "must be between 1 s and 60 s",
            ));
        }
        if !(0.0..=1000.0).contains(&self.ratio) {
            return Err(ConfigError::new(
                "retry_budget.ratio",
                "must be between 0 and 1000",
            ));
        }
        if self.min_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::new("retry_budget.min_per_sec", "is too large"));
        }
        Ok(())
    }

    /// The running budget (validated fields: `TpsBudget::new` panics otherwise).
    pub(crate) fn build(&self) -> TpsBudget {
        TpsBudget::new(self.window, self.min_per_sec, self.ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::retry::budget::Budget;

    #[test]
    fn bad_fields_are_named() {
        let field = |b: RetryBudget| b.validate().expect_err("invalid").field;
        assert_eq!(
            field(RetryBudget::new(Duration::ZERO, 1, 0.2)),
            "retry_budget.window"
        );
        assert_eq!(
            field(RetryBudget::new(Duration::from_secs(61), 1, 0.2)),
            "retry_budget.window"
        );
        assert_eq!(
            field(RetryBudget::new(Duration::from_secs(10), 1, -1.0)),
            "retry_budget.ratio"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_alone_get_the_floor_successes_earn_their_share() {
        let b = RetryBudget::new(Duration::from_secs(10), 2, 0.5);
        let bucket = b.build();
        let mut granted = 0;
        while bucket.withdraw() {
            granted += 1;
            assert!(granted <= 1000, "the floor is finite");
        }
        assert_eq!(granted, b.floor(), "a pure failure burst gets the floor");
        for _ in 0..10 {
            bucket.deposit();
        }
        let mut earned = 0;
        while bucket.withdraw() {
            earned += 1;
        }
        assert_eq!(earned, 5, "10 successes at ratio 0.5 earn 5 retries");
    }
}
