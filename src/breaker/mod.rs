//! A circuit breaker for calls to a dependency: when the dependency fails, stop calling it, fail fast with a
//! useful answer, probe carefully, and let traffic back in when it heals.
//!
//! # How it works
//!
//! - **Closed**: calls flow; each finished call's [`Outcome`](crate::core::Outcome) (from the classifier) and
//!   latency are counted in a window: the last N calls (a true sliding ring, [`count_window`]) or the last
//!   `buckets × width` of time ([`time_window`]). Once the window holds [`minimum_calls`], the breaker trips when
//!   the failure rate or (once configured) the slow-call rate reaches its threshold (or, optionally, after
//!   [`consecutive_failures`] in a row). [`Outcome::Ignored`](crate::core::Outcome::Ignored) (a caller that went
//!   away, a client error the classifier ignores) is not counted.
//! - **Open**: calls are rejected at once with [`Reason::CircuitOpen`](crate::core::Reason::CircuitOpen) and the
//!   remaining open time as retry hint (`Retry-After` in HTTP mode, `grpc-retry-pushback-ms` in gRPC mode,
//!   [`CircuitOpen::retry_after`](crate::core::error::CircuitOpen::retry_after) in error mode). The open period
//!   grows with each consecutive trip (exponential backoff, capped, with seeded jitter).
//! - **Half-open**: exactly [`permitted_calls_in_half_open`] probes are admitted per cycle, the rest rejected.
//!   The probes' verdict (failure and slow rates among them) closes or re-opens the breaker as soon as it can
//!   no longer change. A probe whose future or body is dropped returns its slot; half-open never waits longer
//!   than [`max_wait_in_half_open`].
//! - **Forced open**, **disabled** (everything flows, nothing is counted) and **metrics only** (counted and
//!   reported, never trips) are set through the [`CircuitBreakerHandle`].
//!
//! Time-driven transitions (open period over, half-open waited too long) happen when the breaker is next
//! consulted: by a call, `poll_ready` in readiness mode, or the handle's `state()` / `snapshot()`. The breaker
//! runs no timer of its own.
//!
//! # How it differs
//!
//! tower has no circuit breaker. Compared with the usual Rust and JVM ones:
//!
//! - the count window really slides (the last N calls, not a cumulative count), and the time window is a fixed
//!   ring of buckets, not one record per call: memory is bounded at build time;
//! - the closed path takes no lock and allocates nothing: one atomic load to admit, and per finished call one
//!   ring-slot swap plus one `fetch_add` on a word holding all three counts, so every reader sees a consistent
//!   triple. A tiny critical section would have been simpler but would serialise every caller on one lock
//!   word; the atomics cost the same uncontended and never make a caller wait. The clock is read only where
//!   a rule needs it: twice per call when the slow-call rule is on (it is off until configured, see
//!   [`slow_call_duration`](CircuitBreakerBuilder::slow_call_duration)) or an observer is told latencies, once
//!   per call with a time window, and otherwise only in the open and half-open states. With the defaults (a count
//!   window, no observer) the closed path reads no clock. Every state change is one compare-and-swap on a single
//!   word holding state, generation and deadline, so each trip happens exactly once however many tasks race to
//!   it;
//! - probe permits are RAII ([`Permit`](crate::core::Permit)) tagged with their cycle's generation: a dropped
//!   probe returns its slot, a probe finishing after its cycle ended changes nothing, and half-open cannot get
//!   stuck;
//! - rejections carry a retry hint, and in readiness mode ([`readiness_mode`]) `poll_ready` is not ready while
//!   open, so a balancer routes around the endpoint.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_backpressure::breaker::CircuitBreakerLayer;
//! use tower_backpressure::core::{error::CircuitOpen, BoxError, CircuitState};
//! use tower_layer::Layer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let layer = CircuitBreakerLayer::builder()
//!     .count_window(10)
//!     .minimum_calls(10)
//!     .failure_rate_threshold(50.0)
//!     .wait_in_open(Duration::from_secs(5))
//!     .jitter(0.0)
//!     .build()
//!     .expect("valid config");
//! let handle = layer.handle();
//! let mut svc = layer.layer(service_fn(|fail: bool| async move {
//!     if fail { Err::<&str, BoxError>("boom".into()) } else { Ok("ok") }
//! }));
//!
//! for _ in 0..10 {
//!     let _ = svc.ready().await.unwrap().call(true).await;
//! }
//! assert_eq!(handle.state(), CircuitState::Open);
//!
//! let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().expect("rejected by the breaker");
//! assert_eq!(open.retry_after(), Some(Duration::from_secs(5)));
//!
//! tokio::time::sleep(Duration::from_secs(5)).await;
//! for _ in 0..10 {
//!     svc.ready().await.unwrap().call(false).await.unwrap(); // probes succeed
//! }
//! assert_eq!(handle.state(), CircuitState::Closed);
//! # }
//! ```
//!
//! [`count_window`]: CircuitBreakerBuilder::count_window
//! [`time_window`]: CircuitBreakerBuilder::time_window
//! [`minimum_calls`]: CircuitBreakerBuilder::minimum_calls
//! [`consecutive_failures`]: CircuitBreakerBuilder::consecutive_failures
//! [`permitted_calls_in_half_open`]: CircuitBreakerBuilder::permitted_calls_in_half_open
//! [`max_wait_in_half_open`]: CircuitBreakerBuilder::max_wait_in_half_open
//! [`readiness_mode`]: CircuitBreakerBuilder::readiness_mode

