//! Idempotent declaration of a source's queues: the main queue, one delay queue
//! per tier (TTL, dead-lettering back to the main queue: no plugin), the DLQ.

use crate::config::{QueueType, dlq_queue, tier_queue};
use backstop_core::{Subscription, TransportError, TransportErrorKind};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection};

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
    connection: &Connection,
    channel: &mut Channel,
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
            // A mismatch closes the channel with PRECONDITION_FAILED; say which
            // queue and what Backstop wanted, and open a fresh channel.
            if let Ok(fresh) = connection.create_channel().await {
                *channel = fresh;
            }
            let text = e.to_string();
            let kind = if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
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

/// Declares the main queue, its tier queues and its DLQ.
pub(crate) async fn declare_all(
    connection: &Connection,
    queue_type: QueueType,
    subscription: &Subscription,
) -> Result<(), TransportError> {
    let mut channel = connection.create_channel().await.map_err(|e| {
        TransportError::new(TransportErrorKind::ConnectionLost, "open channel").with_source(e)
    })?;
    let queue = &subscription.source;
    declare(connection, &mut channel, queue, args(queue_type)).await?;
    for tier in &subscription.tiers {
        let mut a = args(queue_type);
        let ttl = i64::try_from(tier.delay().as_millis()).unwrap_or(i64::MAX);
        a.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongLongInt(ttl),
        );
        a.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from("")),
        );
        a.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(queue.as_str())),
        );
        if queue_type == QueueType::Quorum {
            // Quorum dead-lettering is at-most-once unless asked otherwise: a
            // message expiring from a tier must not be dropped on its way back.
            a.insert(
                ShortString::from("x-dead-letter-strategy"),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            a.insert(
                ShortString::from("x-overflow"),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        declare(connection, &mut channel, &tier_queue(queue, tier), a).await?;
    }
    declare(
        connection,
        &mut channel,
        &dlq_queue(queue),
        args(queue_type),
    )
    .await?;
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}
