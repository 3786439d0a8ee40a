//! Which DLQ on which broker: `kafka://host:port/<topic>`,
//! `amqp://user:pass@host:port/<vhost>/<queue>` (or `amqps://`), or a bare name
//! resolved with `BACKSTOP_AMQP_URL` / `BACKSTOP_KAFKA_BROKERS`.

use anyhow::{Context, bail};
use backstop::kafka::{KafkaConfig, KafkaTransport};
use backstop::rabbitmq::{RabbitConfig, RabbitTransport, redacted};
use backstop::{DeadLetterSource, Message, Publisher};

/// A parsed DLQ address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Kafka topic.
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// The DLQ topic.
        topic: String,
    },
    /// A RabbitMQ queue.
    Rabbit {
        /// The AMQP URL of the vhost (password included; never printed).
        url: String,
        /// The DLQ queue.
        queue: String,
    },
}

impl Target {
    /// Parses `spec`, reading the environment for a bare name.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        Self::parse_with(spec, |k| std::env::var(k).ok())
    }

    /// [`parse`](Self::parse) with the environment given.
    pub fn parse_with(spec: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        if let Some(rest) = spec.strip_prefix("kafka://") {
            let Some((brokers, topic)) = rest.split_once('/') else {
                bail!("{spec}: expected kafka://host:port/<dlq-topic>");
            };
            if brokers.is_empty() || topic.is_empty() {
                bail!("{spec}: expected kafka://host:port/<dlq-topic>");
            }
            return Ok(Self::Kafka {
                brokers: brokers.to_owned(),
                topic: topic.to_owned(),
            });
        }
        if spec.starts_with("amqp://") || spec.starts_with("amqps://") {
            let shown = redacted(spec);
            let (base, queue) = spec
                .rsplit_once('/')
                .filter(|(b, q)| !q.is_empty() && b.matches('/').count() >= 3)
                .with_context(|| {
                    format!("{shown}: expected amqp://user:pass@host:port/<vhost>/<dlq-queue>")
                })?;
            return Ok(Self::Rabbit {
                url: base.to_owned(),
                queue: queue.to_owned(),
            });
        }
        if spec.contains("://") {
            bail!(
                "{}: unknown scheme; use kafka://host:port/<topic> or amqp://user:pass@host:port/<vhost>/<queue>",
                redacted(spec)
            );
        }
        if let Some(url) = env("BACKSTOP_AMQP_URL") {
            return Ok(Self::Rabbit {
                url: url.trim_end_matches('/').to_owned(),
                queue: spec.to_owned(),
            });
        }
        if let Some(brokers) = env("BACKSTOP_KAFKA_BROKERS") {
            return Ok(Self::Kafka {
                brokers,
                topic: spec.to_owned(),
            });
        }
        bail!(
            "{spec}: give a URL (kafka://host:port/{spec} or amqp://user:pass@host:port/%2f/{spec}), \
             or set BACKSTOP_AMQP_URL or BACKSTOP_KAFKA_BROKERS"
        )
    }

    /// The DLQ's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Kafka { topic, .. } => topic,
            Self::Rabbit { queue, .. } => queue,
        }
    }

    /// Where it is, without the password.
    pub fn display(&self) -> String {
        match self {
            Self::Kafka { brokers, topic } => format!("kafka://{brokers}/{topic}"),
            Self::Rabbit { url, queue } => format!("{}/{queue}", redacted(url)),
        }
    }

    /// Connects.
    pub fn open(&self) -> anyhow::Result<Broker> {
        Ok(match self {
            Self::Kafka { brokers, .. } => Broker::Kafka(Box::new(
                KafkaTransport::new(KafkaConfig::new(brokers))
                    .with_context(|| format!("Kafka at {brokers}"))?,
            )),
            Self::Rabbit { url, .. } => Broker::Rabbit(
                RabbitTransport::new(RabbitConfig::new(url))
                    .with_context(|| format!("RabbitMQ at {}", redacted(url)))?,
            ),
        })
    }
}

/// A connected broker.
#[derive(Clone, Debug)]
pub enum Broker {
    /// Kafka.
    Kafka(Box<KafkaTransport>),
    /// RabbitMQ.
    Rabbit(RabbitTransport),
}

