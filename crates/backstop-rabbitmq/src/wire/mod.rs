//! What lapin reads from the broker, made safe before it parses it: see
//! [`scan`] for why, [`header_frame`] for what is mended and [`stream`]
//! for where.

mod connect;
pub(crate) mod header_frame;
mod method_frame;
pub(crate) mod scan;
mod stream;

pub(crate) use connect::connect;
