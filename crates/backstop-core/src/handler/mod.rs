//! The one trait teams implement, its closure form, and payload decoding.

mod context;
mod decode;

pub use context::Context;
pub use decode::{Decode, DecodeError, Json};

use crate::error::HandlerError;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

/// Handles one decoded message. The runner acks, retries and dead-letters from
/// the result: a handler never acks by itself.
///
/// ```
/// use backstop_core::{Context, Handler, HandlerError, Json, ResultExt};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Order { id: u64, quantity: i32 }
///
/// struct Orders;
///
/// impl Handler for Orders {
///     type Payload = Json<Order>;
///
///     async fn handle(&self, Json(order): Json<Order>, ctx: Context) -> Result<(), HandlerError> {
///         if order.quantity <= 0 {
///             // Validation: retrying cannot help, dead-letter at once.
///             return Err(HandlerError::permanent(format!("order {} has no quantity", order.id)));
///         }
///         reserve_stock(order.id).await.transient()?; // a blip: retry
///         let _ = ctx.attempt();
///         Ok(())
///     }
/// }
/// # async fn reserve_stock(_: u64) -> Result<(), std::io::Error> { Ok(()) }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// What the payload decodes into: [`Json<T>`] (serde), `bytes::Bytes`,
    /// `String`, or the whole [`Message`](crate::Message). A payload that does
    /// not decode never reaches the handler: it is dead-lettered as `poison`.
    type Payload: Decode;

    /// Handles one message.
    fn handle(
        &self,
        payload: Self::Payload,
        ctx: Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A handler made from a closure; see [`handler_fn`].
pub struct HandlerFn<F, P> {
    f: F,
    _payload: PhantomData<fn() -> P>,
}

impl<F, P> fmt::Debug for HandlerFn<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("payload", &std::any::type_name::<P>())
            .finish()
    }
}

/// A handler from an async closure.
///
/// ```
/// use backstop_core::{handler_fn, Context, HandlerError, Json};
/// let h = handler_fn(|Json(n): Json<u32>, _ctx: Context| async move {
///     if n == 0 { Err(HandlerError::permanent("zero")) } else { Ok(()) }
/// });
/// # let _ = h;
/// ```
pub fn handler_fn<P, F, Fut>(f: F) -> HandlerFn<F, P>
where
    P: Decode,
    F: Fn(P, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn {
        f,
        _payload: PhantomData,
    }
}

impl<P, F, Fut> Handler for HandlerFn<F, P>
where
    P: Decode,
    F: Fn(P, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Payload = P;

    fn handle(
        &self,
        payload: P,
        ctx: Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(payload, ctx)
    }
}
