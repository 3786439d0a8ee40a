//! `[handlers.<source>]`: a handler's options as written in the config,
//! and the [`HandlerOptions`] they make.

use super::{Dur, WorkerConfigError};
use backstop_core::transport::redacted;
use backstop_core::{
    Backoff, CircuitBreaker, ClassAction, DelayTier, ErrorClass, FailureRate, HandlerOptions,
    Priority, RateLimit, RetryBudget, RetryPolicy,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// `[handlers.<source>]`: every field optional, defaults as in [`HandlerOptions`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HandlerSection {
    /// Handler name in metrics and DLQ headers (default: the source).
    pub name: Option<String>,
    /// Per-call timeout (default 30s).
    pub timeout: Option<Dur>,
    /// Messages of this source in flight (default 16).
    pub concurrency: Option<usize>,
    /// Deliveries of one message before it is dead-lettered as poison
    /// (default 10; 0 turns the guard off).
    pub max_deliveries: Option<u32>,
    /// `normal` (default) or `low`.
    pub priority: Option<Priority>,
    /// `[handlers.<source>.retry]`.
    pub retry: Option<RetrySection>,
    /// `[handlers.<source>.retry_budget]`: present = on; `window` (1 s to
    /// 60 s, default 10s), `min_per_sec` (default 10), `ratio` (retries
    /// per success, default 0.2).
    pub retry_budget: Option<RetryBudget>,
    /// `[handlers.<source>.circuit_breaker]`: present = on.
    pub circuit_breaker: Option<BreakerSection>,
    /// `[handlers.<source>.rate_limit]`: present = on; `per_second` and
    /// `burst` (default: one second's worth).
    pub rate_limit: Option<RateLimit>,
    /// `[handlers.<source>.dedupe]`: present = on.
    pub dedupe: Option<DedupeSection>,
}

/// `[handlers.<source>.retry]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetrySection {
    /// Attempts in process before the first delay tier (default 3).
    pub immediate_attempts: Option<u32>,
    /// First backoff (default 100ms).
    pub backoff_min: Option<Dur>,
    /// Backoff cap (default 5s).
    pub backoff_max: Option<Dur>,
    /// Backoff growth factor (default 2).
    pub backoff_factor: Option<f32>,
    /// Delay tiers, shortest first (default `["5s", "30s", "5m"]`; `[]` = none).
    pub tiers: Option<Vec<Dur>>,
    /// A retry-after hint up to this long is waited in process (default 1s).
    pub retry_after_inline_max: Option<Dur>,
    /// What a class of failure does: `{ timeout = "delay_only", permanent = "dead_letter" }`.
    #[serde(default)]
    pub on: BTreeMap<String, ClassAction>,
}

/// `[handlers.<source>.circuit_breaker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerSection {
    /// Failures in a row that open it (default 5; 0 = no such trigger).
    pub consecutive_failures: Option<u32>,
    /// Share of failed calls that opens it (default 0.5; 0 = no such trigger).
    pub failure_rate: Option<f64>,
    /// Window of the failure rate (default 30s).
    pub failure_window: Option<Dur>,
    /// Calls in the window before the rate counts (default 20).
    pub minimum_calls: Option<u32>,
    /// First open interval (default 5s).
    pub open_for: Option<Dur>,
    /// Cap of the doubling open interval (default 60s).
    pub max_open_for: Option<Dur>,
    /// Messages let through while half-open (default 1).
    pub half_open_probes: Option<u32>,
}

/// `[handlers.<source>.dedupe]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DedupeSection {
    /// `memory` (one process), `sqlite` (one node) or `redis` (shared).
    pub store: DedupeStoreName,
    /// SQLite file (store = "sqlite").
    pub path: Option<PathBuf>,
    /// Redis URL (store = "redis"); a password in it only from the environment.
    pub url: Option<String>,
    /// Header holding the idempotency key (default: the message id).
    pub key_header: Option<String>,
    /// How long a done key is remembered (default 24h).
    pub retention: Option<Dur>,
    /// How long a claim holds (default max(2 × timeout, 10s)).
    pub lease: Option<Dur>,
}

impl fmt::Debug for DedupeSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeSection")
            .field("store", &self.store)
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(redacted))
            .field("key_header", &self.key_header)
            .finish_non_exhaustive()
    }
}

/// `handlers.<source>.dedupe.store`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeStoreName {
    /// In process.
    Memory,
    /// A SQLite file (feature `dedupe-sqlite`).
    Sqlite,
    /// Redis (feature `dedupe-redis`).
    Redis,
}

