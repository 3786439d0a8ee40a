//! Between Backstop messages and Kafka records.

use crate::raw_headers::raw_headers;
use backstop_core::{Headers, Message};
use bytes::{Bytes, BytesMut};
use rdkafka::Message as _;
use rdkafka::Timestamp;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
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

/// Consumed payloads and keys are copied into shared chunks of this size:
/// one allocation for many records (and none when a handler clones its
/// payload). A piece kept longer keeps its chunk alive, so pieces above
/// [`OWN_ABOVE`] get an allocation of their own.
const CHUNK: usize = 32 * 1024;
/// See [`CHUNK`].
const OWN_ABOVE: usize = CHUNK / 8;

/// Where a consumer copies what it takes out of librdkafka's buffers.
#[derive(Debug, Default)]
pub(crate) struct Arena(BytesMut);

impl Arena {
    pub(crate) fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.is_empty() {
            return Bytes::new();
        }
        if data.len() > OWN_ABOVE {
            return Bytes::copy_from_slice(data);
        }
        // After a split, the capacity is what is left of the chunk. A chunk
        // whose pieces are all gone is used again (no allocation, no fresh
        // pages to fault in).
        if self.0.capacity() < data.len() && !self.0.try_reclaim(CHUNK) {
            self.0 = BytesMut::with_capacity(CHUNK);
        }
        self.0.extend_from_slice(data);
        self.0.split().freeze()
    }
}

/// What `backstop_malformed_headers_total` counts a header key that is not
/// UTF-8 under.
pub(crate) const KEY_NOT_UTF8: &str = "<key not UTF-8>";

/// A header key as text: invalid UTF-8 bytes written as `\xNN` (the key is
/// kept, readable, and counted as malformed by the caller).
fn key_text(key: &[u8]) -> Result<String, String> {
    match std::str::from_utf8(key) {
        Ok(k) => Ok(k.to_owned()),
        Err(_) => {
            let mut out = String::with_capacity(key.len().saturating_mul(2));
            for chunk in key.utf8_chunks() {
                out.push_str(chunk.valid());
                for b in chunk.invalid() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            Err(out)
        }
    }
}

/// A Backstop message from a consumed record. Headers are read as bytes
/// (see `raw_headers`): a key that is not UTF-8 is kept escaped and counted
/// as malformed, never a panic.
pub(crate) fn from_record(m: &BorrowedMessage<'_>, arena: &mut Arena) -> Message {
    let headers = match raw_headers(m) {
        Some(hs) => {
            let mut out = Headers::new();
            for (key, value) in hs.iter() {
                let key = key_text(key).unwrap_or_else(|escaped| {
                    backstop_core::observability::count_malformed_header(m.topic(), KEY_NOT_UTF8);
                    escaped
                });
                out.append(key, value.map(|v| arena.copy(v)));
            }
            out
        }
        None => Headers::new(),
    };
    let key = m.key().map(|k| arena.copy(k));
    let payload = m.payload().map(|p| arena.copy(p)).unwrap_or_default();
    let mut message = Message::from_parts(key, payload, headers);
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

#[cfg(test)]
mod key_tests {
    use super::key_text;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2_000))]

        /// Any bytes as a header key: UTF-8 kept as it is; anything else
        /// kept readable, every valid part intact, each bad byte as `\xNN`.
        #[test]
        fn any_key_bytes_read_without_a_panic(key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            match key_text(&key) {
                Ok(k) => proptest::prop_assert_eq!(k.as_bytes(), &key[..]),
                Err(escaped) => {
                    let bad: usize = key.utf8_chunks().map(|c| c.invalid().len()).sum();
                    proptest::prop_assert!(bad > 0);
                    proptest::prop_assert_eq!(escaped.matches("\\x").count() >= bad, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod arena_tests {
    use super::*;

    #[test]
    fn pieces_share_chunks_and_large_ones_stand_alone() {
        let mut a = Arena::default();
        let x = a.copy(b"hello");
        let y = a.copy(b"world");
        assert_eq!((&x[..], &y[..]), (&b"hello"[..], &b"world"[..]));
        // Contiguous in one chunk.
        assert_eq!(x.as_ptr().wrapping_add(5), y.as_ptr());
        assert!(a.copy(b"").is_empty());
        let big = vec![7u8; OWN_ABOVE + 1];
        assert_eq!(&a.copy(&big)[..], &big[..]);
        // A chunk that is full moves on to a new one; earlier pieces stay.
        let piece = vec![1u8; OWN_ABOVE];
        let all: Vec<Bytes> = (0..20).map(|_| a.copy(&piece)).collect();
        assert!(all.iter().all(|p| p[..] == piece[..]));
        assert_eq!(&x[..], b"hello");
    }

    #[test]
    fn a_chunk_whose_pieces_are_gone_is_used_again() {
        let mut a = Arena::default();
        let piece = vec![1u8; OWN_ABOVE];
        let first = a.copy(&piece);
        let chunk = first.as_ptr();
        let rest: Vec<Bytes> = (1..8).map(|_| a.copy(&piece)).collect();
        drop((first, rest));
        // The chunk is full: the next piece reclaims it.
        assert_eq!(a.copy(&piece).as_ptr(), chunk);
        // While a piece of it lives, a new chunk is taken instead.
        let kept: Vec<Bytes> = (1..8).map(|_| a.copy(&piece)).collect();
        assert_ne!(a.copy(&piece).as_ptr(), chunk);
        drop(kept);
    }
}
