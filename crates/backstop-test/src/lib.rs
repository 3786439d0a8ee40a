//! The conformance suite every Backstop backend runs, and test helpers.
//!
//! Each behaviour is one public async function taking a [`Backend`]; a backend's
//! test file runs them all with [`conformance_tests!`]. Functions that need fault
//! injection check [`Features`] and fail loudly (never skip silently) when a
//! backend claims a feature it cannot deliver.

pub mod crash;
mod harness;
mod memory;
pub mod proxy;
pub mod raw_amqp;
mod suite;
pub mod tansu;

pub use harness::{
    Call, Harness, Recorder, Running, eventually, eventually_every, rabbitmqctl, start,
    until_settled, until_zero,
};
pub use memory::MemoryBackend;
pub use suite::*;

use backstop_core::{
    DeadLetterPublisher, DeadLetterSource, DelayPublisher, DelayTier, Publisher, Subscriber,
};
use std::future::Future;

/// What a backend supports, so the suite knows which checks apply.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct Features {
    /// [`Backend::faults`] returns an injector.
    pub fault_injection: bool,
    /// The message key travels with every copy (Kafka record keys); AMQP has
    /// routing keys instead, which name the queue a copy is sent to.
    pub keeps_keys: bool,
    /// Deliveries carry [`SourceInfo::delivery_count`](backstop_core::SourceInfo)
    /// (RabbitMQ quorum queues, the in-memory broker; not Kafka).
    pub counts_deliveries: bool,
}

impl Features {
    /// A backend whose record keys survive every hop.
    pub fn with_keys(mut self) -> Self {
        self.keeps_keys = true;
        self
    }

    /// A backend that counts deliveries of a message.
    pub fn with_delivery_counts(mut self) -> Self {
        self.counts_deliveries = true;
        self
    }

    /// A backend with fault injection.
    pub fn with_fault_injection(mut self) -> Self {
        self.fault_injection = true;
        self
    }
}

/// Fault injection a backend offers to the suite. The suite injects publish
/// faults only when the test's own messages are already published, so a
/// backend may implement them as "the next `n` publishes of any kind fail".
pub trait Faults: Send + Sync {
    /// The next `n` DLQ publishes fail.
    fn fail_next_dead_letter_publishes(&self, n: u32);
    /// The next `n` delay-tier publishes fail.
    fn fail_next_delay_publishes(&self, n: u32);
    /// Drop every consumer connection.
    fn drop_connection(&self);
}

/// A backend under test.
pub trait Backend: Send + Sync + 'static {
    /// Its transport.
    type Transport: Publisher
        + Subscriber
        + DelayPublisher
        + DeadLetterPublisher
        + DeadLetterSource
        + Clone;

    /// What it supports.
    fn features(&self) -> Features;

    /// A transport (connected).
    fn transport(&self) -> impl Future<Output = Self::Transport> + Send;

    /// A new source with a unique name, provisioned with its tiers and DLQ.
    fn fresh_source(
        &self,
        prefix: &str,
        group: &str,
        tiers: &[DelayTier],
    ) -> impl Future<Output = String> + Send;

    /// Messages of `source` (and its tiers) not yet acked: ready or in flight.
    fn pending(&self, source: &str) -> impl Future<Output = usize> + Send;

    /// The fault injector, when `features().fault_injection`.
    fn faults(&self) -> Option<&dyn Faults>;
}

/// Declares one test per conformance behaviour for a backend (those that need
/// no fault injection; see [`conformance_fault_tests!`] for the others).
///
/// ```ignore
/// backstop_test::conformance_tests!(tokio::test(start_paused = true), backstop_test::MemoryBackend::new());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($test:meta, $backend:expr) => {
        $crate::conformance_tests!(@each $test, $backend,
            happy_path,
            transient_then_success_immediately,
            transient_then_success_through_delay_tier,
            exhausted_goes_to_dlq_with_every_header,
            permanent_dead_letters_at_once,
            poison_payload_dead_letters,
            panic_is_caught_and_classified,
            timeout_is_enforced_and_classified,
            retry_after_short_hint_waits_in_process,
            retry_after_long_hint_goes_to_a_long_enough_tier,
            graceful_shutdown_drains_in_flight,
            shutdown_deadline_leaves_unfinished_unacked,
            forged_attempt_headers_ignored_on_main_source,
            malformed_tier_headers_counted_and_ignored,
            in_flight_is_bounded,
            shutdown_during_backoff_moves_to_delay_tier,
            shutdown_during_backoff_without_tiers_releases,
            delivery_limit_dead_letters_without_handling,
            circuit_breaker_pauses_intake_during_an_outage,
            dedupe_handles_each_message_once,
            transport_ack_removes_the_message,
            transport_nack_redelivers,
            transport_dropped_delivery_redelivers,
            transport_pause_yields_nothing,
            transport_delayed_publish_returns_after_its_delay,
        );
    };
    (@each $test:meta, $backend:expr, $($name:ident),* $(,)?) => {
        $(
            #[$test]
            async fn $name() {
                let backend = $backend;
                $crate::$name(&backend).await;
            }
        )*
    };
}

/// Declares the conformance tests that need fault injection
/// ([`Features::fault_injection`]): routing failures and connection loss.
#[macro_export]
macro_rules! conformance_fault_tests {
    ($test:meta, $backend:expr) => {
        $crate::conformance_tests!(@each $test, $backend,
            dead_letter_publish_failure_redelivers_original,
            delay_publish_failure_redelivers_original,
            connection_loss_recovers_without_loss,
        );
    };
}
