//! The producer: idempotent, acks=all, each publish awaits its delivery report.

use crate::config::KafkaConfig;
use crate::convert::{to_kafka_headers, to_millis};
use backstop_core::{
    ConfigError, Message, PublishError, Publisher, TransportError, TransportErrorKind,
};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use std::fmt;

/// Publishes to Kafka and returns once the broker acknowledged the record
/// (idempotent producer, `acks=all`). On failure the message is handed back.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher").finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A producer for `config`.
    pub fn new(config: &KafkaConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let producer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.delivery_timeout().as_millis().to_string(),
            )
            .create()
            .map_err(|e| ConfigError::new("kafka", format!("cannot create producer: {e}")))?;
        Ok(Self { producer })
    }

    /// Publishes `message` to `topic`, awaiting the delivery report.
    pub async fn send(&self, topic: &str, message: Message) -> Result<(), PublishError> {
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
        match self.producer.send(record, Timeout::Never).await {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(PublishError::new(publish_error(topic, error), message)),
        }
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
        KafkaError::MessageProduction(code) if code.to_string().contains("Unknown topic") => {
            TransportErrorKind::NotFound
        }
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
