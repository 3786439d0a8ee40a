//! The README's code, compiled: every ```rust block of README.md is found in
//! this file (or, for the worker, in `worker.rs`) line for line, comments
//! aside (`tests/readme.rs` checks). Around the blocks only what the README
//! leaves out: an inventory client, the broker, the shutdown signal.
//!
//! ```sh
//! cargo run -p backstop-examples --example readme   # Ctrl-C to stop
//! ```

/// Kept as the README shows it: rustfmt would reflow the one-line struct.
#[rustfmt::skip]
mod readme {
use backstop::{Context, Handler, HandlerError, Json, ResultExt};
use serde::Deserialize;

#[derive(Deserialize)]
struct Order { id: u64, quantity: u32 }

struct Fulfil { inventory: Inventory }

impl Handler for Fulfil {
    type Payload = Json<Order>; // undecodable payloads never get here: DLQ as `poison`

    async fn handle(&self, Json(order): Json<Order>, ctx: Context) -> Result<(), HandlerError> {
        if order.quantity == 0 {
            // Validation: retrying cannot help, dead-letter at once.
            return Err(HandlerError::permanent(format!("order {} has quantity 0", order.id)));
        }
        // A blip (timeout, 5xx, reset): retried in process, then through delay tiers.
        self.inventory.reserve(order.id, order.quantity).await.transient()?;
        tracing::info!(id = ctx.message_id(), attempt = ctx.attempt(), "reserved");
        Ok(())
    }
}

    use backstop::dedupe::{Dedupe, SqliteDedupeStore};
    use backstop::{CircuitBreaker, HandlerOptions, Priority, RateLimit, RetryBudget};
    use backstop::{RetryPolicy, Runner, memory::MemoryBroker};
    use std::time::Duration;

    /// What the README's handler calls.
    pub(crate) struct Inventory;

    impl Inventory {
        async fn reserve(&self, _id: u64, _quantity: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn shutdown_signal() {
        let _ = tokio::signal::ctrl_c().await;
    }

    /// "and run it".
    pub(crate) async fn run(broker: MemoryBroker, inventory: Inventory) -> anyhow::Result<()> {
let runner = Runner::builder(broker)
    .with_group("fulfilment")
    .with_handler_options("orders", Fulfil { inventory }, HandlerOptions::default()
        .with_timeout(Duration::from_secs(10))
        .with_policy(RetryPolicy::default()))       // 3 attempts, then tiers 5s, 30s, 5m, then DLQ
    .build()?;                                       // bad config is refused here, naming the field
runner.run(shutdown_signal()).await;                 // drains in-flight work, then returns
        Ok(())
    }

    /// "The outbox".
    pub(crate) async fn outbox(
        rabbit_transport: backstop::rabbitmq::RabbitTransport,
        payload: String,
        customer_id: String,
    ) -> anyhow::Result<()> {
        use backstop::Message;
        use backstop::outbox::{OutboxConfig, OutboxPublisher};
let outbox = OutboxPublisher::open(rabbit_transport, OutboxConfig::new("/var/lib/orders/outbox.db")).await?;
outbox.send("orders", Message::new(payload).with_key(customer_id)).await?;  // on disk: safe
        Ok(())
    }

    /// "When a dependency goes down".
    pub(crate) fn resilient() -> anyhow::Result<HandlerOptions> {
        Ok(
HandlerOptions::default()
    // 5 failures in a row, or 50 % of >= 20 calls in 30 s: open for 5 s,
    // doubling to 60 s after each failed half-open probe.
    .with_circuit_breaker(CircuitBreaker::default())
    // Immediate retries limited to 20 % of recent successes + 10/s.
    .with_retry_budget(RetryBudget::default())
    // Handle each backstop-message-id once (SQLite: one node; Redis: shared).
    .with_dedupe(Dedupe::new(SqliteDedupeStore::open("dedupe.sqlite")?))
    .with_rate_limit(RateLimit::per_second(200.0))
    .with_priority(Priority::Low)
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = readme::resilient()?;
    options.validate()?;
    // Compiled, not run here: it needs RabbitMQ.
    let _ = readme::outbox;
    let broker = backstop::memory::MemoryBroker::new();
    readme::run(broker, readme::Inventory).await
}
