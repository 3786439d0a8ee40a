use crate::error::BoxError;
use crate::message::Message;

/// Broad kinds of transport failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The connection or channel is gone; reconnecting may help.
    ConnectionLost,
    /// The broker refused or did not confirm (nack, timeout, request error).
    Rejected,
    /// The destination does not exist or is not reachable.
    NotFound,
    /// The broker refuses this message itself (too large, malformed): sending
    /// the same message again cannot succeed.
    Invalid,
    /// Anything else.
    Other,
}

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {context}")]
#[non_exhaustive]
pub struct TransportError {
    /// What kind of failure.
    pub kind: TransportErrorKind,
    /// What was being done, in words.
    pub context: String,
    /// The backend's error.
    #[source]
    pub source: Option<BoxError>,
}

impl TransportError {
    /// A failure of `kind` while doing `context`.
    pub fn new(kind: TransportErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Attaches the backend's error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }

    /// True when trying again (after reconnecting) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            TransportErrorKind::ConnectionLost | TransportErrorKind::Rejected
        )
    }
}

/// A publish that was not confirmed. The message is handed back, never lost.
#[derive(Debug, thiserror::Error)]
#[error("publish not confirmed")]
pub struct PublishError {
    /// Why.
    #[source]
    pub error: TransportError,
    /// The message, unchanged (boxed to keep `Result`s small on the happy path).
    pub message: Box<Message>,
}

impl PublishError {
    /// A failed publish of `message`.
    pub fn new(error: TransportError, message: Message) -> Self {
        Self {
            error,
            message: Box::new(message),
        }
    }

    /// Takes the message back.
    pub fn into_message(self) -> Message {
        *self.message
    }
}
