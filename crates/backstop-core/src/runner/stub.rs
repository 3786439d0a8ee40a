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

/// The copy without its payload: key and every header kept, plus the
/// payload's size and SHA-256, so the letter can be matched with the
/// original where it still exists (the source, a producer's log).
pub(super) fn payload_stub(copy: Message) -> Message {
    let (key, payload, mut headers) = copy.into_parts();
    let digest = Sha256::digest(&payload);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    headers.insert(names::PAYLOAD_SIZE, payload.len().to_string());
    headers.insert(names::PAYLOAD_SHA256, hex);
    Message::from_parts(key, bytes::Bytes::new(), headers)
}

#[cfg(test)]
mod tests {
    use super::*;

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
