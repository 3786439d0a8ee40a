//! Panics outside the handler (a Backstop bug, or a backend's, that one
//! message triggers): caught around each message's processing and routing,
//! remembered by message id, and ended through the normal decision.
//!
//! The delivery's [`Settlement`](crate::transport::Settlement) gives the
//! message back as the panic unwinds through it. When it comes again, the
//! ledger says it panicked: the first time, the panic counts as a failed
//! attempt of class `panic` and the policy decides (retry, tier, DLQ);
//! from the second, the handler is not run again and the message goes to
//! the DLQ as a stub (its own headers and payload, the failure headers, no
//! origin or attempt headers), built on the shortest path there is.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

thread_local! {
    /// Where the last panic on this thread happened (see [`install_hook`]).
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records each panic's location for [`take_location`], then does what the
/// hook in place before did (printing it, by default). Installed once per
/// process, when the first runner is built.
pub(crate) fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location() {
                let at = format!("{}:{}:{}", l.file(), l.line(), l.column());
                LAST.with(|last| *last.borrow_mut() = Some(at));
            }
            previous(info);
        }));
    });
}

/// The location of the last panic on this thread, if the hook saw one.
pub(crate) fn take_location() -> Option<String> {
    LAST.with(|last| last.borrow_mut().take())
}

/// What a panic said: its `&str` or `String` payload.
pub(crate) fn payload_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned())
}

/// The ledger remembers at most this many messages (the oldest go first).
const REMEMBERED: usize = 4096;

/// A message whose processing panicked outside the handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Panicked {
    /// How many times.
    pub(crate) count: u32,
    /// The last panic: where and what.
    pub(crate) what: String,
}

/// Messages whose processing panicked, by id.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    entries: Mutex<(HashMap<String, Panicked>, VecDeque<String>)>,
    /// Entries now: the path of every message reads only this while the
    /// ledger is empty.
    len: AtomicUsize,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Panicked>, VecDeque<String>)> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a panic of message `id`; returns how many it has had.
    pub(crate) fn record(&self, id: &str, what: String) -> u32 {
        let mut guard = self.lock();
        let (map, order) = &mut *guard;
        let count = match map.get_mut(id) {
            Some(p) => {
                p.count = p.count.saturating_add(1);
                p.what = what;
                p.count
            }
            None => {
                if map.len() >= REMEMBERED
                    && let Some(oldest) = order.pop_front()
                {
                    map.remove(&oldest);
                }
                map.insert(id.to_owned(), Panicked { count: 1, what });
                order.push_back(id.to_owned());
                1
            }
        };
        self.len.store(map.len(), Ordering::Release);
        count
    }

    /// Whether message `id` panicked before, and how.
    pub(crate) fn get(&self, id: impl FnOnce() -> String) -> Option<Panicked> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lock().0.get(&id()).cloned()
    }

    /// Message `id` is settled: nothing more to remember.
    pub(crate) fn forget(&self, id: impl FnOnce() -> String) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let id = id();
        let mut guard = self.lock();
        let (map, order) = &mut *guard;
        if map.remove(&id).is_some() {
            order.retain(|o| *o != id);
        }
        self.len.store(map.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_counts_forgets_and_stays_bounded() {
        let l = Ledger::default();
        assert_eq!(l.get(|| "a".into()), None);
        assert_eq!(l.record("a", "x".into()), 1);
        assert_eq!(l.record("a", "y".into()), 2);
        assert_eq!(
            l.get(|| "a".into()),
            Some(Panicked {
                count: 2,
                what: "y".into()
            })
        );
        l.forget(|| "a".into());
        assert_eq!(l.get(|| "a".into()), None);
        for i in 0..=REMEMBERED {
            l.record(&i.to_string(), String::new());
        }
        assert_eq!(l.get(|| "0".into()), None, "the oldest went first");
        assert!(l.get(|| REMEMBERED.to_string()).is_some());
        assert_eq!(l.len.load(Ordering::Acquire), REMEMBERED);
    }

    #[test]
    fn the_hook_keeps_where_a_panic_happened() {
        install_hook();
        let caught = std::panic::catch_unwind(|| panic!("boom"));
        let payload = caught.expect_err("panicked");
        assert_eq!(payload_text(payload.as_ref()), "boom");
        let at = take_location().expect("a location");
        assert!(at.starts_with(file!()), "{at}");
        assert_eq!(take_location(), None, "taken");
    }
}
