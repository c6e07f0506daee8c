//! Deadlines that travel with a request from the first hop to the last.
//!
//! # Why
//!
//! A request nobody waits for any more should cost nothing. Under overload a service that keeps working on
//! requests whose callers have given up spends its capacity on waste, and the queue in front of it only grows.
//! A deadline fixes that if it is known everywhere: read on the way in, enforced, visible to handlers, passed on
//! to every outbound call with the time already spent taken off, and used by the queue and the limiter to shed
//! work that cannot finish in time.
//!
//! # How it differs from plain tower and tonic
//!
//! - `tower::timeout::Timeout` applies one fixed duration per layer and knows nothing of the caller's budget;
//!   [`DeadlineLayer`] takes the **earliest** of the caller's header (`grpc-timeout` and/or a millisecond header),
//!   its own maximum, and any [`Deadline`] already set (in the request's extensions or the task-local scope).
//! - tonic parses `grpc-timeout` on servers only, answers expiry with CANCELLED, does not count time spent queued,
//!   bounds only the response head (a server stream runs on past the deadline) and never propagates. Here expiry
//!   is 504 / DEADLINE_EXCEEDED (never CANCELLED), the deadline bounds the whole response, streamed body included,
//!   the layer goes outermost so time queued in inner layers counts, and [`PropagateDeadlineLayer`] passes the
//!   rest on to the next hop.
//! - Requests that arrive already expired, or with less than a configurable minimum left, are refused before
//!   the inner service is called.
//!
//! # The pieces
//!
//! - [`Deadline`] (from [`core`](crate::core)): an absolute `tokio::time::Instant`, current in a task-local scope
//!   around the inner service's `call` and its future ([`Deadline::current`]; nested scopes keep the earliest),
//!   and, when the layer is built with `request_extension(true)`, also stored in the request's extensions
//!   (`Deadline::of(&req)`). [`Deadline::find`] reads both places.
//! - [`codec`]: the `grpc-timeout` grammar of the gRPC HTTP/2 protocol and the millisecond header
//!   ([`TIMEOUT_MS_HEADER`], `x-request-timeout-ms` by default). Budgets are encoded **truncated**, never larger
//!   than they are.
//! - [`DeadlineLayer`] (server, feature `http`): computes the effective deadline, refuses doomed requests, stores
//!   the deadline in the request's extensions if built to
//!   ([`request_extension(true)`](DeadlineLayerBuilder::request_extension): for a request handed to another task
//!   before the inner `call`, as behind tower's `Buffer`), makes it current while the inner
//!   service's `call` runs (so a queue or a limiter inside sees it when it decides, and judges it by this layer's
//!   clock reading instead of reading the clock again), runs the inner future with the deadline current, as
//!   [`Deadline::scope`] does (around every poll and its drop), and races it against a timer. On expiry the inner
//!   future is dropped, the answer is deadline-exceeded and the outcome
//!   [`Outcome::Dropped`](crate::core::Outcome::Dropped).
//!   A caller that hangs up before the deadline leaves the outcome `Ignored`; one that hangs up once it has
//!   passed, before the timer has answered (timers fire at the next millisecond tick), `Dropped` as well.
//!   In HTTP and gRPC modes the deadline goes on bounding the response body (see below).
//!   A malformed header (too many digits, unknown unit, overflow, garbage) is ignored with a `tracing` event by
//!   default, or refused in [strict](DeadlineLayerBuilder::strict) mode with 400 / INVALID_ARGUMENT /
//!   [`InvalidTimeout`]; never a panic, never a wrong deadline. A header sent more than once counts with every
//!   value (a proxy may append its own shorter timeout, and implementations differ on which one they read): the
//!   smallest valid value applies; a malformed one among them is skipped with a `tracing` event, or in strict
//!   mode has the request refused. A request with no deadline anywhere and no configured maximum passes straight
//!   through: no clock read, no timer, no allocation.
//! - [`PropagateDeadlineLayer`] (client, feature `http`): takes the request's deadline (the earlier of its extensions'
//!   and [`Deadline::current`]), subtracts a [safety margin](PropagateDeadlineLayerBuilder::margin), writes
//!   `grpc-timeout` and/or the millisecond header (keeping a smaller value the caller set, and only that one of
//!   several), and enforces the deadline locally (in HTTP and gRPC modes on the response body too). If nothing
//!   is left (nothing after the margin, or less than the headers written can carry: under a millisecond with the
//!   millisecond header), the call fails at once with deadline-exceeded and nothing is sent.
//!   The deadline is read in `call`: under [`Deadline::scope`], make the call inside the scoped future
//!   (`oneshot`, or `call` in an `async` block), not before it. A transport that enforces the timeout it sends
//!   on its own (a tonic `Channel` fails the call when the `grpc-timeout` runs out, which tonic reports as
//!   CANCELLED) is answered for: an error from the inner service once the sent budget is spent becomes
//!   deadline-exceeded (with [`GrpcMode`](crate::core::GrpcMode), DEADLINE_EXCEEDED) and outcome `Dropped`
//!   (a layer that writes no timeout header sends no budget: an error before the deadline passes on as it is).
//!   A response that arrives, even late, is passed on as it is (in HTTP and gRPC modes its head: a body still to
//!   come after the deadline is cut at once).
//!
//! **The response body** (`.http()` and `.grpc()`): the deadline bounds the whole exchange, not only the response
//! head. Both layers pass the body on as a [`DeadlineBody`]:
//! - the deadline is [`Deadline::current`] while the body is polled and dropped, so a streaming handler that calls
//!   dependencies while it produces its body passes the deadline on;
//! - at the deadline the inner body is dropped, which stops the work producing it, and the body ends. In gRPC mode
//!   it ends with trailers `grpc-status: 4` (DEADLINE_EXCEEDED): a server stream under a 2.5 s `grpc-timeout`
//!   sends what it made in 2.5 s, then its caller reads DEADLINE_EXCEEDED. In HTTP mode the head (a 200, say) is
//!   sent already, so the body fails with [`DeadlineExceeded`](crate::core::error::DeadlineExceeded) and hyper
//!   resets the stream (HTTP/2) or closes the connection (HTTP/1.1): the client sees a cut response, not a short
//!   one. Either way the outcome is [`Outcome::Dropped`](crate::core::Outcome::Dropped);
//! - the body's timer is armed the first time the body waits, or at its third frame if it never waits (a stream
//!   whose frames are all ready), and is its only allocation. A body that ends sooner without waiting (a
//!   one-frame body, a server's unary gRPC message and its trailers) arms none and passes unchanged; a client's
//!   body that waits for the network arms one. A body is cut at its first poll once the runtime has fired the
//!   timer (a frame ready at that poll is not delivered): hyper polls a body while its client reads, so a client
//!   that stops reading holds the body, and its permit, until it reads again or goes away. Trailers end a body,
//!   and a body that has ended is never cut;
//! - on a client, a body error once the budget written for the next hop is spent is that hop cutting its body at
//!   its deadline: it ends the body as a cut here would (deadline-exceeded, `Dropped`), not as a failure;
//! - the outcome of a cut is `Dropped` with the layer's own classifiers (`HttpStatus`, `GrpcClassifier`), which
//!   hold the permit until the body ends; a closure classifier records the outcome at the response head;
//! - body errors pass on, boxed: the body's error type is [`BoxError`](crate::core::BoxError).
//!
//! In [`ErrorMode`](crate::core::ErrorMode) the response is not an HTTP response the layer knows how to read, and
//! only the response future is bounded. A mode of your own says what it does through [`BoundResponse`].
//!
//! | refusal | [`ErrorMode`](crate::core::ErrorMode) | [`HttpMode`](crate::core::HttpMode) | `GrpcMode` |
//! |---|---|---|---|
//! | expired, too little left, or expiry in flight | [`DeadlineExceeded`](crate::core::error::DeadlineExceeded) | 504 | trailers-only `grpc-status: 4` |
//! | malformed header, strict mode | [`InvalidTimeout`] | 400 | trailers-only `grpc-status: 3` |
//!
//! Place the server layer outermost (`Deadline → RateLimit → Queue(adaptive) → handler`) so queueing counts
//! against the budget, and the client layer first on outbound stacks
//! (`PropagateDeadline → CircuitBreaker → AdaptiveConcurrency → transport`).
//!
//! The server layer reads the clock once, in its `call`, and the budget runs from there, as tower's `Timeout`'s
//! does: a wait between the call and the response future's first poll counts. Such a wait happens when the future
//! is polled by a different task from the one that called, as behind a tower `Buffer` placed above the layer. Served
//! through hyper-util's `TowerToHyperService` (axum's `serve`, tonic's server), the stack is called in the task
//! that polls it, so the time that task waited to be run comes before the call: no tower layer can count it.
//!
//! # Example
//!
//! A handler gets 30 s from its caller, spends 7 s, and calls a dependency, which is told 23 s minus the margin:
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_backpressure::deadline::{Deadline, DeadlineLayer, PropagateDeadlineLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! tokio::time::pause();
//! // The dependency reports the budget it was given.
//! let dependency = service_fn(|req: Request<String>| async move {
//!     let budget = req.headers()["grpc-timeout"].to_str().unwrap().to_owned();
//!     Ok::<_, Infallible>(Response::new(budget))
//! });
//! let client = PropagateDeadlineLayer::builder()
//!     .margin(Duration::from_millis(10))
//!     .build()
//!     .unwrap()
//!     .layer(dependency);
//!
//! let handler = service_fn(move |_req: Request<String>| {
//!     let client = client.clone();
//!     async move {
//!         assert!(Deadline::current().is_some()); // no plumbing needed
//!         tokio::time::sleep(Duration::from_secs(7)).await; // the handler's own work
//!         // No deadline passed explicitly: the task-local one is found.
//!         client.oneshot(Request::new(String::new())).await
//!     }
//! });
//! let server = DeadlineLayer::builder()
//!     .max_timeout(Duration::from_secs(60))
//!     .build()
//!     .unwrap()
//!     .layer(handler);
//!
//! let request = Request::builder().header("grpc-timeout", "30S").body(String::new()).unwrap();
//! let response = server.oneshot(request).await.unwrap();
//! assert_eq!(response.into_body(), "22990000u"); // 30 s - 7 s - 10 ms, in microseconds
//! # }
//! # }
//! ```
//!
//! An expired budget never reaches the handler:
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_backpressure::deadline::DeadlineLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let handler = service_fn(|_req: Request<String>| async {
//!     unreachable!("an expired request is refused before the handler is called");
//!     #[allow(unreachable_code)]
//!     Ok::<_, Infallible>(Response::new(String::new()))
//! });
//! let server = DeadlineLayer::builder().http().build().unwrap().layer(handler);
//! let request = Request::builder().header("x-request-timeout-ms", "0").body(String::new()).unwrap();
//! let response = server.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
//! # }
//! # }
//! ```

#[cfg(feature = "http")]
mod body;
pub mod codec;
#[cfg(feature = "http")]
pub mod future;
#[cfg(feature = "http")]
mod layer;
mod mode;
#[cfg(feature = "http")]
mod service;
#[cfg(feature = "http")]
mod shared;

#[cfg(feature = "http")]
pub use self::body::DeadlineBody;
pub use self::codec::{InvalidTimeout, GRPC_TIMEOUT_HEADER, TIMEOUT_MS_HEADER};
#[cfg(feature = "http")]
pub use self::layer::{
    DeadlineLayer, DeadlineLayerBuilder, PropagateDeadlineLayer, PropagateDeadlineLayerBuilder,
    DEFAULT_MARGIN,
};
pub use self::mode::{BoundResponse, RejectInvalid};
#[cfg(feature = "http")]
pub use self::service::{DeadlineService, PropagateDeadline};
#[cfg(feature = "http")]
pub use self::shared::{DeadlineHandle, DeadlineSnapshot};
pub use crate::core::Deadline;
