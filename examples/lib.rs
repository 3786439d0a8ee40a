//! Shared pieces of the examples, so that tests can run them in-process.

#[path = "quickstart/mod.rs"]
pub mod quickstart;
