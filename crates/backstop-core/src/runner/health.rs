//! What a worker's `/healthz` and `/readyz` ask of a runner: is every source
//! loop making progress, is every source subscribed, is the runner shutting
//! down, are all its circuits open.

use super::Route;
use crate::circuit::CircuitState;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;

/// How often an idle source loop proves it is alive.
pub(crate) const BEAT: Duration = Duration::from_secs(1);

/// Per-source liveness, kept in its route.
#[derive(Debug)]
pub(crate) struct Pulse {
    epoch: Instant,
    /// Milliseconds since `epoch` at the loop's last step.
    beat: AtomicU64,
    subscribed: AtomicBool,
}

impl Pulse {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            beat: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
        }
    }

    /// The source loop made a step (or waited one more beat, alive).
    pub(crate) fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat.store(ms, Relaxed);
    }

    pub(crate) fn subscribed(&self, yes: bool) {
        self.subscribed.store(yes, Relaxed);
        self.beat();
    }

    fn idle_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.beat.load(Relaxed)))
    }
}

/// Live health of a runner; get it with [`Runner::health`](super::Runner::health)
/// before `run` consumes the runner.
#[derive(Debug)]
pub struct RunnerHealth {
    pub(super) routes: Vec<Arc<Route>>,
    pub(super) running: AtomicBool,
    pub(super) shutting_down: AtomicBool,
}

/// One source of a runner, as [`RunnerHealth::routes`] sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteStatus {
    /// The topic or queue.
    pub source: String,
    /// The handler's name.
    pub handler: String,
    /// The source has a live subscription (stream) on the broker.
    pub subscribed: bool,
    /// The worst state of the handler's breakers (`Closed` when it has none).
    pub circuit: CircuitState,
    /// Time since the source loop last made a step or beat (it beats every
    /// second while it waits).
    pub idle_for: Duration,
    /// Deliveries stuck in one step (a handler attempt with its backoff, the
    /// routing of a copy) for longer than `stuck_after`.
    pub stuck: usize,
    /// How long one step of a delivery may last: the handler's timeout plus
    /// its backoff cap plus the runner's routing deadline.
    pub stuck_after: Duration,
}

impl RunnerHealth {
    pub(super) fn new(routes: Vec<Arc<Route>>) -> Self {
        Self {
            routes,
            running: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Every source, now.
    pub fn routes(&self) -> Vec<RouteStatus> {
        self.routes
            .iter()
            .map(|r| RouteStatus {
                source: r.subscription.source.clone(),
                handler: r.name.to_string(),
                subscribed: r.pulse.subscribed.load(Relaxed),
                circuit: r
                    .circuits
                    .as_ref()
                    .map_or(CircuitState::Closed, |c| c.state()),
                idle_for: r.pulse.idle_for(),
                stuck: r.watch.stuck(),
                stuck_after: r.watch.bound(),
            })
            .collect()
    }

    /// `run` has started and not returned.
    pub fn running(&self) -> bool {
        self.running.load(Relaxed)
    }

    /// Shutdown has begun: intake stopped, in-flight work draining.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Liveness: `Err` names each source loop that has not made a step for
    /// `stall_after` (a loop stuck in an await that never ends) and each
    /// source with a delivery stuck in one step for longer than its
    /// `stuck_after` (a slot that will never come free). A runner not started
    /// yet or shutting down counts as live.
    pub fn live(&self, stall_after: Duration) -> Result<(), String> {
        if !self.running() || self.shutting_down() {
            return Ok(());
        }
        let mut stuck = Vec::new();
        for r in self.routes() {
            if r.idle_for > stall_after {
                stuck.push(format!(
                    "source {} made no progress for {:?}",
                    r.source, r.idle_for
                ));
            }
            if r.stuck > 0 {
                stuck.push(format!(
                    "source {}: {} deliver{} in flight in one step for more than {:?}",
                    r.source,
                    r.stuck,
                    if r.stuck == 1 { "y" } else { "ies" },
                    r.stuck_after
                ));
            }
        }
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck.join("; "))
        }
    }

    /// Readiness of the runner itself: running, not shutting down, every
    /// source subscribed, and not every handler's circuit open. (A worker
    /// adds the broker check.) `Err` says why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.shutting_down() {
            return Err("shutting down".into());
        }
        if !self.running() {
            return Err("not started".into());
        }
        let routes = self.routes();
        let unsubscribed: Vec<&str> = routes
            .iter()
            .filter(|r| !r.subscribed)
            .map(|r| r.source.as_str())
            .collect();
        if !unsubscribed.is_empty() {
            return Err(format!("not subscribed: {}", unsubscribed.join(", ")));
        }
        if !routes.is_empty() && routes.iter().all(|r| r.circuit == CircuitState::Open) {
            return Err("every handler's circuit is open".into());
        }
        Ok(())
    }
}
