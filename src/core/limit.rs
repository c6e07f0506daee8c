use std::time::Duration;

/// A live concurrency limit that one layer publishes and another enforces: the queue shedder reads the adaptive
/// limiter's handle through this trait (and a fixed number works the same way), so layers stay independent.
pub trait LimitSource: Clone + Send + Sync + 'static {
    /// The limit now.
    fn limit(&self) -> usize;

    /// The current estimate of how long one request takes to serve, when the source has one. Deadline-aware
    /// layers shed requests whose remaining budget is smaller than this.
    fn expected_latency(&self) -> Option<Duration> {
        None
    }
}

impl LimitSource for usize {
    fn limit(&self) -> usize {
        *self
    }
}
