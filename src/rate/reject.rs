//! How a rate-limit rejection leaves the layer: the core reject modes, plus the IETF rate-limit headers in HTTP.

use std::time::Duration;

use crate::core::BoxError;
#[cfg(feature = "grpc")]
use crate::core::GrpcMode;
#[cfg(feature = "http")]
use crate::core::{http_rejection, retry_after_secs, HttpMode};
use crate::core::{ErrorMode, RejectMode, Rejection, WithRetryAfter};

/// The quota a rate limit advertises, in the terms of the IETF draft
/// [draft-ietf-httpapi-ratelimit-headers-10](https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/)
/// (unchanged in -11): a named policy of `quota` requests per `window` seconds.
///
/// A GCRA limit of one request per interval `T` with a burst of `b` is advertised as `q=b` per `w=⌈b·T⌉`
/// seconds: a client that never sends more than `b` requests in any window of `w` seconds is never refused.
/// Rounding the window up keeps that promise for sub-second intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    name: &'static str,
    quota: u32,
    window_secs: u64,
}

impl Policy {
    pub(crate) fn new(name: &'static str, burst: u32, interval: Duration) -> Self {
        let window = interval.saturating_mul(burst);
        Policy {
            name,
            quota: burst,
            window_secs: retry_after_up(window).max(1),
        }
    }

    /// The policy's name, as quoted in the headers.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Requests allowed per window (the burst).
    pub fn quota(&self) -> u32 {
        self.quota
    }

    /// The window, in whole seconds.
    pub fn window_secs(&self) -> u64 {
        self.window_secs
    }

    /// The `RateLimit-Policy` field value, e.g. `"default";q=100;w=60`.
    #[cfg(feature = "http")]
    pub fn policy_header(&self) -> http::HeaderValue {
        let value = format!("\"{}\";q={};w={}", self.name, self.quota, self.window_secs);
        // The builder only accepts names of printable ASCII without quotes or backslashes.
        http::HeaderValue::try_from(value).expect("policy names are validated by the builder")
    }

    /// The `RateLimit` field value for a refused request: no quota left (`r=0`) and the seconds until there is
    /// (`t`, rounded up like `Retry-After`), e.g. `"default";r=0;t=2`.
    #[cfg(feature = "http")]
    pub fn exhausted_header(&self, retry_after: Duration) -> http::HeaderValue {
        let value = format!("\"{}\";r=0;t={}", self.name, retry_after_up(retry_after));
        http::HeaderValue::try_from(value).expect("policy names are validated by the builder")
    }
}

/// Whole seconds, rounded up (0 for a zero duration).
fn retry_after_up(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// Whether `name` can be written as a structured-field string without escapes.
pub(crate) fn valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// A [`RejectMode`] that knows how to answer a rate-limit rejection.
///
/// [`ErrorMode`] and [`GrpcMode`](crate::core::GrpcMode) answer as for any rejection (`core::error::RateLimited`;
/// RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`). [`HttpMode`](crate::core::HttpMode) adds the IETF
/// `RateLimit` and `RateLimit-Policy` fields to its 429 with `Retry-After`. [`WithRetryAfter`] answers as the
/// mode it wraps does, keeping the limiter's own wait. A custom reject mode opts in with an empty `impl` (the
/// provided method answers as [`RejectMode::reject`] does).
pub trait RateLimitReject<Res, E>: RejectMode<Res, E> {
    /// The answer to a request refused under `policy`.
    fn reject_rate_limited(
        &self,
        rejection: Rejection,
        policy: &Policy,
    ) -> Result<Res, Self::Error> {
        let _ = policy;
        self.reject(rejection)
    }
}

impl<Res, E: Into<BoxError>> RateLimitReject<Res, E> for ErrorMode {}

/// The wrapped mode answers (with its rate-limit headers, if it writes any). The rate limit always computes its
/// own wait, which is kept; the default hint would only fill a rejection that came without one.
impl<Res, E, M: RateLimitReject<Res, E>> RateLimitReject<Res, E> for WithRetryAfter<M> {
    fn reject_rate_limited(
        &self,
        rejection: Rejection,
        policy: &Policy,
    ) -> Result<Res, Self::Error> {
        self.mode()
            .reject_rate_limited(self.hinted(rejection), policy)
    }
}

#[cfg(feature = "grpc")]
impl<B: Default, E> RateLimitReject<http::Response<B>, E> for GrpcMode {}

#[cfg(feature = "http")]
impl<B: Default, E> RateLimitReject<http::Response<B>, E> for HttpMode {
    fn reject_rate_limited(
        &self,
        rejection: Rejection,
        policy: &Policy,
    ) -> Result<http::Response<B>, E> {
        let mut response = http_rejection(rejection);
        let headers = response.headers_mut();
        headers.insert("ratelimit-policy", policy.policy_header());
        if let Some(wait) = rejection
            .retry_after()
            .filter(|w| retry_after_secs(*w).is_some())
        {
            headers.insert("ratelimit", policy.exhausted_header(wait));
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_covers_the_burst_rounded_up() {
        let p = Policy::new("default", 100, Duration::from_millis(600));
        assert_eq!((p.quota(), p.window_secs()), (100, 60));
        let p = Policy::new("default", 1, Duration::from_millis(10));
        assert_eq!((p.quota(), p.window_secs()), (1, 1));
        let p = Policy::new("default", 5, Duration::from_millis(1200));
        assert_eq!(p.window_secs(), 6);
    }

    #[test]
    fn policy_names() {
        assert!(valid_policy_name("per-ip"));
        assert!(!valid_policy_name(""));
        assert!(!valid_policy_name("a\"b"));
        assert!(!valid_policy_name("a\\b"));
        assert!(!valid_policy_name("é"));
    }

    #[cfg(feature = "http")]
    #[test]
    fn header_values() {
        let p = Policy::new("api", 10, Duration::from_millis(100));
        assert_eq!(p.policy_header(), "\"api\";q=10;w=1");
        assert_eq!(
            p.exhausted_header(Duration::from_millis(1200)),
            "\"api\";r=0;t=2"
        );
        assert_eq!(
            p.exhausted_header(Duration::MAX),
            format!("\"api\";r=0;t={}", u64::MAX).as_str(),
            "saturates rather than overflowing"
        );
    }
}
