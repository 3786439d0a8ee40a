//! The runner: pulls deliveries, runs the handler inside its layers, and routes
//! every outcome (ack, immediate retry, delay tier, DLQ) without ever acking an
//! original before its replacement is confirmed.

mod claim;
mod copy;
mod ctx;
mod decide;
mod delivered;
mod health;
mod held;
mod intake;
mod invoke;
mod outcome;
mod panics;
mod process;
mod route;
mod stats;
mod stub;
mod trust;
mod watch;

pub(crate) use delivered::Delivered;
pub use health::{RouteStatus, RunnerHealth};
pub use intake::{Priority, RateLimit};
pub use stats::{RunnerStats, StatsSnapshot};

use crate::circuit::{CircuitBreaker, CircuitState, Circuits};
use crate::dedupe::{Dedupe, DedupeKey};
use crate::error::ConfigError;
use crate::handler::Handler;
use crate::handler::context::HandlerScope;
use crate::observability::{RouteMetrics, TracePropagation};
use crate::retry::{Backoff, RetryBudget, RetryPolicy};
use crate::transport::{
    DeadLetterPublisher, DelayPublisher, Delivery, DeliveryStream, Publisher, Subscriber,
    Subscription, TransportError,
};
use futures_util::FutureExt as _;
use intake::{Bucket, Gate, Slot};
use invoke::DynHandler;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::retry::budget::TpsBudget;

/// Per-handler settings.
#[derive(Clone, Debug)]
pub struct HandlerOptions {
    name: Option<String>,
    timeout: Duration,
    policy: RetryPolicy,
    concurrency: usize,
    max_deliveries: Option<u32>,
    retry_budget: Option<RetryBudget>,
    circuit_breaker: Option<CircuitBreaker>,
    rate_limit: Option<RateLimit>,
    priority: Priority,
    dedupe: Option<Dedupe>,
}

/// Default [`HandlerOptions::with_max_deliveries`]: below RabbitMQ 4's default
/// quorum-queue delivery limit (20), so Backstop dead-letters with its headers
/// before the broker would.
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;

impl Default for HandlerOptions {
    /// 30 s timeout, the default [`RetryPolicy`], 16 messages in flight, at
    /// most [`DEFAULT_MAX_DELIVERIES`] broker deliveries of one message.
    fn default() -> Self {
        Self {
            name: None,
            timeout: Duration::from_secs(30),
            policy: RetryPolicy::default(),
            concurrency: 16,
            max_deliveries: Some(DEFAULT_MAX_DELIVERIES),
            retry_budget: None,
            circuit_breaker: None,
            rate_limit: None,
            priority: Priority::Normal,
            dedupe: None,
        }
    }
}

impl HandlerOptions {
    /// The handler's name (`backstop-handler`, metric label); defaults to the source.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Time one invocation may take; past it the attempt fails as `timeout`.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The retry policy.
    #[must_use]
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Messages of this handler in flight at once (>= 1).
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Poison-pill guard: a message the broker delivers more than `limit`
    /// times (its [`SourceInfo::delivery_count`](crate::SourceInfo), this
    /// delivery included) without it being settled goes to the DLQ with reason
    /// `delivery-limit` and class `poison`, without calling the handler again.
    /// Broker redeliveries happen when a worker dies mid-message (OOM kill,
    /// abort, crash loop), at the shutdown deadline, and when routing a copy
    /// fails; immediate retries and delay tiers do not count. Only brokers that
    /// count deliveries (RabbitMQ quorum queues, the in-memory broker) enforce
    /// it. `None` disables it; `Some(0)` is rejected.
    #[must_use]
    pub fn with_max_deliveries(mut self, limit: Option<u32>) -> Self {
        self.max_deliveries = limit;
        self
    }

    /// A [`RetryBudget`] for this handler's immediate retries, e.g.
    /// `Some(RetryBudget::default())`. Off by default (`None`: immediate
    /// retries are bounded only by the policy's `immediate_attempts`), so a
    /// handler's behaviour does not depend on recent traffic unless asked.
    #[must_use]
    pub fn with_retry_budget(mut self, budget: Option<RetryBudget>) -> Self {
        self.retry_budget = budget;
        self
    }

