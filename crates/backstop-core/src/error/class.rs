use std::fmt;
use std::str::FromStr;

/// The class of a failure; it decides what the retry policy does
/// (ARCHITECTURE.md, "Error classes"). Written to `backstop-error-class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Worth retrying.
    Transient,
    /// Retry after a hint the handler gave.
    RetryAfter,
    /// Retrying cannot help.
    Permanent,
    /// The payload cannot be decoded.
    Poison,
    /// The handler exceeded its timeout.
    Timeout,
    /// The handler panicked.
    Panic,
    /// The circuit breaker was open.
    CircuitOpen,
    /// The message expired.
    Expired,
}

impl ErrorClass {
    /// Every class, for tables and exhaustive tests.
    pub const ALL: [ErrorClass; 8] = [
        Self::Transient,
        Self::RetryAfter,
        Self::Permanent,
        Self::Poison,
        Self::Timeout,
        Self::Panic,
        Self::CircuitOpen,
        Self::Expired,
    ];

    /// The header / metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::RetryAfter => "retry-after",
            Self::Permanent => "permanent",
            Self::Poison => "poison",
            Self::Timeout => "timeout",
            Self::Panic => "panic",
            Self::CircuitOpen => "circuit-open",
            Self::Expired => "expired",
        }
    }
}

/// A class or reason name that is not one of ours.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown name {0:?}")]
pub struct UnknownName(pub String);

impl FromStr for ErrorClass {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownName(s.to_owned()))
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message is in the DLQ. Written to `backstop-dead-letter-reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// Every immediate attempt and delay tier was used.
    Exhausted,
    /// A permanent error.
    Permanent,
    /// The payload could not be decoded.
    Poison,
    /// The broker's delivery limit was reached.
    DeliveryLimit,
    /// The message expired.
    Expired,
}

impl DeadLetterReason {
    /// Every reason.
    pub const ALL: [DeadLetterReason; 5] = [
        Self::Exhausted,
        Self::Permanent,
        Self::Poison,
        Self::DeliveryLimit,
        Self::Expired,
    ];

    /// The header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Permanent => "permanent",
            Self::Poison => "poison",
            Self::DeliveryLimit => "delivery-limit",
            Self::Expired => "expired",
        }
    }
}

impl FromStr for DeadLetterReason {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownName(s.to_owned()))
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in ErrorClass::ALL {
            assert_eq!(c.as_str().parse::<ErrorClass>(), Ok(c));
        }
        for r in DeadLetterReason::ALL {
            assert_eq!(r.to_string().parse::<DeadLetterReason>(), Ok(r));
        }
        assert!("Transient".parse::<ErrorClass>().is_err());
    }
}
