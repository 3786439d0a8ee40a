//! Typed views of the `backstop-*` headers. Parsing is strict: a malformed value
//! is reported as [`Malformed`] and treated as absent, never a panic and never a
//! reason to drop the message.

use super::names::*;
use super::{Headers, MAX_ERROR_CHAIN_BYTES, MAX_ERROR_MESSAGE_BYTES, truncate_utf8};
use crate::error::{DeadLetterReason, ErrorClass};
use std::fmt;
use std::time::{Duration, SystemTime};

/// A framework header that failed to parse and was treated as absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Header name.
    pub header: &'static str,
    /// Why it was refused.
    pub reason: String,
}

/// The last millisecond RFC 3339 timestamps here can say: the end of 9999.
const LAST_MILLI: Duration = Duration::from_millis(253_402_300_799_999);

/// `at` when a timestamp header can say it (from 1970 to the end of year
/// 9999), else `None`. A broker's timestamp can be anything (an AMQP
/// `timestamp` written in milliseconds, a Kafka CreateTime in
/// microseconds): messages keep only representable ones.
pub fn representable(at: SystemTime) -> Option<SystemTime> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    (since <= LAST_MILLI).then_some(at)
}

/// Formats a time as RFC 3339 UTC with milliseconds:
/// `2026-11-26T21:54:20.123Z`; `None` outside what the format holds (see
/// [`representable`]): such a time is unknown, never written.
pub fn format_timestamp(at: SystemTime) -> Option<String> {
    let at = representable(at)?;
    let mut out = String::with_capacity(24);
    fmt::Write::write_fmt(
        &mut out,
        format_args!("{}", humantime::format_rfc3339_millis(at)),
    )
    .ok()?;
    Some(out)
}

/// Writes `name: at` when `at` is representable; else removes `name`.
fn insert_time(headers: &mut Headers, name: &'static str, at: SystemTime) {
    match format_timestamp(at) {
        Some(s) => headers.insert(name, s),
        None => {
            headers.remove(name);
        }
    }
}

/// Parses an RFC 3339 UTC timestamp (`Z` suffix); anything else is `None`.
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

struct Reader<'a> {
    headers: &'a Headers,
    malformed: Vec<Malformed>,
}

impl<'a> Reader<'a> {
    fn new(headers: &'a Headers) -> Self {
        Self {
            headers,
            malformed: Vec::new(),
        }
    }

    fn field<T>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.headers.get(name)?;
        let parsed = std::str::from_utf8(raw)
            .map_err(|_| "not UTF-8".to_owned())
            .and_then(parse);
        match parsed {
            Ok(v) => Some(v),
            Err(reason) => {
                self.malformed.push(Malformed {
                    header: name,
                    reason,
                });
                None
            }
        }
    }

    fn text(&mut self, name: &'static str) -> Option<String> {
        self.field(name, |s| {
            if s.is_empty() {
                Err("empty".to_owned())
            } else {
                Ok(s.to_owned())
            }
        })
    }

    fn time(&mut self, name: &'static str) -> Option<SystemTime> {
        self.field(name, |s| {
            parse_timestamp(s).ok_or_else(|| format!("not an RFC 3339 UTC timestamp: {s:?}"))
        })
    }

    fn count<T: std::str::FromStr>(&mut self, name: &'static str) -> Option<T> {
        self.field(name, |s| {
            // Strict decimal: `u32::from_str` would also take "+5".
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("not a decimal counter: {s:?}"));
            }
            s.parse().map_err(|_| format!("out of range: {s:?}"))
        })
    }

    fn signed<T: std::str::FromStr>(&mut self, name: &'static str) -> Option<T> {
        self.field(name, |s| {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("not a decimal integer: {s:?}"));
            }
            s.parse().map_err(|_| format!("out of range: {s:?}"))
        })
    }
}

/// Attempt accounting. Only believed on sources the framework owns (retry tiers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryMeta {
    /// Handler invocations so far, all kinds.
    pub attempt: u32,
    /// Delay-tier hops so far.
    pub delayed_attempts: u32,
    /// The tier the message is travelling through.
    pub retry_tier: Option<String>,
    /// Earliest time the message may be handled again.
    pub due_at: Option<SystemTime>,
    /// Time of the first failure.
    pub first_failed_at: Option<SystemTime>,
}

