//! The Kafka and RabbitMQ transports of a worker, from its config; the
//! passwords from files or the environment.
#[cfg(any(feature = "kafka", feature = "rabbitmq"))]
use super::config::{WorkerConfig, WorkerConfigError, read_secret};

#[cfg(feature = "kafka")]
pub(super) fn kafka(
    config: &WorkerConfig,
) -> Result<backstop_kafka::KafkaTransport, WorkerConfigError> {
    let k = &config.kafka;
    let mut c = backstop_kafka::KafkaConfig::new(&k.brokers);
    for (key, value) in &k.properties {
        c = c.with_property(key, value);
    }
    let password = match (&k.password, &k.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_secret("kafka.password_file", f)?),
        (None, None) => None,
    };
    if let Some(p) = password {
        c = c.with_property("sasl.password", p);
    }
    if let Some(w) = k.fetch_wait_max {
        c = c.with_fetch_wait_max(w.0);
    }
    if let Some(t) = k.request_timeout {
        c = c.with_request_timeout(t.0);
    }
    if let Some(p) = k.tier_partitions {
        c = c.with_tier_partitions(p);
    }
    if let Some(r) = k.replication_factor {
        c = c.with_replication_factor(r);
    }
    if let Some(n) = k.partition_concurrency {
        c = c.with_partition_concurrency(n);
    }
    if let Some(r) = k.dead_letter_retention {
        c = c.with_dead_letter_retention(r.0);
    }
    if let Some(w) = k.revoke_wait {
        c = c.with_revoke_wait(w.0);
    }
    backstop_kafka::KafkaTransport::new(c).map_err(|e| {
        WorkerConfigError::new(
            format!("kafka.{}", e.field.trim_start_matches("kafka.")),
            e.reason,
        )
    })
}

#[cfg(feature = "rabbitmq")]
pub(super) fn rabbitmq(
    config: &WorkerConfig,
) -> Result<backstop_rabbitmq::RabbitTransport, WorkerConfigError> {
    let r = &config.rabbitmq;
    let password = match (&r.password, &r.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_secret("rabbitmq.password_file", f)?),
        (None, None) => None,
    };
    let url = match password {
        Some(p) => with_password(&r.url, &p)?,
        None => r.url.clone(),
    };
    let mut c = backstop_rabbitmq::RabbitConfig::new(url).with_queue_type(match r.queue_type {
        super::QueueTypeName::Quorum => backstop_rabbitmq::QueueType::Quorum,
        super::QueueTypeName::Classic => backstop_rabbitmq::QueueType::Classic,
    });
    if let Some(n) = &r.connection_name {
        c = c.with_connection_name(n.clone());
    }
    if let Some(t) = r.confirm_timeout {
        c = c.with_confirm_timeout(t.0);
    }
    if let Some(t) = r.connect_timeout {
        c = c.with_connect_timeout(t.0);
    }
    backstop_rabbitmq::RabbitTransport::new(c).map_err(|e| {
        WorkerConfigError::new(
            format!("rabbitmq.{}", e.field.trim_start_matches("rabbitmq.")),
            e.reason,
        )
    })
}

/// `amqp://user@host/vhost` + password → `amqp://user:<encoded>@host/vhost`.
#[cfg(feature = "rabbitmq")]
fn with_password(url: &str, password: &str) -> Result<String, WorkerConfigError> {
    let bad = || {
        WorkerConfigError::new(
            "rabbitmq.url",
            "a password is given, so the URL must name a user: amqp://user@host:5672/vhost",
        )
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let (user, host) = authority.rsplit_once('@').ok_or_else(bad)?;
    let user = user.split(':').next().unwrap_or_default();
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    Ok(match path {
        Some(p) => format!("{scheme}://{user}:{encoded}@{host}/{p}"),
        None => format!("{scheme}://{user}:{encoded}@{host}"),
    })
}
