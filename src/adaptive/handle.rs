//! The live handle on one limiter.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::algorithm::Algorithm;
use super::state::{check_bounds, Control};
use crate::core::{ConfigError, LimitSource};

/// A cheap, cloneable handle on one adaptive limiter: read its figures, retune it live, or hand it to the queue
/// layer as its [`LimitSource`].
///
/// ```
/// use tower_backpressure::adaptive::{AdaptiveConcurrencyLayer, Aimd};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = AdaptiveConcurrencyLayer::builder().initial_limit(10).build().unwrap();
/// let handle = layer.handle();
/// assert_eq!(handle.limit(), 10);
/// handle.set_bounds(2, 8).unwrap();
/// assert_eq!(handle.limit(), 8);
/// handle.set_algorithm(Aimd::new().backoff_ratio(0.8)).unwrap();
/// assert_eq!(handle.snapshot().algorithm, "aimd");
/// # }
/// ```
#[derive(Clone)]
pub struct AdaptiveHandle {
    shared: Arc<dyn Control>,
}

/// The figures of a limiter at one moment.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AdaptiveSnapshot {
    /// The concurrency limit enforced now.
    pub limit: usize,
    /// Requests holding a permit now.
    pub in_flight: usize,
    /// The lower bound of the limit.
    pub min_limit: usize,
    /// The upper bound of the limit.
    pub max_limit: usize,
    /// The algorithm's name.
    pub algorithm: &'static str,
    /// The estimated service time (an average of recent windows), once one window has closed.
    pub expected_latency: Option<Duration>,
    /// Requests rejected so far: over the limit, or doomed (see `rejected_deadline`).
    pub rejected: u64,
    /// Of `rejected`, the requests refused because their [`Deadline`](crate::core::Deadline) would pass before
    /// the expected service time (see the module docs, "Deadlines").
    pub rejected_deadline: u64,
    /// Sample windows applied so far.
    pub windows: u64,
    /// One admitted request in this many is timed: 1 unless the service is busy enough that a window holds
    /// thousands of samples and the layer has no observer (see the module docs, "Cost").
    pub timed_one_in: u32,
}

impl AdaptiveHandle {
    pub(crate) fn new(shared: Arc<dyn Control>) -> Self {
        AdaptiveHandle { shared }
    }

    /// The concurrency limit enforced now.
    pub fn limit(&self) -> usize {
        self.shared.core().limit.load(Ordering::Acquire)
    }

    /// Requests holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.shared.core().in_flight()
    }

    /// The estimated service time, once one sample window has closed.
    pub fn expected_latency(&self) -> Option<Duration> {
        match self.shared.core().expected_latency.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// The current figures.
    pub fn snapshot(&self) -> AdaptiveSnapshot {
        let core = self.shared.core();
        let algorithm = core.lock_updater().algorithm.name();
        let rejected_deadline = core.rejected_deadline.load(Ordering::Relaxed);
        AdaptiveSnapshot {
            limit: self.limit(),
            in_flight: self.in_flight(),
            min_limit: core.min_limit.load(Ordering::Relaxed),
            max_limit: core.max_limit.load(Ordering::Relaxed),
            algorithm,
            expected_latency: self.expected_latency(),
            rejected: rejected_deadline + core.rejected_overloaded.load(Ordering::Relaxed),
            rejected_deadline,
            windows: core.windows.load(Ordering::Relaxed),
            timed_one_in: core.timing_mask() + 1,
        }
    }

    /// Changes the bounds of the limit; the limit is moved into them at once.
    pub fn set_bounds(&self, min_limit: usize, max_limit: usize) -> Result<(), ConfigError> {
        check_bounds(min_limit, max_limit)?;
        let core = self.shared.core();
        let mut updater = core.lock_updater();
        core.min_limit.store(min_limit, Ordering::Relaxed);
        core.max_limit.store(max_limit, Ordering::Relaxed);
        if core.apply_estimate(&mut updater).is_some() {
            drop(updater);
            self.shared.limit_changed();
        }
        Ok(())
    }

    /// Replaces the algorithm (to change its parameters, pass one built with the new ones). The current limit
    /// is kept as the new algorithm's starting point; what the old one had learned is dropped.
    pub fn set_algorithm(&self, algorithm: impl Algorithm) -> Result<(), ConfigError> {
        algorithm.validate()?;
        self.shared.core().lock_updater().algorithm = Box::new(algorithm);
        Ok(())
    }
}

impl LimitSource for AdaptiveHandle {
    fn limit(&self) -> usize {
        AdaptiveHandle::limit(self)
    }

    fn expected_latency(&self) -> Option<Duration> {
        AdaptiveHandle::expected_latency(self)
    }
}

impl fmt::Debug for AdaptiveHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveHandle")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
