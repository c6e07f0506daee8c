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

/// The generic classifier: `Ok` is [`Outcome::Success`], `Err` is [`Outcome::Failure`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyOk;

impl<Res, E> Classify<Res, E> for AnyOk {
    type Response = Res;

    // Always inlined, here and below: made out of line (as the compiler chose once it inlined the permit's
    // release into it), it took the response by pointer and copied it out again, a hundred bytes and more
    // read just after they were written, on every request.
    #[inline(always)]
    fn finish(&self, result: Result<Res, E>, permit: Option<Permit>) -> Result<Res, E> {
        if let Some(permit) = permit {
            permit.complete(if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            });
        }
        result
    }
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
