//! Counts heap allocations on the rate limiter's request path with a counting global allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::time::Duration;

use tower::{service_fn, Layer, Service, ServiceExt};
use tower_backpressure::rate::RateLimitLayer;

struct Counting;

thread_local! {
    // Per thread, so other tests running in parallel do not count; `const` so the counter itself never
    // allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        let _ = LIVE_BYTES.try_with(|n| n.set(n.get() + layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE_BYTES.try_with(|n| n.set(n.get() - layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        let _ = LIVE_BYTES.try_with(|n| n.set(n.get() + new_size as i64 - layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn live_bytes() -> i64 {
    LIVE_BYTES.with(Cell::get)
}

#[test]
fn the_counter_sees_allocations() {
    let (before, bytes) = (allocations(), live_bytes());
    let boxed = std::hint::black_box(Box::new([0u8; 64]));
    assert_eq!(allocations() - before, 1);
    assert_eq!(live_bytes() - bytes, 64);
    drop(boxed);
    assert_eq!(live_bytes(), bytes);
}

#[tokio::test(start_paused = true)]
async fn global_limit_admits_without_allocating() {
    let layer = RateLimitLayer::builder()
        .rate(1_000_000, Duration::from_secs(1))
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|n: u64| async move { Ok::<_, Infallible>(n) }));
    // Warm up: first clock reads and the like.
    for n in 0..10 {
        svc.ready().await.unwrap().call(n).await.unwrap();
    }
    let before = allocations();
    for n in 0..10_000 {
        assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
    }
    // Read before printing: printing allocates.
    let allocated = allocations() - before;
    println!(
        "global limit: {} allocations per admitted request",
        allocated as f64 / 10_000.0
    );
    assert_eq!(allocated, 0, "the global admission path must not allocate");
    assert_eq!(layer.handle().snapshot().admitted, 10_010);
}

#[tokio::test(start_paused = true)]
async fn keyed_limit_memory_stays_flat_past_the_cap() {
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(60))
        .key(|n: &u64| Some(*n))
        .max_keys(10_000)
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|n: u64| async move { Ok::<_, Infallible>(n) }));
    let mut next = 0u64;
    let mut flood = async |count: u64| {
        for _ in 0..count {
            svc.ready().await.unwrap().call(next).await.unwrap();
            next += 1;
        }
    };
    // Fill to the cap and churn through the store once, so its tables have reached their final size.
    flood(100_000).await;
    let bytes = live_bytes();
    let before = allocations();
    flood(100_000).await;
    let grown = live_bytes() - bytes;
    let allocated = allocations() - before;
    println!("keyed limit, 100 000 new keys past the cap: {allocated} allocations, {grown} bytes more in use");
    assert_eq!(layer.handle().snapshot().tracked_keys, 10_000);
    assert_eq!(
        grown, 0,
        "memory in use must not grow with new keys past the cap"
    );
    assert_eq!(
        allocated, 0,
        "evicting and inserting reuses the store's slots"
    );
}
