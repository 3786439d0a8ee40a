//! Why an outbox would not open, or a send was not accepted.

use crate::store::StorageError;
use backstop_core::{ConfigError, Message};

/// Why an outbox could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A setting is invalid; the error names it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file could not be opened or read.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a send was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendErrorKind {
    /// The outbox is at `max_pending_entries` or `max_pending_bytes`.
    Full,
    /// The outbox is shutting down.
    Closed,
    /// Writing to disk failed.
    Storage,
}

/// A send that was not accepted. The message is handed back, never lost.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct SendError {
    kind: SendErrorKind,
    detail: String,
    /// What failed underneath (the store's error), kept as the cause.
    #[source]
    cause: Option<StorageError>,
    /// The message, unchanged.
    pub message: Box<Message>,
}

impl SendError {
    pub(crate) fn new(kind: SendErrorKind, detail: impl Into<String>, message: Message) -> Self {
        Self {
            kind,
            detail: detail.into(),
            cause: None,
            message: Box::new(message),
        }
    }

    /// Writing `message` failed with `cause`.
    pub(crate) fn storage(cause: StorageError, message: Message) -> Self {
        Self {
            kind: SendErrorKind::Storage,
            detail: "writing to the outbox failed".to_owned(),
            cause: Some(cause),
            message: Box::new(message),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> SendErrorKind {
        self.kind
    }

    /// The outbox is at its cap (`OutboxFull`).
    pub fn is_full(&self) -> bool {
        self.kind == SendErrorKind::Full
    }

    /// Takes the message back.
    pub fn into_message(self) -> Message {
        *self.message
    }
}
