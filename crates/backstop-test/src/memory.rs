use crate::{Backend, Faults, Features};
use backstop_core::DelayTier;
use backstop_core::memory::MemoryBroker;
use std::sync::atomic::{AtomicU64, Ordering};

/// The in-memory transport as a conformance [`Backend`].
#[derive(Debug, Default)]
pub struct MemoryBackend {
    broker: MemoryBroker,
    next: AtomicU64,
}

impl MemoryBackend {
    /// A backend over a new broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The broker, for extra inspection.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

impl Backend for MemoryBackend {
    type Transport = MemoryBroker;

    fn features(&self) -> Features {
        Features::default()
            .with_fault_injection()
            .with_keys()
            .with_delivery_counts()
    }

    async fn transport(&self) -> MemoryBroker {
        self.broker.clone()
    }

    async fn fresh_source(&self, prefix: &str, _group: &str, _tiers: &[DelayTier]) -> String {
        format!("{prefix}-{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    async fn pending(&self, source: &str) -> usize {
        let tier_prefix = format!("{source}.retry.");
        self.broker
            .queue_names()
            .iter()
            .filter(|q| *q == source || q.starts_with(&tier_prefix))
            .map(|q| self.broker.ready_len(q) + self.broker.unacked_len(q))
            .sum()
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }
}

impl Faults for MemoryBackend {
    fn fail_next_dead_letter_publishes(&self, n: u32) {
        self.broker.fail_next_dead_letter_publishes(n);
    }
    fn fail_next_delay_publishes(&self, n: u32) {
        self.broker.fail_next_delay_publishes(n);
    }
    fn drop_connection(&self) {
        self.broker.drop_connection();
    }
}
