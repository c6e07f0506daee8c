//! The shared core: what every layer of the crate stands on, knowing no layer.
//!
//! - [`Permit`] and [`Release`]: RAII in-flight accounting that records exactly one [`Outcome`] per admitted
//!   request on every exit path (completion, error, drop, panic).
//! - [`Classify`]: turns a call's result into an [`Outcome`] and decides how long the permit is held
//!   ([`AnyOk`] and closures for generic services; [`HttpStatus`] and [`GrpcClassifier`] hold it until the
//!   response body is done, through [`TrackedBody`]).
//! - [`Rejection`], [`Reason`] and [`RejectMode`]: how a refusal leaves a layer: [`ErrorMode`] (a `BoxError`
//!   downcastable to a type in [`error`]), [`HttpMode`] (503/429/504 with `Retry-After`) or [`GrpcMode`]
//!   (trailers-only UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED).
//! - [`Observer`] and [`Event`]: hooks for tracing, metrics and tests; `()` costs nothing.
//! - [`Deadline`] and [`LimitSource`]: the two hooks through which layers cooperate without knowing each other.
//! - [`ResponseFuture`]: the response future of a layer that admits or rejects in `call`.
//!
//! These are public so that users can write layers that behave like ours.

mod classify;
pub(crate) mod deadline;
pub mod error;
mod future;
mod hint;
mod limit;
pub(crate) mod observer;
mod outcome;
mod permit;
mod rejection;
pub(crate) mod stripe;

#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "metrics")]
mod metrics;

pub use self::classify::{is_local_error, AnyOk, Classify};
#[cfg(feature = "http")]
pub use self::deadline::RequestDeadline;
pub use self::deadline::{CurrentDeadline, Deadline, DeadlineScope, DeadlineSource};
pub use self::error::{BoxError, ConfigError};
pub use self::future::ResponseFuture;
pub use self::hint::WithRetryAfter;
pub use self::limit::LimitSource;
pub use self::observer::{CircuitState, Event, Observer, TracingObserver};
pub use self::outcome::Outcome;
pub(crate) use self::permit::{Instance, Owner};
pub use self::permit::{Permit, Release, Releaser};
pub use self::rejection::{
    retry_after_millis, retry_after_secs, ErrorMode, Reason, RejectMode, Rejection,
};

#[cfg(feature = "grpc")]
pub use self::grpc::{grpc_rejection, GrpcClassifier, GrpcMode};
#[cfg(feature = "http")]
pub use self::http::{
    http_rejection, is_local_rejection, ClassifyEos, HttpMode, HttpStatus, TrackedBody,
};
#[cfg(feature = "metrics")]
pub use self::metrics::MetricsObserver;
