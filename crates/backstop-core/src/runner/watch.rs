//! Stuck deliveries, for liveness: a delivery whose current step (a handler
//! attempt with its backoff, the routing of its copy, its settlement) has
//! lasted longer than the route's bound is stuck, and `/healthz` says so.
//! Waits that are the runner's purpose (an open circuit breaker holding the
//! message, another worker's dedupe claim, a free routing slot) do not count.
//!
//! No registry and no lock: a delivery's clock is a count in one of
//! [`RING`] epoch buckets (an epoch is a quarter of the bound). A delivery
//! counted in an epoch at least five epochs back has been in its step for
//! more than the bound; one stuck is seen within 1.5 times the bound. Two
//! atomic adds per step, whatever the concurrency.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;

/// Epochs in one bound.
const PER_BOUND: u32 = 4;
/// Epoch buckets: a delivery stuck for `RING` epochs aliases a current one
/// and stops counting as stuck (by then liveness has failed for more than
/// twice the bound).
const RING: usize = 16;

/// The clocks of one route's deliveries.
#[derive(Debug)]
pub(crate) struct Watch {
    epoch0: Instant,
    /// The length of an epoch in nanoseconds (at least 1 ms).
    epoch_nanos: u64,
    bound: Duration,
    counts: [AtomicUsize; RING],
}

impl Watch {
    /// Deliveries count as stuck after `bound` in one step.
    pub(crate) fn new(bound: Duration) -> Self {
        Self {
            epoch0: Instant::now(),
            epoch_nanos: u64::try_from((bound / PER_BOUND).as_nanos())
                .unwrap_or(u64::MAX)
                .max(1_000_000),
            bound,
            counts: std::array::from_fn(|_| AtomicUsize::new(0)),
        }
    }

    /// The current epoch (read on every message: in `u64`, where a
    /// `u128` division would cost more than reading the clock).
    fn now(&self) -> u64 {
        let elapsed = self.epoch0.elapsed();
        let nanos = elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(elapsed.subsec_nanos()));
        nanos / self.epoch_nanos.max(1)
    }

    fn bucket(&self, epoch: u64) -> &AtomicUsize {
        // `RING` divides u64's range: the cast back is lossless.
        &self.counts[(epoch % RING as u64) as usize]
    }

    /// A running clock for one delivery, started now.
    pub(crate) fn clock(&self) -> Clock<'_> {
        let mut c = Clock {
            watch: self,
            epoch: None,
        };
        c.restart();
        c
    }

    /// How long a step may last.
    pub(crate) fn bound(&self) -> Duration {
        self.bound
    }

    /// Deliveries in one step for longer than the bound.
    pub(crate) fn stuck(&self) -> usize {
        let now = self.now();
        (u64::from(PER_BOUND) + 1..RING as u64)
            .filter_map(|back| now.checked_sub(back))
            .map(|e| self.bucket(e).load(Relaxed))
            .sum()
    }
}

/// One delivery's clock: counted while running, uncounted when paused or
/// dropped (a panic, an abandoned task: no leak).
#[derive(Debug)]
pub(crate) struct Clock<'a> {
    watch: &'a Watch,
    epoch: Option<u64>,
}

impl Clock<'_> {
    /// A new step begins: the clock starts again from now.
    pub(crate) fn restart(&mut self) {
        self.pause();
        let e = self.watch.now();
        self.watch.bucket(e).fetch_add(1, Relaxed);
        self.epoch = Some(e);
    }

    /// A wait that is not stuck begins (the breaker, a claim, a slot).
    pub(crate) fn pause(&mut self) {
        if let Some(e) = self.epoch.take() {
            self.watch.bucket(e).fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Clock<'_> {
    fn drop(&mut self) {
        self.pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_step_longer_than_the_bound_is_stuck_until_it_moves_on() {
        let w = Watch::new(Duration::from_secs(10));
        let mut c = w.clock();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(w.stuck(), 0, "within the bound");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(w.stuck(), 1, "15 s in one step");
        c.restart();
        assert_eq!(w.stuck(), 0, "a new step");
        c.pause();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(w.stuck(), 0, "a legitimate wait is not stuck");
        c.restart();
        drop(c);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(w.stuck(), 0, "a dropped clock counts no more");
    }

    #[tokio::test(start_paused = true)]
    async fn never_stuck_before_the_bound_whatever_the_epoch_phase() {
        let w = Watch::new(Duration::from_secs(10));
        for offset_ms in (0..10_000).step_by(700) {
            tokio::time::advance(Duration::from_millis(offset_ms)).await;
            let c = w.clock();
            tokio::time::advance(Duration::from_millis(9_999)).await;
            assert_eq!(w.stuck(), 0, "started at phase {offset_ms} ms");
            drop(c);
        }
    }
}