use crate::record::DeadLetter;
pub use backstop::kafka::handled_topic;
use backstop::kafka::{Handled, handled_record};

impl Broker {
    /// Kafka: what the CLI already replayed or purged from `target`, by
    /// position ([`Handled`]). RabbitMQ removes messages for real, so
    /// nothing is recorded there.
    pub async fn handled(&self, target: &Target) -> anyhow::Result<Handled> {
        let Self::Kafka(t) = self else {
            return Ok(Handled::default());
        };
        let log = handled_topic(target.name());
        match t.browse(&log, 10_000_000).await {
            Ok(found) => Ok(Handled::read(found)),
            Err(e) if e.kind() == backstop::TransportErrorKind::NotFound => Ok(Handled::default()),
            Err(e) => Err(e).with_context(|| format!("reading {log}")),
        }
    }

    /// Kafka: records that the letter `d` was handled (`what`), by its
    /// position, confirmed by the broker.
    pub async fn mark_handled(
        &self,
        target: &Target,
        d: &DeadLetter,
        what: String,
    ) -> anyhow::Result<()> {
        let Self::Kafka(t) = self else {
            return Ok(());
        };
        let Some((partition, offset)) = d.position else {
            anyhow::bail!("no position for {:?} in {}", d.id, target.display());
        };
        let log = handled_topic(target.name());
        t.admin()
            .ensure_kept_topic(&log, 1)
            .await
            .with_context(|| format!("creating {log}"))?;
        let record = handled_record(partition, offset, d.message.id(), what);
        t.publish(&log, record)
            .await
            .map_err(|e| e.error)
            .with_context(|| format!("recording in {log}"))
    }

    /// Publishes `message` to `destination`, confirmed.
    pub async fn publish(&self, destination: &str, message: Message) -> anyhow::Result<()> {
        let r = match self {
            Self::Kafka(t) => t.publish(destination, message).await,
            Self::Rabbit(t) => t.publish(destination, message).await,
        };
        r.map_err(|e| e.error)
            .with_context(|| format!("republishing to {destination}"))
    }

    /// Up to `limit` dead letters of `dlq`, oldest first, nothing removed;
    /// on Kafka each with its position.
    pub async fn browse(&self, target: &Target, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let dlq = target.name();
        let r = match self {
            Self::Kafka(t) => t.browse_positioned(dlq, limit).await.map(|found| {
                found
                    .into_iter()
                    .map(|(m, p, o)| DeadLetter {
                        position: Some((p, o)),
                        ..DeadLetter::read(m)
                    })
                    .collect()
            }),
            Self::Rabbit(t) => t
                .browse(dlq, limit)
                .await
                .map(|found| found.into_iter().map(DeadLetter::read).collect()),
        };
        r.with_context(|| format!("reading {} (is the broker running?)", target.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            Target::parse_with("kafka://127.0.0.1:19092/billing.orders.dlq", no_env).unwrap(),
            Target::Kafka {
                brokers: "127.0.0.1:19092".into(),
                topic: "billing.orders.dlq".into()
            }
        );
        assert_eq!(
            Target::parse_with("amqp://app:s3cret@mq:5672/%2f/orders.dlq", no_env).unwrap(),
            Target::Rabbit {
                url: "amqp://app:s3cret@mq:5672/%2f".into(),
                queue: "orders.dlq".into()
            }
        );
        let t = Target::parse_with("orders.dlq", |k| {
            (k == "BACKSTOP_AMQP_URL").then(|| "amqp://guest:guest@localhost:5672/%2f".to_owned())
        })
        .unwrap();
        assert_eq!(t.name(), "orders.dlq");
        assert!(!t.display().contains("guest:guest"), "{}", t.display());
    }

    #[test]
    fn bad_urls_say_what_to_write_without_the_password() {
        let e = Target::parse_with("amqp://app:s3cret@mq:5672", no_env).unwrap_err();
        assert!(e.to_string().contains("<vhost>/<dlq-queue>"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = Target::parse_with("orders.dlq", no_env).unwrap_err();
        assert!(e.to_string().contains("BACKSTOP_AMQP_URL"), "{e}");
        assert!(Target::parse_with("http://x/y", no_env).is_err());
    }
}
