//! The runner: pulls deliveries, runs the handler inside its layers, and routes
//! every outcome (ack, immediate retry, delay tier, DLQ) without ever acking an
//! original before its replacement is confirmed.
//!
//! - `options`, `builder`: the settings and `build`, which validates them;
//! - `source`: one loop per source: intake gate, the stream, a task per
//!   message (that takes its lane's next one itself);
//! - `process` and its steps (`trust`, `held`, `claim`, `invoke`,
//!   `decide`, `copy`, `route`, `outcome`): the path of one delivery;
//! - `intake`, `watch`, `health`, `panics`, `stub`: in-flight bounds and
//!   priority, liveness, readiness, the panic ledger, slimmed copies.

mod builder;
mod claim;
mod copy;
mod ctx;
mod decide;
mod health;
mod held;
mod intake;
mod invoke;
mod options;
mod outcome;
mod panics;
mod process;
mod route;
mod source;
mod stub;
mod trust;
mod watch;

pub use crate::stats::{RunnerStats, StatsSnapshot};
pub use builder::{RunnerBuilder, SharedHandler};
pub use health::{RouteStatus, RunnerHealth};
pub use intake::{Priority, RateLimit};
pub use options::{DEFAULT_MAX_DELIVERIES, HandlerOptions};

use crate::circuit::Circuits;
use crate::dedupe::Dedupe;
use crate::handler::context::HandlerScope;
use crate::observability::{RouteMetrics, TracePropagation};
use crate::retry::{Backoff, RetryPolicy};
use crate::transport::{Subscription, Transport};
use intake::Gate;
use invoke::DynHandler;
use source::{CLOSE_DEADLINE, SourceLoop, routing_slots, source_loop};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::retry::budget::TpsBudget;

struct Route {
    subscription: Subscription,
    handler: Arc<dyn DynHandler>,
    name: Arc<str>,
    /// The handler's name and the intake token, for every `Context`.
    scope: Arc<HandlerScope>,
    timeout: Duration,
    policy: RetryPolicy,
    concurrency: usize,
    max_deliveries: Option<u32>,
    budget: Option<TpsBudget>,
    circuits: Option<Circuits>,
    rate_limit: Option<RateLimit>,
    priority: Priority,
    dedupe: Option<Dedupe>,
    /// The "no id to dedupe by" warning was logged.
    content_id_warned: std::sync::atomic::AtomicBool,
    /// Liveness of this source's loop.
    pulse: health::Pulse,
    /// Messages whose processing panicked outside the handler.
    panics: panics::Ledger,
    /// Messages whose copy could not be routed, by id: how many times.
    unrouted: panics::Ledger,
    /// Deliveries stuck in one step, for liveness.
    watch: watch::Watch,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("subscription", &self.subscription)
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

struct Shared<T> {
    transport: T,
    /// Liveness and readiness; its shutting-down flag is set just before
    /// the intake token is cancelled, and read for every message where the
    /// token would take a lock.
    health: Arc<RunnerHealth>,
    /// Cancelled when intake stops (handlers see it as `Context::shutdown`).
    intake: CancellationToken,
    /// Set when the shutdown deadline passes: what is still in flight is
    /// left to the broker (see `Settlement::leave_unsettled_when`).
    abandoning: Arc<std::sync::atomic::AtomicBool>,
    host: String,
    route_attempts: u32,
    route_backoff: Backoff,
    unroutable: crate::unroutable::UnroutableStore,
    unroutable_after: u32,
    stats: Arc<RunnerStats>,
    propagation: Option<Arc<dyn TracePropagation>>,
}

/// Runs handlers against a transport until shut down.
///
/// ```
/// # #[cfg(feature = "memory")] {
/// use backstop_core::{handler_fn, Context, Json, Message, Publisher, Runner, memory::MemoryBroker};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let broker = MemoryBroker::new();
/// broker.publish("orders", Message::new("42")).await.unwrap();
/// let runner = Runner::builder(broker.clone())
///     .with_group("billing")
///     .with_handler("orders", handler_fn(|Json(n): Json<u32>, _: Context| async move {
///         assert_eq!(n, 42);
///         Ok(())
///     }))
///     .build()
///     .unwrap();
/// let stats = runner.stats();
/// let idle = broker.clone();
/// runner.run(async move { idle.wait_idle().await }).await;
/// assert_eq!(stats.snapshot().ok, 1);
/// # });
/// # }
/// ```
pub struct Runner<T> {
    shared: Arc<Shared<T>>,
    routes: Vec<Arc<Route>>,
    max_in_flight: usize,
    shutdown_deadline: Duration,
    resubscribe_backoff: Backoff,
}

impl<T> fmt::Debug for Runner<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("routes", &self.routes)
            .field("max_in_flight", &self.max_in_flight)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .finish_non_exhaustive()
    }
}

