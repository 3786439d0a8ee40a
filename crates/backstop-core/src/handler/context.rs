use crate::delivered::Delivered;
use crate::message::{Headers, Message};
use crate::transport::SourceInfo;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What a handler may know about the message it handles.
#[derive(Clone, Debug)]
pub struct Context {
    pub(crate) delivered: Arc<Delivered>,
    pub(crate) attempt: u32,
    pub(crate) delayed_attempts: u32,
    pub(crate) scope: Arc<HandlerScope>,
}

/// What every invocation of one handler shares (one reference count per
/// invocation, where a token of its own would take a lock to clone and drop).
#[derive(Debug)]
pub(crate) struct HandlerScope {
    pub(crate) handler: Arc<str>,
    pub(crate) shutdown: CancellationToken,
}

impl Context {
    /// The `backstop-message-id` (derived from the source position when absent).
    pub fn message_id(&self) -> &str {
        self.delivered.id()
    }

    /// This invocation's number, all kinds counted: 1 on the first try.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Delay-tier hops made before this invocation.
    pub fn delayed_attempts(&self) -> u32 {
        self.delayed_attempts
    }

    /// The whole message as delivered (headers, key, raw payload).
    pub fn message(&self) -> &Message {
        &self.delivered.message
    }

    /// The headers as delivered.
    pub fn headers(&self) -> &Headers {
        self.delivered.message.headers()
    }

    /// Where the delivery came from.
    pub fn source(&self) -> &SourceInfo {
        &self.delivered.source
    }

    /// The handler's name (metric label, `backstop-handler`).
    pub fn handler(&self) -> &str {
        &self.scope.handler
    }

    /// Cancelled when the worker starts shutting down; long handlers may watch it.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.scope.shutdown
    }
}
