//! Proves the core's generic path allocates nothing per request: admit, poll, classify, release.
#![allow(unsafe_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use tower_backpressure::core::{
    AnyOk, ErrorMode, Outcome, Permit, Release, Releaser, ResponseFuture,
};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[derive(Default)]
struct Counter(AtomicUsize);

impl Release for Counter {
    fn release(&self, outcome: Outcome, _latency: Duration, _tag: u64) {
        assert_eq!(outcome, Outcome::Success);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn cycle(owner: &Releaser) {
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
    // Built once, as a layer does; cloning it per permit must not allocate.
    let releaser = Releaser::new(owner.clone());
    // Warm up: thread-locals (clock context, the permits' epoch) are set up lazily on first use.
    for _ in 0..10 {
        cycle(&releaser);
    }
    let (allocations, ()) = counting_alloc::allocations_in(|| {
        for _ in 0..10_000 {
            cycle(&releaser);
        }
    });
    assert_eq!(
        allocations, 0,
        "heap allocations in 10 000 admit/complete cycles"
    );
    assert_eq!(
        owner.0.load(Ordering::Relaxed),
        10_010,
        "every cycle released exactly once"
    );
}

#[test]
fn the_counter_sees_allocations() {
    let (allocations, boxed) =
        counting_alloc::allocations_in(|| std::hint::black_box(Box::new(1u8)));
    assert_eq!(*boxed, 1);
    assert_eq!(allocations, 1);
}
