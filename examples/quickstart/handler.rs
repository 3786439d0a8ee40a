//! The handler of the quickstart, as a user writes one: it validates an
//! order and calls a (simulated) flaky inventory service; its retry policy.

use backstop::{Backoff, Context, DelayTier, Handler, HandlerError, Json, RetryPolicy};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One order as producers send it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Order {
    /// Order number.
    pub id: u32,
    /// Items ordered; 0 is invalid.
    pub quantity: u32,
    /// Simulates a flaky dependency: the first `flaky_attempts` attempts fail.
    pub flaky_attempts: u32,
}

/// The handler: validates, then calls a (simulated) flaky inventory service.
#[derive(Clone, Debug, Default)]
pub struct Fulfil {
    pub(crate) handled: Arc<Mutex<HashSet<String>>>,
}

impl Handler for Fulfil {
    type Payload = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: Context) -> Result<(), HandlerError> {
        if order.quantity == 0 {
            return Err(HandlerError::permanent(format!(
                "order {} has quantity 0",
                order.id
            )));
        }
        if ctx.attempt() <= order.flaky_attempts {
            return Err(HandlerError::transient(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("inventory service refused connection (order {})", order.id),
            )));
        }
        self.handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.message_id().to_owned());
        Ok(())
    }
}

/// The retry policy of the quickstart: short tiers so it ends in about a second.
pub fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_immediate_attempts(3)
        .with_backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(50),
        ))
        .with_tiers([
            DelayTier::new(Duration::from_millis(100)),
            DelayTier::new(Duration::from_millis(300)),
        ])
}
