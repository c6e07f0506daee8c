//! Adaptive concurrency limiting: learn how many requests the service can run at once, reject the rest at once.
//!
//! # Why
//!
//! A fixed concurrency limit (tower's `ConcurrencyLimit`) is right for one backend speed only: too high and
//! requests queue inside the service until clients time out, too low and capacity is wasted; and it waits in
//! `poll_ready`, which under axum or hyper becomes an unbounded queue. This layer measures latency and drops
//! per window of finished requests, moves the limit with a pluggable [`Algorithm`], and decides in `call`:
//! under the limit the request is admitted, at the limit it is rejected immediately with
//! [`Reason::Overloaded`](crate::core::Reason::Overloaded) (a `BoxError` downcastable to
//! [`core::error::Overloaded`](crate::core::error::Overloaded), a 503 with `.http()`, gRPC UNAVAILABLE with
//! `.grpc()`).
//!
//! # How it differs from plain tower
//!
//! - `poll_ready` only forwards the inner service's readiness; no permit is reserved, so idle connections hold
//!   nothing.
//! - Clones share one limit and one in-flight count (one `Arc` per layer).
//! - The permit is held until the response is really done (for HTTP until the body ends), and released exactly
//!   once on every path, panics and dropped futures included.
//! - While in flight stays well below the limit (with a limit of 256 or more), the hot path touches only the
//!   calling thread's own cache line: each thread takes admission tokens from the shared count a few at a time
//!   and gives finished requests' tokens back to its own stripe. Under a smaller limit, and once the shared
//!   count's tokens pass 3/8 of the limit, tokens go through the shared count: one compare-and-swap on
//!   admission and one atomic add on completion. The limit holds exactly: before a request is refused, and
//!   before an admission puts in flight at half the limit or more, every parked token goes back. A window's
//!   completions are summed from the stripes, as are the timed requests' samples; the algorithm runs once per
//!   window, by whichever request closes it, under a try-lock nobody waits for. See "Cost" below for when the
//!   clock is read.
//! - The limit is observable and tunable live through an [`AdaptiveHandle`], which also serves as the queue
//!   layer's [`LimitSource`](crate::core::LimitSource).
//! - Requests that cannot finish before their deadline are refused without a permit (see "Deadlines").
//!
//! # Deadlines
//!
//! A request whose [`Deadline`](crate::core::Deadline) is current when `call` runs (set by a
//! [`DeadlineLayer`](crate::deadline::DeadlineLayer) or
//! [`PropagateDeadlineLayer`](crate::deadline::PropagateDeadlineLayer) outside, or by
//! [`Deadline::scope`](crate::core::Deadline::scope) around the caller), or, with the builder's `http()` or
//! `grpc()`, stored in its extensions (a deadline layer built with `request_extension(true)` above a tower
//! `Buffer`, whose worker task calls this layer outside the deadline's scope), is refused at once with
//! [`Reason::DeadlineExceeded`](crate::core::Reason::DeadlineExceeded) (504, gRPC DEADLINE_EXCEEDED, or
//! [`DeadlineExceeded`](crate::core::error::DeadlineExceeded)) when its remaining budget is no more than the
//! service time the limiter expects ([`AdaptiveHandle::expected_latency`], an average of recent windows' mean
//! latency; before the first window only an expired deadline is refused). It takes no permit and teaches the
//! limit nothing, and an outer breaker or limiter ignores the refusal, since it was made locally. In the client
//! stack (`PropagateDeadline → CircuitBreaker → AdaptiveConcurrency`) this spares the dependency calls whose
//! answer would arrive after the caller gave up. Inside a deadline layer's `call` the check uses that layer's
//! clock reading instead of reading the clock again (so behind a queue, a request the queue admits at once is
//! judged twice at one reading; one that waited in the queue costs a clock read). Bypassed requests are not
//! judged. Without a current deadline the check is one thread-local read (and, in HTTP and gRPC mode, a look
//! at the request's extensions). [`deadline_source`](AdaptiveConcurrencyBuilder::deadline_source) reads the
//! deadline instead from elsewhere, such as a field of your own request type.
//! [`AdaptiveSnapshot::rejected_deadline`] counts these refusals.
//!
//! # Cost
//!
//! Reading the clock (twice per request, for its latency) is the largest part of what this layer costs: about
//! 30 ns a read on a typical VM, against 20–30 ns for everything else. A window's mean latency needs a few
//! hundred samples, not every request of a busy service. So without an observer, once a window holds
//! `4 × max(1024, min_samples)` finished requests, the next window times only half of them, a quarter, and so
//! on down to one in 64 (picked by hashing the admission's number among its thread's admissions, so that the
//! picks follow no pattern in the traffic), keeping at least about `2 × max(1024, min_samples)` timed samples a
//! window (and half that if the load halves at once). Every request is still admitted, counted and released the same
//! way; the window's mean and minimum latency are those of the timed requests, and only a timed request can
//! close a window. Below that rate (thousands of requests a window, i.e. tens of thousands a second with the
//! default 100 ms window) every request is timed, and so is every request when an observer is set, since it is
//! told each latency. [`AdaptiveSnapshot::timed_one_in`] shows the rate in force.
//!
//! Algorithms: [`Knee`] (the default, see its docs for the control law), [`Aimd`], [`Vegas`] and [`Gradient2`];
//! `docs/adaptive.md` compares them in the simulator.
//!
//! # Example
//!
//! ```
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
//! use tower_backpressure::core::{error::Overloaded, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = AdaptiveConcurrencyLayer::builder().initial_limit(1).build().unwrap();
//! let handle = layer.handle();
//! let mut svc = tower::ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|x: u32| async move { Ok::<_, BoxError>(x * 2) }));
//!
//! let first = svc.ready().await.unwrap().call(1); // admitted: holds the only permit
//! let second = svc.ready().await.unwrap().call(2); // over the limit: rejected at once
//! assert!(second.await.unwrap_err().is::<Overloaded>());
//! assert_eq!(handle.in_flight(), 1);
//! assert_eq!(first.await.unwrap(), 2);
//! assert_eq!(handle.in_flight(), 0);
//! # }
//! ```

pub mod algorithm;
mod handle;
mod layer;
mod service;
mod state;

pub use self::algorithm::{Aimd, Algorithm, Gradient2, Knee, Vegas, Window};
pub use self::handle::{AdaptiveHandle, AdaptiveSnapshot};
pub use self::layer::{AdaptiveConcurrencyBuilder, AdaptiveConcurrencyLayer};
pub use self::service::{AdaptiveConcurrency, Bypass, NoBypass};
