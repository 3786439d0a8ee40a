use crate::error::BoxError;
use crate::message::Message;
use bytes::Bytes;
use serde::de::DeserializeOwned;

/// A payload that failed to decode: the message is `poison`.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode payload as {target}")]
pub struct DecodeError {
    /// What it was decoded into.
    pub target: &'static str,
    /// The decoder's error type name.
    pub type_name: &'static str,
    /// The decoder's error.
    #[source]
    pub source: BoxError,
}

impl DecodeError {
    /// A failure to decode into `T` with `error`.
    pub fn new<T, E: std::error::Error + Send + Sync + 'static>(error: E) -> Self {
        Self {
            target: std::any::type_name::<T>(),
            type_name: std::any::type_name::<E>(),
            source: Box::new(error),
        }
    }
}

/// Decodes a message into what a handler takes.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a payload Backstop can decode",
    label = "a handler's `Payload` must implement `Decode`",
    note = "for JSON write `type Payload = Json<{Self}>;` (`{Self}: serde::Deserialize`); `Bytes`, `String` and `Message` decode as they are"
)]
pub trait Decode: Sized + Send + 'static {
    /// Decodes; an error makes the message `poison`.
    fn decode(message: &Message) -> Result<Self, DecodeError>;
}

/// A JSON payload decoded with serde.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> Decode for Json<T> {
    fn decode(message: &Message) -> Result<Self, DecodeError> {
        serde_json::from_slice(message.payload())
            .map(Json)
            .map_err(DecodeError::new::<T, _>)
    }
}

impl Decode for Bytes {
    fn decode(message: &Message) -> Result<Self, DecodeError> {
        Ok(message.payload().clone())
    }
}

impl Decode for String {
    fn decode(message: &Message) -> Result<Self, DecodeError> {
        String::from_utf8(message.payload().to_vec()).map_err(DecodeError::new::<String, _>)
    }
}

impl Decode for Message {
    fn decode(message: &Message) -> Result<Self, DecodeError> {
        Ok(message.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u32,
    }

    #[test]
    fn json_decodes_and_reports_failures_with_the_target() {
        let ok = Json::<Order>::decode(&Message::new(r#"{"id":7}"#)).expect("decodes");
        assert_eq!(ok.0, Order { id: 7 });
        let err = Json::<Order>::decode(&Message::new("{not json")).unwrap_err();
        assert!(err.target.ends_with("Order"));
        assert_eq!(err.type_name, "serde_json::error::Error");
        assert!(err.to_string().starts_with("cannot decode payload as"));
        // The decoder's error is the cause, shown once in the chain.
        let cause = err.source.to_string();
        let chain = crate::error::error_chain(&err);
        assert_eq!(chain.matches(cause.as_str()).count(), 1, "{chain}");
        assert_eq!(chain.lines().count(), 2, "{chain}");
    }

    #[test]
    fn string_refuses_invalid_utf8() {
        assert!(String::decode(&Message::new(vec![0xffu8, 0x00])).is_err());
        assert_eq!(String::decode(&Message::new("hé")).expect("utf-8"), "hé");
    }
}
