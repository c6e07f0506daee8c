//! Lag as an overload signal for any layer's classifier.

use crate::core::{Classify, Outcome, Permit};

use super::RuntimeMonitor;

/// Wraps a classifier so that requests finishing while the runtime is lagging count as [`Outcome::Dropped`].
///
/// When the process itself is the bottleneck (a blocked or saturated runtime), latency rises for every request
/// and a limiter that only watches its backend cannot tell why. Plugged into an adaptive limiter's classifier,
/// `LagAware` makes that lag a congestion signal, so the limit comes down. It reads
/// [`RuntimeMonitor::is_lagging`]: one atomic load per finished request; with the monitor stopped or without a
/// [`max_lag`](super::RuntimeMonitorBuilder::max_lag) threshold it changes nothing.
///
/// The decision is made when the inner service answers. While lagging, the permit is completed as `Dropped`
/// there and then, so for HTTP and gRPC classifiers the response body is passed on without holding it.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::core::{AnyOk, Classify};
/// use tower_backpressure::pressure::{LagAware, RuntimeMonitor};
///
/// let monitor = RuntimeMonitor::builder()
///     .max_lag(Duration::from_millis(50), Duration::from_millis(10))
///     .build()?;
/// let classify = LagAware::new(AnyOk, &monitor);
/// // Not lagging: the inner classifier decides.
/// assert_eq!(Classify::<u8, ()>::finish(&classify, Ok(1), None), Ok(1));
/// # Ok::<_, tower_backpressure::core::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct LagAware<C> {
    inner: C,
    monitor: RuntimeMonitor,
}

impl<C> LagAware<C> {
    /// Wraps `inner`, reading lag from `monitor`.
    pub fn new(inner: C, monitor: &RuntimeMonitor) -> Self {
        LagAware {
            inner,
            monitor: monitor.clone(),
        }
    }

    /// The wrapped classifier.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }
}

impl<C, Res, E> Classify<Res, E> for LagAware<C>
where
    C: Classify<Res, E>,
{
    type Response = C::Response;

    fn finish(&self, result: Result<Res, E>, permit: Option<Permit>) -> Result<C::Response, E> {
        match permit {
            Some(permit) if self.monitor.is_lagging() => {
                permit.complete(Outcome::Dropped);
                self.inner.finish(result, None)
            }
            permit => self.inner.finish(result, permit),
        }
    }
}
