use crate::error::ConfigError;
use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

/// Exponential backoff with full jitter and a cap, for immediate retries.
///
/// The un-jittered base grows `min, min*factor, min*factor², ...` up to `max`
/// (backon's exponential builder); each actual delay is drawn uniformly from
/// `[0, base]` ("full jitter"), so a crowd of failing consumers spreads out
/// instead of retrying in lock-step, and no delay ever exceeds the cap.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    factor: f32,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s.
    fn default() -> Self {
        Self::exponential(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Starts at `min`, doubles, never above `max`.
    pub fn exponential(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            factor: 2.0,
        }
    }

    /// Growth factor (at least 1.0).
    #[must_use]
    pub fn with_factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// The first base delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The un-jittered delay before retry number `retry` (1 = first retry).
    pub fn base_delay(&self, retry: u32) -> Duration {
        // Past a thousand steps the base sits at the cap for any sane factor.
        let n = (retry.clamp(1, 1_000) - 1) as usize;
        ExponentialBuilder::new()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(self.factor)
            .without_max_times()
            .build()
            .nth(n)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The jittered delay before retry number `retry`: uniform in `[0, base_delay(retry)]`.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self.base_delay(retry);
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.min > self.max {
            return Err(ConfigError::new(
                format!("{field}.min"),
                format!("{:?} is above the cap {:?}", self.min, self.max),
            ));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(ConfigError::new(
                format!("{field}.factor"),
                format!("{} must be a finite number >= 1.0", self.factor),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_grows_exponentially_until_the_cap_then_stays() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2));
        let bases: Vec<_> = (1..=8).map(|n| b.base_delay(n).as_millis()).collect();
        assert_eq!(bases, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn every_jittered_delay_is_within_zero_and_the_base() {
        let b = Backoff::exponential(Duration::from_millis(50), Duration::from_millis(700))
            .with_factor(3.0);
        for retry in 1..=12 {
            let base = b.base_delay(retry);
            assert!(base <= b.max());
            let mut seen_low = false;
            let mut seen_high = false;
            for _ in 0..2_000 {
                let d = b.delay(retry);
                assert!(d <= base, "retry {retry}: {d:?} > {base:?}");
                seen_low |= d < base / 4;
                seen_high |= d > base * 3 / 4;
            }
            // Full jitter really spreads over the whole range.
            assert!(seen_low && seen_high, "retry {retry}: jitter not spread");
        }
    }

    #[test]
    fn huge_retry_numbers_stay_capped() {
        let b = Backoff::default();
        assert_eq!(b.base_delay(10_000), b.max());
        assert!(b.delay(u32::MAX) <= b.max());
    }

    #[test]
    fn invalid_backoff_is_refused() {
        let e = Backoff::exponential(Duration::from_secs(3), Duration::from_secs(1))
            .validate("policy.backoff")
            .unwrap_err();
        assert_eq!(e.field, "policy.backoff.min");
        let e = Backoff::default()
            .with_factor(0.5)
            .validate("p")
            .unwrap_err();
        assert_eq!(e.field, "p.factor");
    }
}
