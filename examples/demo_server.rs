//! Run with: cargo run --release --example demo_server --features axum,metrics -- --protect default
//!
//! A server to overload by hand with a real load generator. `GET /work` runs on a fake backend of `--workers`
//! workers, each request taking `--service-ms` (capacity: workers × 1000 / service-ms requests per second);
//! `GET /metrics` serves Prometheus text. `--protect` picks what stands in front of `/work`:
//!
//! - `none`: nothing. Past capacity, requests wait for a worker and latency grows with the backlog.
//! - `static`: a fixed concurrency limit of 2 × workers with no queue (the crate's queue layer with a number as
//!   its limit and depth 0): beyond it, an immediate 503.
//! - `default`: the recommended stack of `examples/axum.rs` (deadline, per-IP rate limit, a short CoDel queue in
//!   front of the adaptive limiter's limit, the adaptive limiter).
//!
//! Then, from another terminal:
//!
//! ```text
//! wrk -t2 -c200 -d15s --latency http://127.0.0.1:3000/work
//! ```
//!
//! `--duration-s N` makes the server stop by itself after N seconds (Ctrl-C / SIGTERM work too).

// The axum example's backend, stack and server, shared rather than repeated.
#[path = "axum.rs"]
#[allow(dead_code, unreachable_pub)]
mod axum_example;

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use axum_example::{serve, shutdown_signal, Backend, Config};
use clap::{Parser, ValueEnum};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_backpressure::core::{HttpMode, HttpStatus, MetricsObserver, WithRetryAfter};
use tower_backpressure::queue::QueueLayer;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Protect {
    /// Nothing in front of the backend.
    None,
    /// A fixed concurrency limit (2 × workers), no queue.
    Static,
    /// The recommended stack: deadline, rate limit, queue, adaptive limit.
    Default,
}

/// A server to overload with wrk, with or without protection.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: String,
    /// What stands in front of /work.
    #[arg(long, value_enum, default_value = "default")]
    protect: Protect,
    /// Backend workers: requests served at once.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Milliseconds each request holds a worker.
    #[arg(long, default_value_t = 20)]
    service_ms: u64,
    /// Requests per second per client IP in `default` (one wrk is one IP: keep it out of the way unless you want
    /// to see 429s).
    #[arg(long, default_value_t = 1_000_000)]
    rate_per_ip: u32,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    duration_s: Option<u64>,
}

fn router(args: &Args, prometheus: PrometheusHandle) -> Result<Router, Box<dyn std::error::Error>> {
    let backend = Backend::sleeping(args.workers, Duration::from_millis(args.service_ms));
    let work = {
        let backend = backend.clone();
        move || async move {
            backend.serve().await;
            "done\n"
        }
    };
    let plain = |work_route: Router| {
        let prometheus = prometheus.clone();
        work_route.route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
    };
    Ok(match args.protect {
        Protect::None => plain(Router::new().route("/work", get(work))),
        Protect::Static => {
            let limit = QueueLayer::builder()
                .limit(2 * args.workers)
                .max_depth(0)
                .classifier(HttpStatus::new())
                .reject_mode(WithRetryAfter::new(HttpMode, Duration::from_secs(1)))
                .observer(MetricsObserver::new())
                .build()?;
            plain(Router::new().route("/work", get(work)).layer(limit))
        }
        Protect::Default => {
            let config = Config {
                rate_per_ip: args.rate_per_ip,
                rate_burst: args.rate_per_ip,
                ..Config::default()
            };
            axum_example::app(&config, backend, prometheus)?
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let app = router(&args, axum_example::install_metrics())?;
    let listener = TcpListener::bind(&args.addr).await?;
    eprintln!(
        "demo_server on http://{} --protect {:?}: {} workers × {} ms = {} req/s capacity",
        listener.local_addr()?,
        args.protect,
        args.workers,
        args.service_ms,
        args.workers as u64 * 1000 / args.service_ms.max(1)
    );
    let duration = args.duration_s.map(Duration::from_secs);
    let stop = async move {
        match duration {
            Some(duration) => {
                tokio::select! {
                    () = shutdown_signal() => {}
                    () = tokio::time::sleep(duration) => {}
                }
            }
            None => shutdown_signal().await,
        }
    };
    serve(listener, app, stop, Duration::from_secs(5)).await?;
    Ok(())
}