impl RetryMeta {
    /// Reads the attempt headers; malformed ones are returned and treated as absent.
    pub fn read(headers: &Headers) -> (Self, Vec<Malformed>) {
        let mut r = Reader::new(headers);
        let meta = Self {
            attempt: r.count(ATTEMPT).unwrap_or(0),
            delayed_attempts: r.count(DELAYED_ATTEMPTS).unwrap_or(0),
            retry_tier: r.text(RETRY_TIER),
            due_at: r.time(DUE_AT),
            first_failed_at: r.time(FIRST_FAILED_AT),
        };
        (meta, r.malformed)
    }

    /// Writes the attempt headers, replacing old ones; absent fields are removed.
    pub fn write(&self, headers: &mut Headers) {
        for name in ATTEMPT_HEADERS {
            headers.remove(name);
        }
        headers.insert(ATTEMPT, self.attempt.to_string());
        headers.insert(DELAYED_ATTEMPTS, self.delayed_attempts.to_string());
        if let Some(tier) = &self.retry_tier {
            headers.insert(RETRY_TIER, tier.clone());
        }
        if let Some(at) = self.due_at {
            insert_time(headers, DUE_AT, at);
        }
        if let Some(at) = self.first_failed_at {
            insert_time(headers, FIRST_FAILED_AT, at);
        }
    }
}

/// Where the message first came from. Set once, when it first leaves its source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Origin {
    /// Original topic or queue.
    pub source: String,
    /// Kafka partition.
    pub partition: Option<i32>,
    /// Kafka offset.
    pub offset: Option<i64>,
    /// Original broker/produce timestamp.
    pub timestamp: Option<SystemTime>,
    /// Consumer group / consuming service.
    pub group: Option<String>,
}

impl Origin {
    /// Reads the origin headers; `None` when `backstop-origin-source` is absent or malformed.
    pub fn read(headers: &Headers) -> (Option<Self>, Vec<Malformed>) {
        let mut r = Reader::new(headers);
        let Some(source) = r.text(ORIGIN_SOURCE) else {
            return (None, r.malformed);
        };
        let origin = Self {
            source,
            partition: r.signed(ORIGIN_PARTITION),
            offset: r.signed(ORIGIN_OFFSET),
            timestamp: r.time(ORIGIN_TIMESTAMP),
            group: r.text(ORIGIN_GROUP),
        };
        (Some(origin), r.malformed)
    }

    /// Writes the origin headers, replacing old ones.
    pub fn write(&self, headers: &mut Headers) {
        for name in [
            ORIGIN_SOURCE,
            ORIGIN_PARTITION,
            ORIGIN_OFFSET,
            ORIGIN_TIMESTAMP,
            ORIGIN_GROUP,
        ] {
            headers.remove(name);
        }
        headers.insert(ORIGIN_SOURCE, self.source.clone());
        if let Some(p) = self.partition {
            headers.insert(ORIGIN_PARTITION, p.to_string());
        }
        if let Some(o) = self.offset {
            headers.insert(ORIGIN_OFFSET, o.to_string());
        }
        if let Some(t) = self.timestamp {
            insert_time(headers, ORIGIN_TIMESTAMP, t);
        }
        if let Some(g) = &self.group {
            headers.insert(ORIGIN_GROUP, g.clone());
        }
    }
}

/// The failure that sent a message to a tier or the DLQ. Replaced on every hop.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// Error class.
    pub class: ErrorClass,
    /// The error's type name.
    pub error_type: String,
    /// Display of the error (cut to 4 KiB when written).
    pub message: String,
    /// The `source()` chain, one cause a line (cut to 8 KiB when written).
    pub chain: String,
    /// Stable hash of class + type + normalised message.
    pub fingerprint: String,
    /// Time of this failure.
    pub failed_at: SystemTime,
    /// Handler name.
    pub handler: String,
    /// Host that failed it.
    pub host: String,
    /// On DLQ copies only.
    pub dead_letter_reason: Option<DeadLetterReason>,
}

impl Failure {
    /// Reads the failure headers; `None` when the class is absent or malformed.
    pub fn read(headers: &Headers) -> (Option<Self>, Vec<Malformed>) {
        let mut r = Reader::new(headers);
        let class = r.field(ERROR_CLASS, |s| {
            s.parse::<ErrorClass>()
                .map_err(|_| format!("unknown class {s:?}"))
        });
        let failure = class.map(|class| Self {
            class,
            error_type: r.text(ERROR_TYPE).unwrap_or_default(),
            message: r
                .field(ERROR_MESSAGE, |s| Ok(s.to_owned()))
                .unwrap_or_default(),
            chain: r
                .field(ERROR_CHAIN, |s| Ok(s.to_owned()))
                .unwrap_or_default(),
            fingerprint: r.text(ERROR_FINGERPRINT).unwrap_or_default(),
            failed_at: r.time(FAILED_AT).unwrap_or(SystemTime::UNIX_EPOCH),
            handler: r.text(HANDLER).unwrap_or_default(),
            host: r.text(HOST).unwrap_or_default(),
            dead_letter_reason: r.field(DEAD_LETTER_REASON, |s| {
                s.parse::<DeadLetterReason>()
                    .map_err(|_| format!("unknown reason {s:?}"))
            }),
        });
        (failure, r.malformed)
    }

