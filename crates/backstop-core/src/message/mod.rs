//! The message model: payload, key, headers, and the typed `backstop-*` headers.

mod headers;
mod meta;
mod truncate;

pub use headers::{Header, Headers};
pub use meta::{
    Failure, Malformed, Origin, ReplayMeta, RetryMeta, fingerprint, fingerprint_text,
    format_timestamp, parse_timestamp, representable,
};
pub use truncate::{MAX_ERROR_CHAIN_BYTES, MAX_ERROR_MESSAGE_BYTES, truncate_utf8};

/// Header names of the one schema shared by every backend (HEADERS.md).
pub mod names {
    /// Stable id of the logical message.
    pub const MESSAGE_ID: &str = "backstop-message-id";
    /// Set by a backend that had to drop or mend headers it could not read
    /// safely on arrival (on RabbitMQ: tables nested too deep, short strings
    /// that are not UTF-8); says what was done. Counted as a malformed
    /// header when it arrives on a main source.
    pub const DROPPED_HEADERS: &str = "backstop-dropped-headers";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";

    /// Original topic or queue.
    pub const ORIGIN_SOURCE: &str = "backstop-origin-source";
    /// Original Kafka partition.
    pub const ORIGIN_PARTITION: &str = "backstop-origin-partition";
    /// Original Kafka offset.
    pub const ORIGIN_OFFSET: &str = "backstop-origin-offset";
    /// Original broker/produce timestamp.
    pub const ORIGIN_TIMESTAMP: &str = "backstop-origin-timestamp";
    /// Consumer group / service that failed it.
    pub const ORIGIN_GROUP: &str = "backstop-origin-group";

    /// Handler invocations so far, all kinds.
    pub const ATTEMPT: &str = "backstop-attempt";
    /// Delay-tier hops so far.
    pub const DELAYED_ATTEMPTS: &str = "backstop-delayed-attempts";
    /// Tier the message is travelling through.
    pub const RETRY_TIER: &str = "backstop-retry-tier";
    /// Earliest time the message may be handled again.
    pub const DUE_AT: &str = "backstop-due-at";
    /// Time of the first failure.
    pub const FIRST_FAILED_AT: &str = "backstop-first-failed-at";

    /// Error class (`transient`, `permanent`, ...).
    pub const ERROR_CLASS: &str = "backstop-error-class";
    /// The error's type name.
    pub const ERROR_TYPE: &str = "backstop-error-type";
    /// Display of the error, at most 4 KiB.
    pub const ERROR_MESSAGE: &str = "backstop-error-message";
    /// The `source()` chain, one cause a line, at most 8 KiB.
    pub const ERROR_CHAIN: &str = "backstop-error-chain";
    /// Stable hash used to group failures.
    pub const ERROR_FINGERPRINT: &str = "backstop-error-fingerprint";
    /// Time of this failure.
    pub const FAILED_AT: &str = "backstop-failed-at";
    /// Handler name.
    pub const HANDLER: &str = "backstop-handler";
    /// Host that failed it.
    pub const HOST: &str = "backstop-host";
    /// Why the message is in the DLQ.
    pub const DEAD_LETTER_REASON: &str = "backstop-dead-letter-reason";
    /// On a DLQ stub (the broker refused the copy even slimmed): the
    /// size in bytes of the payload left out.
    pub const PAYLOAD_SIZE: &str = "backstop-payload-size";
    /// On a DLQ stub: the SHA-256 (hex) of the payload left out.
    pub const PAYLOAD_SHA256: &str = "backstop-payload-sha256";

    /// Time of the replay.
    pub const REPLAYED_AT: &str = "backstop-replayed-at";
    /// How many times this message has been replayed.
    pub const REPLAY_COUNT: &str = "backstop-replay-count";
    /// The DLQ it came from.
    pub const REPLAYED_FROM: &str = "backstop-replayed-from";

    /// Attempt-accounting headers: trusted only on framework-owned sources.
    pub const ATTEMPT_HEADERS: [&str; 5] = [
        ATTEMPT,
        DELAYED_ATTEMPTS,
        RETRY_TIER,
        DUE_AT,
        FIRST_FAILED_AT,
    ];
    /// Failure headers: replaced on every hop, never appended.
    pub const FAILURE_HEADERS: [&str; 9] = [
        ERROR_CLASS,
        ERROR_TYPE,
        ERROR_MESSAGE,
        ERROR_CHAIN,
        ERROR_FINGERPRINT,
        FAILED_AT,
        HANDLER,
        HOST,
        DEAD_LETTER_REASON,
    ];
}

use bytes::Bytes;
use std::time::SystemTime;

/// One message: an optional key, the payload bytes and the headers.
///
/// The logical id lives in the `backstop-message-id` header, so it travels
/// with every copy (retry tier, DLQ, replay) on every broker.
///
/// ```
/// use backstop_core::Message;
/// let m = Message::new(r#"{"order":1}"#).with_key("customer-7").with_header("tenant", "acme");
/// assert!(m.id().is_some());
/// assert_eq!(m.headers().get_str("tenant"), Some("acme"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    key: Option<Bytes>,
    payload: Bytes,
    headers: Headers,
    timestamp: Option<SystemTime>,
}

impl Message {
    /// A new message with a fresh UUIDv7 `backstop-message-id`.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        let mut headers = Headers::new();
        headers.insert(names::MESSAGE_ID, uuid::Uuid::now_v7().to_string());
        Self {
            key: None,
            payload: payload.into(),
            headers,
            timestamp: None,
        }
    }

    /// A message exactly as a broker delivered it: nothing is added.
    pub fn from_parts(key: Option<Bytes>, payload: Bytes, headers: Headers) -> Self {
        Self {
            key,
            payload,
            headers,
            timestamp: None,
        }
    }

    /// Sets the record key (Kafka) / routing key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Replaces the `backstop-message-id`.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.headers.insert(names::MESSAGE_ID, id.into());
        self
    }

    /// Sets one header, replacing any with the same key.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Sets the broker/produce timestamp; one no timestamp header can say
    /// (before 1970, after 9999: see [`representable`]) leaves it unknown.
    #[must_use]
    pub fn with_timestamp(mut self, at: SystemTime) -> Self {
        self.set_timestamp(Some(at));
        self
    }

    /// The `backstop-message-id`, if present and UTF-8.
    pub fn id(&self) -> Option<&str> {
        self.headers
            .get_str(names::MESSAGE_ID)
            .filter(|s| !s.is_empty())
    }

    /// The record key / routing key.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, mutably.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// Broker/produce timestamp, when the broker gave one.
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.timestamp
    }

    /// Sets the broker/produce timestamp; one no timestamp header can say
    /// (see [`representable`]) leaves it unknown.
    pub fn set_timestamp(&mut self, at: Option<SystemTime>) {
        self.timestamp = at.and_then(representable);
    }

    /// Splits the message into key, payload and headers.
    pub fn into_parts(self) -> (Option<Bytes>, Bytes, Headers) {
        (self.key, self.payload, self.headers)
    }
}
