use super::{Backoff, DelayTier};
use crate::error::{ConfigError, DeadLetterReason, ErrorClass};
use std::time::Duration;

/// What the runner should do with a message after one handler invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Success: ack the original.
    Ack,
    /// Retry in process after this delay (the message blocks only itself).
    RetryNow(Duration),
    /// Publish to this delay tier (confirmed), then ack the original.
    Delay(DelayTier),
    /// Publish to the DLQ (confirmed), then ack the original.
    DeadLetter(DeadLetterReason),
}

/// The result of one handler invocation, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler succeeded.
    Ok,
    /// The handler failed with this class (and hint, for `retry-after`).
    Failed {
        /// Error class.
        class: ErrorClass,
        /// Retry no earlier than this.
        retry_after: Option<Duration>,
    },
}

/// Where a message stands, from its headers and this delivery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttemptState {
    /// Invocations within the current delivery, the one just made included.
    pub immediate: u32,
    /// Delay-tier hops already made (`backstop-delayed-attempts`).
    pub delayed: u32,
}

/// What a class of failure does (ARCHITECTURE.md's class table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum ClassAction {
    /// Immediate retries, then delay tiers, then the DLQ (`exhausted`).
    Retry,
    /// Skip immediate retries: delay tiers, then the DLQ.
    DelayOnly,
    /// Dead-letter at once.
    DeadLetter,
}

/// The retry policy of one handler. Every field is configurable; defaults follow
/// ARCHITECTURE.md: 3 immediate attempts with full-jitter backoff, delay tiers
/// `5s, 30s, 5m`, permanent and poison failures dead-lettered at once.
///
/// ```
/// use backstop_core::{RetryPolicy, DelayTier, Decision, Outcome, AttemptState, ErrorClass};
/// use std::time::Duration;
/// let policy = RetryPolicy::default()
///     .with_immediate_attempts(2)
///     .with_tiers([DelayTier::new(Duration::from_secs(10))]);
/// let failed = Outcome::Failed { class: ErrorClass::Transient, retry_after: None };
/// let d = policy.decide(&failed, AttemptState { immediate: 2, delayed: 0 });
/// assert_eq!(d, Decision::Delay(DelayTier::new(Duration::from_secs(10))));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    immediate_attempts: u32,
    backoff: Backoff,
    tiers: Vec<DelayTier>,
    retry_after_inline_max: Duration,
    actions: [(ErrorClass, ClassAction); ErrorClass::ALL.len()],
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            immediate_attempts: 3,
            backoff: Backoff::default(),
            tiers: [5, 30, 300]
                .into_iter()
                .map(|s| DelayTier::new(Duration::from_secs(s)))
                .collect(),
            retry_after_inline_max: Duration::from_secs(1),
            actions: ErrorClass::ALL.map(|c| (c, default_action(c))),
        }
    }
}

fn default_action(class: ErrorClass) -> ClassAction {
    match class {
        ErrorClass::Permanent | ErrorClass::Poison | ErrorClass::Expired => ClassAction::DeadLetter,
        ErrorClass::Transient
        | ErrorClass::RetryAfter
        | ErrorClass::Timeout
        | ErrorClass::Panic
        | ErrorClass::CircuitOpen => ClassAction::Retry,
    }
}

impl RetryPolicy {
    /// Handler invocations per delivery before escalating to a delay tier (>= 1).
    #[must_use]
    pub fn with_immediate_attempts(mut self, attempts: u32) -> Self {
        self.immediate_attempts = attempts;
        self
    }

    /// Backoff between immediate attempts.
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The delay tiers, shortest first; empty means "no delayed retries".
    #[must_use]
    pub fn with_tiers(mut self, tiers: impl IntoIterator<Item = DelayTier>) -> Self {
        self.tiers = tiers.into_iter().collect();
        self
    }

    /// A `retry-after` hint up to this long is waited out in process (if immediate
    /// attempts remain); a longer one goes to the first tier at least that long.
    #[must_use]
    pub fn with_retry_after_inline_max(mut self, max: Duration) -> Self {
        self.retry_after_inline_max = max;
        self
    }

    /// What failures of `class` do.
    #[must_use]
    pub fn on(mut self, class: ErrorClass, action: ClassAction) -> Self {
        for entry in &mut self.actions {
            if entry.0 == class {
                entry.1 = action;
            }
        }
        self
    }

    /// Immediate attempts per delivery.
    pub fn immediate_attempts(&self) -> u32 {
        self.immediate_attempts
    }

    /// The backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The delay tiers.
    pub fn tiers(&self) -> &[DelayTier] {
        &self.tiers
    }

    /// The action for a class.
    pub fn action(&self, class: ErrorClass) -> ClassAction {
        self.actions
            .iter()
            .find(|(c, _)| *c == class)
            .map_or(ClassAction::Retry, |(_, a)| *a)
    }

