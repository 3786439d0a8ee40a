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
//!   at-least-once dead-lettering), and the DLQ `<queue>.dlq`, always a classic
//!   queue so that reading it never counts toward a delivery limit. A queue that
//!   exists with other arguments gives an error naming it.
//! - A message coming back from a tier is recognised by `x-death`; the
//!   original is acked only after its tier or DLQ copy is confirmed.
//! - The password of the AMQP URL never appears in logs or errors.
//! - A lost connection or channel is replaced on next use (publishes) and by
//!   the runner's resubscribe with backoff and jitter (consumers), which
//!   re-declares the topology; unacked deliveries come back from the broker
//!   (at-least-once). Each connection carries a `connection_name`
//!   ([`RabbitConfig::with_connection_name`]) so operators can find it.
//!
//! ## Delivery limits and redeliveries
//!
//! Backstop's immediate retries happen in process and its delay tiers
//! republish a new message, so neither makes RabbitMQ redeliver. The broker
//! redelivers only when a message is returned unsettled: a worker killed
//! mid-message, work abandoned at the shutdown deadline, or a tier/DLQ copy the
//! broker would not confirm (the original is then nacked, never acked).
//!
//! - On quorum queues RabbitMQ counts those returns in `x-delivery-count`;
//!   the runner reads it as `SourceInfo::delivery_count` and, past
//!   `HandlerOptions::with_max_deliveries` (default 10), dead-letters the
//!   message itself with reason `delivery-limit`, class `poison` and every
//!   Backstop header, without calling the handler again: a poison pill that
//!   crashes the worker cannot crash it forever.
//! - RabbitMQ may enforce its own limit (`x-delivery-limit`, a
//!   `delivery-limit` policy; RabbitMQ 4 sets 20 by default on quorum queues).
//!   Backstop's default stays below it. Should the broker's limit strike
//!   anyway, the message is not dropped: the main queue dead-letters to
//!   `<queue>.dlq` (at-least-once on quorum queues), where it arrives with
//!   `x-death` / `x-first-death-reason: delivery_limit` instead of Backstop's
//!   failure headers. The same holds for anything else RabbitMQ removes from
//!   the main queue (a TTL or length policy).
//! - Classic queues do not count deliveries: the guard does not apply there,
//!   which is one more reason quorum queues are the default.
//!
//! ## Trust in `x-death`
//!
//! A delivery counts as coming back from a delay tier when its newest `x-death`
//! entry names one of the source's tier queues. A producer that writes a
//! forged `x-death` together with forged `backstop-attempt` headers can make
//! Backstop believe them: the worst it gains is skipping the remaining
//! retries, so a transient failure reaches the DLQ early (with every header,
//! nothing lost, replayable). Restrict publishing to
//! the main queue with RabbitMQ permissions where producers are not trusted.

mod ack;
mod amqp_json;
mod config;
mod convert;
mod dead_letters;
mod publish;
mod settle;
mod subscriber;
mod topology;
mod transport;
mod wire;

pub use config::{AMQP_URL_ENV, QueueType, RabbitConfig, dlq_queue, redacted, tier_queue};
pub use dead_letters::QueueReader;
pub use subscriber::RabbitStream;
pub use transport::RabbitTransport;
