//! Per-handler settings ([`HandlerOptions`]), validated by themselves: the
//! runner's builder and the worker's config refuse the same things with
//! the same field names.

use super::intake::{Priority, RateLimit};
use crate::circuit::CircuitBreaker;
use crate::dedupe::{Dedupe, DedupeKey};
use crate::error::ConfigError;
use crate::retry::{RetryBudget, RetryPolicy};
use std::time::Duration;

/// Per-handler settings.
#[derive(Clone, Debug)]
pub struct HandlerOptions {
    pub(super) name: Option<String>,
    pub(super) timeout: Duration,
    pub(super) policy: RetryPolicy,
    pub(super) concurrency: usize,
    pub(super) max_deliveries: Option<u32>,
    pub(super) retry_budget: Option<RetryBudget>,
    pub(super) circuit_breaker: Option<CircuitBreaker>,
    pub(super) rate_limit: Option<RateLimit>,
    pub(super) priority: Priority,
    pub(super) dedupe: Option<Dedupe>,
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
    /// `RetryBudget::default()`. Off by default (immediate retries are
    /// bounded only by the policy's `immediate_attempts`), so a handler's
    /// behaviour does not depend on recent traffic unless asked.
    #[must_use]
    pub fn with_retry_budget(mut self, budget: RetryBudget) -> Self {
        self.retry_budget = Some(budget);
        self
    }

    /// A [`CircuitBreaker`] for this handler, e.g.
    /// `CircuitBreaker::default()`: when its dependency fails, intake
    /// pauses and failing messages wait instead of burning their retries and
    /// filling the DLQ (see [`crate::circuit`]). Off by default: with it, a
    /// handler that fails every message pauses instead of dead-lettering.
    #[must_use]
    pub fn with_circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.circuit_breaker = Some(breaker);
        self
    }

    /// At most this many messages a second taken from this source (off by
    /// default).
    #[must_use]
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Idempotent processing: a [`Dedupe`] layer claims each message's key
    /// before the handler runs and acks known duplicates without calling it.
    #[must_use]
    pub fn with_dedupe(mut self, dedupe: Dedupe) -> Self {
        self.dedupe = Some(dedupe);
        self
    }

    /// This source's [`Priority`] for the runner's in-flight slots.
    #[must_use]
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
}

impl HandlerOptions {
    /// Checks every setting; the error names the field relative to the
    /// handler (`timeout`, `dedupe.retention`, `policy.tiers[1].delay`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be greater than zero"));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new("concurrency", "must be at least 1"));
        }
        if self.max_deliveries == Some(0) {
            return Err(ConfigError::new(
                "max_deliveries",
                "must be at least 1 (or None to disable the guard)",
            ));
        }
        if let Some(b) = &self.retry_budget {
            b.validate()?;
        }
        if let Some(b) = &self.circuit_breaker {
            b.validate()?;
        }
        if let Some(r) = &self.rate_limit {
            r.validate()?;
        }
        self.policy.validate()?;
        match &self.dedupe {
            Some(d) => self.validate_dedupe(d),
            None => Ok(()),
        }
    }

    fn validate_dedupe(&self, d: &Dedupe) -> Result<(), ConfigError> {
        if d.retention.is_zero() {
            return Err(ConfigError::new(
                "dedupe.retention",
                "must be greater than zero",
            ));
        }
        if let Some(longest) = self.policy.tiers().iter().map(|t| t.delay()).max()
            && d.retention < longest
        {
            return Err(ConfigError::new(
                "dedupe.retention",
                format!(
                    "{:?} is shorter than the longest delay tier ({longest:?}): a message back from that tier could be handled twice",
                    d.retention
                ),
            ));
        }
        if d.lease_for(self.timeout) <= self.timeout {
            return Err(ConfigError::new(
                "dedupe.lease",
                "must be longer than the handler's timeout",
            ));
        }
        if let DedupeKey::Header(h) = &d.key
            && h.trim().is_empty()
        {
            return Err(ConfigError::new("dedupe.key_header", "must not be empty"));
        }
        Ok(())
    }
}