    /// A [`CircuitBreaker`] for this handler, e.g.
    /// `Some(CircuitBreaker::default())`: when its dependency fails, intake
    /// pauses and failing messages wait instead of burning their retries and
    /// filling the DLQ (see [`crate::circuit`]). Off by default: with it, a
    /// handler that fails every message pauses instead of dead-lettering.
    #[must_use]
    pub fn with_circuit_breaker(mut self, breaker: Option<CircuitBreaker>) -> Self {
        self.circuit_breaker = breaker;
        self
    }

    /// At most this many messages a second taken from this source.
    #[must_use]
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Idempotent processing: a [`Dedupe`] layer claims each message's key
    /// before the handler runs and acks known duplicates without calling it.
    #[must_use]
    pub fn with_dedupe(mut self, dedupe: Option<Dedupe>) -> Self {
        self.dedupe = dedupe;
        self
    }

    /// This source's [`Priority`] for the runner's in-flight slots.
    #[must_use]
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
}

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

/// Builds a [`Runner`]; `build` validates everything and names the bad field.
#[derive(Debug)]
pub struct RunnerBuilder<T> {
    transport: T,
    group: String,
    handlers: Vec<(String, Arc<dyn DynHandler>, HandlerOptions)>,
    max_in_flight: usize,
    shutdown_deadline: Duration,
    route_attempts: u32,
    route_backoff: Backoff,
    routing_deadline: Duration,
    unroutable: crate::unroutable::UnroutableStore,
    unroutable_after: u32,
    resubscribe_backoff: Backoff,
    propagation: Option<Arc<dyn TracePropagation>>,
}

/// A type-erased [`Handler`], cheap to clone: register it with
/// [`RunnerBuilder::with_shared_handler`] on a transport chosen at run time.
#[derive(Clone, Debug)]
pub struct SharedHandler(Arc<dyn DynHandler>);

impl SharedHandler {
    /// Wraps `handler`.
    pub fn new<H: Handler>(handler: H) -> Self {
        Self(Arc::new(handler))
    }
}

impl fmt::Debug for dyn DynHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Handler")
    }
}

