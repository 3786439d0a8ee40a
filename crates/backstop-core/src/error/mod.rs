//! Handler errors and their classes.

mod class;

pub use class::{DeadLetterReason, ErrorClass, UnknownName};

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A boxed error, as handlers and transports carry them.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What a handler tells the runner about a failure: the class decides retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Worth retrying: timeouts, 5xx, disconnects.
    Transient,
    /// Never worth retrying: validation, 4xx. Dead-lettered at once.
    Permanent,
    /// Retry, but not before this long (a 429 with a hint).
    RetryAfter(Duration),
    /// Fallback: publish the message to a parking destination and ack it
    /// (served degraded; someone looks at it later). Never retried.
    Park,
    /// Fallback: ack the message without effect, with a reason. Never retried.
    Skip,
}

/// The error a [`Handler`](crate::Handler) returns. It keeps the source error,
/// its type name and its `source()` chain, which end up in the failure headers.
///
/// ```
/// use backstop_core::{HandlerError, ErrorClass};
/// use std::time::Duration;
/// let e = HandlerError::retry_after(Duration::from_secs(2), "rate limited");
/// assert_eq!(e.class(), ErrorClass::RetryAfter);
/// assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(2)));
/// assert_eq!(e.to_string(), "rate limited");
/// ```
///
/// It is transparent, as thiserror's `#[error(transparent)]`: it displays as
/// its source error and its `source()` is that error's, so a report of the
/// chain (the `backstop-error-chain` header, `anyhow`'s `{:#}`) shows each
/// cause once.
#[derive(Debug)]
pub struct HandlerError {
    kind: HandlerErrorKind,
    type_name: Cow<'static, str>,
    dependency: Option<Cow<'static, str>>,
    park_to: Option<Cow<'static, str>>,
    source: BoxError,
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}

impl HandlerError {
    fn new<E: Into<BoxError>>(kind: HandlerErrorKind, error: E) -> Self {
        Self {
            kind,
            type_name: Cow::Borrowed(std::any::type_name::<E>()),
            dependency: None,
            park_to: None,
            source: error.into(),
        }
    }

    /// A failure worth retrying (class `transient`).
    pub fn transient<E: Into<BoxError>>(error: E) -> Self {
        Self::new(HandlerErrorKind::Transient, error)
    }

    /// A failure that retrying cannot fix (class `permanent`): dead-lettered at once.
    pub fn permanent<E: Into<BoxError>>(error: E) -> Self {
        Self::new(HandlerErrorKind::Permanent, error)
    }

    /// Retry no earlier than `after` (class `retry-after`).
    pub fn retry_after<E: Into<BoxError>>(after: Duration, error: E) -> Self {
        Self::new(HandlerErrorKind::RetryAfter(after), error)
    }

    /// Fallback: publish the message to `destination` (a queue or topic the
    /// service owns, e.g. `orders.parked`) with the reason in its failure
    /// headers, and ack it once the broker confirmed the copy. Counted as
    /// `outcome="parked"`; not retried, not dead-lettered.
    pub fn park<E: Into<BoxError>>(destination: impl Into<Cow<'static, str>>, reason: E) -> Self {
        let mut e = Self::new(HandlerErrorKind::Park, reason);
        e.park_to = Some(destination.into());
        e
    }

    /// Fallback: ack the message without effect, logging `reason`. Counted as
    /// `outcome="skipped"`; not retried, not dead-lettered.
    pub fn skip<E: Into<BoxError>>(reason: E) -> Self {
        Self::new(HandlerErrorKind::Skip, reason)
    }

    /// Where [`park`](Self::park) sends the message.
    pub fn park_destination(&self) -> Option<&str> {
        self.park_to.as_deref()
    }

