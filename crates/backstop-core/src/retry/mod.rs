//! Retry policy: what happens after a failure, computed from headers so that it
//! survives restarts.

mod backoff;
mod budget;
mod policy;
mod tier;

pub use backoff::Backoff;
pub use budget::RetryBudget;
pub use policy::{AttemptState, ClassAction, Decision, Outcome, RetryPolicy};
pub use tier::DelayTier;
