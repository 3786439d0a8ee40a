pub use backstop_core::*;
