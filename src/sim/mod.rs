//! A deterministic overload simulator: run your own tower stack against simulated traffic before production.
//!
//! Load tests on real machines are slow and noisy, and overload behaviour (a goodput collapse, a limit that
//! creeps upwards, work done for clients that left long ago) shows only after minutes at the edge. The
//! simulator runs the real layers on a current-thread tokio runtime with **paused time**: a ten-minute scenario
//! takes a second or two, and the same scenario with the same seed gives the same [`Report`] byte for byte on any
//! machine (RNG: ChaCha8 from `rand_chacha`, distributions from `rand_distr`).
//!
//! # The model
//!
//! - **Backend**: `workers` requests are served at once; the others wait in the backend's own FIFO queue. The
//!   service time is constant, exponential or lognormal; a share `error_rate` of served requests fail with
//!   HTTP 500. Both can change at phase boundaries (slow-downs, outages, recovery). Dropping a request's future
//!   leaves the queue or frees the worker at once, as a cancelled server handler does.
//! - **Clients**: open loop. Arrivals are Poisson (or evenly spaced, `arrivals = "uniform"`) with a rate per phase,
//!   optionally ramping linearly (`rps` → `rps_end`) or given per class (`class_rps`). Each request carries its
//!   class's priority in the [`PRIORITY_HEADER`] header and, with `send_deadline`, its remaining budget in a
//!   `grpc-timeout` header (milliseconds, `NNNm`); a [client-side](Stack::client_side) stack (`breaker`) is instead
//!   called with the client's deadline current, as a handler calls it, and writes the header itself. There the
//!   backend stands for the dependency: a call the stack drops (its deadline enforced locally) frees the backend at
//!   once, as an HTTP/2 or gRPC stream reset cancels the remote handler, and the backend does not read the header
//!   written for it (the header's value is checked over real sockets, in `tests/deadline_hyper.rs` and
//!   `tests/deadline_tonic.rs`). Such a stack's wasted work therefore shows its local enforcement and that
//!   cancellation, not a remote server honouring the header. The client gives up after its timeout; the server keeps
//!   working on the request unless `cancel_on_timeout` (across a real network nobody tells it). Rejections and
//!   errors are retried at once up to `retries` times within the same timeout.
//! - **The stack under test** is any tower service over `http::Request<`[`SimBody`]`>` answering
//!   `http::Response<`[`SimResponseBody`]`>`, boxed as a [`SimService`] (see [`boxed`]). The simulator reads
//!   every response body to its end, so layers that hold a permit until the body is done release it as in
//!   production.
//! - **Verdicts**: an `Err`, or status 503, 429 or 504 (or a trailers-only gRPC UNAVAILABLE, RESOURCE_EXHAUSTED
//!   or DEADLINE_EXCEEDED), is a *rejection*; any other 4xx or 5xx status (or gRPC status) an *error*; any other
//!   answer within the client's timeout a *success*; no answer in time a *timeout*.
//!
//! Each request's demand (its service time draw and whether it fails) comes from its own RNG stream, and
//! arrivals from another, so every strategy faces exactly the same requests.
//!
//! Determinism holds as long as the stack does too: time from `tokio::time`, no thread-local randomness, and
//! `biased;` in any `tokio::select!` (tokio picks among ready branches at random otherwise).
//!
//! # The scenario file
//!
//! ```toml
//! name = "s2-sustained"          # required, unique
//! description = "..."            # optional
//! seed = 2                       # default 1
//!
//! [backend]
//! workers = 8
//! service = { dist = "exponential", mean_ms = 40.0 }
//! #   { dist = "constant", ms }, { dist = "exponential", mean_ms }, { dist = "lognormal", median_ms, sigma }
//! error_rate = 0.0               # optional
//!
//! [client]
//! timeout_ms = 1000              # at most 3600000 (an hour)
//! send_deadline = false          # optional: send grpc-timeout
//! cancel_on_timeout = false      # optional
//! retries = 0                    # optional
//! arrivals = "poisson"           # optional: "poisson" or "uniform" (evenly spaced)
//!
//! [[class]]                      # optional; default: one class "default", priority critical
//! name = "critical"              # unique, not "all" (the rows summing the classes)
//! priority = "critical"          # critical_plus | critical | sheddable_plus | sheddable
//! timeout_ms = 1000              # optional override
//!
//! [[phase]]
//! name = "2x"                    # unique
//! duration_s = 60
//! rps = 400.0                    # or class_rps = { critical = 120.0, sheddable = 720.0 }
//! rps_end = 800.0                # optional linear ramp
//! backend = { service = { dist = "constant", ms = 5.0 }, error_rate = 1.0 }   # optional change
//! ```
//!
//! Unknown keys, missing keys and impossible values are refused with a [`ScenarioError`] naming the file, the
//! key and the problem. The ten scenarios of the crate's `scenarios/` folder are [`Scenario::builtin`].
//!
//! # What is measured
//!
//! One [`Row`] per phase and class (plus class `"all"`): offered, backend, good, rejected, timed-out and failed
//! requests per second, capacity, availability, p50/p99 latency of the good requests (HDR histogram),
//! **wasted work** (the share of the backend's busy time spent on requests whose client had already given up:
//! the time after the give-up only; work done earlier on a request that is then cut off at its deadline or fails
//! is not counted there, and shows as goodput lost instead), **cut work** (the share of the busy time spent on
//! work cut off before it was done, wasted or not: what a deadline layer cancels),
//! and, through the stack's [`Probes`], the time-averaged limit and the deepest queue. A time series per
//! [`WINDOW`] ([`SeriesPoint`]) feeds charts. [`to_json`] writes the rows as the `overload` example does.
//!
//! # Example
//!
//! A tiny scenario against a custom stack (tower's concurrency limit with load shedding in front of one
//! worker):
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_backpressure::sim::{self, Probes, Scenario, Stack};
//!
//! let scenario = Scenario::from_toml(
//!     r#"
//!     name = "tiny"
//!     [backend]
//!     workers = 1
//!     service = { dist = "constant", ms = 10.0 }
//!     [client]
//!     timeout_ms = 500
//!     [[phase]]
//!     name = "calm"
//!     duration_s = 2
//!     rps = 50.0
//!     [[phase]]
//!     name = "3x"
//!     duration_s = 2
//!     rps = 300.0
//!     "#,
//!     "tiny.toml",
//! )?;
//!
//! let report = sim::run_stack(&scenario, "limit-2", |backend, _scenario| {
//!     let service = ServiceBuilder::new().load_shed().concurrency_limit(2).service(backend);
//!     Stack::new(sim::boxed(service)).probes(Probes::none().limit(|| 2))
//! })?;
//!
//! let overload = report.row("3x", "all").unwrap();
//! assert!(overload.goodput_rps > 80.0); // capacity is 100 rps
//! assert!(overload.rejected_rps > 150.0); // the rest is refused at once
//! assert_eq!(overload.mean_limit, Some(2.0));
//! println!("{}", sim::to_json([&report]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Registered strategies ([`STRATEGIES`], used by the `overload` example) run the same way with [`run`].

mod record;
mod report;
mod run;
mod scenario;
mod strategy;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

pub use self::report::{to_json, Report, Row, SeriesPoint};
pub use self::run::{run, run_stack};
pub use self::scenario::{
    Arrivals, Backend, BackendChange, Class, Client, Phase, Priority, Scenario, ScenarioError,
    ServiceTime,
};
pub use self::strategy::{boxed, strategy, BuildStack, Probe, Probes, Stack, Strategy, STRATEGIES};

use crate::core::BoxError;

/// The request header that carries a request's priority: `critical_plus`, `critical`, `sheddable_plus` or
/// `sheddable` (see [`Priority::as_str`]).
pub const PRIORITY_HEADER: &str = "x-priority";

/// The length of one window of the time series.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The body of simulated requests (empty).
pub type SimBody = http_body_util::Empty<Bytes>;

/// The body of responses leaving the stack under test.
pub type SimResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// The stack under test, boxed.
pub type SimService =
    tower::util::BoxCloneService<http::Request<SimBody>, http::Response<SimResponseBody>, BoxError>;
