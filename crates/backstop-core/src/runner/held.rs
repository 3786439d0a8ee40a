//! The circuit breaker's leave for one call, held until its verdict.

use crate::circuit::{Circuits, Permit, Verdict};

/// A permit of the handler's circuit breaker (or none: no breaker, or not
/// taken yet). Whatever way the message's path ends, the permit is
/// recorded once: with the verdict the path gives it, or as `Ignored` when
/// it is dropped unrecorded (a duplicate, a shutdown, a skip, a panic), so
/// a probe slot is never kept by a message that said nothing about its
/// dependencies.
#[derive(Debug)]
pub(super) struct Held<'a> {
    leave: Option<(&'a Circuits, Permit)>,
}

impl<'a> Held<'a> {
    pub(super) fn none() -> Self {
        Self { leave: None }
    }

    /// `permit` from `circuits`; none when either is missing.
    pub(super) fn new(circuits: Option<&'a Circuits>, permit: Option<Permit>) -> Self {
        Self {
            leave: circuits.zip(permit),
        }
    }

    pub(super) fn is_some(&self) -> bool {
        self.leave.is_some()
    }

    /// Records how the call ended; true when the message should be held (see
    /// `Circuits::record`).
    pub(super) fn record(mut self, verdict: Verdict<'_>) -> bool {
        self.leave
            .take()
            .is_some_and(|(circuits, permit)| circuits.record(permit, verdict))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some((circuits, permit)) = self.leave.take() {
            circuits.record(permit, Verdict::Ignored);
        }
    }
}