impl<T> RunnerBuilder<T>
where
    T: Subscriber + DelayPublisher + DeadLetterPublisher + Publisher,
{
    /// Consumer group (Kafka) / service name; recorded as `backstop-origin-group`.
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// Runs `handler` on `source` with default options.
    #[must_use]
    pub fn with_handler<H: Handler>(self, source: impl Into<String>, handler: H) -> Self {
        self.with_handler_options(source, handler, HandlerOptions::default())
    }

    /// Runs `handler` on `source` with these options.
    #[must_use]
    pub fn with_handler_options<H: Handler>(
        mut self,
        source: impl Into<String>,
        handler: H,
        options: HandlerOptions,
    ) -> Self {
        self.handlers
            .push((source.into(), Arc::new(handler), options));
        self
    }

    /// Runs a [`SharedHandler`] on `source` with these options (for code that
    /// picks the transport at run time, such as a worker built from config).
    #[must_use]
    pub fn with_shared_handler(
        mut self,
        source: impl Into<String>,
        handler: SharedHandler,
        options: HandlerOptions,
    ) -> Self {
        self.handlers.push((source.into(), handler.0, options));
        self
    }

    /// Deliveries in flight across all handlers (>= 1). A full runner stops pulling.
    #[must_use]
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max;
        self
    }

    /// After shutdown starts, in-flight messages get this long to finish; the rest
    /// are left unacked and will be redelivered.
    #[must_use]
    pub fn with_shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// How often to try publishing a retry/DLQ copy before giving the original back
    /// to the broker for redelivery, and the backoff between tries.
    #[must_use]
    pub fn with_route_retries(mut self, attempts: u32, backoff: Backoff) -> Self {
        self.route_attempts = attempts;
        self.route_backoff = backoff;
        self
    }

    /// How long routing a copy (publishing it, confirmed, with its retries)
    /// may take before liveness counts the delivery as stuck (default 60 s).
    /// A delivery is stuck when one step of it (a handler attempt with its
    /// backoff, the routing of its copy) lasts longer than the handler's
    /// timeout plus its backoff cap plus this; `/healthz` then fails. Waits
    /// for an open circuit breaker, another worker's dedupe claim or a free
    /// routing slot do not count.
    #[must_use]
    pub fn with_routing_deadline(mut self, deadline: Duration) -> Self {
        self.routing_deadline = deadline;
        self
    }

    /// Where a message goes when its DLQ refuses even its stub for good
    /// (default `backstop-unroutable` in the working directory): see
    /// [`crate::unroutable`]. Give it a path on a persistent volume.
    #[must_use]
    pub fn with_unroutable_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.unroutable = crate::unroutable::UnroutableStore::new(dir);
        self
    }

    /// After how many deliveries of one message whose copy could not be
    /// routed (every try of [`with_route_retries`](Self::with_route_retries)
    /// failed: a DLQ whose length policy refuses publishes, a tier queue
    /// deleted) the message is written to the unroutable store and acked
    /// rather than given back once more (default 5; the handler runs at
    /// most that often). Until then each such delivery is given back to the
    /// broker, so an outage that ends in time loses nothing and moves
    /// nothing.
    #[must_use]
    pub fn with_unroutable_after(mut self, deliveries: u32) -> Self {
        self.unroutable_after = deliveries;
        self
    }

    /// Trace context across messages (an OpenTelemetry propagator, say):
    /// each delivery's span joins the producer's trace, and every copy the
    /// runner publishes carries the span's context.
    #[must_use]
    pub fn with_trace_propagation(mut self, propagation: Arc<dyn TracePropagation>) -> Self {
        self.propagation = Some(propagation);
        self
    }

    /// Backoff between attempts to (re)subscribe after a lost connection.
    #[must_use]
    pub fn with_resubscribe_backoff(mut self, backoff: Backoff) -> Self {
        self.resubscribe_backoff = backoff;
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<Runner<T>, ConfigError> {
        // Panics outside handlers are reported with where they happened.
        panics::install_hook();
        if self.group.trim().is_empty() {
            return Err(ConfigError::new("group", "must not be empty"));
        }
        if self.handlers.is_empty() {
            return Err(ConfigError::new("handlers", "add at least one handler"));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new("max_in_flight", "must be at least 1"));
        }
        if self.route_attempts == 0 {
            return Err(ConfigError::new("route_attempts", "must be at least 1"));
        }
        if self.unroutable_after == 0 {
            return Err(ConfigError::new("unroutable_after", "must be at least 1"));
        }
        self.route_backoff.validate("route_backoff")?;
        self.resubscribe_backoff.validate("resubscribe_backoff")?;
        let stats = Arc::new(RunnerStats::default());
        let mut routes = Vec::with_capacity(self.handlers.len());
        let intake = CancellationToken::new();
        for (source, handler, options) in self.handlers {
            let field = format!("handlers[{source}]");
            if source.trim().is_empty() {
                return Err(ConfigError::new("handlers[].source", "must not be empty"));
            }
            if routes
                .iter()
                .any(|r: &Route| r.subscription.source == source)
            {
                return Err(ConfigError::new(
                    format!("{field}.source"),
                    "a source can have one handler per runner",
                ));
            }
            if options.timeout.is_zero() {
                return Err(ConfigError::new(
                    format!("{field}.timeout"),
                    "must be greater than zero",
                ));
            }
            if options.concurrency == 0 {
                return Err(ConfigError::new(
                    format!("{field}.concurrency"),
                    "must be at least 1",
                ));
            }
            if options.max_deliveries == Some(0) {
                return Err(ConfigError::new(
                    format!("{field}.max_deliveries"),
                    "must be at least 1 (or None to disable the guard)",
                ));
            }
            let named = |e: ConfigError| ConfigError::new(format!("{field}.{}", e.field), e.reason);
            if let Some(b) = &options.retry_budget {
                b.validate().map_err(named)?;
            }
            if let Some(b) = &options.circuit_breaker {
                b.validate().map_err(named)?;
            }
            if let Some(r) = &options.rate_limit {
                r.validate().map_err(named)?;
            }
            options.policy.validate().map_err(named)?;
            if let Some(d) = &options.dedupe {
                if d.retention.is_zero() {
                    return Err(ConfigError::new(
                        format!("{field}.dedupe.retention"),
                        "must be greater than zero",
                    ));
                }
                if let Some(longest) = options.policy.tiers().iter().map(|t| t.delay()).max()
                    && d.retention < longest
                {
                    return Err(ConfigError::new(
                        format!("{field}.dedupe.retention"),
                        format!(
                            "{:?} is shorter than the longest delay tier ({longest:?}): a message back from that tier could be handled twice",
                            d.retention
                        ),
                    ));
                }
                if d.lease_for(options.timeout) <= options.timeout {
                    return Err(ConfigError::new(
                        format!("{field}.dedupe.lease"),
                        "must be longer than the handler's timeout",
                    ));
                }
                if let DedupeKey::Header(h) = &d.key
                    && h.trim().is_empty()
                {
                    return Err(ConfigError::new(
                        format!("{field}.dedupe.key_header"),
                        "must not be empty",
                    ));
                }
            }
            let name: Arc<str> = options.name.unwrap_or_else(|| source.clone()).into();
            let stuck_after = options
                .timeout
                .saturating_add(options.policy.backoff().max())
                .saturating_add(self.routing_deadline);
            routes.push(Route {
                subscription: Subscription {
                    source,
                    group: self.group.clone(),
                    tiers: options.policy.tiers().to_vec(),
                    prefetch: prefetch(options.concurrency.min(self.max_in_flight)),
                },
                handler,
                timeout: options.timeout,
                policy: options.policy,
                concurrency: options.concurrency,
                max_deliveries: options.max_deliveries,
                budget: options.retry_budget.map(|b| b.build()),
                circuits: options
                    .circuit_breaker
                    .map(|b| Circuits::new(b, name.clone(), stats.clone())),
                rate_limit: options.rate_limit,
                priority: options.priority,
                dedupe: options.dedupe,
                content_id_warned: std::sync::atomic::AtomicBool::new(false),
                panics: panics::Ledger::default(),
                unrouted: panics::Ledger::default(),
                watch: watch::Watch::new(stuck_after),
                pulse: health::Pulse::new(),
                scope: Arc::new(HandlerScope {
                    handler: name.clone(),
                    shutdown: intake.clone(),
                }),
                name,
            });
        }
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        Ok(Runner {
            shared: Arc::new(Shared {
                transport: self.transport,
                health: Arc::new(RunnerHealth::new(routes.clone())),
                intake,
                abandoning: Arc::default(),
                host: gethostname::gethostname().to_string_lossy().into_owned(),
                route_attempts: self.route_attempts,
                route_backoff: self.route_backoff,
                unroutable: self.unroutable,
                unroutable_after: self.unroutable_after,
                stats,
                propagation: self.propagation,
            }),
            routes,
            max_in_flight: self.max_in_flight,
            shutdown_deadline: self.shutdown_deadline,
            resubscribe_backoff: self.resubscribe_backoff,
        })
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
    T: Subscriber + DelayPublisher + DeadLetterPublisher + Publisher,
{
    /// Starts a builder: group `backstop`, 64 in flight, 30 s shutdown deadline,
    /// 3 tries to publish a retry/DLQ copy (50 ms .. 1 s backoff).
    pub fn builder(transport: T) -> RunnerBuilder<T> {
        RunnerBuilder {
            transport,
            group: "backstop".to_owned(),
            handlers: Vec::new(),
            max_in_flight: 64,
            shutdown_deadline: Duration::from_secs(30),
            route_attempts: 3,
            route_backoff: Backoff::exponential(Duration::from_millis(50), Duration::from_secs(1)),
            routing_deadline: Duration::from_secs(60),
            unroutable: crate::unroutable::UnroutableStore::new("backstop-unroutable"),
            unroutable_after: 5,
            resubscribe_backoff: Backoff::exponential(
                Duration::from_millis(100),
                Duration::from_secs(10),
            ),
            propagation: None,
        }
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

struct SourceLoop<T> {
    shared: Arc<Shared<T>>,
    /// Copies of this source on their way to a tier or the DLQ, out of
    /// `routing_slots`.
    routing: Arc<Semaphore>,
    routing_slots: usize,
    route: Arc<Route>,
    metrics: Arc<RouteMetrics>,
    global: Arc<Gate>,
    intake: CancellationToken,
    hard: CancellationToken,
    tracker: TaskTracker,
    resubscribe_backoff: Backoff,
    /// The runner's shutdown deadline: bounds the stream's close.
    shutdown_deadline: Duration,
}

/// After this long without a free in-flight slot, the stream is paused (and
/// resumed when a slot frees). Pausing at once for every short wait would
/// make Kafka drop and refetch its prefetched data all the time.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Copies on their way to a tier or the DLQ per in-flight slot of a source:
/// they no longer hold a slot (see `process::route_off`), but stay bounded.
const ROUTING_PER_SLOT: usize = 4;

/// Deliveries a backend may hand out per in-flight slot of a source
/// (basic.qos on RabbitMQ). A window no wider than the slots leaves each
/// slot idle for a round trip to the broker after every ack (on a quorum
/// queue, through its Raft log): with 16 slots and a window of 16, S1 on
/// RabbitMQ reached 14,000 msg/s in the benchmark, with a window of 64
/// 31,000 (the raw lapin loop at 64: 30,000). Waiting deliveries stay
/// unacked, so a crash or close gives them back.
const PREFETCH_PER_SLOT: usize = 4;

/// The prefetch window of a source with `in_flight` slots.
fn prefetch(in_flight: usize) -> usize {
    in_flight.saturating_mul(PREFETCH_PER_SLOT)
}

fn routing_slots(concurrency: usize) -> usize {
    concurrency.saturating_mul(ROUTING_PER_SLOT).max(64)
}

/// The least time a source gives its stream to close at the end (it gives
/// what is left of the shutdown deadline when that is more).
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// How long `run` waits, after the shutdown deadline, for abandoned work
/// to end: the sources' stream close, and a little more.
const ABANDON_WAIT: Duration = CLOSE_DEADLINE.saturating_add(Duration::from_secs(5));

/// How many messages of one lane a task handles before it lets another
/// lane have its slot (when the source has no free slot).
const LANE_TURN: u32 = 64;

/// The ticks of a waiting source loop's heartbeat.
fn beats() -> tokio::time::Interval {
    let mut beat =
        tokio::time::interval_at(tokio::time::Instant::now() + health::BEAT, health::BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat
}

/// What waiting for the next intake slot ended with.
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per intake step, moved once"
)]
enum Gated {
    /// Take the next message with these slots (and this one, if the stream
    /// handed it out while paused).
    Go(
        (OwnedSemaphorePermit, Slot),
        Option<Delivery>,
        Option<crate::circuit::Permit>,
    ),
    /// Shutting down.
    Stop,
    /// The stream failed or ended while paused.
    Lost(Option<TransportError>),
}

impl<T> SourceLoop<T>
where
    T: Subscriber + DelayPublisher + DeadLetterPublisher + Publisher,
{
    /// Waits until this source may take a message: a slot of its own and one
    /// of the runner's, the circuit breaker letting intake through, and the
    /// rate limit. A long wait pauses the stream, which stays serviced.
    async fn gate(
        &self,
        local: &Arc<Semaphore>,
        bucket: &mut Option<Bucket>,
        stream: &mut T::Stream,
        beat: &mut tokio::time::Interval,
    ) -> Gated {
        let route = &self.route;
        let ready = async {
            // Nothing closes this semaphore; were it closed, intake would
            // wait here for the shutdown instead of panicking.
            let Ok(l) = local.clone().acquire_owned().await else {
                return std::future::pending().await;
            };
            let g = self.global.acquire(route.priority).await;
            let mut probe = None;
            if let Some(c) = &route.circuits {
                c.intake_ready().await;
                // Half-open: intake takes the probe slot itself, so one
                // probe (not a prefetch window of messages) comes in.
                if c.state() == CircuitState::HalfOpen {
                    probe = Some(c.permit().await);
                }
            }
            if let Some(b) = bucket.as_mut() {
                b.take().await;
            }
            ((l, g), probe)
        };
        tokio::pin!(ready);
        let pause_after = match &route.circuits {
            Some(c) if c.state() != CircuitState::Closed => Duration::ZERO,
            _ => PAUSE_AFTER,
        };
        let pausing = tokio::time::sleep(pause_after);
        tokio::pin!(pausing);
        let mut paused = false;
        let mut held: Option<Delivery> = None;
        let gated = loop {
            tokio::select! {
                biased;
                () = self.intake.cancelled() => break Gated::Stop,
                (slots, probe) = &mut ready => break Gated::Go(slots, held.take(), probe),
                _ = beat.tick() => route.pulse.beat(),
                () = &mut pausing, if !paused => {
                    paused = true;
                    stream.pause();
                }
                next = stream.next_delivery(), if paused && held.is_none() => match next {
                    Some(Ok(d)) => held = Some(d),
                    Some(Err(e)) => break Gated::Lost(Some(e)),
                    None => break Gated::Lost(None),
                },
            }
        };
        if paused {
            stream.resume();
        }
        gated
    }

    fn dispatch(
        &self,
        slots: (OwnedSemaphorePermit, Slot),
        delivery: Delivery,
        probe: Option<crate::circuit::Permit>,
    ) {
        let ctx = ctx::Ctx {
            shared: self.shared.clone(),
            route: self.route.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.intake.clone(),
            system: self.shared.transport.system(),
            tracker: self.tracker.clone(),
            hard: self.hard.clone(),
            routing: self.routing.clone(),
        };
        let hard = self.hard.clone();
        let abandoning = self.shared.abandoning.clone();
        let stats = self.shared.stats.clone();
        let yields = (self.route.priority == Priority::Low).then(|| self.global.clone());
        self.tracker.spawn(async move {
            // Held whole until the task ends (a field used alone below would
            // otherwise be all the block keeps).
            let held = slots;
            let (mut next, mut probe) = (Some(delivery), probe);
            // A lane (Kafka partition) goes on in this task while it has a
            // message that may go: no hand-over per message. Every
            // `LANE_TURN` messages it gives its slot up if the source has
            // none left, so other partitions get their turn.
            let mut run = 0u32;
            // One wait for the whole task, not one per message.
            let abandon = hard.cancelled();
            tokio::pin!(abandon);
            while let Some(mut delivery) = next.take() {
                let lane = delivery.take_lane();
                let (message, source, mut settlement) = delivery.into_parts();
                // Dropped at the shutdown deadline: left to the broker, as
                // documented; dropped otherwise (a panic): given back.
                settlement.leave_unsettled_when(abandoning.clone());
                let d = Arc::new(Delivered::new(message, source));
                // Everything after intake runs under one panic guard: a
                // panic gives the message back (its settlement nacks as it
                // is dropped) and is remembered, the lane goes on.
                // Pinned where it is made: the future is kilobytes, and
                // `select!` would otherwise move it once more per message.
                let processed = std::pin::pin!(
                    AssertUnwindSafe(process::process(&ctx, d.clone(), settlement, probe.take()))
                        .catch_unwind()
                );
                // The message first: one that settles on its first poll never
                // polls the hard stop (a lock each time).
                tokio::select! {
                    biased;
                    done = processed => {
                        if let Err(payload) = done {
                            process::panicked(&ctx, d.id(), "outside the handler", payload.as_ref());
                        }
                    }
                    () = &mut abandon => {
                        RunnerStats::bump(&stats.abandoned);
                        return;
                    }
                }
                let Some(lane) = lane else { return };
                run = run.wrapping_add(1);
                let turn_over =
                    run.is_multiple_of(LANE_TURN) && held.0.semaphore().available_permits() == 0;
                if ctx.may_go_on()
                    && !turn_over
                    && !yields.as_ref().is_some_and(|g| g.normal_waiting())
                {
                    next = lane.next();
                } else {
                    drop(lane); // leaves it to the stream
                }
            }
        });
    }
}

async fn source_loop<T>(s: SourceLoop<T>)
where
    T: Subscriber + DelayPublisher + DeadLetterPublisher + Publisher,
{
    let local = Arc::new(Semaphore::new(s.route.concurrency));
    let mut bucket = s.route.rate_limit.map(Bucket::new);
    let source = s.route.subscription.source.clone();
    let mut failures = 0u32;
    // One heartbeat for the loop's life: every wait below ticks it.
    let mut beat = beats();
    'connect: while !s.intake.is_cancelled() {
        if failures > 0 {
            // Lost (or never got) the stream: not ready until subscribed again.
            s.route.pulse.subscribed(false);
            let wait = tokio::time::sleep(s.resubscribe_backoff.delay(failures));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = s.intake.cancelled() => break 'connect,
                    () = &mut wait => break,
                    _ = beat.tick() => s.route.pulse.beat(),
                }
            }
        }
        let subscribed = tokio::select! {
            _ = s.intake.cancelled() => break 'connect,
            r = s.shared.transport.subscribe(&s.route.subscription) => r,
        };
        let mut stream = match subscribed {
            Ok(stream) => {
                s.route.pulse.subscribed(true);
                stream
            }
            Err(error) => {
                s.route.pulse.subscribed(false);
                failures += 1;
                tracing::warn!(%source, %error, failures, "subscribe failed; retrying with backoff");
                continue 'connect;
            }
        };
        'intake: loop {
            // Bounded in-flight: take the slots before pulling, so a full runner
            // stops fetching instead of buffering.
            let (slots, probe) = match s.gate(&local, &mut bucket, &mut stream, &mut beat).await {
                Gated::Stop => break,
                Gated::Go(slots, Some(held), probe) => {
                    s.dispatch(slots, held, probe);
                    continue;
                }
                Gated::Go(slots, None, probe) => (slots, probe),
                Gated::Lost(error) => {
                    failures += 1;
                    tracing::warn!(%source, error = ?error.map(|e| e.to_string()), "delivery stream lost while paused; resubscribing");
                    continue 'connect;
                }
            };
            // Armed only when closed now: half-open intake (a probe) waits
            // for its message like any other.
            let tripped = async {
                match &s.route.circuits {
                    Some(c) if c.state() == CircuitState::Closed => c.tripped().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::pin!(tripped);
            let next = loop {
                tokio::select! {
                    _ = s.intake.cancelled() => break None,
                    n = stream.next_delivery() => break Some(n),
                    // Waiting for a message is progress: prove it to /healthz.
                    _ = beat.tick() => s.route.pulse.beat(),
                    // The breaker opened while we waited for a message: give the
                    // slots back and let the gate pause the stream.
                    () = &mut tripped => {
                        drop(slots);
                        if let (Some(c), Some(p)) = (&s.route.circuits, probe) {
                            c.record(p, crate::circuit::Verdict::Ignored);
                        }
                        continue 'intake;
                    }
                }
            };
            let Some(next) = next else { break };
            s.route.pulse.beat();
            match next {
                Some(Ok(delivery)) => {
                    failures = 0;
                    s.dispatch(slots, delivery, probe);
                }
                Some(Err(error)) => {
                    failures += 1;
                    tracing::warn!(%source, %error, "delivery stream failed; resubscribing");
                    continue 'connect;
                }
                None => {
                    failures += 1;
                    tracing::warn!(%source, "delivery stream ended; resubscribing");
                    continue 'connect;
                }
            }
        }
        // Intake stopped: keep the stream (and so the backend's consumer/channel)
        // alive until this source's in-flight messages are settled, copies
        // on their way included (their originals are acked on it).
        let stopped = tokio::time::Instant::now();
        let all = u32::try_from(s.route.concurrency).unwrap_or(u32::MAX);
        let routing = u32::try_from(s.routing_slots).unwrap_or(u32::MAX);
        tokio::select! {
            _ = s.hard.cancelled() => {}
            _ = async {
                let _ = local.acquire_many(all).await;
                let _ = s.routing.acquire_many(routing).await;
            } => {}
        }
        // Settlements that travel on the stream's connection reach the
        // broker before the stream goes: the close may take what is left of
        // the shutdown deadline (a busy broker answers a channel close
        // late, and a process that exits before the answer can lose acks
        // the broker had not read yet), and at least `CLOSE_DEADLINE`.
        let close_within = s
            .shutdown_deadline
            .saturating_sub(stopped.elapsed())
            .max(CLOSE_DEADLINE);
        if tokio::time::timeout(close_within, stream.close())
            .await
            .is_err()
        {
            tracing::warn!(%source, waited = ?close_within, "closing the delivery stream took too long");
        }
        break;
    }
}
