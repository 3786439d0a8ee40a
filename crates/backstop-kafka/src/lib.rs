//! # backstop-kafka
//!
//! The Kafka backend of Backstop, on rdkafka (librdkafka).
//!
//! - [`KafkaTransport`] implements every transport capability of
//!   `backstop-core`: publish with delivery reports, subscribe as a
//!   consumer-group member, delay tiers as topics, the DLQ topic, DLQ reading.
//! - Offsets are stored for commit only up to the lowest unfinished offset of
//!   each partition (a watermark), so a crash never skips a message; the
//!   original is settled only after its retry/DLQ copy is acknowledged.
//! - Retry tiers are one topic per tier and consumer group,
//!   `<group>.<topic>.retry.<tier>`, and the DLQ is `<group>.<topic>.dlq`.
//!   A tier partition is paused until its head message is due.
//! - Missing retry/DLQ topics are created at start (most clusters and tansu do
//!   not auto-create); the source topic must exist.
//! - Security settings are librdkafka properties passed through
//!   ([`KafkaConfig::with_property`]); secret values are never printed.

mod admin;
mod config;
mod convert;
mod dead_letters;
mod handled;
mod names;
mod publisher;
mod raw_headers;
mod subscriber;
mod transport;

pub use admin::KafkaAdmin;
pub use config::{BROKERS_ENV, KafkaConfig};
pub use handled::{Handled, POSITION_HEADER as HANDLED_POSITION_HEADER, handled_record};
pub use names::{TopicNames, dlq_topic, handled_topic, tier_topic};
pub use publisher::KafkaPublisher;
pub use subscriber::KafkaStream;
pub use transport::KafkaTransport;
