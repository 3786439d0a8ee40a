//! Walking an AMQP field value without recursion: its extent, and whether
//! lapin can read it safely (nesting no deeper than [`MAX_NESTING`], every
//! short string valid UTF-8). lapin's parser recurses once per level on
//! the connection's I/O thread: a producer's headers nested a few thousand
//! levels deep (25 KiB) overflow that thread's stack and abort the
//! process, and a short string that is not UTF-8 fails the whole
//! connection, so the message comes back on the next one, for ever.

/// Tables and arrays nested deeper than this are not handed to lapin
/// (the same bound as the JSON view of headers, `amqp_json::MAX_DEPTH`).
pub(crate) const MAX_NESTING: usize = crate::amqp_json::MAX_DEPTH;

/// What a walk over one field value found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value {
    /// Readable; the value ends at this offset.
    Safe(usize),
    /// Well formed, but nested too deep or holding a short string that is
    /// not UTF-8; the value ends at this offset.
    Unsafe(usize),
    /// Not a field value at all (unknown type, a length past its end).
    Malformed,
}

/// A table or array being walked: where it ends, and whether its entries
/// carry keys (tables do).
struct Open {
    end: usize,
    keyed: bool,
}

fn be_u32(b: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(bytes)).ok()
}

/// Where the short string at `at` ends, and whether it is UTF-8.
pub(crate) fn short_string(b: &[u8], at: usize) -> Option<(usize, bool)> {
    let len = usize::from(*b.get(at)?);
    let end = at.checked_add(1)?.checked_add(len)?;
    let text = b.get(at + 1..end)?;
    Some((end, std::str::from_utf8(text).is_ok()))
}

/// Fixed sizes of the scalar types lapin reads (`AMQPType::from_id`).
fn scalar_size(tag: u8) -> Option<usize> {
    Some(match tag {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        _ => return None,
    })
}

/// Walks the field value (type tag first) at `at`, which must end by
/// `limit`.
pub(crate) fn value(b: &[u8], at: usize, limit: usize) -> Value {
    walk(b, at, limit).unwrap_or(Value::Malformed)
}

fn walk(b: &[u8], at: usize, limit: usize) -> Option<Value> {
    let mut open: Vec<Open> = Vec::new();
    let mut safe = true;
    let mut pos = at;
    loop {
        let end = open.last().map_or(limit, |o| o.end);
        if let Some(o) = open.last()
            && o.keyed
        {
            let (after, utf8) = short_string(b, pos)?;
            safe &= utf8;
            pos = after;
        }
        let tag = *b.get(pos)?;
        pos = pos.checked_add(1)?;
        match tag {
            b'S' | b'x' => pos = pos.checked_add(4)?.checked_add(be_u32(b, pos)?)?,
            b'F' | b'A' => {
                let inner = pos.checked_add(4)?;
                let close = inner.checked_add(be_u32(b, pos)?)?;
                if close > end {
                    return None;
                }
                open.push(Open {
                    end: close,
                    keyed: tag == b'F',
                });
                safe &= open.len() <= MAX_NESTING;
                pos = inner;
            }
            other => pos = pos.checked_add(scalar_size(other)?)?,
        }
        if pos > end {
            return None;
        }
        // Close every table and array that ends here.
        while let Some(o) = open.last() {
            match pos.cmp(&o.end) {
                std::cmp::Ordering::Equal => {
                    open.pop();
                }
                std::cmp::Ordering::Less => break,
                std::cmp::Ordering::Greater => return None,
            }
        }
        if open.is_empty() {
            return Some(if safe {
                Value::Safe(pos)
            } else {
                Value::Unsafe(pos)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_test::raw_amqp::nested_value as nested;
    use lapin::types::generation::gen_value;
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

    fn bytes(v: &AMQPValue) -> Vec<u8> {
        let (out, _) = cookie_factory::r#gen(gen_value(v), Vec::new()).expect("gen");
        out
    }

    #[test]
    fn values_lapin_writes_are_walked_to_their_end() {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("k"),
            AMQPValue::LongString(LongString::from("v")),
        );
        t.insert(ShortString::from("n"), AMQPValue::LongLongInt(-3));
        let v = AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::FieldTable(t),
            AMQPValue::Boolean(true),
            AMQPValue::FieldArray(FieldArray::default()),
        ]));
        let b = bytes(&v);
        assert_eq!(value(&b, 0, b.len()), Value::Safe(b.len()));
    }

    #[test]
    fn nesting_past_the_bound_is_unsafe_but_its_end_is_known() {
        let ok = nested(MAX_NESTING);
        assert_eq!(value(&ok, 0, ok.len()), Value::Safe(ok.len()));
        let deep = nested(MAX_NESTING + 1);
        assert_eq!(value(&deep, 0, deep.len()), Value::Unsafe(deep.len()));
        // Deep enough to overflow lapin's parser; walked without recursion.
        let hostile = nested(200_000);
        assert_eq!(
            value(&hostile, 0, hostile.len()),
            Value::Unsafe(hostile.len())
        );
    }

    #[test]
    fn a_key_that_is_not_utf8_is_unsafe() {
        // F, length, key of two bytes 0xff 0xfe, void.
        let b = [b'F', 0, 0, 0, 4, 2, 0xff, 0xfe, b'V'];
        assert_eq!(value(&b, 0, b.len()), Value::Unsafe(b.len()));
    }

    #[test]
    fn lengths_past_their_container_and_unknown_types_are_malformed() {
        assert_eq!(value(&[b'A', 0, 0, 0, 9, b'V'], 0, 6), Value::Malformed);
        assert_eq!(value(&[b'S', 255, 255, 255, 255], 0, 5), Value::Malformed);
        assert_eq!(value(b"?", 0, 1), Value::Malformed);
        assert_eq!(value(&[], 0, 0), Value::Malformed);
        // An inner array claiming more than its outer one holds.
        let b = [b'A', 0, 0, 0, 5, b'A', 0, 0, 0, 9];
        assert_eq!(value(&b, 0, b.len()), Value::Malformed);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..256), at in 0usize..300) {
            let _ = value(&b, at, b.len());
        }
    }
}
