//! Stable topic names: one topic per tier and consumer group, never per attempt.

use backstop_core::DelayTier;

/// `<group>.<topic>.retry.<tier>`.
pub fn tier_topic(group: &str, source: &str, tier: &DelayTier) -> String {
    format!("{group}.{source}.retry.{}", tier.name())
}

/// `<group>.<topic>.dlq`.
pub fn dlq_topic(group: &str, source: &str) -> String {
    format!("{group}.{source}.dlq")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_are_stable() {
        let tier = DelayTier::new(Duration::from_secs(30));
        assert_eq!(
            tier_topic("billing", "orders", &tier),
            "billing.orders.retry.30s"
        );
        assert_eq!(dlq_topic("billing", "orders"), "billing.orders.dlq");
    }
}
