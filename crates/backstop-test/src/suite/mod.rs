//! The behaviours every backend must show. Each function panics on a violation.

use crate::{Backend, Harness, Recorder, eventually, start, until_zero};
use backstop_core::message::{format_timestamp, names, parse_timestamp};
use backstop_core::{
    Backoff, Context, DelayPublisher, DelayTier, HandlerError, HandlerOptions, Json, Message,
    RetryPolicy, SourceKind, handler_fn,
};
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

mod contract;
mod faults;
mod outcomes;
mod resilience;
mod shutdown;
mod trust;

pub use contract::*;
pub use faults::*;
pub use outcomes::*;
pub use resilience::*;
pub use shutdown::*;
pub use trust::*;

const WAIT: Duration = Duration::from_secs(60);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The policy the suite uses: 3 immediate attempts with 1..10 ms backoff, tiers
/// `200ms, 400ms`, retry-after hints up to 500 ms waited in process.
pub fn fast_policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(3)
        .with_backoff(Backoff::exponential(ms(1), ms(10)))
        .with_tiers([DelayTier::new(ms(200)), DelayTier::new(ms(400))])
        .with_retry_after_inline_max(ms(500))
}

fn options() -> HandlerOptions {
    HandlerOptions::default()
        .with_name("conformance")
        .with_timeout(Duration::from_secs(5))
}

#[derive(serde::Deserialize)]
struct Order {
    n: u32,
}

fn order(n: u32) -> Message {
    Message::new(format!(r#"{{"n":{n}}}"#))
}

#[derive(Debug)]
struct InventoryDown(std::io::Error);

impl fmt::Display for InventoryDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("inventory service unavailable")
    }
}

impl std::error::Error for InventoryDown {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

async fn dlq_len<T>(h: &Harness<T>) -> usize
where
    T: backstop_core::Publisher
        + backstop_core::Subscriber
        + DelayPublisher
        + backstop_core::DeadLetterPublisher
        + backstop_core::DeadLetterSource
        + Clone,
{
    h.dlq().await.len()
}

fn header<'a>(m: &'a Message, name: &str) -> &'a str {
    m.headers()
        .get_str(name)
        .unwrap_or_else(|| panic!("DLQ message lacks {name}: {:?}", m.headers()))
}
