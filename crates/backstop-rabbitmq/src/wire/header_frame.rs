//! Content header frames made safe for lapin before it parses them: header
//! entries that it would choke on (nested deeper than
//! [`scan::MAX_NESTING`], a short string that is not UTF-8 anywhere inside,
//! malformed) are dropped, short-string properties that are not UTF-8 are
//! replaced by their lossy UTF-8 form, and the header [`DROPPED`] says what
//! was done. Everything else is copied byte for byte; a frame with nothing
//! to mend is not copied at all.

use super::scan::{self, Value};

/// The header added to a message whose headers or properties were mended
/// on arrival; the runner counts it as a malformed header.
pub(crate) const DROPPED: &str = backstop_core::message::names::DROPPED_HEADERS;

/// Bit (from the top of the flags word) and kind of each basic property,
/// in wire order.
const PROPERTIES: [Kind; 14] = [
    Kind::Short, // content-type
    Kind::Short, // content-encoding
    Kind::Table, // headers
    Kind::Fixed(1),
    Kind::Fixed(1),
    Kind::Short, // correlation-id
    Kind::Short, // reply-to
    Kind::Short, // expiration
    Kind::Short, // message-id
    Kind::Fixed(8),
    Kind::Short, // type
    Kind::Short, // user-id
    Kind::Short, // app-id
    Kind::Short, // cluster-id
];
const HEADERS: usize = 2;
/// Class id, weight and body size come before the flags.
const FLAGS_AT: usize = 12;

#[derive(Clone, Copy)]
enum Kind {
    Short,
    Table,
    Fixed(usize),
}