/// What a finished run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Counters at the end.
    pub stats: StatsSnapshot,
    /// True when every in-flight delivery finished before the deadline.
    pub drained: bool,
}

impl<T> Runner<T>
where
    T: Transport,
{
    /// Starts a builder: group `backstop`, 64 in flight, 30 s shutdown deadline,
    /// 3 tries to publish a retry/DLQ copy (50 ms .. 1 s backoff).
    pub fn builder(transport: T) -> RunnerBuilder<T> {
        RunnerBuilder::new(transport)
    }

    /// Live counters; clone the `Arc` before `run` consumes the runner.
    pub fn stats(&self) -> Arc<RunnerStats> {
        self.shared.stats.clone()
    }

    /// What each source subscribes to (source, group, tiers, prefetch), for
    /// backlog readings ([`Inspect`](crate::transport::Inspect)).
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.routes.iter().map(|r| r.subscription.clone()).collect()
    }

    /// Live health (liveness and readiness); clone the `Arc` before `run`.
    pub fn health(&self) -> Arc<RunnerHealth> {
        self.shared.health.clone()
    }

    /// Runs until `shutdown` completes, then stops intake, lets in-flight messages
    /// finish and route their outcomes within the deadline, and returns. Messages
    /// not finished by then are left unacked, so the broker redelivers them.
    /// It returns at most 10 s after the deadline even when abandoned work
    /// does not end (a handler blocking its thread).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> RunReport {
        let intake = self.shared.intake.clone();
        let hard = CancellationToken::new();
        let tracker = TaskTracker::new();
        let global = Gate::new(self.max_in_flight);
        self.shared
            .health
            .running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for route in &self.routes {
            route.pulse.beat();
            let metrics = Arc::new(RouteMetrics::new(&route.subscription.source, &route.name));
            if let Some(c) = &route.circuits {
                c.export();
            }
            tracker.spawn(source_loop(SourceLoop {
                shared: self.shared.clone(),
                routing: Arc::new(Semaphore::new(routing_slots(route.concurrency))),
                routing_slots: routing_slots(route.concurrency),
                route: route.clone(),
                metrics,
                global: global.clone(),
                intake: intake.clone(),
                hard: hard.clone(),
                tracker: tracker.clone(),
                resubscribe_backoff: self.resubscribe_backoff,
                shutdown_deadline: self.shutdown_deadline,
            }));
        }
        shutdown.await;
        tracing::info!("shutdown: stopping intake, draining in-flight messages");
        self.shared
            .health
            .shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        intake.cancel();
        tracker.close();
        let drained = tokio::time::timeout(self.shutdown_deadline, tracker.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                deadline = ?self.shutdown_deadline,
                "shutdown deadline passed: unfinished messages are left unacked for redelivery"
            );
            self.shared
                .abandoning
                .store(true, std::sync::atomic::Ordering::SeqCst);
            hard.cancel();
            // Abandoned work ends at once unless something blocks its
            // thread (a handler in a synchronous call, a client that does
            // not yield): `run` returns anyway, after a bounded wait.
            if tokio::time::timeout(ABANDON_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    waited = ?ABANDON_WAIT,
                    "abandoned work still runs (a handler blocking its thread?): returning without it"
                );
            }
        }
        self.shared
            .health
            .running
            .store(false, std::sync::atomic::Ordering::Relaxed);
        RunReport {
            stats: self.shared.stats.snapshot(),
            drained,
        }
    }
}

/// How long `run` waits, after the shutdown deadline, for abandoned work
/// to end: the sources' stream close, and a little more.
const ABANDON_WAIT: Duration = CLOSE_DEADLINE.saturating_add(Duration::from_secs(5));
