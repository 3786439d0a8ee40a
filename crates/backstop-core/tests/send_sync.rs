//! Public types are Send/Sync where users need them to be (tokio's
//! async_send_sync habit): a runner must be spawnable, errors must cross tasks.

use backstop_core::memory::{MemoryBroker, MemoryStream};
use backstop_core::*;
use bytes::Bytes;

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn send_sync<T: Send + Sync>() {}
fn send_value<T: Send>(_: &T) {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<Message>();
    send_sync::<Headers>();
    send_sync::<HandlerError>();
    send_sync::<TransportError>();
    send_sync::<PublishError>();
    send_sync::<ConfigError>();
    send_sync::<RetryPolicy>();
    send_sync::<DelayTier>();
    send_sync::<Context>();
    send_sync::<Subscription>();
    send_sync::<RunnerStats>();
    send_sync::<MemoryBroker>();
    send_sync::<Runner<MemoryBroker>>();
    send_sync::<HandlerOptions>();
    send::<Delivery>();
    send::<MemoryStream>();
    sync::<RetryMeta>();
}

#[test]
fn the_run_future_is_send() {
    let runner = Runner::builder(MemoryBroker::new())
        .with_handler("q", handler_fn(|_: Bytes, _: Context| async { Ok(()) }))
        .build()
        .unwrap();
    let fut = runner.run(std::future::pending());
    send_value(&fut);
}
