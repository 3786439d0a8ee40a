//! Intake control: the overall in-flight bound with priority between sources,
//! and the per-source rate limit.

use crate::error::ConfigError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A source's priority among the sources of one runner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum Priority {
    /// Takes an in-flight slot only when no normal source is waiting for one:
    /// under load it yields to the others, and it uses the spare capacity.
    Low,
    /// The default.
    #[default]
    Normal,
}

/// The runner-wide in-flight bound. Like a semaphore, except that a low
/// priority source gets a slot only while no normal-priority source waits.
#[derive(Debug)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    freed: Notify,
}

#[derive(Debug)]
struct GateState {
    available: usize,
    normal_waiting: usize,
}

/// One slot of the gate; freed on drop.
#[derive(Debug)]
pub(super) struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.lock().available += 1;
        self.0.freed.notify_waiters();
    }
}

/// A normal-priority source counted as waiting; uncounted on drop.
struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().normal_waiting -= 1;
        self.0.freed.notify_waiters();
    }
}

impl Gate {
    pub(super) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(GateState {
                available: slots,
                normal_waiting: 0,
            }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a normal-priority source waits for a slot (a low-priority one
    /// should then give its slot up rather than keep it for its next message).
    pub(super) fn normal_waiting(&self) -> bool {
        self.lock().normal_waiting > 0
    }

    /// Waits for a slot. Cancel-safe.
    pub(super) async fn acquire(self: &Arc<Self>, priority: Priority) -> Slot {
        let mut waiting = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                let may =
                    s.available > 0 && (priority == Priority::Normal || s.normal_waiting == 0);
                if may {
                    s.available -= 1;
                    drop(s);
                    drop(waiting);
                    return Slot(self.clone());
                }
                if priority == Priority::Normal && waiting.is_none() {
                    s.normal_waiting += 1;
                    waiting = Some(Waiting(self));
                }
            }
            freed.await;
        }
    }
}

/// A per-source rate limit: at most `per_second` messages a second taken
/// from the broker, with bursts of up to `burst`.
///
/// A token bucket on tokio's clock (written here rather than taken from
/// `governor`, whose clock the paused-clock tests cannot drive).
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(from = "crate::config_serde::RateLimitFields")
)]
pub struct RateLimit {
    per_second: f64,
    burst: u32,
}

impl RateLimit {
    /// `per_second` messages a second, bursts of up to one second's worth.
    pub fn per_second(per_second: f64) -> Self {
        Self {
            per_second,
            burst: (per_second.ceil() as u32).max(1),
        }
    }

    /// The most messages taken at once after an idle spell (>= 1).
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Checks the fields; the error names the bad one (under `rate_limit.`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.per_second.is_finite() && self.per_second >= 0.001) {
            return Err(ConfigError::new(
                "rate_limit.per_second",
                "must be a number of at least 0.001",
            ));
        }
        if self.burst == 0 {
            return Err(ConfigError::new("rate_limit.burst", "must be at least 1"));
        }
        Ok(())
    }
}

/// The running token bucket of one source.
#[derive(Debug)]
pub(super) struct Bucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.burst),
            at: Instant::now(),
        }
    }

    /// Waits for a token and takes it.
    pub(super) async fn take(&mut self) {
        loop {
            let now = Instant::now();
            let refill = now.duration_since(self.at).as_secs_f64() * self.limit.per_second;
            self.tokens = (self.tokens + refill).min(f64::from(self.limit.burst));
            self.at = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let missing = (1.0 - self.tokens) / self.limit.per_second;
            tokio::time::sleep(Duration::from_secs_f64(missing)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_the_burst_then_the_rate() {
        let mut b = Bucket::new(RateLimit::per_second(10.0).with_burst(5));
        let t = Instant::now();
        for _ in 0..5 {
            b.take().await;
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..20 {
            b.take().await;
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2010),
            "20 more at 10/s: {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_priority_source_waits_while_a_normal_one_does() {
        let gate = Gate::new(1);
        let held = gate.acquire(Priority::Normal).await;
        let g = gate.clone();
        let normal = tokio::spawn(async move { g.acquire(Priority::Normal).await });
        tokio::task::yield_now().await;
        let g = gate.clone();
        let low = tokio::spawn(async move { g.acquire(Priority::Low).await });
        tokio::task::yield_now().await;
        drop(held);
        let n = normal.await.expect("normal gets the slot");
        tokio::task::yield_now().await;
        assert!(!low.is_finished(), "low waits while the slot is taken");
        drop(n);
        let _l = low.await.expect("low gets the free slot");
    }

    #[tokio::test(start_paused = true)]
    async fn low_priority_uses_spare_slots() {
        let gate = Gate::new(2);
        let _a = gate.acquire(Priority::Low).await;
        let _b = gate.acquire(Priority::Low).await;
        assert_eq!(gate.lock().available, 0);
    }

    #[test]
    fn bad_rate_limits_are_named() {
        assert_eq!(
            RateLimit::per_second(0.0).validate().unwrap_err().field,
            "rate_limit.per_second"
        );
        assert_eq!(
            RateLimit::per_second(5.0)
                .with_burst(0)
                .validate()
                .unwrap_err()
                .field,
            "rate_limit.burst"
        );
    }
}
