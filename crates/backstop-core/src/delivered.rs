//! One delivery as the runner and the handler's `Context` share it: the
//! message, where it came from, and its id, made once per delivery (one
//! allocation), the id only when something asks for it.

use crate::message::Message;
use crate::transport::SourceInfo;
use std::fmt;
use std::io::Write as _;
use std::sync::OnceLock;

/// A delivered message with its source and (lazily) its id.
#[derive(Debug)]
pub(crate) struct Delivered {
    pub(crate) message: Message,
    pub(crate) source: SourceInfo,
    /// The derived id, made on first use (most Kafka records have no id of
    /// their own, and most successes never need one).
    derived: OnceLock<Box<str>>,
}

impl Delivered {
    pub(crate) fn new(message: Message, source: SourceInfo) -> Self {
        Self {
            message,
            source,
            derived: OnceLock::new(),
        }
    }

    /// The message's `backstop-message-id`, or one derived from its source
    /// position (or, without one, its content), so a redelivery gets the
    /// same id and dedupe still works.
    pub(crate) fn id(&self) -> &str {
        match self.message.id() {
            Some(id) => id,
            None => self
                .derived
                .get_or_init(|| derived_id(&self.source, &self.message)),
        }
    }

    /// Whether the id is derived from the content (no id of its own, no
    /// broker position): it cannot tell two equal messages apart, so dedupe
    /// must not use it.
    pub(crate) fn content_id(&self) -> bool {
        self.message.id().is_none() && self.source.offset.is_none()
    }

    /// The id as a span or log field, made only if the field is recorded.
    pub(crate) fn id_field(&self) -> IdField<'_> {
        IdField(self)
    }
}

/// See [`Delivered::id_field`].
pub(crate) struct IdField<'a>(&'a Delivered);

impl fmt::Display for IdField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.id())
    }
}

/// Namespace for ids derived from a source position (UUIDv5).
const DERIVED_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6261_636b_7374_6f70_8000_0000_0000_0001);

/// An id for a message that arrived without `backstop-message-id`: derived
/// from the source position, or from key and payload when the broker has no
/// position.
fn derived_id(source: &SourceInfo, message: &Message) -> Box<str> {
    let uuid = match (source.partition, source.offset) {
        (partition, Some(offset)) => position_uuid(&source.source, partition, offset),
        (_, None) => {
            let mut name = Vec::with_capacity(64);
            name.extend_from_slice(b"content:");
            name.extend_from_slice(source.source.as_bytes());
            name.push(0);
            if let Some(key) = message.key() {
                name.extend_from_slice(key);
            }
            name.push(0);
            name.extend_from_slice(message.payload());
            uuid::Uuid::new_v5(&DERIVED_ID_NAMESPACE, &name)
        }
    };
    Box::from(
        &*uuid
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    )
}

/// `pos:<source>/<partition>/<offset>`, named on the stack when it fits.
fn position_uuid(source: &str, partition: Option<i32>, offset: i64) -> uuid::Uuid {
    let partition = partition.unwrap_or(-1);
    let mut name = [0u8; 320];
    let mut w = &mut name[..];
    let room = w.len();
    let written = write!(w, "pos:{source}/{partition}/{offset}");
    let len = room - w.len();
    match (written, name.get(..len)) {
        (Ok(()), Some(named)) => uuid::Uuid::new_v5(&DERIVED_ID_NAMESPACE, named),
        // A source name too long for the buffer.
        _ => uuid::Uuid::new_v5(
            &DERIVED_ID_NAMESPACE,
            format!("pos:{source}/{partition}/{offset}").as_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Headers;

    /// A message as a broker hands over one without an id.
    fn bare(payload: &'static str, key: Option<&'static str>) -> Message {
        Message::from_parts(key.map(Into::into), payload.into(), Headers::new())
    }

    fn at(offset: Option<i64>) -> SourceInfo {
        let mut s = SourceInfo::main("orders");
        s.partition = Some(3);
        s.offset = offset;
        s
    }

    #[test]
    fn an_id_of_its_own_wins_and_positions_derive_stable_ids() {
        let own = Delivered::new(Message::new("x").with_id("m-1"), at(Some(7)));
        assert_eq!(own.id(), "m-1");
        assert!(!own.content_id());
        let a = Delivered::new(bare("x", None), at(Some(7)));
        let b = Delivered::new(bare("y", None), at(Some(7)));
        let c = Delivered::new(bare("x", None), at(Some(8)));
        assert_eq!(a.id(), b.id(), "same position, same id");
        assert_ne!(a.id(), c.id());
        assert_eq!(a.id().len(), 36, "a hyphenated UUID");
        assert_eq!(a.id_field().to_string(), a.id());
        // A position longer than the stack buffer is named on the heap.
        let long = "t".repeat(400);
        let mut s = at(Some(7));
        s.source = long.as_str().into();
        let l = Delivered::new(bare("x", None), s);
        assert_ne!(l.id(), a.id());
    }

    #[test]
    fn without_a_position_the_content_names_the_message() {
        let a = Delivered::new(bare("x", Some("k")), at(None));
        let b = Delivered::new(bare("x", Some("k")), at(None));
        let c = Delivered::new(bare("x", Some("j")), at(None));
        assert!(a.content_id());
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
    }
}
