//! Error types: one opaque type per rejection reason, and the builder error.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

macro_rules! rejection_error {
    ($(#[$doc:meta])* $name:ident, $msg:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            retry_after: Option<Duration>,
        }

        impl $name {
            pub(crate) fn new(retry_after: Option<Duration>) -> Self {
                $name { retry_after }
            }

            /// How long the layer suggests waiting before trying again, when it knows.
            pub fn retry_after(&self) -> Option<Duration> {
                self.retry_after
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($msg)
            }
        }

        impl std::error::Error for $name {}
    };
}

/// Declares the rejection error types, and [`is_rejection`] over all of them: a type declared here cannot be left
/// out of it.
macro_rules! rejection_errors {
    ($($(#[$doc:meta])* $name:ident, $msg:literal;)*) => {
        $(rejection_error!($(#[$doc])* $name, $msg);)*

        /// Whether `error` is one of the rejection error types.
        pub(crate) fn is_rejection(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
            false $(|| error.is::<$name>())*
        }
    };
}

rejection_errors! {
    /// The request was shed because the service is at its concurrency limit.
    Overloaded, "service overloaded";
    /// The request was shed because the wait queue is full.
    QueueFull, "request queue full";
    /// The request waited in the queue longer than allowed.
    QueueTimeout, "request timed out in queue";
    /// The request was refused because the circuit breaker is open.
    CircuitOpen, "circuit breaker open";
    /// The request's deadline passed, or too little of it was left to do the work.
    DeadlineExceeded, "deadline exceeded";
    /// The request was refused by a rate limit.
    RateLimited, "rate limit exceeded";
}

/// An invalid layer configuration, returned by `build()`.
///
/// Its message names the layer, the setting and the problem, e.g.
/// `invalid adaptive concurrency config: min_limit: must not exceed max_limit (10 > 5)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    layer: &'static str,
    field: &'static str,
    problem: Cow<'static, str>,
}

impl ConfigError {
    /// A configuration error for `field` of `layer`.
    pub fn new(
        layer: &'static str,
        field: &'static str,
        problem: impl Into<Cow<'static, str>>,
    ) -> Self {
        ConfigError {
            layer,
            field,
            problem: problem.into(),
        }
    }

    /// The layer whose configuration is invalid.
    pub fn layer(&self) -> &'static str {
        self.layer
    }

    /// The setting that is invalid.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} config: {}: {}",
            self.layer, self.field, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}
