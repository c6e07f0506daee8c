//! The Rust code of docs/guide.md and docs/adaptive.md, compiled.
//!
//! Every ```` ```rust ```` block of those files appears below, line for line (leading and trailing spaces aside),
//! inside just enough code to compile it; `guides_show_only_compiled_code` fails when a block is not found here,
//! so a block edited in the guide must be edited here too, and an API change that breaks a block breaks the
//! build. Blocks marked ```` ```rust,ignore ```` are
//! sketches that use crates this one does not depend on; they are not checked.
#![cfg(all(feature = "sim", feature = "full"))]
#![allow(dead_code, unused_variables)]

use std::time::Duration;

use tower_backpressure::core::BoxError;

type Body = String;

fn handler() -> impl tower::Service<
    http::Request<Body>,
    Response = http::Response<Body>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(|_: http::Request<Body>| async {
        Ok::<_, BoxError>(http::Response::new(Body::new()))
    })
}

mod choosing_a_stack {
    use super::*;
    use tower::ServiceBuilder;
    use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
    use tower_backpressure::breaker::CircuitBreakerLayer;
    use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};
    use tower_backpressure::queue::QueueLayer;
    use tower_backpressure::rate::RateLimitLayer;

    #[rustfmt::skip]
    fn stacks() -> Result<(), BoxError> {
        let deadline = DeadlineLayer::builder().http().build()?;
        let rate = RateLimitLayer::builder().rate(100, Duration::from_secs(1)).http().build()?;
        let adaptive = AdaptiveConcurrencyLayer::builder().http().build()?;
        let queue = QueueLayer::builder().limit(adaptive.handle()).http().build()?;
        let propagate = PropagateDeadlineLayer::builder().http().build()?;
        let breaker = CircuitBreakerLayer::builder().http().build()?;
        let limiter = AdaptiveConcurrencyLayer::builder().http().build()?;
        let (handler, transport) = (handler(), handler());
use tower_backpressure::ServiceBuilderExt;

let server = ServiceBuilder::new()
    .deadline(deadline)             // DeadlineLayer
    .rate_limiter(rate)             // RateLimitLayer ("rate_limit" is tower's own per-clone limiter)
    .queue(queue)                   // QueueLayer
    .adaptive_concurrency(adaptive) // AdaptiveConcurrencyLayer
    .service(handler);

let client = ServiceBuilder::new()
    .propagate_deadline(propagate)  // PropagateDeadlineLayer
    .circuit_breaker(breaker)       // CircuitBreakerLayer
    .adaptive_concurrency(limiter)
    .service(transport);
        Ok(())
    }
}

mod axum_recipe {
    use std::net::SocketAddr;

    use axum::routing::get;
    use axum::Router;
    use tower::ServiceBuilder;
    use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
    use tower_backpressure::core::{HttpMode, HttpStatus, MetricsObserver, WithRetryAfter};
    use tower_backpressure::deadline::DeadlineLayer;
    use tower_backpressure::queue::QueueLayer;
    use tower_backpressure::rate::{PeerIp, RateLimitLayer};
    use tower_backpressure::ServiceBuilderExt;

    use super::*;

    async fn work() -> &'static str {
        "done"
    }

    async fn health() -> &'static str {
        "ok"
    }

    async fn metrics() -> String {
        String::new()
    }

    async fn shutdown_signal() {}

    #[rustfmt::skip]
    async fn serve(listener: tokio::net::TcpListener) -> Result<(), BoxError> {
        let deadline = DeadlineLayer::builder().max_timeout(Duration::from_secs(5)).http().build()?;
let mode = WithRetryAfter::new(HttpMode, Duration::from_secs(1));
let adaptive = AdaptiveConcurrencyLayer::builder()
    .classifier(HttpStatus::new())
    .reject_mode(mode)
    .observer(MetricsObserver::new())
    .build()?;
let queue = QueueLayer::builder()
    .limit(adaptive.handle())
    .max_depth(32)
    .classifier(HttpStatus::new())
    .reject_mode(mode)
    .observer(MetricsObserver::new())
    .build()?;
let rate = RateLimitLayer::builder()
    .rate(1_000, Duration::from_secs(1))
    .key(PeerIp::new())             // reads ConnectInfo<SocketAddr>
    .http()
    .build()?;

let protected = Router::new()
    .route("/work", get(work))
    .layer(ServiceBuilder::new().deadline(deadline).rate_limiter(rate).queue(queue).adaptive_concurrency(adaptive));
let app = Router::new()
    .route("/health", get(health))     // outside the stack: answered while /work sheds
    .route("/metrics", get(metrics))
    .merge(protected);

axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
    .with_graceful_shutdown(shutdown_signal())
    .await?;
        Ok(())
    }
}

