//! Building a [`Runner`]: its settings, its handlers, and `build`, which
//! validates everything and names the bad field.

use super::options::HandlerOptions;
use super::{Route, Runner, Shared, health, panics, watch};
use crate::circuit::Circuits;
use crate::error::ConfigError;
use crate::handler::Handler;
use crate::handler::context::HandlerScope;
use crate::observability::TracePropagation;
use crate::retry::Backoff;
use crate::runner::invoke::DynHandler;
use crate::runner::{RunnerHealth, RunnerStats};
use crate::transport::{Subscription, Transport};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

impl<T> RunnerBuilder<T> {
    /// See [`Runner::builder`].
    pub(super) fn new(transport: T) -> Self {
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
}

impl<T> RunnerBuilder<T>
where
    T: Transport,
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
    pub fn build(mut self) -> Result<Runner<T>, ConfigError> {
        // Panics outside handlers are reported with where they happened.
        panics::install_hook();
        self.validate()?;
        let stats = Arc::new(RunnerStats::default());
        let intake = CancellationToken::new();
        let routes: Vec<Arc<Route>> = std::mem::take(&mut self.handlers)
            .into_iter()
            .map(|(source, handler, options)| {
                Arc::new(self.route(source, handler, options, &stats, &intake))
            })
            .collect();
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

    /// The runner's own settings, then every handler's (named
    /// `handlers[<source>].<field>`).
    fn validate(&self) -> Result<(), ConfigError> {
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
        for (i, (source, _, options)) in self.handlers.iter().enumerate() {
            if source.trim().is_empty() {
                return Err(ConfigError::new("handlers[].source", "must not be empty"));
            }
            let field = format!("handlers[{source}]");
            if self.handlers.iter().take(i).any(|(s, _, _)| s == source) {
                return Err(ConfigError::new(
                    format!("{field}.source"),
                    "a source can have one handler per runner",
                ));
            }
            options.validate().map_err(|e| e.within(&field))?;
        }
        Ok(())
    }

    /// One handler's route (validated).
    fn route(
        &self,
        source: String,
        handler: Arc<dyn DynHandler>,
        options: HandlerOptions,
        stats: &Arc<RunnerStats>,
        intake: &CancellationToken,
    ) -> Route {
        let name: Arc<str> = options.name.unwrap_or_else(|| source.clone()).into();
        let stuck_after = options
            .timeout
            .saturating_add(options.policy.backoff().max())
            .saturating_add(self.routing_deadline);
        Route {
            subscription: Subscription::new(source, self.group.clone())
                .with_tiers(options.policy.tiers().to_vec())
                .with_prefetch(prefetch(options.concurrency.min(self.max_in_flight))),
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
        }
    }
}

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
