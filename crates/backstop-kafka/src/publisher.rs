//! The producer: idempotent, acks=all, each publish awaits its delivery report.
//!
//! An idempotent producer that hits a fatal error (the broker lost its
//! producer state: a restarted or replaced broker answers with an
//! out-of-order or unknown sequence) refuses every later record for good,
//! which would stop every tier and DLQ copy of the process until it is
//! restarted. The publisher replaces such a producer with a fresh one (a
//! new producer id) and sends the record again on it, once.

use crate::config::KafkaConfig;
use crate::convert::{to_kafka_headers, to_millis};
use backstop_core::{
    ConfigError, Message, PublishError, Publisher, TransportError, TransportErrorKind,
};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use std::fmt;
use std::sync::{Arc, RwLock};

/// Publishes to Kafka and returns once the broker acknowledged the record
/// (idempotent producer, `acks=all`). On failure the message is handed back.
#[derive(Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    /// The producer in use and its generation (how many were replaced).
    current: RwLock<(u64, FutureProducer)>,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher").finish_non_exhaustive()
    }
}

fn producer(config: &KafkaConfig) -> Result<FutureProducer, ConfigError> {
    config
        .client()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            config.delivery_timeout().as_millis().to_string(),
        )
        .create()
        .map_err(|e| ConfigError::new("kafka", format!("cannot create producer: {e}")))
}

impl KafkaPublisher {
    /// A producer for `config`.
    pub fn new(config: &KafkaConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let first = producer(config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                current: RwLock::new((0, first)),
            }),
        })
    }

    /// How many producers were replaced after a fatal error.
    pub fn renewals(&self) -> u64 {
        self.current().0
    }

    fn current(&self) -> (u64, FutureProducer) {
        let guard = self.inner.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Replaces the producer of `generation` (unless another send already
    /// did); false when no new producer could be made.
    fn renew(&self, generation: u64, reason: &str) -> bool {
        let mut guard = self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if guard.0 != generation {
            return true;
        }
        match producer(&self.inner.config) {
            Ok(fresh) => {
                tracing::warn!(
                    reason,
                    "the Kafka producer failed fatally; sending on a new one"
                );
                let old = std::mem::replace(&mut *guard, (generation.wrapping_add(1), fresh));
                // Dropping a producer flushes and joins its threads: not here.
                let _ = std::thread::Builder::new()
                    .name("backstop-kafka-close".into())
                    .spawn(move || drop(old));
                true
            }
            Err(e) => {
                tracing::error!(error = %e, reason, "the Kafka producer failed fatally and no new one could be made");
                false
            }
        }
    }

    /// Publishes `message` to `topic`, awaiting the delivery report.
    pub async fn send(&self, topic: &str, message: Message) -> Result<(), PublishError> {
        let (generation, producer) = self.current();
        let Err(error) = send_on(&producer, topic, &message).await else {
            return Ok(());
        };
        let fatal = producer.client().fatal_error();
        drop(producer);
        let error = match fatal {
            Some((_, reason)) if self.renew(generation, &reason) => {
                let (_, fresh) = self.current();
                match send_on(&fresh, topic, &message).await {
                    Ok(()) => return Ok(()),
                    Err(again) => again,
                }
            }
            _ => error,
        };
        Err(PublishError::new(publish_error(topic, error), message))
    }
}

async fn send_on(
    producer: &FutureProducer,
    topic: &str,
    message: &Message,
) -> Result<(), KafkaError> {
    let headers = to_kafka_headers(message.headers());
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .payload(&message.payload()[..])
        .headers(headers);
    if let Some(key) = message.key() {
        record = record.key(&key[..]);
    }
    if let Some(ms) = message.timestamp().and_then(to_millis) {
        record = record.timestamp(ms);
    }
    match producer.send(record, Timeout::Never).await {
        Ok(_) => Ok(()),
        Err((error, _)) => Err(error),
    }
}

fn publish_error(topic: &str, error: KafkaError) -> TransportError {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let kind = match &error {
        KafkaError::MessageProduction(
            Code::MessageSizeTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidMessage
            | Code::InvalidRecord,
        ) => TransportErrorKind::Invalid,
        KafkaError::MessageProduction(
            Code::UnknownTopic | Code::UnknownTopicOrPartition | Code::UnknownTopicId,
        ) => TransportErrorKind::NotFound,
        _ => TransportErrorKind::Rejected,
    };
    TransportError::new(kind, format!("publish to topic {topic:?} not acknowledged"))
        .with_source(error)
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, destination: &str, message: Message) -> Result<(), PublishError> {
        self.send(destination, message).await
    }
}

#[cfg(test)]
mod tests {
    use super::publish_error;
    use backstop_core::TransportErrorKind;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as Code;

    /// By librdkafka's codes, never by their text.
    #[test]
    fn publish_errors_are_classified_by_their_codes() {
        let kind = |code| publish_error("t", KafkaError::MessageProduction(code)).kind();
        for code in [
            Code::UnknownTopic,
            Code::UnknownTopicOrPartition,
            Code::UnknownTopicId,
        ] {
            assert_eq!(kind(code), TransportErrorKind::NotFound, "{code:?}");
        }
        for code in [Code::MessageSizeTooLarge, Code::InvalidRecord] {
            assert_eq!(kind(code), TransportErrorKind::Invalid, "{code:?}");
        }
        for code in [Code::MessageTimedOut, Code::NotEnoughReplicas] {
            assert_eq!(kind(code), TransportErrorKind::Rejected, "{code:?}");
        }
    }
}
