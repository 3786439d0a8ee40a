//! One dead letter as the CLI sees it, read from Backstop's headers or from a
//! foreign convention (Spring Kafka, Kafka Connect, RabbitMQ dead-lettering).

use backstop::Message;
use backstop::message::{fingerprint_text, names, parse_timestamp};
use std::time::SystemTime;

/// Who wrote the dead letter's failure headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// `backstop-*` headers.
    Backstop,
    /// Spring Kafka's `kafka_dlt-*` headers.
    Spring,
    /// Kafka Connect's `__connect.errors.*` headers.
    KafkaConnect,
    /// RabbitMQ's own dead-lettering (`x-death`, `x-first-death-*`).
    RabbitMq,
    /// No failure headers at all.
    Unknown,
}

impl Convention {
    /// Its name in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backstop => "backstop",
            Self::Spring => "spring",
            Self::KafkaConnect => "kafka-connect",
            Self::RabbitMq => "rabbitmq",
            Self::Unknown => "unknown",
        }
    }
}

/// A dead letter: the message plus what its headers say about its failure.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// `backstop-message-id`, or for a message without one a stand-in
    /// (`#` and a hash of its key, headers and payload) that stays the same
    /// however often the DLQ is read.
    pub id: String,
    /// Its key, as text when UTF-8.
    pub key: Option<String>,
    /// Who wrote the failure headers.
    pub convention: Convention,
    /// Error class (`transient`, `permanent`, ...; for foreign conventions
    /// `exception`, or RabbitMQ's reason such as `rejected`).
    pub class: String,
    /// The error's type name.
    pub error_type: String,
    /// The error message.
    pub error_message: String,
    /// The cause chain or stack trace.
    pub error_chain: String,
    /// Groups the same failure (stable hash of class, type and message).
    pub fingerprint: String,
    /// Where it came from: `topic[partition]@offset` or a queue.
    pub origin: Option<String>,
    /// The original source alone (topic or queue), for replay.
    pub origin_source: Option<String>,
    /// When it failed (or, lacking that, its timestamp).
    pub failed_at: Option<SystemTime>,
    /// Handler invocations.
    pub attempts: Option<u32>,
    /// Why it was dead-lettered (`exhausted`, `permanent`, ...).
    pub reason: Option<String>,
    /// The message itself.
    pub message: Message,
    /// Kafka: its partition and offset in the DLQ topic (what the handled
    /// log names); `None` on RabbitMQ.
    pub position: Option<(i32, i64)>,
}

fn text(m: &Message, name: &str) -> Option<String> {
    m.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|s| !s.is_empty())
}

fn origin(
    source: Option<String>,
    partition: Option<String>,
    offset: Option<String>,
) -> Option<String> {
    let source = source?;
    Some(match (partition, offset) {
        (Some(p), Some(o)) => format!("{source}[{p}]@{o}"),
        (Some(p), None) => format!("{source}[{p}]"),
        _ => source,
    })
}

/// FNV-1a 64 over key, headers and payload: stable across reads and releases.
fn stand_in_id(m: &Message) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(m.key().map_or(&[][..], |k| &k[..]));
    for h in m.headers().iter() {
        feed(h.key.as_bytes());
        feed(h.value.as_deref().unwrap_or_default());
    }
    feed(m.payload());
    format!("#{hash:016x}")
}

/// SHA-256 over key, headers and payload, each length-prefixed, leaving out
/// what the broker changes between two readings of the same delivery
/// (`x-delivery-count`): tells one dead letter from another that shares its
/// id. Two letters with the same digest are the same bytes, so acting on
/// either is acting on what the preview showed.
pub(crate) fn content_digest(m: &Message) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut feed = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    match m.key() {
        Some(k) => {
            feed(b"k");
            feed(k);
        }
        None => feed(b"-"),
    }
    for header in m.headers().iter().filter(|h| h.key != "x-delivery-count") {
        feed(header.key.as_bytes());
        match &header.value {
            Some(v) => {
                feed(b"v");
                feed(v);
            }
            None => feed(b"-"),
        }
    }
    feed(m.payload());
    h.finalize().into()
}

