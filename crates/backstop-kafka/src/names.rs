//! Stable topic names: one topic per tier and consumer group, never per attempt.

use backstop_core::{ConfigError, DelayTier};

/// The default retry-tier topic: `<group>.<topic>.retry.<tier>`.
pub fn tier_topic(group: &str, source: &str, tier: &DelayTier) -> String {
    TopicNames::default().tier(group, source, tier)
}

/// The default DLQ topic: `<group>.<topic>.dlq`.
pub fn dlq_topic(group: &str, source: &str) -> String {
    TopicNames::default().dlq(group, source)
}

/// Where the `backstop` CLI records what it replayed or purged from a Kafka
/// DLQ topic (records cannot be deleted one by one): `<dlq>.backstop-handled`,
/// one record per letter, keyed by its position ([`crate::Handled`]).
pub fn handled_topic(dlq: &str) -> String {
    format!("{dlq}.backstop-handled")
}

/// How retry-tier and DLQ topics are named, as templates with `{group}`,
/// `{topic}` and (for tiers) `{tier}`.
///
/// ```
/// use backstop_kafka::TopicNames;
/// use backstop_core::DelayTier;
/// use std::time::Duration;
/// let names = TopicNames::new("{topic}-retry-{tier}-{group}", "{topic}-dlt").unwrap();
/// assert_eq!(names.tier("billing", "orders", &DelayTier::new(Duration::from_secs(5))), "orders-retry-5s-billing");
/// assert_eq!(names.dlq("billing", "orders"), "orders-dlt");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicNames {
    tier: String,
    dlq: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        Self {
            tier: "{group}.{topic}.retry.{tier}".to_owned(),
            dlq: "{group}.{topic}.dlq".to_owned(),
        }
    }
}

impl TopicNames {
    /// Templates for tier and DLQ topics. The tier template needs `{topic}` and
    /// `{tier}` (one topic per tier, never per attempt); the DLQ one `{topic}`.
    pub fn new(tier: impl Into<String>, dlq: impl Into<String>) -> Result<Self, ConfigError> {
        let (tier, dlq) = (tier.into(), dlq.into());
        for needed in ["{topic}", "{tier}"] {
            if !tier.contains(needed) {
                return Err(ConfigError::new(
                    "kafka.topic_names.tier",
                    format!("{tier:?} lacks {needed}"),
                ));
            }
        }
        if !dlq.contains("{topic}") {
            return Err(ConfigError::new(
                "kafka.topic_names.dlq",
                format!("{dlq:?} lacks {{topic}}"),
            ));
        }
        Ok(Self { tier, dlq })
    }

    /// The tier topic of `source` for `group`.
    pub fn tier(&self, group: &str, source: &str, tier: &DelayTier) -> String {
        self.tier
            .replace("{group}", group)
            .replace("{topic}", source)
            .replace("{tier}", tier.name())
    }

    /// The DLQ topic of `source` for `group`.
    pub fn dlq(&self, group: &str, source: &str) -> String {
        self.dlq
            .replace("{group}", group)
            .replace("{topic}", source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn default_names_are_stable() {
        let tier = DelayTier::new(Duration::from_secs(30));
        assert_eq!(
            tier_topic("billing", "orders", &tier),
            "billing.orders.retry.30s"
        );
        assert_eq!(dlq_topic("billing", "orders"), "billing.orders.dlq");
    }

    #[test]
    fn templates_must_keep_one_topic_per_tier() {
        let e = TopicNames::new("{topic}.retry", "{topic}.dlq").unwrap_err();
        assert_eq!(e.field, "kafka.topic_names.tier");
        let e = TopicNames::new("{topic}.{tier}", "dead").unwrap_err();
        assert_eq!(e.field, "kafka.topic_names.dlq");
    }
}
