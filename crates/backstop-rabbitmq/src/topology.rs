//! Idempotent declaration of a source's queues: the main queue, one delay queue
//! per tier (TTL, dead-lettering back to the main queue: no plugin), the DLQ.

use crate::config::{QueueType, dlq_queue, tier_queue};
use backstop_core::{Subscription, TransportError, TransportErrorKind};
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

fn args(queue_type: QueueType) -> FieldTable {
    let mut t = FieldTable::default();
    let kind = match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(kind)),
    );
    t
}

fn describe(t: &FieldTable) -> String {
    t.inner()
        .iter()
        .map(|(k, v)| match v {
            AMQPValue::LongString(s) => format!("{}={}", k.as_str(), s),
            AMQPValue::LongLongInt(n) => format!("{}={n}", k.as_str()),
            other => format!("{}={other:?}", k.as_str()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn declare(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
) -> Result<(), TransportError> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(ShortString::from(name), opts, arguments.clone())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            // A mismatch closes the channel with PRECONDITION_FAILED (the
            // caller stops there); say which queue and what Backstop wanted.
            let text = e.to_string();
            let kind =
                if crate::transport::soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
                    format!(
                        "queue {name:?} exists with other arguments than Backstop declares ({}); \
                     delete it or align its arguments: {text}",
                        describe(&arguments)
                    )
                } else {
                    format!("declare queue {name:?}: {text}")
                };
            Err(TransportError::new(TransportErrorKind::Rejected, kind).with_source(e))
        }
    }
}

/// Arguments that make `queue_type` queues dead-letter to `target` through the
/// default exchange, at-least-once on quorum queues (at-most-once is their
/// default: a message could be dropped on its way).
fn dead_letter_to(queue_type: QueueType, target: &str) -> FieldTable {
    let mut a = args(queue_type);
    a.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("")),
    );
    a.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(target)),
    );
    if queue_type == QueueType::Quorum {
        a.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        // at-least-once dead-lettering requires it; a full queue then nacks
        // publishes instead of dropping its oldest message.
        a.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
    }
    a
}

/// Declares the main queue and its tier queues (the DLQ:
/// [`declare_classic`]).
///
/// The main queue dead-letters to the DLQ: whatever RabbitMQ itself removes
/// from it (a quorum queue's delivery limit, a TTL or length policy) lands in
/// `<queue>.dlq` with `x-death`, never silently dropped. Tier queues expire
/// into the main queue after their TTL.
pub(crate) async fn declare_all(
    channel: &Channel,
    queue_type: QueueType,
    subscription: &Subscription,
) -> Result<(), TransportError> {
    let queue = &subscription.source;
    declare(
        channel,
        queue,
        dead_letter_to(queue_type, &dlq_queue(queue)),
    )
    .await?;
    for tier in &subscription.tiers {
        let mut a = dead_letter_to(queue_type, queue);
        let ttl = i64::try_from(tier.delay().as_millis()).unwrap_or(i64::MAX);
        a.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongLongInt(ttl),
        );
        declare(channel, &tier_queue(queue, tier), a).await?;
    }
    Ok(())
}

/// The DLQ is always a classic queue, whatever the main queue's type: a
/// classic queue counts no deliveries, so no delivery limit (an
/// `x-delivery-limit`, a `delivery-limit` policy, RabbitMQ 4's default of 20
/// on quorum queues) can ever drop a dead letter because someone read it. A
/// reading of a queue over AMQP 0-9-1 is a get and a return, which quorum
/// queues before RabbitMQ 4.3 count as a delivery.
///
/// Declares `name` as such (durable). `Ok(false)` when the queue exists with
/// other arguments (a quorum DLQ an earlier Backstop declared): it is kept as
/// it is, and the caller warns.
pub(crate) async fn declare_classic(channel: &Channel, name: &str) -> Result<bool, TransportError> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(ShortString::from(name), opts, args(QueueType::Classic))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if crate::transport::soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
            Ok(false)
        }
        Err(e) => Err(TransportError::new(
            TransportErrorKind::Rejected,
            format!("declare queue {name:?}: {e}"),
        )
        .with_source(e)),
    }
}
