use std::any::Any;

use super::error::{is_rejection, BoxError};
use super::{Outcome, Permit};

/// Decides what a finished call says about load, and when its permit is released.
///
/// `finish` receives the inner service's result and the request's permit (`None` for requests a layer let
/// through without one, such as bypassed health checks) and returns what the caller gets:
///
/// - generic classifiers ([`AnyOk`], closures) record the outcome at once and return the response unchanged;
/// - HTTP and gRPC classifiers (features `http`, `grpc`) look at the response head and move the permit into the
///   response body, so it is held, and latency measured, until the body ends or is dropped.
pub trait Classify<Res, E>: Clone + Send + Sync + 'static {
    /// What the caller receives on success.
    type Response;

    /// Classifies `result`, releases or hands on `permit`, and returns the response.
    fn finish(&self, result: Result<Res, E>, permit: Option<Permit>) -> Result<Self::Response, E>;
}

/// The generic classifier: `Ok` is [`Outcome::Success`], `Err` is [`Outcome::Failure`], except a refusal made by
/// one of this crate's layers inside ([`is_local_error`]), which is [`Outcome::Ignored`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyOk;

impl<Res, E: 'static> Classify<Res, E> for AnyOk {
    type Response = Res;

    // Always inlined, here and below: made out of line (as the compiler chose once it inlined the permit's
    // release into it), it took the response by pointer and copied it out again, a hundred bytes and more
    // read just after they were written, on every request.
    #[inline(always)]
    fn finish(&self, result: Result<Res, E>, permit: Option<Permit>) -> Result<Res, E> {
        if let Some(permit) = permit {
            permit.complete(match &result {
                Ok(_) => Outcome::Success,
                Err(error) if is_local_error(error) => Outcome::Ignored,
                Err(_) => Outcome::Failure,
            });
        }
        result
    }
}

/// Whether `error` is a refusal made by one of this process's layers in error mode (a [`BoxError`] holding one of
/// the [`error`](super::error) types a rejection becomes: overloaded, queue full, queue timeout, circuit open,
/// deadline exceeded, rate limited) rather than an error from the service behind them.
///
/// [`AnyOk`] records such an error as [`Outcome::Ignored`]: a local layer shedding load says nothing about the
/// health of the dependency, so an outer circuit breaker must not trip on it and an outer limiter must not learn
/// from it. A closure classifier can do the same by calling this first. (In HTTP and gRPC mode a refusal is a
/// response, and `is_local_rejection` tells.) For any other error type it is `false`, decided at compile time.
///
/// That includes the deadline-exceeded answer of a deadline layer inside, whose expiry may stand for a slow
/// dependency, as in HTTP mode: a breaker meant to open on those needs a classifier of its own that calls them
/// failures.
///
/// ```
/// use tower_backpressure::core::{is_local_error, BoxError, Rejection, Reason};
///
/// let refused: BoxError = Rejection::new(Reason::Overloaded).into_error();
/// assert!(is_local_error(&refused));
/// let failed: BoxError = "connection reset".into();
/// assert!(!is_local_error(&failed));
/// assert!(!is_local_error(&std::io::Error::other("not boxed")));
/// ```
pub fn is_local_error<E: 'static>(error: &E) -> bool {
    (error as &dyn Any)
        .downcast_ref::<BoxError>()
        .is_some_and(|error| is_rejection(&**error))
}

/// Any closure `Fn(Result<&Res, &E>) -> Outcome` is a generic classifier.
///
/// ```
/// use tower_backpressure::core::{Classify, Outcome};
///
/// // Timeouts reported as `Err("timeout")` are overload, other errors are failures.
/// let classify = |r: Result<&u32, &&str>| match r {
///     Ok(_) => Outcome::Success,
///     Err(&"timeout") => Outcome::Dropped,
///     Err(_) => Outcome::Failure,
/// };
/// assert_eq!(classify.finish(Ok(7), None), Ok(7));
/// ```
impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(Result<&Res, &E>) -> Outcome + Clone + Send + Sync + 'static,
{
    type Response = Res;

    #[inline(always)]
    fn finish(&self, result: Result<Res, E>, permit: Option<Permit>) -> Result<Res, E> {
        if let Some(permit) = permit {
            permit.complete(self(result.as_ref()));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Reason, Rejection};

    #[test]
    fn every_rejection_is_a_local_error() {
        for reason in Reason::ALL {
            assert!(
                is_local_error(&Rejection::new(reason).into_error()),
                "{reason:?}"
            );
        }
        let failed: BoxError = "connection reset".into();
        assert!(!is_local_error(&failed));
    }
}
