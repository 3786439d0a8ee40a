//! The layers right around the handler: decode (poison), timeout, panic guard.

use crate::error::{ErrorClass, HandlerError, error_chain};
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
}

impl Failed {
    fn from_handler(e: HandlerError) -> Self {
        let class = e.class();
        let retry_after = e.retry_after_hint();
        let error_type = e.type_name().to_owned();
        let source = e.into_source();
        Self {
            class,
            retry_after,
            error_type,
            message: source.to_string(),
            chain: error_chain(source.as_ref()),
        }
    }

    fn poison(e: DecodeError) -> Self {
        Self {
            class: ErrorClass::Poison,
            retry_after: None,
            error_type: e.type_name.to_owned(),
            message: e.to_string(),
            chain: error_chain(&e),
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
        }
    }

    fn panic(payload: Box<dyn Any + Send>) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic with a non-string payload".to_owned());
        let message = format!("handler panicked: {text}");
        Self {
            class: ErrorClass::Panic,
            retry_after: None,
            error_type: "backstop::Panic".to_owned(),
            chain: message.clone(),
            message,
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

/// Runs one invocation under the timeout and the panic guard.
pub(crate) async fn invoke(
    handler: &dyn DynHandler,
    timeout: Duration,
    message: &Message,
    ctx: Context,
) -> Result<(), Failed> {
    let guarded = AssertUnwindSafe(handler.call(message, ctx)).catch_unwind();
    match tokio::time::timeout(timeout, guarded).await {
        Err(_) => Err(Failed::timeout(timeout)),
        Ok(Err(panic)) => Err(Failed::panic(panic)),
        Ok(Ok(result)) => result,
    }
}
