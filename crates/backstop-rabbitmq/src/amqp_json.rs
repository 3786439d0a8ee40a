//! AMQP field values (tables, arrays, numbers of every width) as plain JSON,
//! for headers that are not strings, such as RabbitMQ's `x-death`: a table
//! becomes an object, an array an array, text a string, a number a number,
//! a timestamp its seconds since the epoch, bytes `{"hex": "…"}`. Nesting is
//! cut at [`MAX_DEPTH`]: a producer's table nested thousands deep must not
//! overflow the stack.

use lapin::types::AMQPValue;
use serde_json::{Map, Value, json};
use std::fmt::Write as _;

/// Deeper values are written as `"…"`.
pub(crate) const MAX_DEPTH: usize = 32;

fn hex(bytes: &[u8]) -> Value {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    json!({ "hex": s })
}

fn text(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => hex(bytes),
    }
}

/// `v` as JSON (see the module's docs).
pub(crate) fn amqp_json(v: &AMQPValue) -> Value {
    to_json(v, 0)
}

fn to_json(v: &AMQPValue, depth: usize) -> Value {
    if depth >= MAX_DEPTH {
        return Value::String("…".to_owned());
    }
    match v {
        AMQPValue::Void => Value::Null,
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!({ "scale": d.scale, "value": d.value }),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => text(s.as_bytes()),
        AMQPValue::ByteArray(b) => hex(b.as_slice()),
        AMQPValue::FieldArray(a) => {
            Value::Array(a.as_slice().iter().map(|x| to_json(x, depth + 1)).collect())
        }
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, x)| (k.as_str().to_owned(), to_json(x, depth + 1)))
                .collect::<Map<_, _>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, FieldTable, LongString, ShortString};

    #[test]
    fn x_death_reads_as_plain_json() {
        let mut death = FieldTable::default();
        death.insert(ShortString::from("count"), AMQPValue::LongLongInt(3));
        death.insert(
            ShortString::from("queue"),
            AMQPValue::LongString(LongString::from("orders")),
        );
        death.insert(
            ShortString::from("time"),
            AMQPValue::Timestamp(1_764_280_000),
        );
        death.insert(
            ShortString::from("routing-keys"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from(vec![0xffu8]),
            )])),
        );
        let v = amqp_json(&AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::FieldTable(death),
        ])));
        assert_eq!(
            v,
            json!([{
                "count": 3,
                "queue": "orders",
                "time": 1_764_280_000u64,
                "routing-keys": [{ "hex": "ff" }]
            }])
        );
    }

    #[test]
    fn deep_nesting_is_cut_not_followed() {
        let mut v = AMQPValue::Void;
        for _ in 0..1_000 {
            v = AMQPValue::FieldArray(FieldArray::from(vec![v]));
        }
        let mut j = &amqp_json(&v);
        let mut depth = 0;
        while let Value::Array(inner) = j {
            j = &inner[0];
            depth += 1;
        }
        assert_eq!(depth, MAX_DEPTH);
        assert_eq!(j, &Value::String("…".into()));
    }
}
