#![allow(unsafe_code)]
//! The adaptive limiter's generic path allocates nothing per admitted request once warmed up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use futures::FutureExt;
use tower::{service_fn, Layer, Service};
use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
use tower_backpressure::core::BoxError;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a thread-local
// `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn admitted_requests_allocate_nothing() {
    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(64)
        .min_samples(8)
        .window(Duration::from_nanos(1))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|x: u64| async move { Ok::<_, BoxError>(x) }));
    let mut run = |n: u64| {
        for i in 0..n {
            futures::future::poll_fn(|cx| svc.poll_ready(cx))
                .now_or_never()
                .unwrap()
                .unwrap();
            assert_eq!(svc.call(i).now_or_never().unwrap().unwrap(), i);
        }
    };
    run(1_000);
    let windows_before = handle.snapshot().windows;
    let before = allocations();
    run(10_000);
    let after = allocations();
    assert!(
        handle.snapshot().windows > windows_before,
        "windows closed during the measured run"
    );
    assert_eq!(
        after - before,
        0,
        "heap allocations for 10 000 admitted requests"
    );
}
