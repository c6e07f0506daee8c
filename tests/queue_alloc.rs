//! Proves the queue allocates nothing per request on its fast path (nobody queued, below the limit), and that its
//! queueing path allocates only the queued request's own state (one block, freed when it leaves the queue) while
//! the wait queue reuses its memory once warmed up instead of growing.
#![allow(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tower::Service;
use tower_backpressure::queue::QueueLayer;
use tower_layer::Layer;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{allocations, deallocations};

fn poll<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

fn ready(svc: &mut impl Service<u32>) {
    assert!(matches!(
        svc.poll_ready(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Ok(()))
    ));
}

fn fast<S: Service<u32, Response = u32>>(svc: &mut S) {
    ready(svc);
    let mut fut = std::pin::pin!(svc.call(7));
    assert!(matches!(poll(fut.as_mut()), Poll::Ready(Ok(7))));
}

fn queued<S: Service<u32, Response = u32>>(svc: &mut S) {
    ready(svc);
    let mut first = std::pin::pin!(svc.call(1));
    ready(svc);
    let mut second = std::pin::pin!(svc.call(2));
    assert!(poll(second.as_mut()).is_pending());
    assert!(matches!(poll(first.as_mut()), Poll::Ready(Ok(1))));
    assert!(matches!(poll(second.as_mut()), Poll::Ready(Ok(2))));
}

#[test]
fn fast_path_allocates_nothing_and_the_queue_does_not_grow() {
    let layer = QueueLayer::builder().limit(4).max_depth(8).build().unwrap();
    let mut svc = layer.layer(tower::service_fn(|x: u32| {
        std::future::ready(Ok::<_, Infallible>(x))
    }));

    // Warm up, past the service instance's one allocation: its own permit releaser, at its 64th request.
    for _ in 0..100 {
        fast(&mut svc);
    }
    let before = allocations();
    for _ in 0..10_000 {
        fast(&mut svc);
    }
    assert_eq!(allocations() - before, 0, "fast path allocated");

    // The queueing path: one request holds the only slot, the next waits, the first finishes and hands its slot
    // over. Queue timers need a runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let layer = QueueLayer::builder().limit(1).max_depth(8).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|x: u32| {
        std::future::ready(Ok::<_, Infallible>(x))
    }));
    // Two requests each, so past the instance's 64th request and the releaser it makes then.
    for _ in 0..50 {
        queued(&mut svc);
    }
    let (before, freed_before) = (allocations(), deallocations());
    for _ in 0..10_000 {
        queued(&mut svc);
    }
    let (allocated, freed) = (allocations() - before, deallocations() - freed_before);
    // One block per queued request: its state (request, service, timer) is boxed so that the future every
    // admitted request moves stays small. Nothing else: the wait queue's slab is reused.
    assert_eq!(
        allocated, 10_000,
        "the queueing path allocated {allocated} times for 10 000 queued requests"
    );
    assert_eq!(freed, allocated, "queued state was not freed");
    let s = handle.snapshot();
    assert_eq!(
        (s.queued, s.completed, s.in_flight, s.depth),
        (10_050, 20_100, 0, 0)
    );
}