    /// Checks the policy; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.immediate_attempts == 0 {
            return Err(ConfigError::new(
                "policy.immediate_attempts",
                "must be at least 1 (the first attempt counts)",
            ));
        }
        self.backoff.validate("policy.backoff")?;
        for (i, tier) in self.tiers.iter().enumerate() {
            tier.validate(&format!("policy.tiers[{i}]"))?;
            if self.tiers[..i].iter().any(|t| t.name() == tier.name()) {
                return Err(ConfigError::new(
                    format!("policy.tiers[{i}].name"),
                    format!("{:?} is used twice; tier names must be unique", tier.name()),
                ));
            }
            if i > 0 && tier.delay() < self.tiers[i - 1].delay() {
                return Err(ConfigError::new(
                    format!("policy.tiers[{i}].delay"),
                    "tiers must be ordered shortest first",
                ));
            }
        }
        Ok(())
    }

    /// The decision for one outcome. Pure: everything it needs is in `state`,
    /// which the runner reads from headers, so decisions survive restarts.
    pub fn decide(&self, outcome: &Outcome, state: AttemptState) -> Decision {
        let (class, hint) = match *outcome {
            Outcome::Ok => return Decision::Ack,
            Outcome::Failed { class, retry_after } => (class, retry_after),
        };
        let immediate_left = state.immediate < self.immediate_attempts;
        match self.action(class) {
            ClassAction::DeadLetter => Decision::DeadLetter(match class {
                ErrorClass::Permanent => DeadLetterReason::Permanent,
                ErrorClass::Poison => DeadLetterReason::Poison,
                ErrorClass::Expired => DeadLetterReason::Expired,
                _ => DeadLetterReason::Exhausted,
            }),
            ClassAction::Retry => match hint {
                Some(after) if after <= self.retry_after_inline_max && immediate_left => {
                    Decision::RetryNow(after)
                }
                Some(after) => self.tier_for(state.delayed, Some(after)),
                None if immediate_left => Decision::RetryNow(self.backoff.delay(state.immediate)),
                None => self.tier_for(state.delayed, None),
            },
            ClassAction::DelayOnly => self.tier_for(state.delayed, hint),
        }
    }

    /// The decision for `outcome` as if no immediate attempt were left: the next
    /// delay tier, or the DLQ once tiers are used up. The runner uses it when it
    /// shuts down during a backoff, so a message is not held through its wait.
    pub fn escalate(&self, outcome: &Outcome, state: AttemptState) -> Decision {
        self.decide(
            outcome,
            AttemptState {
                immediate: u32::MAX,
                ..state
            },
        )
    }

    /// Hop `delayed` goes to tier `delayed`; a hint moves it to the first tier at
    /// least that long (or the longest). Past the last tier: DLQ `exhausted`.
    fn tier_for(&self, delayed: u32, hint: Option<Duration>) -> Decision {
        let next = delayed as usize;
        if next >= self.tiers.len() {
            return Decision::DeadLetter(DeadLetterReason::Exhausted);
        }
        let index = match hint {
            Some(after) => self
                .tiers
                .iter()
                .position(|t| t.delay() >= after)
                .unwrap_or(self.tiers.len() - 1)
                .max(next),
            None => next,
        };
        Decision::Delay(self.tiers[index].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
            .with_immediate_attempts(3)
            .with_backoff(Backoff::exponential(ms(10), ms(40)))
            .with_tiers([DelayTier::new(ms(100)), DelayTier::new(ms(1000))])
            .with_retry_after_inline_max(ms(500))
    }

    fn failed(class: ErrorClass) -> Outcome {
        Outcome::Failed {
            class,
            retry_after: None,
        }
    }

    fn at(immediate: u32, delayed: u32) -> AttemptState {
        AttemptState { immediate, delayed }
    }

    #[test]
    fn success_acks() {
        assert_eq!(policy().decide(&Outcome::Ok, at(1, 0)), Decision::Ack);
    }

    #[test]
    fn retrying_classes_go_immediate_then_tiers_then_dlq() {
        let p = policy();
        for class in [
            ErrorClass::Transient,
            ErrorClass::Timeout,
            ErrorClass::Panic,
            ErrorClass::CircuitOpen,
        ] {
            for immediate in 1..3 {
                match p.decide(&failed(class), at(immediate, 0)) {
                    Decision::RetryNow(d) => assert!(d <= p.backoff().base_delay(immediate)),
                    other => panic!("{class}: {other:?}"),
                }
            }
            assert_eq!(
                p.decide(&failed(class), at(3, 0)),
                Decision::Delay(DelayTier::new(ms(100))),
                "{class}"
            );
            assert_eq!(
                p.decide(&failed(class), at(3, 1)),
                Decision::Delay(DelayTier::new(ms(1000)))
            );
            assert_eq!(
                p.decide(&failed(class), at(3, 2)),
                Decision::DeadLetter(DeadLetterReason::Exhausted)
            );
        }
    }

    #[test]
    fn permanent_poison_and_expired_dead_letter_at_once_with_their_reason() {
        let p = policy();
        for (class, reason) in [
            (ErrorClass::Permanent, DeadLetterReason::Permanent),
            (ErrorClass::Poison, DeadLetterReason::Poison),
            (ErrorClass::Expired, DeadLetterReason::Expired),
        ] {
            assert_eq!(
                p.decide(&failed(class), at(1, 0)),
                Decision::DeadLetter(reason)
            );
        }
    }

    #[test]
    fn retry_after_short_hint_waits_in_process() {
        let o = Outcome::Failed {
            class: ErrorClass::RetryAfter,
            retry_after: Some(ms(300)),
        };
        assert_eq!(policy().decide(&o, at(1, 0)), Decision::RetryNow(ms(300)));
        // No immediate attempts left: the first tier that is long enough.
        assert_eq!(
            policy().decide(&o, at(3, 0)),
            Decision::Delay(DelayTier::new(ms(1000)))
        );
    }

    #[test]
    fn retry_after_long_hint_picks_a_tier_at_least_that_long() {
        let o = |after| Outcome::Failed {
            class: ErrorClass::RetryAfter,
            retry_after: Some(after),
        };
        let p = policy();
        assert_eq!(
            p.decide(&o(ms(800)), at(1, 0)),
            Decision::Delay(DelayTier::new(ms(1000)))
        );
        // Longer than every tier: the longest one.
        assert_eq!(
            p.decide(&o(ms(60_000)), at(1, 0)),
            Decision::Delay(DelayTier::new(ms(1000)))
        );
        // Tiers used up: DLQ.
        assert_eq!(
            p.decide(&o(ms(800)), at(1, 2)),
            Decision::DeadLetter(DeadLetterReason::Exhausted)
        );
    }

    #[test]
    fn class_actions_are_configurable() {
        let p = policy()
            .on(ErrorClass::Permanent, ClassAction::Retry)
            .on(ErrorClass::Transient, ClassAction::DelayOnly)
            .on(ErrorClass::Panic, ClassAction::DeadLetter);
        assert!(matches!(
            p.decide(&failed(ErrorClass::Permanent), at(1, 0)),
            Decision::RetryNow(_)
        ));
        assert_eq!(
            p.decide(&failed(ErrorClass::Transient), at(1, 0)),
            Decision::Delay(DelayTier::new(ms(100)))
        );
        assert_eq!(
            p.decide(&failed(ErrorClass::Panic), at(1, 0)),
            Decision::DeadLetter(DeadLetterReason::Exhausted)
        );
    }

    #[test]
    fn escalate_skips_the_remaining_immediate_attempts() {
        let p = policy();
        assert_eq!(
            p.escalate(&failed(ErrorClass::Transient), at(1, 0)),
            Decision::Delay(DelayTier::new(ms(100)))
        );
        let hinted = Outcome::Failed {
            class: ErrorClass::RetryAfter,
            retry_after: Some(ms(300)),
        };
        assert_eq!(
            p.escalate(&hinted, at(1, 0)),
            Decision::Delay(DelayTier::new(ms(1000)))
        );
        assert_eq!(
            p.escalate(&failed(ErrorClass::Transient), at(1, 2)),
            Decision::DeadLetter(DeadLetterReason::Exhausted)
        );
    }

    #[test]
    fn no_tiers_means_dlq_after_immediate_attempts() {
        let p = policy().with_tiers([]);
        assert_eq!(
            p.decide(&failed(ErrorClass::Transient), at(3, 0)),
            Decision::DeadLetter(DeadLetterReason::Exhausted)
        );
    }

    #[test]
    fn defaults_match_the_architecture() {
        let p = RetryPolicy::default();
        assert_eq!(p.immediate_attempts(), 3);
        let tiers: Vec<_> = p.tiers().iter().map(DelayTier::name).collect();
        assert_eq!(tiers, ["5s", "30s", "5m"]);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn validation_names_the_field() {
        let e = policy().with_immediate_attempts(0).validate().unwrap_err();
        assert_eq!(e.field, "policy.immediate_attempts");
        let e = policy()
            .with_tiers([DelayTier::new(ms(5)), DelayTier::named("5ms", ms(9))])
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "policy.tiers[1].name");
        let e = policy()
            .with_tiers([DelayTier::new(ms(50)), DelayTier::new(ms(9))])
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "policy.tiers[1].delay");
        assert!(e.to_string().contains("policy.tiers[1].delay"));
    }
}
