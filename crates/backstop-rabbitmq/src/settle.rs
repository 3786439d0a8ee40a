//! Pipelined acks and nacks for a subscription's channel: a settlement is
//! handed to lapin and the handling task goes on at once, instead of waiting
//! for lapin to have sent it. The stream keeps what is still on its way and
//! waits for all of it before it closes its channel, so none is cut off.

use futures_util::FutureExt as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

type Sending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Prune the finished settlements every this many new ones.
const PRUNE_EVERY: usize = 256;

/// The settlements of one channel that lapin has not finished sending.
#[derive(Default)]
pub(crate) struct Settlements {
    sending: Mutex<Vec<Sending>>,
    started: AtomicUsize,
}

impl Settlements {
    fn sending(&self) -> std::sync::MutexGuard<'_, Vec<Sending>> {
        self.sending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `settle` (its first poll hands the frame to lapin) and keeps it
    /// if lapin has not finished with it yet.
    pub(crate) fn start(&self, settle: impl Future<Output = ()> + Send + 'static) {
        let mut settle: Sending = Box::pin(settle);
        if (&mut settle).now_or_never().is_some() {
            return;
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let mut sending = self.sending();
        if n % PRUNE_EVERY == PRUNE_EVERY - 1 {
            sending.retain_mut(|s| s.as_mut().now_or_never().is_none());
        }
        sending.push(settle);
    }

    /// Waits until lapin has sent every settlement started so far.
    pub(crate) async fn flushed(&self) {
        let sending = std::mem::take(&mut *self.sending());
        futures_util::future::join_all(sending).await;
    }
}