    /// Replaces every failure header with this failure's (never appends).
    pub fn write(&self, headers: &mut Headers) {
        for name in FAILURE_HEADERS {
            headers.remove(name);
        }
        headers.insert(ERROR_CLASS, self.class.as_str());
        headers.insert(ERROR_TYPE, self.error_type.clone());
        headers.insert(
            ERROR_MESSAGE,
            truncate_utf8(&self.message, MAX_ERROR_MESSAGE_BYTES),
        );
        headers.insert(
            ERROR_CHAIN,
            truncate_utf8(&self.chain, MAX_ERROR_CHAIN_BYTES),
        );
        headers.insert(ERROR_FINGERPRINT, self.fingerprint.clone());
        insert_time(headers, FAILED_AT, self.failed_at);
        headers.insert(HANDLER, self.handler.clone());
        headers.insert(HOST, self.host.clone());
        if let Some(reason) = self.dead_letter_reason {
            headers.insert(DEAD_LETTER_REASON, reason.as_str());
        }
    }
}

/// Replay provenance, set by the CLI's replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayMeta {
    /// Time of the replay.
    pub replayed_at: SystemTime,
    /// How many times this message has been replayed.
    pub replay_count: u32,
    /// The DLQ it came from.
    pub replayed_from: String,
}

impl ReplayMeta {
    /// Reads the replay headers; `None` when never replayed.
    pub fn read(headers: &Headers) -> (Option<Self>, Vec<Malformed>) {
        let mut r = Reader::new(headers);
        let count = r.count(REPLAY_COUNT);
        let at = r.time(REPLAYED_AT);
        let from = r.text(REPLAYED_FROM);
        let meta = match (count, at, from) {
            (Some(replay_count), Some(replayed_at), Some(replayed_from)) => Some(Self {
                replayed_at,
                replay_count,
                replayed_from,
            }),
            _ => None,
        };
        (meta, r.malformed)
    }

    /// Prepares `headers` for a replay from `dlq`: strips every failure and attempt
    /// header, keeps identity, origin and application headers, and adds provenance.
    pub fn apply(headers: &mut Headers, dlq: &str, at: SystemTime) {
        let previous = Self::read(headers).0.map_or(0, |m| m.replay_count);
        headers.retain(|h| {
            !(FAILURE_HEADERS.contains(&h.key.as_str())
                || ATTEMPT_HEADERS.contains(&h.key.as_str()))
        });
        insert_time(headers, REPLAYED_AT, at);
        headers.insert(REPLAY_COUNT, (previous + 1).to_string());
        headers.insert(REPLAYED_FROM, dlq.to_owned());
    }
}

/// A short stable hash of class + type + message, with digits and ids normalised,
/// so that "order 17 not found" and "order 912 not found" group together.
pub fn fingerprint(class: ErrorClass, error_type: &str, message: &str) -> String {
    fingerprint_text(class.as_str(), error_type, message)
}

/// [`fingerprint`] for a class given as text, such as one read from a DLQ
/// written by another framework.
pub fn fingerprint_text(class: &str, error_type: &str, message: &str) -> String {
    let mut normalised = String::with_capacity(message.len());
    for token in split_keep(message) {
        if token.bytes().any(|b| b.is_ascii_digit()) && token.chars().all(is_word) {
            normalised.push('#');
        } else {
            normalised.push_str(token);
        }
    }
    // FNV-1a 64: tiny, and stable across releases and platforms (std's hasher is not).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [class, "\u{1f}", error_type, "\u{1f}", &normalised] {
        for b in part.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits into maximal runs of word characters and of everything else.
fn split_keep(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let word = is_word(first);
        let end = rest
            .char_indices()
            .find(|&(_, c)| is_word(c) != word)
            .map_or(rest.len(), |(i, _)| i);
        let (token, tail) = rest.split_at(end);
        rest = tail;
        Some(token)
    })
}

#[cfg(test)]
mod tests;