/// Spring Kafka's numeric headers (`kafka_dlt-original-partition`: a Java
/// `int`, `-offset` and `-timestamp`: a `long`, `retry_topic-attempts`: an
/// `int`) travel as big-endian bytes; other writers put decimal text.
/// Decoded by their type, never by printing them.
pub fn spring_number(bytes: &[u8]) -> Option<i64> {
    match bytes.len() {
        4 => Some(i64::from(i32::from_be_bytes(bytes.try_into().ok()?))),
        8 => Some(i64::from_be_bytes(bytes.try_into().ok()?)),
        _ => std::str::from_utf8(bytes).ok()?.trim().parse().ok(),
    }
}

/// Spring headers holding a number as big-endian bytes; those ending in
/// `timestamp` are epoch milliseconds.
pub const SPRING_NUMBERS: [&str; 6] = [
    "kafka_dlt-original-partition",
    "kafka_dlt-original-offset",
    "kafka_dlt-original-timestamp",
    "retry_topic-attempts",
    "retry_topic-backoff-timestamp",
    "retry_topic-original-timestamp",
];

fn number(m: &Message, name: &str) -> Option<i64> {
    spring_number(m.headers().get(name)?)
}

/// Epoch milliseconds as a time; `None` when negative or past what a
/// time holds.
pub fn epoch_millis(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))
}

/// The newest entry of RabbitMQ's `x-death` (the backend carries AMQP
/// tables as plain JSON): how often the message died there, when last,
/// why, and from which queue.
#[derive(Debug, Default, PartialEq)]
struct XDeath {
    count: Option<u32>,
    time: Option<SystemTime>,
    reason: Option<String>,
    queue: Option<String>,
}

