//! Errors as one line of text with their causes, for logs and the stored
//! `last_error`/`reason` (an error shows its own context; its causes come
//! from `source()`).

/// `e`, then each cause after a colon.
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
