//! # backstop-core
//!
//! The broker-agnostic heart of Backstop: the message model and the one header
//! schema, the [`Handler`] trait teams implement, typed error classes, the
//! [`RetryPolicy`], the small transport capability traits each backend
//! implements, the [`Runner`] that ties them together, and an in-memory
//! transport (feature `memory`, on by default).
//!
//! The path of one message: decode (failure = `poison`) → timeout (`timeout`) →
//! panic guard (`panic`) → [`Handler::handle`] → [`RetryPolicy::decide`] →
//! ack, retry in process, publish to a delay tier, or publish to the DLQ. The
//! original is acked only after its replacement is confirmed by the broker.
//!
//! ```
//! # #[cfg(feature = "memory")] {
//! use backstop_core::{memory::MemoryBroker, handler_fn, Context, HandlerError, Json, Message, Publisher, Runner};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new(r#"{"qty": 0}"#)).await.unwrap();
//!
//! #[derive(serde::Deserialize)]
//! struct Order { qty: u32 }
//!
//! let runner = Runner::builder(broker.clone())
//!     .with_handler("orders", handler_fn(|Json(o): Json<Order>, _: Context| async move {
//!         if o.qty == 0 { return Err(HandlerError::permanent("qty must be positive")) }
//!         Ok(())
//!     }))
//!     .build()
//!     .unwrap();
//! let idle = broker.clone();
//! runner.run(async move { idle.wait_idle().await }).await;
//! let dead = broker.messages("orders.dlq");
//! assert_eq!(dead[0].headers().get_str("backstop-dead-letter-reason"), Some("permanent"));
//! # });
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod circuit;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod config_serde;
pub mod dedupe;
mod delivered;
pub mod error;
pub mod handler;
pub mod message;
pub mod observability;
pub mod prelude;
pub mod retry;
pub mod runner;
mod stats;
pub mod transport;
pub mod unroutable;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;

pub use circuit::{CircuitBreaker, CircuitState, FailureRate};
pub use error::{
    BoxError, ConfigError, DeadLetterReason, ErrorClass, HandlerError, HandlerErrorKind, ResultExt,
};
pub use handler::{Context, Decode, DecodeError, Handler, HandlerFn, Json, handler_fn};
pub use message::{Failure, Header, Headers, Malformed, Message, Origin, ReplayMeta, RetryMeta};
pub use observability::TracePropagation;
pub use retry::{
    AttemptState, Backoff, ClassAction, Decision, DelayTier, Outcome, RetryBudget, RetryPolicy,
};
pub use runner::{
    DEFAULT_MAX_DELIVERIES, HandlerOptions, Priority, RateLimit, RouteStatus, RunReport, Runner,
    RunnerBuilder, RunnerHealth, RunnerStats, SharedHandler, StatsSnapshot,
};
pub use transport::{
    Acknowledge, Backlog, DeadLetterPublisher, DeadLetterSource, DelayPublisher, Delivery,
    DeliveryStream, Inspect, Lane, Lanes, PublishError, Publisher, Settlement, SourceInfo,
    SourceKind, Subscriber, Subscription, Transport, TransportError, TransportErrorKind,
};
