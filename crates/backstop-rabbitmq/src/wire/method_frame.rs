//! Method frames that carry what a producer wrote: `basic.deliver`,
//! `basic.get-ok` and `basic.return` hold the exchange and routing key of
//! the publish as short strings, which AMQP says are UTF-8 and RabbitMQ
//! does not check. A routing key that is not UTF-8 (through a topic or
//! fanout exchange, say) fails lapin's whole connection, and the message
//! comes back first on the next one, for ever. Such a string is replaced by
//! its lossy UTF-8 form; the caller adds a note to the content header that
//! follows on the same channel.

use super::scan;

#[derive(Clone, Copy)]
enum Field {
    Short,
    Fixed(usize),
}

use Field::{Fixed, Short};

/// The fields of the methods mended, by (class, method).
fn fields(class: u16, method: u16) -> Option<&'static [Field]> {
    Some(match (class, method) {
        // consumer-tag, delivery-tag, redelivered, exchange, routing-key
        (60, 60) => &[Short, Fixed(8), Fixed(1), Short, Short],
        // delivery-tag, redelivered, exchange, routing-key, message-count
        (60, 71) => &[Fixed(8), Fixed(1), Short, Short, Fixed(4)],
        // reply-code, reply-text, exchange, routing-key
        (60, 50) => &[Fixed(2), Short, Short, Short],
        _ => return None,
    })
}

/// The payload to hand lapin instead of `payload` (a method frame's) and a
/// note saying what was mended, or `None` when nothing needs mending.
pub(crate) fn mend(payload: &[u8]) -> Option<(Vec<u8>, &'static str)> {
    let id = |at: usize| {
        Some(u16::from_be_bytes(
            payload.get(at..at + 2)?.try_into().ok()?,
        ))
    };
    let fields = fields(id(0)?, id(2)?)?;
    let mut pos = 4;
    let mut spans = Vec::with_capacity(fields.len());
    let mut needed = false;
    for field in fields {
        let (end, utf8) = match field {
            Short => scan::short_string(payload, pos)?,
            Fixed(n) => (pos.checked_add(*n)?, true),
        };
        payload.get(pos..end)?;
        needed |= !utf8;
        spans.push((pos, end, utf8));
        pos = end;
    }
    if !needed {
        return None;
    }
    let mut out = payload.get(..4)?.to_vec();
    for (start, end, utf8) in spans {
        match payload.get(start..end) {
            Some(bytes) if utf8 => out.extend_from_slice(bytes),
            Some(bytes) => super::header_frame::push_mended_short(&mut out, bytes.get(1..)?),
            None => return None,
        }
    }
    out.extend_from_slice(payload.get(pos..)?);
    Some((
        out,
        "exchange or routing key not UTF-8, replaced by its lossy UTF-8 form",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(routing_key: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 60, 3, b't', b'a', b'g'];
        p.extend_from_slice(&7u64.to_be_bytes());
        p.push(0);
        p.extend_from_slice(&[9]);
        p.extend_from_slice(b"amq.topic");
        p.push(u8::try_from(routing_key.len()).expect("short"));
        p.extend_from_slice(routing_key);
        p
    }

    #[test]
    fn a_routing_key_that_is_not_utf8_is_mended_and_nothing_else_changes() {
        assert_eq!(mend(&deliver(b"orders.eu")), None);
        let (mended, note) = mend(&deliver(&[0xff, b'k'])).expect("mended");
        assert_eq!(mended, deliver("\u{fffd}k".as_bytes()));
        assert!(note.contains("routing key"));
    }

    #[test]
    fn other_methods_and_cut_frames_are_left_to_lapin() {
        assert_eq!(mend(&[0, 10, 0, 10, 0xff]), None);
        let cut = deliver(&[0xff, b'k']);
        assert_eq!(mend(&cut[..cut.len() - 1]), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let mut p = vec![0, 60, 0, 60];
            p.extend_from_slice(&b);
            let _ = mend(&p);
        }
    }
}
