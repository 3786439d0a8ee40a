//! The worker's background readings: the broker check behind `/readyz`, the
//! backlog gauges (lag, queue depth, retry backlog, DLQ depth and age), and
//! the Prometheus exporter they are exported through.

use super::config::{HealthSection, MetricsSection, WorkerConfigError};
use backstop_core::observability::names;
use backstop_core::{Inspect, RunnerHealth, Subscription};
use metrics::gauge;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// `backstop_worker_start_time_seconds`: unix time the worker started.
pub const WORKER_START_TIME_SECONDS: &str = "backstop_worker_start_time_seconds";
/// `backstop_worker_ready`: 1 when `/readyz` answers ready, else 0.
pub const WORKER_READY: &str = "backstop_worker_ready";

/// Liveness and readiness of a running worker, as `/healthz` and `/readyz`
/// answer them.
#[derive(Debug)]
pub struct Readiness {
    runner: Arc<RunnerHealth>,
    stall_after: Duration,
    /// The last broker check: `None` before the first one ended.
    broker: Mutex<Option<Result<(), String>>>,
}

impl Readiness {
    pub(crate) fn new(runner: Arc<RunnerHealth>, stall_after: Duration) -> Self {
        Self {
            runner,
            stall_after,
            broker: Mutex::new(None),
        }
    }

    /// `/healthz`: every source loop made progress within `health.stall_after`.
    pub fn live(&self) -> Result<(), String> {
        self.runner.live(self.stall_after)
    }

    /// `/readyz`: the broker answered its last check, the runner runs and is
    /// not shutting down, every source is subscribed, not every circuit is open.
    pub fn ready(&self) -> Result<(), String> {
        match &*self.broker.lock().unwrap_or_else(|p| p.into_inner()) {
            None => return Err("broker not checked yet".into()),
            Some(Err(e)) => return Err(format!("broker unreachable: {e}")),
            Some(Ok(())) => {}
        }
        self.runner.ready()
    }

    /// The runner's health (per source).
    pub fn runner(&self) -> &RunnerHealth {
        &self.runner
    }

    fn set_broker(&self, r: Result<(), String>) {
        *self.broker.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
}

/// Checks the broker every `check_interval` (at once first), keeping the
/// result for `/readyz` and `backstop_worker_ready` up to date.
pub(crate) async fn check_broker<T: Inspect>(
    transport: T,
    readiness: Arc<Readiness>,
    health: HealthSection,
    stop: CancellationToken,
) {
    let ready_gauge = gauge!(WORKER_READY);
    let mut was: Option<bool> = None;
    loop {
        let r = match tokio::time::timeout(health.check_timeout.0, transport.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {:?} (health.check_timeout)",
                health.check_timeout.0
            )),
        };
        let up = r.is_ok();
        if was != Some(up) {
            match &r {
                Ok(()) => tracing::info!("broker reachable"),
                Err(e) => tracing::warn!(error = %e, "broker unreachable: not ready"),
            }
            was = Some(up);
        }
        readiness.set_broker(r);
        ready_gauge.set(if readiness.ready().is_ok() { 1.0 } else { 0.0 });
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(health.check_interval.0) => {}
        }
    }
    ready_gauge.set(0.0);
}

/// Reads every subscription's backlog every `interval` into the gauges.
pub(crate) async fn read_backlog<T: Inspect>(
    transport: T,
    subscriptions: Vec<Subscription>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut failing = vec![false; subscriptions.len()];
    loop {
        for (sub, failing) in subscriptions.iter().zip(failing.iter_mut()) {
            let reading = tokio::select! {
                () = stop.cancelled() => return,
                r = transport.backlog(sub) => r,
            };
            match reading {
                Ok(b) => {
                    if *failing {
                        tracing::info!(source = %sub.source, "backlog readable again");
                        *failing = false;
                    }
                    let source = sub.source.clone();
                    for (partition, lag) in &b.lag {
                        gauge!(names::CONSUMER_LAG, "source" => source.clone(), "partition" => partition.to_string())
                            .set(*lag as f64);
                    }
                    if let Some(d) = b.depth {
                        gauge!(names::QUEUE_DEPTH, "source" => source.clone()).set(d as f64);
                    }
                    for (tier, waiting) in &b.tiers {
                        gauge!(names::RETRY_BACKLOG, "source" => source.clone(), "tier" => tier.clone())
                            .set(*waiting as f64);
                    }
                    if let Some(d) = b.dlq_depth {
                        gauge!(names::DLQ_DEPTH, "dlq" => b.dlq.clone()).set(d as f64);
                        let age = if d == 0 {
                            Some(0.0)
                        } else {
                            b.dlq_oldest_age.map(|a| a.as_secs_f64())
                        };
                        if let Some(age) = age {
                            gauge!(names::DLQ_OLDEST_AGE_SECONDS, "dlq" => b.dlq.clone()).set(age);
                        }
                    }
                }
                Err(e) => {
                    if !*failing {
                        tracing::warn!(source = %sub.source, error = %e, "cannot read the backlog; gauges keep their last values");
                        *failing = true;
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

static EXPORTER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (a second worker in the
/// same process shares it) and keeps its histograms tidy.
pub(crate) fn install_exporter(m: &MetricsSection) -> Result<PrometheusHandle, WorkerConfigError> {
    if let Some(h) = EXPORTER.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::HANDLER_DURATION_SECONDS.to_owned()),
            &m.handler_buckets,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::END_TO_END_SECONDS.to_owned()),
                &m.end_to_end_buckets,
            )
        })
        .map_err(|e| WorkerConfigError::new("metrics", e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        return Err(WorkerConfigError::new(
            "metrics.enabled",
            "another metrics recorder is already installed in this process; set metrics.enabled = false to keep it",
        ));
    }
    let handle = EXPORTER.get_or_init(|| handle).clone();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Sets `backstop_worker_start_time_seconds`.
pub(crate) fn started_now() {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(WORKER_START_TIME_SECONDS).set(now);
    gauge!(WORKER_READY).set(0.0);
}
