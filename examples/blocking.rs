//! Run with: cargo run --example blocking
//!
//! A handler that, on some requests, does synchronous CPU work right on the runtime's worker thread: the classic
//! way to stall an async server. Three phases of the same in-process traffic on a single-worker runtime:
//!
//! 1. blocking, unprotected: the runtime monitor shows the lag, and every request, even the cheap ones, waits;
//! 2. blocking behind a `PressureLayer`: while the lag is above the threshold new requests are shed at once with
//!    "overloaded" and a retry hint, instead of queueing behind the stall;
//! 3. the fix: the CPU work moves to `tokio::task::spawn_blocking`, the lag disappears and nothing is shed.
//!
//! Shedding buys time; `spawn_blocking` (or a dedicated thread pool) is the cure.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_backpressure::core::{error, BoxError};
use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};

/// How long each phase sends traffic.
const PHASE: Duration = Duration::from_millis(1000);
/// One request every 2 ms.
const EVERY: Duration = Duration::from_millis(2);
/// One request in `HEAVY_EVERY` does `HEAVY` of CPU work.
const HEAVY_EVERY: u32 = 50;
const HEAVY: Duration = Duration::from_millis(30);

/// Synchronous CPU work: what a password hash, an image resize or a big JSON document costs.
fn cpu_work(for_: Duration) -> u64 {
    let start = std::time::Instant::now();
    let mut x = 0u64;
    while start.elapsed() < for_ {
        for i in 0..1_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    x
}

async fn handler(id: u32, fixed: bool) -> Result<u64, BoxError> {
    if id % HEAVY_EVERY != 0 {
        // The cheap requests: a little I/O.
        tokio::time::sleep(Duration::from_millis(1)).await;
        return Ok(0);
    }
    if fixed {
        // The fix: the work runs on tokio's blocking pool, the worker stays free for everyone else.
        Ok(tokio::task::spawn_blocking(|| cpu_work(HEAVY)).await?)
    } else {
        // The bug: the worker thread is busy for HEAVY and no other task on it runs meanwhile.
        Ok(cpu_work(HEAVY))
    }
}

#[derive(Default)]
struct Report {
    served: usize,
    shed: usize,
    cheap_latencies: Vec<Duration>,
}

/// Sends one request every `EVERY` for `PHASE`, each on its own task, and waits for all of them.
async fn drive<S>(svc: S) -> Report
where
    S: Service<u32, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(EVERY);
    let end = Instant::now() + PHASE;
    let mut id = 0;
    while Instant::now() < end {
        tick.tick().await;
        id += 1;
        let svc = svc.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let result = svc.oneshot(id).await;
            (id, result, sent.elapsed())
        });
    }
    let mut report = Report::default();
    while let Some(done) = tasks.join_next().await {
        let (id, result, latency) = done.expect("request task panicked");
        match result {
            Ok(_) => {
                report.served += 1;
                if id % HEAVY_EVERY != 0 {
                    report.cheap_latencies.push(latency);
                }
            }
            Err(e) if e.is::<error::Overloaded>() => report.shed += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    report
}

fn monitor() -> RuntimeMonitor {
    RuntimeMonitor::builder()
        .interval(Duration::from_millis(5))
        .window(400)
        .max_lag(Duration::from_millis(20), Duration::from_millis(10))
        .min_recovery(Duration::from_millis(20))
        .build()
        .expect("valid monitor config")
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn print_row(name: &str, report: &mut Report, monitor: &RuntimeMonitor) {
    report.cheap_latencies.sort_unstable();
    let snap = monitor.snapshot();
    println!(
        "{name:<26} {:>6} {:>5} {:>10.1?} {:>10.1?} {:>9.1?} {:>9.1?} {:>5}",
        report.served,
        report.shed,
        percentile(&report.cheap_latencies, 0.5),
        percentile(&report.cheap_latencies, 0.99),
        snap.p99_lag,
        snap.max_lag,
        snap.trips,
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    println!(
        "one request every {EVERY:?} for {PHASE:?}; one in {HEAVY_EVERY} does {HEAVY:?} of CPU work; one worker thread\n"
    );
    println!(
        "{:<26} {:>6} {:>5} {:>10} {:>10} {:>9} {:>9} {:>5}",
        "phase", "served", "shed", "cheap p50", "cheap p99", "lag p99", "lag max", "trips"
    );

    // 1. The blocking handler, with only the monitor watching.
    let m = monitor();
    let guard = m.start()?;
    let mut report = drive(service_fn(|id| handler(id, false))).await;
    print_row("blocking, unprotected", &mut report, &m);
    guard.stop().await;

    // 2. The same handler behind the pressure layer.
    let m = monitor();
    let guard = m.start()?;
    let layer = PressureLayer::builder(&m)
        .retry_after(Duration::from_secs(1))
        .build()?;
    let mut report = drive(layer.layer(service_fn(|id| handler(id, false)))).await;
    print_row("blocking + PressureLayer", &mut report, &m);
    guard.stop().await;

    // 3. The fix.
    let m = monitor();
    let guard = m.start()?;
    let layer = PressureLayer::builder(&m)
        .retry_after(Duration::from_secs(1))
        .build()?;
    let mut report = drive(layer.layer(service_fn(|id| handler(id, true)))).await;
    print_row("spawn_blocking (the fix)", &mut report, &m);
    guard.stop().await;

    Ok(())
}
