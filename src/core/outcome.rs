use std::fmt;

/// What a finished request says about the health of the service behind a layer.
///
/// Every admitted request ends with exactly one `Outcome`, recorded by its [`Permit`](super::Permit).
/// Limiters learn from it, circuit breakers count it, observers export it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request was served.
    Success,
    /// The request failed for a reason that is the service's fault (an HTTP 500, gRPC INTERNAL, an inner panic),
    /// but that is not, by itself, a sign of overload.
    Failure,
    /// The request was lost to overload: a timeout, an expired deadline, a downstream 429/503/504 or gRPC
    /// UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED. Adaptive limiters treat it as a congestion signal.
    Dropped,
    /// The answer says nothing about load: the caller went away (the response future or body was dropped) or
    /// cancelled, or the classifier chose to ignore it.
    Ignored,
}

impl Outcome {
    /// A short lowercase name, used as a metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Dropped => "dropped",
            Outcome::Ignored => "ignored",
        }
    }

    /// Whether a circuit breaker counts this outcome against the dependency (`Failure` or `Dropped`).
    pub const fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure | Outcome::Dropped)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
