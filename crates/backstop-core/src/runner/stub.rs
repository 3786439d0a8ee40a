//! Copies cut down for a broker that refuses them: first the failure
//! headers (`slim`), then, for the DLQ, the payload itself (`payload_stub`),
//! so that a message whose copy never fits still ends, findable, instead
//! of going round for ever.

use crate::message::{Message, names, truncate_utf8};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

/// The copy with its failure headers cut down: no error chain, the error
/// message to 256 bytes. Identity, origin and attempt headers stay.
pub(super) fn slim(mut copy: Message) -> Message {
    let headers = copy.headers_mut();
    headers.remove(names::ERROR_CHAIN);
    if let Some(m) = headers.get_str(names::ERROR_MESSAGE) {
        let cut = truncate_utf8(m, 256);
        headers.insert(names::ERROR_MESSAGE, cut);
    }
    copy
}

/// Ids longer than this are malformed (HEADERS.md, "Limits").
const MAX_ID_BYTES: usize = 4096;

/// For an id over 4 KiB, what copies carry instead: `sha256:<hex>` of it.
pub(super) fn bounded_id(id: &str) -> Option<String> {
    (id.len() > MAX_ID_BYTES).then(|| format!("sha256:{}", hex_sha256(id.as_bytes())))
}

fn hex_sha256(data: &[u8]) -> String {
    let mut hex = String::with_capacity(64);
    for b in Sha256::digest(data) {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The copy without its payload: key and every header kept, plus the
/// payload's size and SHA-256, so the letter can be matched with the
/// original where it still exists (the source, a producer's log).
pub(super) fn payload_stub(copy: Message) -> Message {
    let (key, payload, mut headers) = copy.into_parts();
    headers.insert(names::PAYLOAD_SIZE, payload.len().to_string());
    headers.insert(names::PAYLOAD_SHA256, hex_sha256(&payload));
    Message::from_parts(key, bytes::Bytes::new(), headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_over_4_kib_are_replaced_by_their_digest() {
        assert_eq!(bounded_id(&"i".repeat(MAX_ID_BYTES)), None);
        let long = bounded_id(&"i".repeat(MAX_ID_BYTES + 1)).expect("replaced");
        assert!(
            long.starts_with("sha256:") && long.len() == 7 + 64,
            "{long}"
        );
    }

    #[test]
    fn a_stub_keeps_key_and_headers_and_says_what_it_left_out() {
        let m = Message::new("abc")
            .with_key("k")
            .with_header(names::ERROR_CLASS, "permanent");
        let s = payload_stub(m);
        assert!(s.payload().is_empty());
        assert_eq!(s.key().map(|k| &k[..]), Some(&b"k"[..]));
        assert_eq!(s.headers().get_str(names::ERROR_CLASS), Some("permanent"));
        assert_eq!(s.headers().get_str(names::PAYLOAD_SIZE), Some("3"));
        assert_eq!(
            s.headers().get_str(names::PAYLOAD_SHA256),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
    }
}
