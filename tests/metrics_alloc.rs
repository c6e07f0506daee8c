//! Proves that `MetricsObserver` adds no allocation to a request: each series' key is built once, and an event
//! hands the recorder that key by reference. Measured against the same layers with no observer, so that what a
//! layer itself allocates (a refusal's boxed error) is left out, and with a recorder whose handles do nothing, so
//! that what an exporter allocates is left out too.
#![cfg(all(feature = "metrics", feature = "http"))]
#![allow(unsafe_code)]

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tower::{service_fn, Layer, Service};
use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::{Event, MetricsObserver, Observer, Outcome, Reason};
use tower_backpressure::deadline::{Deadline, DeadlineLayer, PropagateDeadlineLayer};
use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
use tower_backpressure::queue::QueueLayer;
use tower_backpressure::rate::RateLimitLayer;

/// A recorder whose handles do nothing, so that what is counted is the observer's own work; it counts the series
/// recorded into, on this thread, so that a test can tell the observer was told anything at all.
struct Noop;

thread_local! {
    static RECORDED: Cell<u64> = const { Cell::new(0) };
}

fn recorded() -> u64 {
    RECORDED.with(Cell::get)
}

fn note() {
    RECORDED.with(|n| n.set(n.get() + 1));
}

impl Recorder for Noop {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        note();
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        note();
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        note();
        Histogram::noop()
    }
}

fn backend() -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone {
    service_fn(|_req: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))))
}

/// Allocations made by 10 000 requests through `svc` (answered at once, or refused), after a warm-up of 100 that
/// builds the observer's keys and the layers' thread-locals, with the do-nothing recorder installed.
fn allocations_of<S: Service<Request<()>>>(mut svc: S) -> u64 {
    // Built before the count starts (an extension allocates its map): each brings a deadline far off, for the
    // propagating layer; the others ignore it.
    let request = || {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(Deadline::after(Duration::from_secs(3_600)));
        req
    };
    let mut cx = Context::from_waker(Waker::noop());
    let mut cycle = |req| {
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let mut fut = std::pin::pin!(svc.call(req));
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    };
    metrics::with_local_recorder(&Noop, || {
        (0..100).for_each(|_| cycle(request()));
        let batch: Vec<_> = (0..10_000).map(|_| request()).collect();
        counting_alloc::allocations_in(|| batch.into_iter().for_each(&mut cycle)).0
    })
}

/// Checks that `layer` with a `MetricsObserver` (unnamed, then named) allocates no more over 10 000 requests than
/// with none, and that the observer recorded into at least one series a request (so that a layer which stopped
/// telling its observer anything would not pass for one that allocates nothing).
macro_rules! no_more_than_unobserved {
    ($what:literal, |$observer:ident| $layer:expr) => {{
        let unobserved = {
            let $observer = ();
            allocations_of($layer.layer(backend()))
        };
        for named in [false, true] {
            let $observer = if named {
                MetricsObserver::named("payments")
            } else {
                MetricsObserver::new()
            };
            let before = recorded();
            let observed = allocations_of($layer.layer(backend()));
            assert!(
                recorded() - before >= 10_000,
                "{}: {} series recorded for 10 100 requests (named: {named})",
                $what,
                recorded() - before
            );
            assert_eq!(
                observed, unobserved,
                "{}: allocations with a MetricsObserver (named: {named}) against none",
                $what
            );
        }
    }};
}

#[test]
fn layers_allocate_no_more_with_a_metrics_observer_than_without() {
    // Every layer that tells its observer about each request, on the admitted path.
    no_more_than_unobserved!("adaptive", |observer| AdaptiveConcurrencyLayer::builder()
        .initial_limit(1_000)
        .max_limit(1_000)
        .observer(observer)
        .build()
        .unwrap());
    no_more_than_unobserved!("queue", |observer| QueueLayer::builder()
        .limit(1_000)
        .observer(observer)
        .build()
        .unwrap());
    no_more_than_unobserved!("breaker", |observer| CircuitBreakerLayer::builder()
        .observer(observer)
        .build()
        .unwrap());
    no_more_than_unobserved!("deadline", |observer| DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(30))
        .observer(observer)
        .build()
        .unwrap());
    // Under a deadline (the requests bring one) it writes two headers into each request, which allocates (http's
    // storage) with or without an observer.
    no_more_than_unobserved!("propagate_deadline", |observer| {
        PropagateDeadlineLayer::builder()
            .observer(observer)
            .build()
            .unwrap()
    });
    // A monitor that is not running never reports pressure: every request is admitted.
    let monitor = RuntimeMonitor::builder()
        .max_lag(Duration::from_millis(50), Duration::from_millis(10))
        .build()
        .unwrap();
    no_more_than_unobserved!("pressure", |observer| PressureLayer::builder(&monitor)
        .observer(observer)
        .build()
        .unwrap());
    // The rate limiter tells only of refusals: one request an hour lets the warm-up's first through and refuses
    // every other.
    no_more_than_unobserved!("rate", |observer| RateLimitLayer::builder()
        .rate(1, Duration::from_secs(3_600))
        .observer(observer)
        .build()
        .unwrap());
}

/// One event of each kind a request causes, for `layer`.
fn request_events(layer: &'static str) -> [Event; 3] {
    [
        Event::Admitted {
            layer,
            in_flight: 1,
        },
        Event::Completed {
            layer,
            outcome: Outcome::Success,
            latency: Duration::from_millis(3),
            in_flight: 0,
        },
        Event::Rejected {
            layer,
            reason: Reason::Overloaded,
            retry_after: None,
        },
    ]
}

/// Allocations made by recording `events` 1 000 times each through `observer`, after once.
fn allocations_recording(observer: &MetricsObserver, events: &[Event]) -> u64 {
    metrics::with_local_recorder(&Noop, || {
        events.iter().for_each(|e| observer.on_event(e));
        counting_alloc::allocations_in(|| {
            for _ in 0..1_000 {
                events.iter().for_each(|e| observer.on_event(e));
            }
        })
        .0
    })
}

#[test]
fn a_layer_of_your_own_is_recorded_through_keys_built_per_event() {
    let observer = MetricsObserver::new();
    // The crate's layers' keys are built once: nothing per event.
    assert_eq!(
        allocations_recording(&observer, &request_events("queue")),
        0
    );
    // Any other layer name still records, with a key (and its labels) built at each event, as the `metrics` macros
    // build theirs: the counter above would have seen such allocations.
    let own = allocations_recording(&observer, &request_events("my_layer"));
    assert!(own >= 3_000, "{own} allocations for 3 000 events");
}
