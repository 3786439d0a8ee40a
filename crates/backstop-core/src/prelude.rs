//! What a handler and the code that runs it use, in one import:
//!
//! ```
//! use backstop_core::prelude::*;
//!
//! struct Orders;
//!
//! impl Handler for Orders {
//!     type Payload = Json<serde_json::Value>;
//!     async fn handle(&self, Json(order): Json<serde_json::Value>, _ctx: Context) -> Result<(), HandlerError> {
//!         order.get("id").ok_or_else(|| HandlerError::permanent("no id"))?;
//!         Ok(())
//!     }
//! }
//! ```

pub use crate::error::{ErrorClass, HandlerError, ResultExt};
pub use crate::handler::{Context, Decode, Handler, Json, handler_fn};
pub use crate::message::Message;
pub use crate::retry::{Backoff, DelayTier, RetryPolicy};
pub use crate::runner::{HandlerOptions, Runner};
pub use crate::transport::{Publisher, Transport};
