//! Runtime pressure: watch the tokio runtime itself, and shed load while it is stalled.
//!
//! # Why
//!
//! The classic async failure is a blocked runtime: a CPU-heavy or synchronous call inside a handler stalls every
//! task on that worker, and latency rises for everyone, while request-level limiters still see "few requests in
//! flight" and admit more. Operators of event-loop servers watch scheduling delay ("event-loop lag") and pending
//! tasks for exactly this reason, and Node's `@fastify/under-pressure` answers 503 when they cross a threshold.
//! Plain tower has nothing that looks at the runtime: `LoadShed` sheds only when the inner service is not ready.
//!
//! - [`RuntimeMonitor`]: one small task that asks to wake every `interval` and records how late it actually ran,
//!   keeping a bounded window of recent lags (max, p50, p99) and tokio's stable runtime figures (workers, alive
//!   tasks, global queue depth). It evaluates the thresholds with hysteresis (trip above `trip`, recover only
//!   below `recover`, optionally after a calm [`min_recovery`](RuntimeMonitorBuilder::min_recovery)) once per
//!   sample, so readers pay one atomic load. Started explicitly; dropping the [`MonitorGuard`] ends the task; a
//!   monitor that is not running costs nothing and never reports pressure.
//! - [`PressureLayer`] / [`Pressure`]: rejects new requests while the monitor is under pressure, with
//!   [`Reason::Overloaded`](crate::core::Reason::Overloaded) and a `Retry-After` (a `BoxError`, a 503, or a
//!   gRPC UNAVAILABLE, per reject mode), letting a [`Bypass`] predicate's requests (health checks) through.
//! - [`LagAware`]: a classifier wrapper that counts requests finishing while the runtime lags as
//!   [`Outcome::Dropped`](crate::core::Outcome::Dropped), so an adaptive limiter brings its limit down when the
//!   process, not the backend, is the bottleneck.
//!
//! What the monitor sees: on a current-thread runtime, any blocking call delays the probe by its full length.
//! On a multi-thread runtime the probe is late only when every worker is busy or the one holding it is blocked,
//! so lag there measures saturation; global queue depth and alive tasks complement it. Shedding is a stopgap:
//! the fix for a blocking handler is [`tokio::task::spawn_blocking`] (see the guide and `examples/blocking.rs`).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_backpressure::core::{error, BoxError};
//! use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let monitor = RuntimeMonitor::builder()
//!     .interval(Duration::from_millis(5))
//!     .max_lag(Duration::from_millis(50), Duration::from_millis(10))
//!     .min_recovery(Duration::from_millis(100))
//!     .build()?;
//! let guard = monitor.start()?;
//!
//! let layer = PressureLayer::builder(&monitor).retry_after(Duration::from_secs(1)).build()?;
//! let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n * 2) }));
//! assert_eq!(svc.clone().oneshot(21).await?, 42);
//!
//! // A handler that blocks the (only) worker for 100 ms: the probe's next sample is about 95 ms late.
//! monitor.next_sample().await;
//! tokio::spawn(async { std::thread::sleep(Duration::from_millis(100)) }).await?;
//! monitor.next_sample().await;
//! assert!(monitor.snapshot().max_lag >= Duration::from_millis(90));
//! assert!(monitor.is_under_pressure());
//!
//! let err = svc.clone().oneshot(1).await.unwrap_err();
//! let shed = err.downcast_ref::<error::Overloaded>().expect("shed as overloaded");
//! assert_eq!(shed.retry_after(), Some(Duration::from_secs(1)));
//!
//! // Calm again: after 100 ms of calm samples the pressure clears.
//! while monitor.is_under_pressure() {
//!     monitor.next_sample().await;
//! }
//! assert_eq!(svc.oneshot(2).await?, 4);
//! guard.stop().await;
//! # Ok(())
//! # }
//! ```

pub mod error;

mod classify;
mod layer;
mod monitor;
mod service;
mod trip;

#[cfg(test)]
mod tests;

pub use self::classify::LagAware;
pub use self::error::StartError;
pub use self::layer::{PressureHandle, PressureLayer, PressureLayerBuilder, PressureSnapshot};
pub use self::monitor::{
    MonitorGuard, RuntimeMonitor, RuntimeMonitorBuilder, RuntimeSnapshot, MAX_WINDOW,
};
pub use self::service::{Bypass, Pressure};
