//! Proves the circuit breaker's closed path allocates nothing per call: admit, call, poll, classify, count.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use tower::Service;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::CircuitState;
use tower_layer::Layer;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Only the test's own thread is counted: the harness allocates on its threads whenever it likes.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Zero-sized, so boxing it into a `BoxError` allocates nothing and only the breaker's own work is measured.
#[derive(Debug)]
struct Boom;

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}

impl std::error::Error for Boom {}

#[test]
fn closed_path_allocates_nothing() {
    // Both windows, and a failure now and then so the counts and the trip check really run.
    let count = CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(10)
        .build()
        .unwrap();
    let time = CircuitBreakerLayer::builder()
        .time_window(10, std::time::Duration::from_secs(1))
        .minimum_calls(10)
        .build()
        .unwrap();
    for layer in [count, time] {
        let handle = layer.handle();
        let mut svc = layer.layer(tower::service_fn(|fail: bool| {
            std::future::ready(if fail { Err(Boom) } else { Ok(7u32) })
        }));
        let mut cycle = |i: usize| {
            let mut cx = Context::from_waker(Waker::noop());
            assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
            let mut fut = std::pin::pin!(svc.call(i % 10 == 0));
            let out = fut.as_mut().poll(&mut cx);
            assert!(matches!(out, Poll::Ready(Ok(7)) | Poll::Ready(Err(_))));
        };
        // Warm up: thread-locals (clock context) are set up lazily on first use.
        for i in 1..10 {
            cycle(i);
        }
        COUNTING.with(|c| c.set(true));
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for i in 1..10_000 {
            cycle(i);
        }
        let after = ALLOCATIONS.load(Ordering::Relaxed);
        COUNTING.with(|c| c.set(false));
        let snap = handle.snapshot();
        assert_eq!(snap.state, CircuitState::Closed);
        assert!(
            snap.calls >= 10 && snap.failures > 0,
            "the window counted: {snap:?}"
        );
        assert_eq!(
            after - before,
            0,
            "heap allocations in 10 000 closed-path calls"
        );
    }
}