mod layer;
mod service;
mod state;
mod window;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use self::layer::{CircuitBreakerBuilder, CircuitBreakerLayer};
pub use self::service::CircuitBreaker;

use self::state::Shared;
use crate::core::{CircuitState, Observer};

/// A cheap, cloneable handle on a breaker: its state, a snapshot of its figures, and operator controls. Every
/// control is one compare-and-swap on the state word, reported to the observer like any transition.
pub struct CircuitBreakerHandle<O = ()> {
    shared: Arc<Shared<O>>,
}

impl<O> Clone for CircuitBreakerHandle<O> {
    fn clone(&self) -> Self {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<O> fmt::Debug for CircuitBreakerHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<O: Observer> CircuitBreakerHandle<O> {
    fn new(shared: Arc<Shared<O>>) -> Self {
        CircuitBreakerHandle { shared }
    }

    /// The state now (applying a due time-driven transition first).
    pub fn state(&self) -> CircuitState {
        self.shared.state()
    }

    /// The current figures.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Holds the breaker open until another control releases it; calls are rejected without a retry hint.
    pub fn force_open(&self) {
        self.shared.force(CircuitState::ForcedOpen);
    }

    /// Closes the breaker with an empty window, whatever its state.
    pub fn force_closed(&self) {
        self.shared.force(CircuitState::Closed);
    }

    /// Switches the breaker off: every call flows, nothing is counted, it never trips.
    pub fn disable(&self) {
        self.shared.force(CircuitState::Disabled);
    }

    /// Counts and reports (window, rates, observer events) but never trips.
    pub fn metrics_only(&self) {
        self.shared.force(CircuitState::MetricsOnly);
    }

    /// As if just built: closed, window and backoff forgotten, jitter sequence restarted from the seed.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

/// A breaker's figures at one instant.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The state.
    pub state: CircuitState,
    /// Calls counted in the window (closed and metrics-only states; the window is emptied on entering them).
    pub calls: u64,
    /// Of those, failures.
    pub failures: u64,
    /// Of those, slow calls.
    pub slow_calls: u64,
    /// `failures / calls` in percent (0 for an empty window).
    pub failure_rate: f64,
    /// `slow_calls / calls` in percent (0 for an empty window).
    pub slow_call_rate: f64,
    /// Failures in a row, up to the last success.
    pub consecutive_failures: u32,
    /// Trips since the breaker was last closed: the exponent of the open-period backoff.
    pub consecutive_trips: u32,
    /// Admitted calls not yet finished.
    pub in_flight: usize,
    /// Probes admitted in the current half-open cycle (0 in other states).
    pub probes_admitted: u64,
    /// Time left in the open period (open state only).
    pub open_remaining: Option<Duration>,
}
