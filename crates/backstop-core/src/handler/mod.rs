//! The one trait teams implement, its closure form, and payload decoding.
//!
//! # Fallbacks
//!
//! A handler that cannot do the full job may still settle the message:
//! degrade inside the handler (primary → cached → default), and when even
//! that is not good enough, return a fallback outcome instead of an error:
//! [`HandlerError::park`] publishes the message to a parking destination
//! (confirmed, then acked; `outcome="parked"`), [`HandlerError::skip`] acks it
//! with a logged reason (`outcome="skipped"`). Neither is retried nor
//! dead-lettered, and neither counts as a handler error.
//!
//! ```
//! use backstop_core::{Context, Handler, HandlerError, Json};
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Quote { sku: String, customer_tier: Option<String> }
//!
//! struct Pricing { cache: Cache }
//!
//! impl Handler for Pricing {
//!     type Payload = Json<Quote>;
//!
//!     async fn handle(&self, Json(q): Json<Quote>, _: Context) -> Result<(), HandlerError> {
//!         // 1. Primary: the pricing service, with a short timeout of its own.
//!         let price = match tokio::time::timeout(Duration::from_millis(300), pricing_api(&q.sku)).await {
//!             Ok(Ok(price)) => price,
//!             // 2. Cached: the last price we saw, if it is fresh enough.
//!             _ => match self.cache.get(&q.sku) {
//!                 Some(price) => price,
//!                 // 3. Default: list price for customers without a contract.
//!                 None if q.customer_tier.is_none() => list_price(&q.sku),
//!                 // 4. Error: nothing safe to charge. Park it for a later run
//!                 //    instead of burning retries while pricing is down.
//!                 None => {
//!                     return Err(HandlerError::park(
//!                         "quotes.parked",
//!                         format!("no price for {} (pricing down, not cached)", q.sku),
//!                     ));
//!                 }
//!             },
//!         };
//!         if price == 0 {
//!             return Err(HandlerError::skip("withdrawn product: nothing to quote"));
//!         }
//!         send_quote(&q.sku, price).await.map_err(HandlerError::transient)
//!     }
//! }
//! # struct Cache;
//! # impl Cache { fn get(&self, _: &str) -> Option<u64> { None } }
//! # async fn pricing_api(_: &str) -> Result<u64, std::io::Error> { Ok(1) }
//! # fn list_price(_: &str) -> u64 { 1 }
//! # async fn send_quote(_: &str, _: u64) -> Result<(), std::io::Error> { Ok(()) }
//! ```

pub(crate) mod context;
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