    /// Overrides the type name recorded in `backstop-error-type`.
    #[must_use]
    pub fn with_type_name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.type_name = name.into();
        self
    }

    /// Names the dependency the call failed on (`"inventory-api"`): with a
    /// [`CircuitBreaker`](crate::CircuitBreaker), each named dependency gets a
    /// breaker of its own, so its failures are counted apart from the others
    /// and the logs say which one is down. Any open breaker pauses the handler.
    ///
    /// ```
    /// use backstop_core::HandlerError;
    /// let e = HandlerError::transient("connection refused").with_dependency("inventory-api");
    /// assert_eq!(e.dependency(), Some("inventory-api"));
    /// ```
    #[must_use]
    pub fn with_dependency(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.dependency = Some(name.into());
        self
    }

    /// The dependency named with [`with_dependency`](Self::with_dependency).
    pub fn dependency(&self) -> Option<&str> {
        self.dependency.as_deref()
    }

    /// The kind the handler chose.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// The class the retry policy decides on.
    pub fn class(&self) -> ErrorClass {
        match self.kind {
            HandlerErrorKind::Transient => ErrorClass::Transient,
            HandlerErrorKind::Permanent | HandlerErrorKind::Park | HandlerErrorKind::Skip => {
                ErrorClass::Permanent
            }
            HandlerErrorKind::RetryAfter(_) => ErrorClass::RetryAfter,
        }
    }

    /// True for transient and retry-after errors.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            HandlerErrorKind::Transient | HandlerErrorKind::RetryAfter(_)
        )
    }

    /// True for permanent errors.
    pub fn is_permanent(&self) -> bool {
        self.kind == HandlerErrorKind::Permanent
    }

    /// The retry-after hint, if any.
    pub fn retry_after_hint(&self) -> Option<Duration> {
        match self.kind {
            HandlerErrorKind::RetryAfter(d) => Some(d),
            _ => None,
        }
    }

    /// The type name of the error the handler wrapped.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The wrapped error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

/// `?`-friendly classification: `serde_json::from_str(s).permanent()?`.
pub trait ResultExt<T> {
    /// Maps the error to [`HandlerError::transient`].
    fn transient(self) -> Result<T, HandlerError>;
    /// Maps the error to [`HandlerError::permanent`].
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}

/// Display of `error` and each of its causes, one a line.
pub(crate) fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        out.push('\n');
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("payment failed")]
    struct PaymentFailed(#[source] std::io::Error);

    #[test]
    fn classes_follow_the_constructor() {
        assert_eq!(HandlerError::transient("x").class(), ErrorClass::Transient);
        assert_eq!(HandlerError::permanent("x").class(), ErrorClass::Permanent);
        assert!(HandlerError::permanent("x").is_permanent());
        assert!(HandlerError::transient("x").is_transient());
        let r = HandlerError::retry_after(Duration::from_millis(5), "x");
        assert_eq!(r.class(), ErrorClass::RetryAfter);
        assert!(r.is_transient());
    }

    #[test]
    fn type_name_and_chain_come_from_the_source_error() {
        let e = HandlerError::transient(PaymentFailed(std::io::Error::other("connection reset")));
        assert!(
            e.type_name().ends_with("PaymentFailed"),
            "{}",
            e.type_name()
        );
        assert_eq!(e.to_string(), "payment failed");
        // Transparent: each cause once, whether read from the handler
        // error or from its source.
        assert_eq!(error_chain(&e), "payment failed\nconnection reset");
        let source = e.into_source();
        assert_eq!(
            error_chain(source.as_ref()),
            "payment failed\nconnection reset"
        );
    }

    #[test]
    fn result_ext_classifies() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("bad"));
        assert!(r.permanent().unwrap_err().is_permanent());
    }
}

/// Configuration refused at start; names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{field}`: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The field, as a dotted path (`policy.tiers[1].name`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// A refusal of `field` because of `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same refusal with its field inside `prefix`
    /// (`handlers[orders]` + `timeout` = `handlers[orders].timeout`).
    #[must_use]
    pub fn within(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            reason: self.reason,
        }
    }
}