impl XDeath {
    fn newest(m: &Message) -> Option<Self> {
        let all: serde_json::Value = serde_json::from_slice(m.headers().get("x-death")?).ok()?;
        let first = all.as_array()?.first()?.as_object()?;
        let field = |k: &str| {
            first
                .get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        Some(Self {
            count: first
                .get("count")
                .and_then(serde_json::Value::as_u64)
                .and_then(|c| u32::try_from(c).ok()),
            // AMQP timestamps are seconds.
            time: first
                .get("time")
                .and_then(serde_json::Value::as_i64)
                .and_then(|s| epoch_millis(s.checked_mul(1000)?)),
            reason: field("reason"),
            queue: field("queue"),
        })
    }
}

/// Millisecond epoch text (Spring, Connect) as a time.
fn epoch_ms(s: &str) -> Option<SystemTime> {
    epoch_millis(s.trim().parse().ok()?)
}

impl DeadLetter {
    /// Reads `message`.
    pub fn read(message: Message) -> Self {
        let m = &message;
        let id = m.id().map_or_else(|| stand_in_id(m), str::to_owned);
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let (convention, class, error_type, error_message, error_chain) = failure(m);
        let (origin_source, origin_text, failed_at, attempts, reason) =
            provenance(m, convention, m.timestamp());
        let fingerprint = text(m, names::ERROR_FINGERPRINT)
            .filter(|_| convention == Convention::Backstop)
            .unwrap_or_else(|| fingerprint_text(&class, &error_type, &error_message));
        Self {
            id,
            key,
            convention,
            class,
            error_type,
            error_message,
            error_chain,
            fingerprint,
            origin: origin_text,
            origin_source,
            failed_at,
            attempts,
            reason,
            message,
            position: None,
        }
    }
}

/// The failure a letter records, by the first convention whose headers it
/// carries: its convention, class, error type, message and chain.
fn failure(m: &Message) -> (Convention, String, String, String, String) {
    if let Some(class) = text(m, names::ERROR_CLASS) {
        (
            Convention::Backstop,
            class,
            text(m, names::ERROR_TYPE).unwrap_or_default(),
            text(m, names::ERROR_MESSAGE).unwrap_or_default(),
            text(m, names::ERROR_CHAIN).unwrap_or_default(),
        )
    } else if let Some(fqcn) = text(m, "kafka_dlt-exception-fqcn") {
        (
            Convention::Spring,
            "exception".to_owned(),
            fqcn,
            text(m, "kafka_dlt-exception-message").unwrap_or_default(),
            text(m, "kafka_dlt-exception-stacktrace").unwrap_or_default(),
        )
    } else if let Some(class) = text(m, "__connect.errors.exception.class.name") {
        (
            Convention::KafkaConnect,
            "exception".to_owned(),
            class,
            text(m, "__connect.errors.exception.message").unwrap_or_default(),
            text(m, "__connect.errors.exception.stacktrace").unwrap_or_default(),
        )
    } else if let Some(reason) = text(m, "x-first-death-reason") {
        let queue = text(m, "x-first-death-queue").unwrap_or_default();
        (
            Convention::RabbitMq,
            reason.clone(),
            "rabbitmq dead-lettering".to_owned(),
            format!("dead-lettered by RabbitMQ from {queue}: {reason}"),
            String::new(),
        )
    } else {
        (
            Convention::Unknown,
            "unknown".to_owned(),
            String::new(),
            String::new(),
            String::new(),
        )
    }
}

/// Origin source, origin as shown, failed at, attempts, dead-letter reason.
type Provenance = (
    Option<String>,
    Option<String>,
    Option<SystemTime>,
    Option<u32>,
    Option<String>,
);

/// Where a letter came from and what befell it, as its convention says.
fn provenance(
    m: &Message,
    convention: Convention,
    fallback_time: Option<SystemTime>,
) -> Provenance {
    match convention {
        Convention::Backstop => {
            let source = text(m, names::ORIGIN_SOURCE);
            (
                source.clone(),
                origin(
                    source,
                    text(m, names::ORIGIN_PARTITION),
                    text(m, names::ORIGIN_OFFSET),
                ),
                text(m, names::FAILED_AT)
                    .and_then(|t| parse_timestamp(&t))
                    .or(fallback_time),
                text(m, names::ATTEMPT).and_then(|a| a.parse().ok()),
                text(m, names::DEAD_LETTER_REASON),
            )
        }
        Convention::Spring => {
            let source = text(m, "kafka_dlt-original-topic");
            (
                source.clone(),
                origin(
                    source,
                    number(m, "kafka_dlt-original-partition").map(|p| p.to_string()),
                    number(m, "kafka_dlt-original-offset").map(|o| o.to_string()),
                ),
                // The DLT record is written when the record failed.
                text(m, "kafka_dlt-exception-timestamp")
                    .and_then(|t| epoch_ms(&t))
                    .or(fallback_time),
                // Retry topics count attempts (a Java `int`).
                number(m, "retry_topic-attempts").and_then(|a| u32::try_from(a).ok()),
                None,
            )
        }
        Convention::KafkaConnect => {
            let source = text(m, "__connect.errors.topic");
            (
                source.clone(),
                origin(
                    source,
                    text(m, "__connect.errors.partition"),
                    text(m, "__connect.errors.offset"),
                ),
                fallback_time,
                None,
                None,
            )
        }
        Convention::RabbitMq => {
            let death = XDeath::newest(m);
            let source = death
                .as_ref()
                .and_then(|d| d.queue.clone())
                .or_else(|| text(m, "x-first-death-queue"));
            (
                source.clone(),
                source,
                death.as_ref().and_then(|d| d.time).or(fallback_time),
                death.as_ref().and_then(|d| d.count),
                death
                    .and_then(|d| d.reason)
                    .or_else(|| text(m, "x-first-death-reason")),
            )
        }
        Convention::Unknown => (None, None, fallback_time, None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spring_headers_are_read() {
        let m = Message::new("{}")
            .with_header(
                "kafka_dlt-exception-fqcn",
                "java.lang.IllegalStateException",
            )
            .with_header("kafka_dlt-exception-message", "order 17 has no lines")
            .with_header("kafka_dlt-original-topic", "orders")
            .with_header("kafka_dlt-original-partition", "2")
            .with_header("kafka_dlt-original-offset", "918")
            .with_header("kafka_dlt-exception-timestamp", "1764280000000");
        let d = DeadLetter::read(m);
        assert_eq!(d.convention, Convention::Spring);
        assert_eq!(d.error_type, "java.lang.IllegalStateException");
        assert_eq!(d.origin.as_deref(), Some("orders[2]@918"));
        assert_eq!(d.origin_source.as_deref(), Some("orders"));
        assert!(d.failed_at.is_some());
    }

    #[test]
    fn spring_binary_headers_are_decoded_by_type() {
        let m = Message::new("{}")
            .with_header("kafka_dlt-exception-fqcn", "java.lang.RuntimeException")
            .with_header("kafka_dlt-original-topic", "orders")
            .with_header("kafka_dlt-original-partition", 2i32.to_be_bytes().to_vec())
            .with_header(
                "kafka_dlt-original-offset",
                4_294_967_296i64.to_be_bytes().to_vec(),
            )
            .with_header(
                "kafka_dlt-original-timestamp",
                1_764_280_000_123i64.to_be_bytes().to_vec(),
            )
            .with_header("retry_topic-attempts", 3i32.to_be_bytes().to_vec());
        let d = DeadLetter::read(m);
        assert_eq!(d.origin.as_deref(), Some("orders[2]@4294967296"));
        assert_eq!(d.attempts, Some(3));
        assert_eq!(spring_number(&[0, 0, 1]), None, "neither int nor long");
        assert_eq!(spring_number(b"17"), Some(17));
        assert_eq!(epoch_millis(-1), None);
        assert_eq!(epoch_millis(i64::MAX).map(|_| ()), Some(()), "no panic");
    }

    #[test]
    fn connect_headers_are_read_and_fingerprints_group_numbers() {
        let read = |n: u32| {
            DeadLetter::read(
                Message::new("x")
                    .with_header("__connect.errors.topic", "payments")
                    .with_header("__connect.errors.partition", "0")
                    .with_header("__connect.errors.offset", n.to_string())
                    .with_header(
                        "__connect.errors.exception.class.name",
                        "org.apache.kafka.connect.errors.DataException",
                    )
                    .with_header(
                        "__connect.errors.exception.message",
                        format!("bad record {n}"),
                    ),
            )
        };
        let (a, b) = (read(5), read(77));
        assert_eq!(a.convention, Convention::KafkaConnect);
        assert_eq!(a.origin.as_deref(), Some("payments[0]@5"));
        assert_eq!(a.fingerprint, b.fingerprint, "numbers are normalised away");
    }

    #[test]
    fn x_death_gives_attempts_time_reason_and_queue() {
        let m = Message::from_parts(None, "x".into(), backstop::Headers::new())
            .with_header("x-first-death-queue", "orders")
            .with_header("x-first-death-reason", "rejected")
            .with_header(
                "x-death",
                r#"[{"count":4,"reason":"expired","queue":"orders.retry","time":1764280000},
                    {"count":1,"reason":"rejected","queue":"orders","time":1764270000}]"#,
            );
        let d = DeadLetter::read(m);
        assert_eq!(d.attempts, Some(4));
        assert_eq!(d.reason.as_deref(), Some("expired"));
        assert_eq!(d.origin.as_deref(), Some("orders.retry"));
        assert_eq!(d.failed_at, epoch_millis(1_764_280_000_000));
        // Garbage in x-death: the first-death headers still serve.
        let m = Message::from_parts(None, "x".into(), backstop::Headers::new())
            .with_header("x-first-death-queue", "orders")
            .with_header("x-first-death-reason", "rejected")
            .with_header("x-death", r#"{"count":"many","time":-5}"#);
        let d = DeadLetter::read(m);
        assert_eq!((d.attempts, d.reason.as_deref()), (None, Some("rejected")));
    }

    #[test]
    fn rabbitmq_dead_lettering_is_read() {
        let m = Message::from_parts(None, "x".into(), backstop::Headers::new())
            .with_header("x-first-death-queue", "orders")
            .with_header("x-first-death-reason", "delivery_limit");
        let d = DeadLetter::read(m.clone());
        assert_eq!(d.convention, Convention::RabbitMq);
        assert_eq!(d.class, "delivery_limit");
        assert_eq!(d.origin.as_deref(), Some("orders"));
        assert!(d.id.starts_with('#'), "no message id: a stand-in {}", d.id);
        assert_eq!(DeadLetter::read(m).id, d.id, "the same on every read");
    }
}
