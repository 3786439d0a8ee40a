//! Reading the runner's settings from configuration files (feature `serde`):
//! the settings types derive `Deserialize` with the names the worker's TOML
//! uses, and durations are written as text (`"500ms"`, `"30s"`, `"5m"`).
//! The values are checked where the runner checks them, by `validate`.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// Deserializes a [`Duration`] written as text: `"500ms"`, `"30s"`, `"5m"`,
/// `"1h 30m"` (humantime's syntax). For `#[serde(deserialize_with = ..)]`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"a duration such as "500ms", "30s" or "5m""#)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v.trim()).map_err(|e| {
                E::custom(format!(
                    r#"{v:?} is not a duration ({e}); write e.g. "500ms", "30s", "5m""#
                ))
            })
        }
    }
    d.deserialize_str(Text)
}

/// [`crate::RateLimit`] as written: `per_second` and an optional `burst`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitFields {
    per_second: f64,
    burst: Option<u32>,
}

impl From<RateLimitFields> for crate::RateLimit {
    fn from(f: RateLimitFields) -> Self {
        let limit = Self::per_second(f.per_second);
        match f.burst {
            Some(b) => limit.with_burst(b),
            None => limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{ClassAction, Priority, RateLimit, RetryBudget};
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Deserialize)]
    struct Settings {
        priority: Priority,
        action: ClassAction,
        budget: RetryBudget,
        limit: RateLimit,
    }

    fn read(json: &str) -> Result<Settings, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn settings_read_with_the_worker_config_names_and_defaults() {
        let s = read(
            r#"{"priority":"low","action":"delay_only",
                "budget":{"window":"5s"},"limit":{"per_second":2.5}}"#,
        )
        .map_err(|e| e.to_string());
        let Ok(s) = s else {
            panic!("{s:?}");
        };
        assert_eq!(s.priority, Priority::Low);
        assert_eq!(s.action, ClassAction::DelayOnly);
        let d = RetryBudget::default();
        assert_eq!(
            s.budget,
            RetryBudget::new(Duration::from_secs(5), d.min_per_sec(), d.ratio())
        );
        assert_eq!(s.limit, RateLimit::per_second(2.5));
    }

    #[test]
    fn unknown_fields_names_and_bad_durations_are_refused() {
        let doc = |priority: &str, budget: &str, limit: &str| {
            format!(
                r#"{{"priority":"{priority}","action":"retry","budget":{budget},"limit":{limit}}}"#
            )
        };
        let ok_limit = r#"{"per_second":1}"#;
        for (json, says) in [
            (
                doc("low", r#"{"windw":"5s"}"#, ok_limit),
                "unknown field `windw`",
            ),
            (
                doc("low", r#"{"window":"soon"}"#, ok_limit),
                "is not a duration",
            ),
            (
                doc("low", "{}", r#"{"per_second":1,"bust":3}"#),
                "unknown field `bust`",
            ),
            (doc("urgent", "{}", ok_limit), "unknown variant `urgent`"),
        ] {
            let err = read(&json).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(says), "{json}: {err}");
        }
        assert!(read(&doc("low", "{}", ok_limit)).is_ok());
    }
}
