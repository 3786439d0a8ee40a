use crate::error::ConfigError;
use std::time::Duration;

/// One broker-side delay tier: a queue/topic whose messages all wait `delay`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DelayTier {
    name: String,
    delay: Duration,
}

impl DelayTier {
    /// A tier named after its delay (`5s`, `30s`, `5m`, `250ms`).
    pub fn new(delay: Duration) -> Self {
        Self {
            name: tier_name(delay),
            delay,
        }
    }

    /// A tier with an explicit name (it becomes part of topic/queue names).
    pub fn named(name: impl Into<String>, delay: Duration) -> Self {
        Self {
            name: name.into(),
            delay,
        }
    }

    /// The tier's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long its messages wait.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.name"),
                "must not be empty",
            ));
        }
        if let Some(c) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(ConfigError::new(
                format!("{field}.name"),
                format!(
                    "{:?} contains {c:?}; tier names become topic/queue names, use [A-Za-z0-9._-]",
                    self.name
                ),
            ));
        }
        if self.delay.is_zero() {
            return Err(ConfigError::new(
                format!("{field}.delay"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

fn tier_name(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0ms".to_owned(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_delay() {
        let names: Vec<_> = [5_000u64, 30_000, 300_000, 7_200_000, 250, 1_500]
            .into_iter()
            .map(|ms| DelayTier::new(Duration::from_millis(ms)).name().to_owned())
            .collect();
        assert_eq!(names, ["5s", "30s", "5m", "2h", "250ms", "1500ms"]);
    }

    #[test]
    fn bad_tiers_are_refused_with_the_field() {
        let e = DelayTier::named("a b", Duration::from_secs(1))
            .validate("policy.tiers[0]")
            .unwrap_err();
        assert_eq!(e.field, "policy.tiers[0].name");
        let e = DelayTier::new(Duration::ZERO)
            .validate("policy.tiers[2]")
            .unwrap_err();
        assert_eq!(e.field, "policy.tiers[2].delay");
    }
}
