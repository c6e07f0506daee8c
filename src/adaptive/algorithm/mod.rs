//! Limit algorithms: how a window of samples moves the concurrency limit.
//!
//! The layer aggregates samples into a [`Window`] and hands each finished window to exactly one
//! [`Algorithm::update`] call, which returns the new limit estimate. The layer then clamps the estimate to
//! `[min_limit, max_limit]` and enforces its integer part (never less than 1).
//!
//! | algorithm | signal | file |
//! |---|---|---|
//! | [`Knee`] (default) | Little's law: peak throughput × unloaded latency, re-measured by a gentle probe | `knee.rs` |
//! | [`Aimd`] | drops and a latency timeout | `aimd.rs` |
//! | [`Vegas`] | queue estimate from the no-load latency (TCP Vegas) | `vegas.rs` |
//! | [`Gradient2`] | ratio of a long-term to the current latency | `gradient2.rs` |
//!
//! All of them back off on [`Outcome::Dropped`](crate::core::Outcome::Dropped) and never grow while the
//! window was app-limited (in-flight stayed below half the limit).

use std::fmt;
use std::time::Duration;

use crate::core::ConfigError;

mod aimd;
mod gradient2;
mod knee;
mod vegas;

pub use self::aimd::Aimd;
pub use self::gradient2::Gradient2;
pub use self::knee::Knee;
pub use self::vegas::Vegas;

pub(crate) const LAYER: &str = "adaptive concurrency";

/// What one sample window saw: the input of [`Algorithm::update`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// The limit estimate in force during the window (the algorithm's last answer, clamped).
    pub limit: f64,
    /// Requests that finished with a success or a failure.
    pub samples: u64,
    /// Requests that finished as [`Outcome::Dropped`](crate::core::Outcome::Dropped).
    pub dropped: u64,
    /// Mean latency of the samples (zero when there were none). On a busy layer without an observer only a
    /// random share of requests is timed (see the [module docs](super#cost)), and this is their mean.
    pub mean_latency: Duration,
    /// Smallest latency sample (zero when there were none), among the timed ones.
    pub min_latency: Duration,
    /// Most requests in flight at once during the window.
    pub max_in_flight: usize,
    /// How long the window lasted.
    pub duration: Duration,
}

impl Window {
    /// Whether any request was dropped.
    pub fn did_drop(&self) -> bool {
        self.dropped > 0
    }

    /// Whether the window was app-limited: in-flight stayed below half the limit, so the limit was not what
    /// held throughput back and the window says nothing about whether a higher limit would be safe.
    pub fn app_limited(&self) -> bool {
        (self.max_in_flight as f64) * 2.0 < self.limit
    }

    /// Completed requests (samples and drops) per second.
    pub fn throughput(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            (self.samples + self.dropped) as f64 / secs
        } else {
            0.0
        }
    }
}

/// A concurrency limit algorithm, fed one [`Window`] at a time by a single updater.
///
/// Implementations keep whatever state they need (baselines, counters) in `self`; they are never called
/// concurrently. The returned estimate may be fractional (the layer enforces its integer part) and may lie
/// outside the layer's bounds (the layer clamps it); a non-finite answer is ignored.
pub trait Algorithm: fmt::Debug + Send + 'static {
    /// A short lowercase name (`"aimd"`, `"vegas"`, ...), reported in snapshots.
    fn name(&self) -> &'static str;

    /// Checks the parameters; `build()` and live updates refuse an algorithm that fails.
    fn validate(&self) -> Result<(), ConfigError>;

    /// The new limit estimate after `window`.
    fn update(&mut self, window: &Window) -> f64;
}

impl Algorithm for Box<dyn Algorithm> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        (**self).validate()
    }

    fn update(&mut self, window: &Window) -> f64 {
        (**self).update(window)
    }
}

/// `Err` unless `lo <= value <= hi` (and finite).
pub(crate) fn check_range(
    field: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
) -> Result<(), ConfigError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(ConfigError::new(
            LAYER,
            field,
            format!("must be within [{lo}, {hi}], got {value}"),
        ))
    }
}

/// Netflix's `log10` root function: `max(1, floor(log10(limit)))`.
pub(crate) fn log10_root(limit: f64) -> f64 {
    limit.max(1.0).log10().floor().max(1.0)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::Window;
    use std::time::Duration;

    /// A busy window (in-flight at the limit) with `samples` samples of `latency_ms`.
    pub(crate) fn busy(limit: f64, latency_ms: u64, samples: u64) -> Window {
        Window {
            limit,
            samples,
            dropped: 0,
            mean_latency: Duration::from_millis(latency_ms),
            min_latency: Duration::from_millis(latency_ms),
            max_in_flight: limit as usize,
            duration: Duration::from_millis(latency_ms * samples / (limit.max(1.0) as u64)),
        }
    }

    pub(crate) fn dropped(mut w: Window) -> Window {
        w.dropped = 1;
        w
    }

    pub(crate) fn idle(mut w: Window) -> Window {
        w.max_in_flight = (w.limit / 4.0) as usize;
        w
    }
}
