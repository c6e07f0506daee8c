use std::fmt;
use std::time::Duration;

use super::error::{self, BoxError};

/// Why a layer refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// At the concurrency limit (adaptive limiter, pressure shedder).
    Overloaded,
    /// The wait queue is full.
    QueueFull,
    /// The request waited too long in the queue.
    QueueTimeout,
    /// The circuit breaker is open.
    CircuitOpen,
    /// The deadline has passed or cannot be met.
    DeadlineExceeded,
    /// A rate limit was hit.
    RateLimited,
}

impl Reason {
    /// Every reason, in the order they are declared.
    #[cfg(any(test, feature = "metrics"))]
    pub(crate) const ALL: [Reason; 6] = [
        Reason::Overloaded,
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::CircuitOpen,
        Reason::DeadlineExceeded,
        Reason::RateLimited,
    ];

    /// A short lowercase name, used as a metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Overloaded => "overloaded",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::CircuitOpen => "circuit_open",
            Reason::DeadlineExceeded => "deadline_exceeded",
            Reason::RateLimited => "rate_limited",
        }
    }

    /// A short human-readable message, the same as the reason's error type displays.
    pub const fn message(self) -> &'static str {
        match self {
            Reason::Overloaded => "service overloaded",
            Reason::QueueFull => "request queue full",
            Reason::QueueTimeout => "request timed out in queue",
            Reason::CircuitOpen => "circuit breaker open",
            Reason::DeadlineExceeded => "deadline exceeded",
            Reason::RateLimited => "rate limit exceeded",
        }
    }

    /// The HTTP status a rejection for this reason answers with in HTTP mode: 429 for rate limits, 504 for
    /// deadlines, 503 for everything else.
    #[cfg(feature = "http")]
    pub fn http_status(self) -> http::StatusCode {
        match self {
            Reason::RateLimited => http::StatusCode::TOO_MANY_REQUESTS,
            Reason::DeadlineExceeded => http::StatusCode::GATEWAY_TIMEOUT,
            _ => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code a rejection for this reason answers with in gRPC mode: 8 RESOURCE_EXHAUSTED for rate
    /// limits, 4 DEADLINE_EXCEEDED for deadlines, 14 UNAVAILABLE for everything else.
    pub const fn grpc_code(self) -> u16 {
        match self {
            Reason::RateLimited => 8,
            Reason::DeadlineExceeded => 4,
            _ => 14,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A layer's decision to refuse a request: the reason and, when the layer knows it, how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    reason: Reason,
    retry_after: Option<Duration>,
}

impl Rejection {
    /// A rejection for `reason` with no retry hint.
    pub const fn new(reason: Reason) -> Self {
        Rejection {
            reason,
            retry_after: None,
        }
    }

    /// Adds a retry hint.
    #[must_use]
    pub const fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Why the request was refused.
    pub const fn reason(&self) -> Reason {
        self.reason
    }

    /// How long the caller should wait before trying again, when known.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The error of this reason's type (in [`error`](super::error)), boxed: what error mode returns. Callers
    /// recover it with `downcast_ref::<error::Overloaded>()` and friends.
    pub fn into_error(self) -> BoxError {
        let r = self.retry_after;
        match self.reason {
            Reason::Overloaded => Box::new(error::Overloaded::new(r)),
            Reason::QueueFull => Box::new(error::QueueFull::new(r)),
            Reason::QueueTimeout => Box::new(error::QueueTimeout::new(r)),
            Reason::CircuitOpen => Box::new(error::CircuitOpen::new(r)),
            Reason::DeadlineExceeded => Box::new(error::DeadlineExceeded::new(r)),
            Reason::RateLimited => Box::new(error::RateLimited::new(r)),
        }
    }
}

/// Whole seconds for a `Retry-After` header: rounded **up**, so a client never retries early (1.2 s gives 2).
/// A zero duration gives `None`: the header is left out rather than inviting an immediate retry storm. Saturates at
/// `u64::MAX` seconds (a `Duration::MAX` would otherwise round up past it).
pub fn retry_after_secs(retry_after: Duration) -> Option<u64> {
    if retry_after.is_zero() {
        return None;
    }
    let round_up = u64::from(retry_after.subsec_nanos() > 0);
    Some(retry_after.as_secs().saturating_add(round_up))
}

/// Whole milliseconds for `grpc-retry-pushback-ms`, rounded up; `None` for zero.
pub fn retry_after_millis(retry_after: Duration) -> Option<u64> {
    if retry_after.is_zero() {
        return None;
    }
    let ms = retry_after.as_millis();
    let ms = if retry_after.as_nanos() % 1_000_000 > 0 {
        ms + 1
    } else {
        ms
    };
    Some(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// How a rejection leaves a layer, and how the inner service's errors are passed on.
///
/// `Res` is the response type the layer returns, `E` the inner service's error type.
pub trait RejectMode<Res, E>: Clone + Send + Sync + 'static {
    /// The layer's error type.
    type Error;

    /// Passes an inner service error on.
    fn inner_error(&self, error: E) -> Self::Error;

    /// Turns a rejection into the layer's answer.
    fn reject(&self, rejection: Rejection) -> Result<Res, Self::Error>;
}

/// Rejections leave as `Err(BoxError)`, downcastable to the reason's type in [`error`](super::error). For generic
/// tower services; requires the inner error to convert into [`BoxError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorMode;

impl<Res, E> RejectMode<Res, E> for ErrorMode
where
    E: Into<BoxError>,
{
    type Error = BoxError;

    fn inner_error(&self, error: E) -> BoxError {
        error.into()
    }

    fn reject(&self, rejection: Rejection) -> Result<Res, BoxError> {
        Err(rejection.into_error())
    }
}
