//! Shared pieces of the examples, so that tests can run them in-process.

pub mod demo;
#[path = "kafka_worker/mod.rs"]
pub mod kafka_worker;
#[path = "outbox_producer/mod.rs"]
pub mod outbox_producer;
#[path = "rabbitmq_worker/mod.rs"]
pub mod rabbitmq_worker;
