//! # Backstop
//!
//! Message-queue consumers and producers that do not lose messages when things
//! fail. Write one [`Handler`]; Backstop runs it with a timeout on every call,
//! typed error classes (transient failures are retried, validation failures are
//! not), immediate retries with full-jitter backoff, broker-side delay tiers, a
//! dead-letter queue with full failure metadata, bounded in-flight work and
//! graceful shutdown. The original message is acked only after whatever
//! replaces it (retry-tier or DLQ copy) is confirmed by the broker.
//!
//! `use backstop::prelude::*;` brings what a handler and its runner use;
//! everything else is at the root and in the modules below.
//!
//! ## Features
//! Each backend is its own crate, so a RabbitMQ user never builds librdkafka.
//! - `memory` (default): the in-memory broker, for tests, the quickstart and
//!   local development.
//! - `kafka`: the Kafka backend (`kafka::KafkaTransport`, on rdkafka).
//! - `rabbitmq`: the RabbitMQ backend (`rabbitmq::RabbitTransport`, on lapin).
//! - `outbox`: the disk-backed outbox producer (`outbox::OutboxPublisher`, SQLite).
//! - `dedupe-sqlite`, `dedupe-redis`: the SQLite and Redis dedupe stores
//!   (`dedupe::SqliteDedupeStore`, `dedupe::RedisDedupeStore`).
//! - `worker`: the production worker (`worker::Worker`): TOML and
//!   environment config, Prometheus metrics, `/healthz` and `/readyz`,
//!   signals, text or JSON logs.
//! - `otel`: the worker exports spans with OpenTelemetry OTLP.
//!
//! ## Example
//! ```
//! use backstop::prelude::*;
//! use backstop::memory::MemoryBroker;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order { id: u64, quantity: u32 }
//!
//! struct Orders;
//!
//! impl Handler for Orders {
//!     type Payload = Json<Order>;
//!     async fn handle(&self, Json(order): Json<Order>, _ctx: Context) -> Result<(), HandlerError> {
//!         if order.quantity == 0 {
//!             return Err(HandlerError::permanent(format!("order {} has no quantity", order.id)));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new(r#"{"id":1,"quantity":2}"#)).await.unwrap();
//! let runner = Runner::builder(broker.clone())
//!     .with_group("fulfilment")
//!     .with_handler_options("orders", Orders, HandlerOptions::default())
//!     .build()?;
//! let idle = broker.clone();
//! let report = runner.run(async move { idle.wait_idle().await }).await;
//! assert_eq!(report.stats.ok, 1);
//! # Ok::<(), backstop::ConfigError>(())
//! # }).unwrap();
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use backstop_core::*;

/// The Kafka backend.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka {
    pub use backstop_kafka::*;
}

/// The RabbitMQ backend.
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq {
    pub use backstop_rabbitmq::*;
}

/// The production worker: config, exporter, health server, signals, logs
/// (crate `backstop-worker`).
#[cfg(feature = "worker")]
#[cfg_attr(docsrs, doc(cfg(feature = "worker")))]
pub mod worker {
    pub use backstop_worker::*;
}

/// The disk-backed outbox producer.
#[cfg(feature = "outbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
pub mod outbox {
    pub use backstop_outbox::*;
}
