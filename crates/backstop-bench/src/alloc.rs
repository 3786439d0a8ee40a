//! Counts heap allocations of the whole process (a child consumer), for the
//! `allocs/msg` column: allocations made inside the timed window divided by
//! the messages of that window.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// `std::alloc::System` plus one relaxed counter increment per allocation
/// (`alloc`, `alloc_zeroed` and `realloc` each count as one).
#[derive(Debug)]
pub(crate) struct Counting;

// The workspace forbids unsafe code; `GlobalAlloc` is an unsafe trait, so a
// counting allocator cannot exist without this one `unsafe impl`. Every method
// forwards to `System` with the caller's own arguments, which upholds the
// contract `System` documents; the counter has no effect on memory.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's (GlobalAlloc::alloc).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's (GlobalAlloc::alloc_zeroed).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations made by this process so far (Rust's heap only: librdkafka's
/// own `malloc` calls from C are not seen).
pub(crate) fn count() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}
