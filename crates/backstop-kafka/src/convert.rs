//! Between Backstop messages and Kafka records.

use backstop_core::{Headers, Message};
use bytes::Bytes;
use rdkafka::Message as _;
use rdkafka::Timestamp;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Record headers from Backstop headers (null values and duplicates kept).
pub(crate) fn to_kafka_headers(headers: &Headers) -> OwnedHeaders {
    headers
        .iter()
        .fold(OwnedHeaders::new_with_capacity(headers.len()), |acc, h| {
            acc.insert(Header {
                key: &h.key,
                value: h.value.as_deref(),
            })
        })
}

/// A Backstop message from a consumed record.
pub(crate) fn from_record(m: &BorrowedMessage<'_>) -> Message {
    let headers = match m.headers() {
        Some(hs) => hs
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
            .collect(),
        None => Headers::new(),
    };
    let mut message = Message::from_parts(
        m.key().map(Bytes::copy_from_slice),
        m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
    );
    message.set_timestamp(to_system_time(m.timestamp()));
    message
}

fn to_system_time(t: Timestamp) -> Option<SystemTime> {
    t.to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        // A broker's timestamp can be anything: past what SystemTime holds,
        // the record has none.
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
}

/// Milliseconds since the epoch for a record timestamp.
pub(crate) fn to_millis(t: SystemTime) -> Option<i64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}
