//! A consumer binary in a few lines: [`Worker`] reads the configuration (TOML
//! plus `BACKSTOP_*` environment overrides), connects the broker it names,
//! runs your handlers with the policies of their `[handlers.<source>]`
//! sections, serves `/healthz`, `/readyz` and `/metrics`, exports every
//! metric of OBSERVABILITY.md for Prometheus, logs as text or JSON, and on
//! SIGTERM/SIGINT stops intake, drains in-flight work and returns.
//!
//! ```no_run
//! // Through the facade: backstop::worker::Worker, backstop::handler_fn, ...
//! use backstop_core::{handler_fn, Context, HandlerError, Json};
//! use backstop_worker::Worker;
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), backstop_worker::WorkerError> {
//!     let fulfil = handler_fn(|Json(order): Json<Order>, _ctx: Context| async move {
//!         if order.id == 0 {
//!             return Err(HandlerError::permanent("order id 0"));
//!         }
//!         Ok(())
//!     });
//!     Worker::from_env()?          // BACKSTOP_CONFIG=worker.toml, BACKSTOP_<SECTION>__<FIELD>=...
//!         .with_handler("orders", fulfil)
//!         .run()                   // until SIGTERM/SIGINT, then drains
//!         .await?;
//!     Ok(())
//! }
//! ```

#[cfg(not(any(feature = "memory", feature = "kafka", feature = "rabbitmq")))]
compile_error!(
    "backstop-worker needs a broker: enable its feature memory, kafka or rabbitmq \
     (through the facade: backstop's feature of the same name)"
);

mod brokers;
mod config;
mod dedupe;
mod http;
mod logging;
#[cfg(feature = "otel")]
mod otel;
mod probe;

pub use config::{
    BreakerSection, BrokerKind, CONFIG_ENV, DedupeSection, DedupeStoreName, Dur, HandlerSection,
    HealthSection, HttpSection, KafkaSection, LogFormat, LoggingSection, MetricsSection,
    QueueTypeName, RabbitSection, RetrySection, TracingSection, WorkerConfig, WorkerConfigError,
};
pub use probe::{Readiness, WORKER_READY, WORKER_START_TIME_SECONDS};

use backstop_core::transport::BoxFuture;
use backstop_core::{
    Handler, HandlerOptions, Inspect, RunReport, Runner, SharedHandler, Transport, TransportError,
};
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Why a worker could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A bad configuration value, named.
    #[error(transparent)]
    Config(#[from] WorkerConfigError),
    /// The broker could not be reached or set up at start.
    #[error("the broker could not be reached or set up")]
    Transport(#[from] TransportError),
    /// The health server could not listen.
    #[error("http.listen {addr}: cannot listen")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

type Adjust = Box<dyn FnOnce(HandlerOptions) -> HandlerOptions + Send>;

/// Builds and runs a consumer binary; see the [module docs](self).
pub struct Worker {
    config: WorkerConfig,
    handlers: Vec<(String, SharedHandler, Adjust)>,
    shutdown: Option<BoxFuture<'static, ()>>,
    logging: bool,
    #[cfg(feature = "memory")]
    memory: Option<backstop_core::memory::MemoryBroker>,
    started: Option<tokio::sync::oneshot::Sender<Started>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field(
                "handlers",
                &self.handlers.iter().map(|h| &h.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What a started worker tells [`Worker::on_started`]: where it listens and
/// its readiness.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Started {
    /// The health server's address (the real port when `http.listen` asked for 0).
    pub http: Option<std::net::SocketAddr>,
    /// Liveness and readiness, as `/healthz` and `/readyz` answer.
    pub readiness: Arc<Readiness>,
}

impl Worker {
    /// Configuration from the file named by `BACKSTOP_CONFIG` (if set) and the
    /// `BACKSTOP_<SECTION>__<FIELD>` environment variables.
    pub fn from_env() -> Result<Self, WorkerConfigError> {
        Ok(Self::new(WorkerConfig::from_env()?))
    }

    /// Configuration from `path` and the environment.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, WorkerConfigError> {
        Ok(Self::new(WorkerConfig::load(Some(path.as_ref()))?))
    }

    /// A worker with this configuration.
    pub fn new(config: WorkerConfig) -> Self {
        Self {
            config,
            handlers: Vec::new(),
            shutdown: None,
            logging: true,
            #[cfg(feature = "memory")]
            memory: None,
            started: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Runs `handler` on `source`, with the options of `[handlers.<source>]`.
    #[must_use]
    pub fn with_handler<H: Handler>(self, source: impl Into<String>, handler: H) -> Self {
        self.with_handler_adjusted(source, handler, |o| o)
    }

    /// Runs `handler` on `source`; `adjust` changes the options read from
    /// `[handlers.<source>]` (for what a file cannot say, such as a dedupe
    /// store of your own).
    #[must_use]
    pub fn with_handler_adjusted<H: Handler>(
        mut self,
        source: impl Into<String>,
        handler: H,
        adjust: impl FnOnce(HandlerOptions) -> HandlerOptions + Send + 'static,
    ) -> Self {
        self.handlers
            .push((source.into(), SharedHandler::new(handler), Box::new(adjust)));
        self
    }

    /// Stops when `shutdown` completes instead of on SIGTERM/SIGINT.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(shutdown));
        self
    }

    /// Leaves logging to the caller (no `tracing` subscriber installed).
    #[must_use]
    pub fn without_logging(mut self) -> Self {
        self.logging = false;
        self
    }

    /// Uses this in-memory broker (`broker = "memory"`).
    #[cfg(feature = "memory")]
    #[must_use]
    pub fn with_memory_broker(mut self, broker: backstop_core::memory::MemoryBroker) -> Self {
        self.memory = Some(broker);
        self
    }

    /// Tells `tx` where the worker listens once it has started.
    #[must_use]
    pub fn on_started(mut self, tx: tokio::sync::oneshot::Sender<Started>) -> Self {
        self.started = Some(tx);
        self
    }

    /// Runs until SIGTERM/SIGINT (or the [`with_shutdown`](Self::with_shutdown)
    /// future), then stops intake, drains in-flight work within
    /// `shutdown_deadline` and returns what the run did. Bad configuration
    /// and an unreachable broker at start are errors; later broker outages
    /// are ridden out (and `/readyz` says so).
    pub async fn run(mut self) -> Result<RunReport, WorkerError> {
        if self.logging {
            logging::init(&self.config)?;
        }
        let exporter = if self.config.metrics.enabled {
            Some(probe::install_exporter(&self.config.metrics)?)
        } else {
            None
        };
        probe::started_now();
        let Some(kind) = self.config.broker else {
            #[cfg(feature = "memory")]
            if let Some(m) = self.memory.take() {
                return self.serve(m, exporter).await;
            }
            return Err(WorkerConfigError::new(
                "broker",
                "not set; choose \"kafka\", \"rabbitmq\" or \"memory\"",
            )
            .into());
        };
        match kind {
            BrokerKind::Memory => {
                #[cfg(feature = "memory")]
                {
                    let m = self.memory.take().unwrap_or_default();
                    self.serve(m, exporter).await
                }
                #[cfg(not(feature = "memory"))]
                Err(feature_missing("memory"))
            }
            BrokerKind::Kafka => {
                #[cfg(feature = "kafka")]
                {
                    let t = brokers::kafka(&self.config)?;
                    self.serve(t, exporter).await
                }
                #[cfg(not(feature = "kafka"))]
                Err(feature_missing("kafka"))
            }
            BrokerKind::Rabbitmq => {
                #[cfg(feature = "rabbitmq")]
                {
                    let t = brokers::rabbitmq(&self.config)?;
                    self.serve(t, exporter).await
                }
                #[cfg(not(feature = "rabbitmq"))]
                Err(feature_missing("rabbitmq"))
            }
        }
    }

    async fn serve<T>(
        mut self,
        transport: T,
        exporter: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Result<RunReport, WorkerError>
    where
        T: Transport + Inspect + Clone,
    {
        let handlers = std::mem::take(&mut self.handlers);
        let runner = runner(&self.config, handlers, transport.clone()).await?;
        let config = self.config;
        let readiness = Arc::new(Readiness::new(runner.health(), config.health.stall_after.0));
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(probe::check_broker(
            transport.clone(),
            readiness.clone(),
            config.health.clone(),
            stop.clone(),
        ));
        if exporter.is_some() && !config.metrics.backlog_interval.0.is_zero() {
            tasks.spawn(probe::read_backlog(
                transport,
                runner.subscriptions(),
                config.metrics.backlog_interval.0,
                stop.clone(),
            ));
        }
        let http = if config.http.enabled {
            let addr = config.http.listen;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Listen { addr, source })?;
            let local = listener.local_addr().ok();
            tasks.spawn(http::serve(
                listener,
                readiness.clone(),
                exporter,
                stop.clone(),
            ));
            local
        } else {
            None
        };
        tracing::info!(
            group = %config.group(),
            sources = ?runner.subscriptions().iter().map(|s| s.source.as_str()).collect::<Vec<_>>(),
            http = ?http,
            "worker started"
        );
        if let Some(tx) = self.started {
            let _ = tx.send(Started {
                http,
                readiness: readiness.clone(),
            });
        }
        let shutdown = match self.shutdown {
            Some(s) => s,
            None => Box::pin(signal()),
        };
        let report = runner.run(shutdown).await;
        log_stopped(&report);
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        #[cfg(feature = "otel")]
        let _ = tokio::task::spawn_blocking(otel::shutdown).await;
        Ok(report)
    }
}

/// The runner of `config` with `handlers` (every configured source must
/// have one), its errors named as the config file names fields.
async fn runner<T: Transport>(
    config: &WorkerConfig,
    handlers: Vec<(String, SharedHandler, Adjust)>,
    transport: T,
) -> Result<Runner<T>, WorkerError> {
    for source in config.handlers.keys() {
        if !handlers.iter().any(|(s, _, _)| s == source) {
            return Err(WorkerConfigError::new(
                format!("handlers.{source}"),
                "no handler is registered for this source (a typo?)",
            )
            .into());
        }
    }
    let mut builder = Runner::builder(transport)
        .with_group(config.group())
        .with_max_in_flight(config.max_in_flight)
        .with_shutdown_deadline(config.shutdown_deadline.0)
        .with_routing_deadline(config.health.routing_deadline.0);
    if let Some(dir) = &config.unroutable_dir {
        builder = builder.with_unroutable_dir(dir);
    }
    #[cfg(feature = "otel")]
    if config.tracing.otlp_endpoint.is_some() {
        builder = builder.with_trace_propagation(Arc::new(otel::Propagation::default()));
    }
    for (source, handler, adjust) in handlers {
        let mut options = config.handler_options(&source)?;
        if let Some(d) = config.handlers.get(&source).and_then(|h| h.dedupe.as_ref()) {
            options = options.with_dedupe(dedupe::open(&source, d).await?);
        }
        builder = builder.with_shared_handler(source, handler, adjust(options));
    }
    builder.build().map_err(|e| {
        // The runner names handler fields `handlers[<source>].x`.
        let field = e
            .field
            .strip_prefix("handlers[")
            .and_then(|rest| rest.split_once(']'))
            .map_or(e.field.clone(), |(s, f)| format!("handlers.{s}{f}"));
        WorkerConfigError::new(field, e.reason).into()
    })
}

fn log_stopped(report: &RunReport) {
    let s = report.stats;
    if report.drained {
        tracing::info!(
            ok = s.ok,
            retried = s.retried,
            delayed = s.delayed,
            dead_lettered = s.dead_lettered,
            "worker stopped: in-flight work drained"
        );
    } else {
        tracing::warn!(
            abandoned = s.abandoned,
            "worker stopped at the shutdown deadline: unfinished messages were left unacked and will be redelivered"
        );
    }
}

/// The W3C trace-context propagator of the `otel` feature, for code outside
/// the runner: an outbox (`OutboxConfig::with_trace_propagation`) or a
/// [`RunnerBuilder`](backstop_core::RunnerBuilder) of your own.
#[cfg(feature = "otel")]
pub fn trace_propagation() -> Arc<dyn backstop_core::TracePropagation> {
    Arc::new(otel::Propagation::default())
}

#[allow(dead_code, reason = "used only when a backend feature is off")]
fn feature_missing(feature: &str) -> WorkerError {
    WorkerConfigError::new(
        "broker",
        format!("\"{feature}\" needs the backstop feature `{feature}`"),
    )
    .into()
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
