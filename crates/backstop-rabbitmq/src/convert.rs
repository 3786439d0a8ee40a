//! Between Backstop messages and AMQP messages.

use backstop_core::{Headers, Message};
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What `backstop_malformed_headers_total` counts a header key dropped from
/// an AMQP copy under (see [`properties`]).
pub(crate) const KEY_TOO_LONG: &str = "<key over 255 bytes>";

/// AMQP properties for a Backstop message going to `destination`:
/// persistent, headers as long strings (null headers as void), the timestamp
/// in seconds. AMQP header keys and the `message-id` property are short
/// strings (255 bytes at most, HEADERS.md): a longer key is dropped and
/// counted as malformed; a longer id travels only in `backstop-message-id`.
pub(crate) fn properties(message: &Message, destination: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    for h in message.headers() {
        let Ok(key) = ShortString::try_new(h.key.as_str()) else {
            backstop_core::observability::count_malformed_header(destination, KEY_TOO_LONG);
            tracing::warn!(
                destination,
                bytes = h.key.len(),
                "header key over 255 bytes dropped from the AMQP copy"
            );
            continue;
        };
        let value = match &h.value {
            Some(v) => AMQPValue::LongString(LongString::from(v.to_vec())),
            None => AMQPValue::Void,
        };
        table.insert(key, value);
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(id) = message.id().and_then(|id| ShortString::try_new(id).ok()) {
        props = props.with_message_id(id);
    }
    if let Some(secs) = message
        .timestamp()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    {
        props = props.with_timestamp(secs.as_secs());
    }
    props
}

/// A header value as bytes: strings as they are, other AMQP values (numbers,
/// `x-death` tables) as plain JSON (see `amqp_json`), so nothing a foreign
/// producer sent is lost and tools read it as values.
fn value_bytes(v: &AMQPValue) -> Option<Bytes> {
    match v {
        AMQPValue::Void => None,
        AMQPValue::LongString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(Bytes::copy_from_slice(s.as_str().as_bytes())),
        AMQPValue::Boolean(b) => Some(Bytes::from(b.to_string())),
        AMQPValue::LongLongInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::LongInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::LongUInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::ShortInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::ShortUInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::Timestamp(t) => Some(Bytes::from(t.to_string())),
        other => serde_json::to_vec(&crate::amqp_json::amqp_json(other))
            .ok()
            .map(Bytes::from),
    }
}

/// A Backstop message from a delivery.
pub(crate) fn from_delivery(data: Vec<u8>, props: &BasicProperties, routing_key: &str) -> Message {
    let headers: Headers = props
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), value_bytes(v)))
                .collect()
        })
        .unwrap_or_default();
    let mut m = Message::from_parts(
        Some(Bytes::copy_from_slice(routing_key.as_bytes())),
        Bytes::from(data),
        headers,
    );
    m.set_timestamp(
        props
            .timestamp()
            // Anything a producer wrote: out of range is unknown.
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s))),
    );
    // A producer that is not Backstop may still set AMQP's own message id:
    // it identifies the message (dedupe) better than anything derived here.
    if m.id().is_none()
        && let Some(id) = props.message_id().as_ref()
        && !id.as_str().is_empty()
    {
        m.headers_mut().insert(
            backstop_core::message::names::MESSAGE_ID,
            id.as_str().to_owned(),
        );
    }
    m
}

/// The queue of the newest `x-death` entry: where the broker dead-lettered it from.
pub(crate) fn last_death_queue(props: &BasicProperties) -> Option<String> {
    let deaths = props.headers().as_ref()?.inner().get("x-death")?.clone();
    let AMQPValue::FieldArray(entries) = deaths else {
        return None;
    };
    let AMQPValue::FieldTable(first) = entries.as_slice().first()? else {
        return None;
    };
    match first.inner().get("queue")? {
        AMQPValue::LongString(q) => Some(String::from_utf8_lossy(q.as_bytes()).into_owned()),
        AMQPValue::ShortString(q) => Some(q.as_str().to_owned()),
        _ => None,
    }
}

/// Deliveries so far, this one included: quorum queues count earlier returns
/// in `x-delivery-count` (absent on the first delivery); classic queues do not
/// count, so `None`. A producer can write the header too: a value that is
/// not a count (negative, past `u32`, not a number) is malformed, counted for
/// `source` and ignored, so it can neither end a message unhandled nor
/// keep one alive.
pub(crate) fn delivery_count(props: &BasicProperties, quorum: bool, source: &str) -> Option<u32> {
    if !quorum {
        return None;
    }
    let earlier = match props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
    {
        None => 0,
        Some(v) => sane_count(v).unwrap_or_else(|| {
            backstop_core::observability::count_malformed_header(source, "x-delivery-count");
            tracing::warn!(source, value = ?v, "malformed x-delivery-count ignored");
            0
        }),
    };
    Some(earlier.saturating_add(1))
}

