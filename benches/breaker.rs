//! The circuit breaker's closed path against failsafe's, and two threads through one breaker against tower's
//! `ConcurrencyLimit`.
//!
//! Run with: cargo bench --bench breaker

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use failsafe::futures::CircuitBreaker as _;
use tower::Service;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_layer::Layer;

fn poll_ready_now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("ready futures only"),
    }
}

fn inner() -> impl Service<
    u32,
    Response = u32,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<u32, std::convert::Infallible>>,
> + Clone {
    tower::service_fn(|x: u32| std::future::ready(Ok(x)))
}

/// One call through `svc`: ready, call, poll to completion.
fn call<S: Service<u32>>(svc: &mut S, x: u32) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => unreachable!("always ready"),
    }
    poll_ready_now(svc.call(x))
}

fn closed_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("closed_path");
    // Every admitted call reads the clock twice (its permit measures latency, for the slow-call rule).
    g.bench_function("one clock read (reference)", |b| {
        b.iter(tokio::time::Instant::now)
    });
    g.bench_function("one std clock read (reference)", |b| {
        b.iter(std::time::Instant::now)
    });
    let mut bare = inner();
    g.bench_function("no breaker", |b| b.iter(|| call(&mut bare, black_box(7))));

    let mut ours = CircuitBreakerLayer::builder()
        .build()
        .unwrap()
        .layer(inner());
    g.bench_function("tower-backpressure", |b| {
        b.iter(|| call(&mut ours, black_box(7)))
    });

    let mut ours_time = CircuitBreakerLayer::builder()
        .time_window(10, Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(inner());
    g.bench_function("tower-backpressure, time window", |b| {
        b.iter(|| call(&mut ours_time, black_box(7)))
    });

    let mut ours_minute = CircuitBreakerLayer::builder()
        .time_window(60, Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(inner());
    g.bench_function("tower-backpressure, time window of 60 buckets", |b| {
        b.iter(|| call(&mut ours_minute, black_box(7)))
    });

    let failsafe = failsafe::Config::new().build();
    let mut bare = inner();
    g.bench_function("failsafe", |b| {
        b.iter(|| {
            let mut cx = Context::from_waker(Waker::noop());
            let _ = bare.poll_ready(&mut cx);
            poll_ready_now(failsafe.call(bare.call(black_box(7))))
        })
    });
    g.finish();
}

/// `iters` calls on each of two threads through clones of one service; the time until both are done.
fn two_threads<S>(svc: S, iters: u64) -> Duration
where
    S: Service<u32> + Clone + Send + 'static,
{
    // The threads time themselves: on two cores the spawning thread may not run again until both are done.
    let barrier = std::sync::Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut svc = svc.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for i in 0..iters {
                    let _ = black_box(call(&mut svc, i as u32));
                }
                (start, Instant::now())
            })
        })
        .collect();
    let spans: Vec<(Instant, Instant)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let start = spans.iter().map(|s| s.0).min().expect("two threads");
    let end = spans.iter().map(|s| s.1).max().expect("two threads");
    end - start
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("two_threads");
    g.bench_function("tower ConcurrencyLimit", |b| {
        b.iter_custom(|iters| {
            two_threads(tower::limit::ConcurrencyLimit::new(inner(), 1024), iters)
        })
    });
    g.bench_function("tower-backpressure breaker", |b| {
        b.iter_custom(|iters| {
            two_threads(
                CircuitBreakerLayer::builder()
                    .build()
                    .unwrap()
                    .layer(inner()),
                iters,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, closed_path, contended);
criterion_main!(benches);