/// One property as found on the wire.
enum Found<'a> {
    Keep(&'a [u8]),
    /// A short string that is not UTF-8.
    Mend(&'a [u8]),
    /// The headers table: entries kept, and keys of the ones dropped.
    Headers(Vec<&'a [u8]>, Vec<String>),
}

/// The payload to hand lapin instead of `payload` (a content header
/// frame's), or `None` when it is safe as it is (and there is no `extra`
/// note to add) or not a content header lapin could read anyway.
pub(crate) fn mend(payload: &[u8], extra: Option<&str>) -> Option<Vec<u8>> {
    let flags = u16::from_be_bytes(payload.get(FLAGS_AT..FLAGS_AT + 2)?.try_into().ok()?);
    let mut pos = FLAGS_AT + 2;
    let mut found = Vec::new();
    let mut needed = extra.is_some();
    for (i, kind) in PROPERTIES.iter().enumerate() {
        if flags & (1 << (15 - i)) == 0 {
            continue;
        }
        let (end, what) = read(payload, pos, *kind)?;
        needed |= match &what {
            Found::Keep(_) => false,
            Found::Mend(_) => true,
            Found::Headers(_, dropped) => !dropped.is_empty(),
        };
        found.push((i, what));
        pos = end;
    }
    needed.then(|| {
        write(
            payload,
            flags,
            found,
            payload.get(pos..).unwrap_or_default(),
            extra,
        )
    })
}

fn read(b: &[u8], at: usize, kind: Kind) -> Option<(usize, Found<'_>)> {
    match kind {
        Kind::Fixed(n) => {
            let end = at.checked_add(n)?;
            Some((end, Found::Keep(b.get(at..end)?)))
        }
        Kind::Short => {
            let (end, utf8) = scan::short_string(b, at)?;
            let text = b.get(at + 1..end)?;
            Some((
                end,
                if utf8 {
                    Found::Keep(b.get(at..end)?)
                } else {
                    Found::Mend(text)
                },
            ))
        }
        Kind::Table => {
            let len =
                usize::try_from(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?)).ok()?;
            let end = at.checked_add(4)?.checked_add(len)?;
            if end > b.len() {
                return None;
            }
            let (kept, dropped) = entries(b, at + 4, end);
            Some((end, Found::Headers(kept, dropped)))
        }
    }
}

/// The entries of the table between `start` and `end`: those lapin reads
/// safely, and the keys of the others. A malformed entry ends the walk
/// (where the next one would start is unknown) and drops the rest.
fn entries(b: &[u8], start: usize, end: usize) -> (Vec<&[u8]>, Vec<String>) {
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    let mut pos = start;
    while pos < end {
        let key = scan::short_string(b, pos).filter(|(after, _)| *after < end);
        let walked = key.map(|(after, utf8)| (after, utf8, scan::value(b, after, end)));
        let name = |after: usize| {
            String::from_utf8_lossy(b.get(pos + 1..after).unwrap_or_default()).into_owned()
        };
        match walked {
            Some((_, true, Value::Safe(next))) => {
                kept.push(b.get(pos..next).unwrap_or_default());
                pos = next;
            }
            Some((after, _, Value::Safe(next) | Value::Unsafe(next))) => {
                dropped.push(name(after));
                pos = next;
            }
            Some((after, _, Value::Malformed)) => {
                dropped.push(format!(
                    "{} (malformed; every entry after it too)",
                    name(after)
                ));
                break;
            }
            None => {
                dropped.push("(a malformed key; every entry after it too)".to_owned());
                break;
            }
        }
    }
    (kept, dropped)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

/// The lossy UTF-8 form of `bytes`, cut to a short string's 255 bytes at a
/// character boundary, as a short string.
pub(crate) fn push_mended_short(out: &mut Vec<u8>, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut cut = text.len().min(255);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    out.push(u8::try_from(cut).unwrap_or(u8::MAX));
    out.extend_from_slice(text.as_bytes().get(..cut).unwrap_or_default());
}

fn note(dropped: &[String], mended: usize, extra: Option<&str>) -> String {
    let mut parts: Vec<String> = extra.into_iter().map(str::to_owned).collect();
    if !dropped.is_empty() {
        let keys: Vec<String> = dropped.iter().take(8).map(|k| format!("{k:?}")).collect();
        let more = dropped.len().saturating_sub(8);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        parts.push(format!(
            "dropped header(s) {}{more}: nested deeper than {} levels, holding a short string that is not UTF-8, or malformed",
            keys.join(", "),
            scan::MAX_NESTING
        ));
    }
    if mended > 0 {
        parts.push(format!(
            "{mended} short-string propert(ies) not UTF-8, replaced by their lossy UTF-8 form"
        ));
    }
    parts.join("; ")
}

fn write(
    payload: &[u8],
    flags: u16,
    found: Vec<(usize, Found<'_>)>,
    rest: &[u8],
    extra: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 256);
    out.extend_from_slice(payload.get(..FLAGS_AT).unwrap_or_default());
    out.extend_from_slice(&(flags | 1 << (15 - HEADERS)).to_be_bytes());
    let mended = found
        .iter()
        .filter(|(_, f)| matches!(f, Found::Mend(_)))
        .count();
    let dropped: Vec<String> = found
        .iter()
        .flat_map(|(_, f)| match f {
            Found::Headers(_, d) => d.clone(),
            _ => Vec::new(),
        })
        .collect();
    let mut marker = Vec::new();
    marker.push(u8::try_from(DROPPED.len()).unwrap_or(u8::MAX));
    marker.extend_from_slice(DROPPED.as_bytes());
    marker.push(b'S');
    let text = note(&dropped, mended, extra);
    push_len(&mut marker, text.len());
    marker.extend_from_slice(text.as_bytes());
    let had_headers = found.iter().any(|(i, _)| *i == HEADERS);
    let mut marker = Some(marker);
    for (i, what) in found {
        if i > HEADERS
            && !had_headers
            && let Some(m) = marker.take()
        {
            write_table(&mut out, &[], m);
        }
        match what {
            Found::Keep(bytes) => out.extend_from_slice(bytes),
            Found::Mend(bytes) => push_mended_short(&mut out, bytes),
            Found::Headers(kept, _) => {
                write_table(&mut out, &kept, marker.take().unwrap_or_default())
            }
        }
    }
    if let Some(m) = marker.take() {
        write_table(&mut out, &[], m);
    }
    out.extend_from_slice(rest);
    out
}

fn write_table(out: &mut Vec<u8>, kept: &[&[u8]], marker: Vec<u8>) {
    let len = kept.iter().map(|e| e.len()).sum::<usize>() + marker.len();
    push_len(out, len);
    for entry in kept {
        out.extend_from_slice(entry);
    }
    out.extend_from_slice(&marker);
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_test::raw_amqp::nested_value;
    use lapin::BasicProperties;
    use lapin::protocol::basic::{gen_properties, parse_properties};
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    /// A content header payload: class 60, weight 0, body size 5, then
    /// `props` as lapin writes them.
    fn payload(props: &BasicProperties) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let (mut written, _) =
            cookie_factory::r#gen(gen_properties(props), Vec::new()).expect("gen");
        p.append(&mut written);
        p
    }

    fn parsed(payload: &[u8]) -> BasicProperties {
        let (rest, props) = parse_properties(&payload[FLAGS_AT..]).expect("lapin reads it");
        assert!(rest.is_empty(), "nothing left over");
        props
    }

    /// `payload` with the raw entry `key` = `value` appended to its
    /// headers table (which must be its only table and come last but for
    /// `tail` bytes of later properties).
    fn with_raw_entry(props: &BasicProperties, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut p = payload(&props.clone().with_headers(FieldTable::default()));
        // Only content-type may come before headers here.
        let mut at = FLAGS_AT + 2;
        if props.content_type().is_some() {
            at += 1 + usize::from(p[at]);
        }
        let mut entry = vec![u8::try_from(key.len()).expect("short")];
        entry.extend_from_slice(key);
        entry.extend_from_slice(value);
        let len = u32::try_from(entry.len()).expect("small");
        p.splice(at..at + 4, len.to_be_bytes());
        p.splice(at + 4..at + 4, entry);
        p
    }

    #[test]
    fn safe_headers_are_left_alone() {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("a"),
            AMQPValue::LongString(LongString::from("b")),
        );
        let props = BasicProperties::default()
            .with_headers(t)
            .with_message_id(ShortString::from("id"))
            .with_timestamp(7);
        assert_eq!(mend(&payload(&props), None), None);
    }

    #[test]
    fn deep_entries_are_dropped_and_said_so_the_rest_kept() {
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("text/plain"))
            .with_priority(3);
        let p = with_raw_entry(&props, b"deep", &nested_value(10_000));
        let mended = mend(&p, None).expect("mended");
        let got = parsed(&mended);
        assert_eq!(
            got.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(*got.priority(), Some(3));
        let headers = got.headers().clone().expect("headers");
        assert!(!headers.inner().contains_key("deep"));
        let note = match headers.inner().get(DROPPED) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("no note: {other:?}"),
        };
        assert!(
            note.contains("\"deep\"") && note.contains("32 levels"),
            "{note}"
        );
    }

    #[test]
    fn a_key_that_is_not_utf8_is_dropped() {
        let p = with_raw_entry(&BasicProperties::default(), &[0xff, b'k'], b"V");
        let got = parsed(&mend(&p, None).expect("mended"));
        let headers = got.headers().clone().expect("headers");
        assert_eq!(headers.inner().len(), 1, "only the note: {headers:?}");
    }

    #[test]
    fn a_short_string_property_that_is_not_utf8_is_mended_and_headers_added() {
        // correlation-id (bit 10), raw, with no headers property at all.
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        p.extend_from_slice(&(1u16 << 10).to_be_bytes());
        p.extend_from_slice(&[3, b'a', 0xff, b'b']);
        let got = parsed(&mend(&p, None).expect("mended"));
        assert_eq!(
            got.correlation_id().as_ref().map(|s| s.as_str()),
            Some("a\u{fffd}b")
        );
        assert!(
            got.headers()
                .as_ref()
                .expect("headers")
                .inner()
                .contains_key(DROPPED)
        );
    }

    proptest::proptest! {
        /// Whatever a content header holds, the mended one never panics the
        /// mender, and lapin reads every payload it hands over.
        #[test]
        fn mended_payloads_are_read_by_lapin(
            key in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            levels in 0usize..80,
        ) {
            for v in [nested_value(levels), value] {
                let p = with_raw_entry(&BasicProperties::default(), &key, &v);
                if let Some(m) = mend(&p, None) {
                    parsed(&m);
                }
            }
        }
    }
}