/// An AMQP integer that is a count (`0..=u32::MAX`), by its type.
fn sane_count(v: &AMQPValue) -> Option<u32> {
    match v {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    }
}

/// Now, for messages without a timestamp.
pub(crate) fn now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_and_ids_never_panic_and_the_id_travels_whole() {
        let id = "i".repeat(300);
        let mut m = Message::new("x").with_header("tenant", "acme");
        m.headers_mut().insert("k".repeat(256), "dropped");
        m.headers_mut()
            .insert(backstop_core::message::names::MESSAGE_ID, id.clone());
        let props = properties(&m, "q");
        assert_eq!(props.message_id(), &None, "over 255 bytes: no property");
        let back = from_delivery(b"x".to_vec(), &props, "q");
        assert_eq!(back.id(), Some(id.as_str()));
        assert_eq!(back.headers().get_str("tenant"), Some("acme"));
        assert_eq!(back.headers().len(), 2, "the long key is gone");
        let short = Message::new("x").with_header(backstop_core::message::names::MESSAGE_ID, "m-1");
        assert_eq!(
            properties(&short, "q")
                .message_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some("m-1")
        );
    }

    /// Any AMQP value a producer can send, nested a few levels.
    fn amqp_value() -> impl proptest::strategy::Strategy<Value = AMQPValue> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(AMQPValue::Void),
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            any::<f64>().prop_map(AMQPValue::Double),
            prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(v.into())),
                prop::collection::vec(("[a-z-]{1,12}", inner), 0..4).prop_map(|kv| {
                    let mut t = FieldTable::default();
                    for (k, v) in kv {
                        t.insert(ShortString::from(k), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1_000))]

        /// Whatever a producer puts in the headers and the timestamp, the
        /// delivery converts without a panic, and its copy converts back.
        #[test]
        fn any_amqp_delivery_converts_and_its_copy_too(
            headers in proptest::collection::vec(("[a-z-]{1,20}|.{0,300}", amqp_value()), 0..8),
            timestamp in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let mut t = FieldTable::default();
            for (k, v) in headers {
                if let Ok(k) = ShortString::try_new(k) {
                    t.insert(k, v);
                }
            }
            let mut props = BasicProperties::default().with_headers(t);
            if let Some(ts) = timestamp {
                props = props.with_timestamp(ts);
            }
            let m = from_delivery(b"x".to_vec(), &props, "q");
            let _ = delivery_count(&props, true, "q");
            let _ = last_death_queue(&props);
            let back = properties(&m, "q");
            let again = from_delivery(b"x".to_vec(), &back, "q");
            proptest::prop_assert_eq!(again.headers().len(), m.headers().len());
        }
    }

    #[test]
    fn delivery_counts_are_believed_only_when_they_are_counts() {
        let with = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert(ShortString::from("x-delivery-count"), v);
            BasicProperties::default().with_headers(t)
        };
        let count = |p: &BasicProperties| delivery_count(p, true, "q");
        assert_eq!(count(&BasicProperties::default()), Some(1));
        assert_eq!(count(&with(AMQPValue::LongLongInt(4))), Some(5));
        assert_eq!(count(&with(AMQPValue::LongUInt(2))), Some(3));
        for garbage in [
            AMQPValue::LongLongInt(-1),
            AMQPValue::LongLongInt(i64::MAX),
            AMQPValue::LongInt(-7),
            AMQPValue::LongString(LongString::from("999")),
            AMQPValue::Boolean(true),
        ] {
            assert_eq!(count(&with(garbage.clone())), Some(1), "{garbage:?}");
        }
        assert_eq!(
            delivery_count(&with(AMQPValue::LongLongInt(4)), false, "q"),
            None
        );
    }

    #[test]
    fn hostile_timestamps_are_unknown() {
        for secs in [u64::MAX, 1 << 63, 1_795_730_060_123] {
            let props = BasicProperties::default().with_timestamp(secs);
            let m = from_delivery(b"x".to_vec(), &props, "q");
            assert_eq!(m.timestamp(), None, "{secs}");
        }
        let props = BasicProperties::default().with_timestamp(1_795_730_060);
        assert!(
            from_delivery(b"x".to_vec(), &props, "q")
                .timestamp()
                .is_some()
        );
    }

    #[test]
    fn headers_round_trip_including_nulls_and_binary() {
        let mut m = Message::new("x").with_header("tenant", "acme");
        m.headers_mut().append("nothing", None);
        m.headers_mut()
            .insert("raw", Bytes::from_static(&[0xff, 0x00]));
        let props = properties(&m, "q");
        let back = from_delivery(b"x".to_vec(), &props, "orders");
        assert_eq!(back.headers().get_str("tenant"), Some("acme"));
        assert_eq!(back.headers().get("raw"), Some(&[0xff, 0x00][..]));
        assert!(back.headers().contains("nothing"));
        assert_eq!(back.id(), m.id());
        assert_eq!(back.key().map(|k| &k[..]), Some(&b"orders"[..]));
    }
}