impl HandlerSection {
    /// These settings over [`HandlerOptions::default`], checked by
    /// [`HandlerOptions::validate`], the check the runner makes itself
    /// (errors named `handlers.<source>.<field>`, as in this file).
    pub fn options(&self, source: &str) -> Result<HandlerOptions, WorkerConfigError> {
        let field = |f: &str| format!("handlers.{source}.{f}");
        let mut o = HandlerOptions::default();
        if let Some(n) = &self.name {
            o = o.with_name(n.clone());
        }
        if let Some(t) = self.timeout {
            o = o.with_timeout(t.0);
        }
        if let Some(c) = self.concurrency {
            o = o.with_concurrency(c);
        }
        if let Some(m) = self.max_deliveries {
            o = o.with_max_deliveries((m > 0).then_some(m));
        }
        if let Some(p) = self.priority {
            o = o.with_priority(p);
        }
        if let Some(r) = &self.retry {
            o = o.with_policy(r.policy(&field)?);
        }
        if let Some(b) = self.retry_budget {
            o = o.with_retry_budget(b);
        }
        if let Some(c) = &self.circuit_breaker {
            o = o.with_circuit_breaker(c.breaker());
        }
        if let Some(r) = self.rate_limit {
            o = o.with_rate_limit(r);
        }
        if let Some(d) = &self.dedupe {
            d.check(&field)?;
        }
        o.validate()
            .map_err(|e| WorkerConfigError::new(field(&config_field(&e.field)), e.reason))?;
        Ok(o)
    }
}

/// A field of the runner's options by its name in this file: the policy is
/// `retry`, and its backoff's fields are flat (`policy.backoff.min` is
/// `retry.backoff_min`); the others are named alike.
fn config_field(options_field: &str) -> String {
    match options_field.strip_prefix("policy.") {
        Some(rest) => format!("retry.{}", rest.replace("backoff.", "backoff_")),
        None => options_field.to_owned(),
    }
}

impl RetrySection {
    /// The policy these settings make over the default (checked with the
    /// other options); an unknown error class in `on` is refused here.
    fn policy(&self, field: &dyn Fn(&str) -> String) -> Result<RetryPolicy, WorkerConfigError> {
        let mut policy = RetryPolicy::default();
        if let Some(n) = self.immediate_attempts {
            policy = policy.with_immediate_attempts(n);
        }
        let b = *policy.backoff();
        let mut backoff = Backoff::exponential(
            self.backoff_min.map_or(b.min(), |d| d.0),
            self.backoff_max.map_or(b.max(), |d| d.0),
        );
        if let Some(f) = self.backoff_factor {
            backoff = backoff.with_factor(f);
        }
        policy = policy.with_backoff(backoff);
        if let Some(tiers) = &self.tiers {
            policy = policy.with_tiers(tiers.iter().map(|d| DelayTier::new(d.0)));
        }
        if let Some(m) = self.retry_after_inline_max {
            policy = policy.with_retry_after_inline_max(m.0);
        }
        for (class, action) in &self.on {
            let Ok(c) = class.parse::<ErrorClass>() else {
                let known: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
                return Err(WorkerConfigError::new(
                    field(&format!("retry.on.{class}")),
                    format!("unknown error class; one of {}", known.join(", ")),
                ));
            };
            policy = policy.on(c, *action);
        }
        Ok(policy)
    }
}

impl BreakerSection {
    /// 0 turns a trigger off; a missing field keeps the default.
    fn breaker(&self) -> CircuitBreaker {
        let d = CircuitBreaker::default();
        let rate = d.failure_rate().unwrap_or(FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(30),
            minimum_calls: 20,
        });
        let threshold = self.failure_rate.unwrap_or(rate.threshold);
        CircuitBreaker::default()
            .with_consecutive_failures(match self.consecutive_failures {
                Some(0) => None,
                Some(n) => Some(n),
                None => d.consecutive_failures(),
            })
            .with_failure_rate((threshold != 0.0).then_some(FailureRate {
                threshold,
                window: self.failure_window.map_or(rate.window, |w| w.0),
                minimum_calls: self.minimum_calls.unwrap_or(rate.minimum_calls),
            }))
            .with_open_for(
                self.open_for.map_or(d.open_for(), |x| x.0),
                self.max_open_for.map_or(d.max_open_for(), |x| x.0),
            )
            .with_half_open_probes(self.half_open_probes.unwrap_or(d.half_open_probes()))
    }
}

impl DedupeSection {
    /// What the worker needs to open the store (the runner checks the
    /// rest once the store is open).
    fn check(&self, field: &dyn Fn(&str) -> String) -> Result<(), WorkerConfigError> {
        match self.store {
            DedupeStoreName::Sqlite if self.path.is_none() => {
                return Err(WorkerConfigError::new(
                    field("dedupe.path"),
                    "the sqlite store needs a file path",
                ));
            }
            DedupeStoreName::Redis if self.url.is_none() => {
                return Err(WorkerConfigError::new(
                    field("dedupe.url"),
                    "the redis store needs a URL (redis://host:6379)",
                ));
            }
            _ => {}
        }
        if let Some(r) = self.retention
            && r.0.is_zero()
        {
            return Err(WorkerConfigError::new(
                field("dedupe.retention"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}
