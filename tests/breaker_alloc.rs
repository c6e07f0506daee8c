//! Proves the circuit breaker's closed path allocates nothing per call: admit, call, poll, classify, count.
#![allow(unsafe_code)]

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::future::Future;
use std::task::{Context, Poll, Waker};

use tower::Service;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::CircuitState;
use tower_layer::Layer;

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
        // Warm up: thread-locals (clock context) are set up lazily on first use, and a service instance makes
        // its own permit releaser, once, at its 64th request.
        for i in 1..100 {
            cycle(i);
        }
        let (allocations, ()) = counting_alloc::allocations_in(|| {
            for i in 1..10_000 {
                cycle(i);
            }
        });
        let snap = handle.snapshot();
        assert_eq!(snap.state, CircuitState::Closed);
        assert!(
            snap.calls >= 10 && snap.failures > 0,
            "the window counted: {snap:?}"
        );
        assert_eq!(
            allocations, 0,
            "heap allocations in 10 000 closed-path calls"
        );
    }
}