#[rustfmt::skip]
mod simulator_recipe {
use tower::ServiceBuilder;
use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
use tower_backpressure::queue::QueueLayer;
use tower_backpressure::sim::{boxed, run_stack, Probes, Scenario, SimService, Stack};
use tower_backpressure::ServiceBuilderExt;

#[test]
fn my_stack_holds_under_5x() {
    // Your own scenario file here; this crate's s2 (calm, then 2x, 5x and 10x the backend's capacity) runs as is.
    let scenario = Scenario::load("scenarios/s2-sustained.toml").unwrap();
    let report = run_stack(&scenario, "mine", |backend: SimService, _scenario| {
        let adaptive = AdaptiveConcurrencyLayer::builder().max_limit(64).http().build().unwrap();
        let queue = QueueLayer::builder().limit(adaptive.handle()).max_depth(16).http().build().unwrap();
        let (limit, depth) = (adaptive.handle(), queue.handle());
        let stack = ServiceBuilder::new().queue(queue).adaptive_concurrency(adaptive).service(backend);
        Stack::new(boxed(stack))
            .probes(Probes::none().limit(move || limit.limit()).queue_depth(move || depth.snapshot().depth))
    })
    .unwrap();
    let (calm, overload) = (report.row("calm", "all").unwrap(), report.row("5x", "all").unwrap());
    assert!(overload.goodput_rps >= 0.93 * overload.capacity_rps);
    assert!(overload.p99_ms.unwrap() <= 2.0 * calm.p99_ms.unwrap());
}
}

mod runtime_pressure {
    use super::*;

    #[rustfmt::skip]
    fn server() -> Result<(), BoxError> {
        let app = handler();
use std::time::Duration;
use tower::ServiceBuilder;
use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};

let monitor = RuntimeMonitor::builder()
    .interval(Duration::from_millis(10))
    .max_lag(Duration::from_millis(100), Duration::from_millis(20)) // trip above 100 ms, recover below 20 ms
    .min_recovery(Duration::from_millis(500))                       // ... for half a second
    .build()?;
let _monitor_guard = monitor.start()?; // keep it alive as long as the server runs

let svc = ServiceBuilder::new()
    .layer(
        PressureLayer::builder(&monitor)
            .http()
            .bypass(|req: &http::Request<Body>| req.uri().path() == "/health") // Body: the server's request body
            .retry_after(Duration::from_secs(2))
            .build()?,
    )
    .service(app);
        Ok(())
    }
}

mod adaptive_builder {
    use http::Request;
    use tower_backpressure::adaptive::{AdaptiveConcurrencyLayer, Knee};

    use super::*;

    #[rustfmt::skip]
    fn layer() -> Result<(), BoxError> {
let layer = AdaptiveConcurrencyLayer::builder()
    .initial_limit(20)            // before the first window closes
    .min_limit(1)
    .max_limit(1000)
    .algorithm(Knee::new())       // the default; or Aimd, Vegas, Gradient2, or your own `Algorithm`
    .min_samples(20)              // a window closes after >= 20 finished requests ...
    .window(Duration::from_millis(100)) // ... and >= 100 ms
    .bypass(|req: &Request<Body>| req.uri().path() == "/healthz") // Body: the request body type
    .http()                       // 503/504, permit held until the body ends, deadlines also from the request;
                                  // .grpc() for UNAVAILABLE / DEADLINE_EXCEEDED
    .build()?;
let handle = layer.handle();      // limit(), in_flight(), snapshot(), set_bounds(), set_algorithm(); a LimitSource
        Ok(())
    }
}

/// The ```` ```rust ```` blocks of a markdown file, each as its trimmed, non-empty lines.
fn rust_blocks(markdown: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in markdown.lines() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == "```rust" => current = Some(Vec::new()),
            Some(_) if fence.starts_with("```") => blocks.extend(current.take()),
            Some(block) if !line.trim().is_empty() => block.push(line.trim().to_owned()),
            _ => {}
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    blocks
}

#[test]
fn guides_show_only_compiled_code() {
    let here: Vec<String> = include_str!("doc_snippets.rs")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    let guides = [
        ("docs/guide.md", include_str!("../docs/guide.md")),
        ("docs/adaptive.md", include_str!("../docs/adaptive.md")),
    ];
    let mut checked = 0;
    for (file, markdown) in guides {
        for block in rust_blocks(markdown) {
            assert!(
                here.windows(block.len()).any(|lines| lines == block.as_slice()),
                "a ```rust block of {file} is not in tests/doc_snippets.rs, so nothing compiles it; \
                 copy it there (or mark it ```rust,ignore if it cannot compile):\n{}",
                block.join("\n")
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 5,
        "the number of compiled blocks changed: update this count"
    );
}
