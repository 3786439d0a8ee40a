//! What every step of a message's path reads: the runner's shared parts,
//! its route (handler and options), metrics and the stop signals.

use super::{Route, Shared};
use crate::circuit;
use crate::observability::RouteMetrics;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(super) struct Ctx<T> {
    pub(super) shared: Arc<Shared<T>>,
    pub(super) route: Arc<Route>,
    pub(super) metrics: Arc<RouteMetrics>,
    pub(super) shutdown: CancellationToken,
    pub(super) system: &'static str,
    /// Routing of copies runs in tasks of its own, tracked for the drain,
    /// abandoned at the shutdown deadline...
    pub(super) tracker: TaskTracker,
    pub(super) hard: CancellationToken,
    /// ...and bounded: at most this many copies on their way per source.
    pub(super) routing: Arc<Semaphore>,
}

impl<T> Clone for Ctx<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            route: self.route.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            system: self.system,
            tracker: self.tracker.clone(),
            hard: self.hard.clone(),
            routing: self.routing.clone(),
        }
    }
}

impl<T> Ctx<T> {
    /// Whether the task that settled a delivery may take its lane's next one
    /// itself. Not while shutting down, not while the breaker is anything
    /// but closed (intake decides about probes), not with a rate limit (its
    /// tokens are taken at intake).
    pub(super) fn may_go_on(&self) -> bool {
        !self.shared.health.shutting_down()
            && self.route.rate_limit.is_none()
            && self
                .route
                .circuits
                .as_ref()
                .is_none_or(|c| c.state() == circuit::CircuitState::Closed)
    }
}
