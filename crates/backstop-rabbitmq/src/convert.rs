//! Between Backstop messages and AMQP messages.

use backstop_core::{Headers, Message};
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// AMQP properties for a Backstop message: persistent, headers as long strings
/// (null headers as void), the timestamp in seconds.
pub(crate) fn properties(message: &Message) -> BasicProperties {
    let mut table = FieldTable::default();
    for h in message.headers() {
        let value = match &h.value {
            Some(v) => AMQPValue::LongString(LongString::from(v.to_vec())),
            None => AMQPValue::Void,
        };
        table.insert(ShortString::from(h.key.as_str()), value);
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(id) = message.id() {
        props = props.with_message_id(ShortString::from(id));
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
/// `x-death` tables) as JSON, so nothing a foreign producer sent is lost.
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
        other => serde_json::to_vec(other).ok().map(Bytes::from),
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
            .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
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
/// count, so `None`.
pub(crate) fn delivery_count(props: &BasicProperties, quorum: bool) -> Option<u32> {
    if !quorum {
        return None;
    }
    let earlier = match props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
    {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => *n,
        _ => 0,
    };
    Some(earlier.saturating_add(1))
}

/// Now, for messages without a timestamp.
pub(crate) fn now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_including_nulls_and_binary() {
        let mut m = Message::new("x").with_header("tenant", "acme");
        m.headers_mut().append("nothing", None);
        m.headers_mut()
            .insert("raw", Bytes::from_static(&[0xff, 0x00]));
        let props = properties(&m);
        let back = from_delivery(b"x".to_vec(), &props, "orders");
        assert_eq!(back.headers().get_str("tenant"), Some("acme"));
        assert_eq!(back.headers().get("raw"), Some(&[0xff, 0x00][..]));
        assert!(back.headers().contains("nothing"));
        assert_eq!(back.id(), m.id());
        assert_eq!(back.key().map(|k| &k[..]), Some(&b"orders"[..]));
    }
}
