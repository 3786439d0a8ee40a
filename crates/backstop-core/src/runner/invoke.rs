//! The layers right around the handler: decode (poison), timeout, panic guard.

use crate::error::{ErrorClass, HandlerError, HandlerErrorKind, error_chain};
use crate::handler::{Context, Decode, DecodeError, Handler};
use crate::message::Message;
use crate::transport::BoxFuture;
use futures_util::FutureExt;
use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// One failed invocation, with everything the failure headers need.
#[derive(Debug, Clone)]
pub(crate) struct Failed {
    pub(crate) class: ErrorClass,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) error_type: String,
    pub(crate) message: String,
    pub(crate) chain: String,
    /// The dependency the handler named, for the circuit breaker.
    pub(crate) dependency: Option<String>,
    /// The fallback the handler chose instead of failing.
    pub(crate) fallback: Option<Fallback>,
}

/// A fallback outcome a handler returned.
#[derive(Debug, Clone)]
pub(crate) enum Fallback {
    Park(String),
    Skip,
}

impl Failed {
    fn from_handler(e: HandlerError) -> Self {
        let class = e.class();
        let retry_after = e.retry_after_hint();
        let error_type = e.type_name().to_owned();
        let dependency = e.dependency().map(str::to_owned);
        let fallback = match e.kind() {
            HandlerErrorKind::Park => e.park_destination().map(|d| Fallback::Park(d.to_owned())),
            HandlerErrorKind::Skip => Some(Fallback::Skip),
            _ => None,
        };
        let source = e.into_source();
        Self {
            class,
            retry_after,
            error_type,
            message: source.to_string(),
            chain: error_chain(source.as_ref()),
            dependency,
            fallback,
        }
    }

    fn poison(e: DecodeError) -> Self {
        Self {
            class: ErrorClass::Poison,
            retry_after: None,
            error_type: e.type_name.to_owned(),
            // The one line on-call reads first: what failed and why (the
            // chain header has them as separate lines).
            message: format!("{e}: {}", e.source),
            chain: error_chain(&e),
            dependency: None,
            fallback: None,
        }
    }

    /// A message the broker keeps redelivering without it being settled.
    pub(crate) fn delivery_limit(count: u32, limit: u32) -> Self {
        let message = format!(
            "delivered {count} times without being settled (limit {limit}): \
             a worker may be crashing on it"
        );
        Self {
            class: ErrorClass::Poison,
            retry_after: None,
            error_type: "backstop::DeliveryLimit".to_owned(),
            chain: message.clone(),
            message,
            dependency: None,
            fallback: None,
        }
    }

    /// The dedupe store could not be asked: a transient failure of the
    /// dependency `dedupe-store`.
    pub(crate) fn dedupe_store(e: &crate::dedupe::DedupeError) -> Self {
        Self {
            class: ErrorClass::Transient,
            retry_after: None,
            error_type: "backstop::DedupeStore".to_owned(),
            message: e.to_string(),
            chain: error_chain(e),
            dependency: Some("dedupe-store".to_owned()),
            fallback: None,
        }
    }

    fn timeout(after: Duration) -> Self {
        let message = format!("handler did not finish within {after:?}");
        Self {
            class: ErrorClass::Timeout,
            retry_after: None,
            error_type: "backstop::Timeout".to_owned(),
            chain: message.clone(),
            message,
            dependency: None,
            fallback: None,
        }
    }

    fn panic(payload: Box<dyn Any + Send>) -> Self {
        let text = super::panics::payload_text(payload.as_ref());
        let message = match super::panics::take_location() {
            Some(at) => format!("handler panicked at {at}: {text}"),
            None => format!("handler panicked: {text}"),
        };
        Self::panicked(message)
    }

    /// A panic outside the handler, on an earlier delivery of this message
    /// (see `panics`): `what` says where and what.
    pub(crate) fn outside_handler(what: &str) -> Self {
        Self::panicked(what.to_owned())
    }

    fn panicked(message: String) -> Self {
        Self {
            class: ErrorClass::Panic,
            retry_after: None,
            error_type: "backstop::Panic".to_owned(),
            chain: message.clone(),
            message,
            dependency: None,
            fallback: None,
        }
    }
}

/// A handler with its payload type erased, so the runner is not generic over it.
pub(crate) trait DynHandler: Send + Sync + 'static {
    fn call<'a>(&'a self, message: &'a Message, ctx: Context) -> BoxFuture<'a, Result<(), Failed>>;
}

impl<H: Handler> DynHandler for H {
    fn call<'a>(&'a self, message: &'a Message, ctx: Context) -> BoxFuture<'a, Result<(), Failed>> {
        Box::pin(async move {
            let payload = H::Payload::decode(message).map_err(Failed::poison)?;
            self.handle(payload, ctx)
                .await
                .map_err(Failed::from_handler)
        })
    }
}

/// Runs one invocation, started at `started`, under the timeout and the
/// panic guard.
///
/// Most handlers finish, or fail, on their first poll: the timer is armed
/// only for one that has to wait, for what is left of its time.
pub(crate) async fn invoke(
    handler: &dyn DynHandler,
    timeout: Duration,
    started: std::time::Instant,
    message: &Message,
    ctx: Context,
) -> Result<(), Failed> {
    let mut guarded = std::pin::pin!(AssertUnwindSafe(handler.call(message, ctx)).catch_unwind());
    let done = match guarded.as_mut().now_or_never() {
        Some(done) => done,
        None => {
            let left = timeout.saturating_sub(started.elapsed());
            match tokio::time::Instant::now().checked_add(left) {
                Some(deadline) => match tokio::time::timeout_at(deadline, guarded).await {
                    Ok(done) => done,
                    Err(_) => return Err(Failed::timeout(timeout)),
                },
                // A timeout past what the clock holds: none.
                None => guarded.await,
            }
        }
    };
    match done {
        Err(panic) => Err(Failed::panic(panic)),
        Ok(result) => result,
    }
}
