//! What a breaker's state is called, here and in the metric.

use std::fmt;

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// A few probes go through.
    HalfOpen,
    /// Intake paused, failing messages held.
    Open,
}

impl CircuitState {
    /// The `backstop_circuit_state` value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }

    /// `closed`, `half-open`, `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half-open",
            Self::Open => "open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
