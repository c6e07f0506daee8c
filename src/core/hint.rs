use std::time::Duration;

use super::{RejectMode, Rejection};

/// A [`RejectMode`] wrapper that gives rejections without a retry hint a default one.
///
/// Layers that cannot know when capacity frees up (the adaptive limiter, the queue) refuse without a hint, so
/// their 503s carry no `Retry-After` and their gRPC rejections no `grpc-retry-pushback-ms`. Clients that honour
/// the hint back off instead of retrying at once; wrapping the mode sets one. Hints a layer computed itself
/// (a rate limit's wait, an open breaker's remaining time) are kept. It wraps the mode of any layer, the rate
/// limit's included (where it is a [`RateLimitReject`](crate::rate::RateLimitReject) when the mode it wraps is,
/// and keeps that mode's rate-limit headers).
///
/// ```
/// # #[cfg(feature = "http")] {
/// use std::time::Duration;
/// use tower_backpressure::core::{HttpMode, HttpStatus, WithRetryAfter};
/// use tower_backpressure::queue::QueueLayer;
///
/// let queue = QueueLayer::builder()
///     .limit(64)
///     .classifier(HttpStatus::new())
///     .reject_mode(WithRetryAfter::new(HttpMode, Duration::from_secs(1)))
///     .build()
///     .unwrap();
/// # drop(queue);
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct WithRetryAfter<M> {
    mode: M,
    retry_after: Duration,
}

impl<M> WithRetryAfter<M> {
    /// Wraps `mode`, hinting `retry_after` when a rejection has no hint of its own.
    pub const fn new(mode: M, retry_after: Duration) -> Self {
        WithRetryAfter { mode, retry_after }
    }
}

impl<Res, E, M: RejectMode<Res, E>> RejectMode<Res, E> for WithRetryAfter<M> {
    type Error = M::Error;

    fn inner_error(&self, error: E) -> Self::Error {
        self.mode.inner_error(error)
    }

    fn reject(&self, rejection: Rejection) -> Result<Res, Self::Error> {
        self.mode.reject(self.hinted(rejection))
    }
}

impl<M> WithRetryAfter<M> {
    /// The wrapped mode.
    pub(crate) fn mode(&self) -> &M {
        &self.mode
    }

    /// `rejection`, given the default hint if it has none of its own.
    pub(crate) fn hinted(&self, rejection: Rejection) -> Rejection {
        match rejection.retry_after() {
            Some(_) => rejection,
            None => rejection.with_retry_after(Some(self.retry_after)),
        }
    }
}
