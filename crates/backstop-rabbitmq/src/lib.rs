//! # backstop-rabbitmq
//!
//! The RabbitMQ backend of Backstop, on lapin.
//!
//! - [`RabbitTransport`] implements every transport capability of
//!   `backstop-core`: publish with publisher confirms (mandatory: unroutable is
//!   an error, not a silent drop), consume with manual acks and `basic.qos`
//!   tied to the runner's in-flight bound, delay tiers, the DLQ, DLQ reading.
//! - Topology, declared idempotently: the main queue (quorum by default), one
//!   delay queue per tier `<queue>.retry.<tier>` with `x-message-ttl` and
//!   dead-lettering back to the main queue (no plugin; quorum tier queues use
//!   at-least-once dead-lettering), and the DLQ `<queue>.dlq`. A queue that
//!   exists with other arguments gives an error naming it.
//! - A message coming back from a tier is recognised by `x-death`; the
//!   original is acked only after its tier or DLQ copy is confirmed.
//! - The password of the AMQP URL never appears in logs or errors.

mod config;
mod convert;
mod topology;
mod transport;

pub use config::{AMQP_URL_ENV, QueueType, RabbitConfig, dlq_queue, redacted, tier_queue};
pub use transport::{RabbitStream, RabbitTransport};
