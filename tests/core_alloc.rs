//! Proves the core's generic path allocates nothing per request: admit, poll, classify, release.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use tower_backpressure::core::{AnyOk, ErrorMode, Outcome, Permit, Release, ResponseFuture};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Default)]
struct Counter(AtomicUsize);

impl Release for Counter {
    fn release(&self, outcome: Outcome, _latency: Duration, _tag: u64) {
        assert_eq!(outcome, Outcome::Success);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn cycle(owner: &Arc<Counter>) {
    let permit = Permit::new(owner.clone(), 0);
    let inner = std::future::ready(Ok::<u32, std::convert::Infallible>(7));
    let mut fut = std::pin::pin!(ResponseFuture::admitted(
        inner,
        Some(permit),
        AnyOk,
        ErrorMode
    ));
    let out = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(matches!(out, std::task::Poll::Ready(Ok(7))));
}

#[test]
fn admit_complete_cycle_allocates_nothing() {
    let owner = Arc::new(Counter::default());
    // Warm up: thread-locals (clock context) are set up lazily on first use.
    for _ in 0..10 {
        cycle(&owner);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..10_000 {
        cycle(&owner);
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(
        after - before,
        0,
        "heap allocations in 10 000 admit/complete cycles"
    );
    assert_eq!(
        owner.0.load(Ordering::Relaxed),
        10_010,
        "every cycle released exactly once"
    );
}
