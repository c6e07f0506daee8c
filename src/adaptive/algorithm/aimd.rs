use std::time::Duration;

use super::{Algorithm, Window, LAYER};
use crate::core::ConfigError;

/// Additive increase, multiplicative decrease, after Netflix concurrency-limits' `AIMDLimit`.
///
/// Per window:
///
/// ```text
/// if dropped > 0 or mean_latency > timeout:  limit = min(limit - 1, limit * backoff_ratio)
/// else if max_in_flight * 2 >= limit:        limit = limit + 1
/// else (app-limited):                        limit unchanged
/// ```
///
/// Defaults, as published: `backoff_ratio = 0.9` (allowed range `[0.5, 1)`), `timeout = 5 s` (a window whose
/// mean latency exceeds it counts as a drop). Netflix's initial limit (10) and bounds belong to the layer here
/// (`initial_limit`, `min_limit`, `max_limit` on the builder).
///
/// AIMD only learns from drops: with a classifier that never reports [`Dropped`](crate::core::Outcome::Dropped)
/// and latency under the timeout, it grows until the limit reaches its maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    backoff_ratio: f64,
    timeout: Duration,
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd {
            backoff_ratio: 0.9,
            timeout: Duration::from_secs(5),
        }
    }
}

impl Aimd {
    /// AIMD with the published defaults.
    pub fn new() -> Self {
        Aimd::default()
    }

    /// The factor applied to the limit on a drop, in `[0.5, 1)` (default 0.9).
    #[must_use]
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        self.backoff_ratio = ratio;
        self
    }

    /// A window whose mean latency exceeds `timeout` counts as a drop (default 5 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Algorithm for Aimd {
    fn name(&self) -> &'static str {
        "aimd"
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.backoff_ratio >= 0.5 && self.backoff_ratio < 1.0) {
            return Err(ConfigError::new(
                LAYER,
                "aimd.backoff_ratio",
                format!("must be within [0.5, 1), got {}", self.backoff_ratio),
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new(LAYER, "aimd.timeout", "must be positive"));
        }
        Ok(())
    }

    fn update(&mut self, w: &Window) -> f64 {
        if w.did_drop() || w.mean_latency > self.timeout {
            (w.limit - 1.0).min(w.limit * self.backoff_ratio)
        } else if w.app_limited() {
            w.limit
        } else {
            w.limit + 1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{busy, dropped, idle};
    use super::*;

    #[test]
    fn grows_by_one_when_busy() {
        assert_eq!(Aimd::new().update(&busy(10.0, 20, 20)), 11.0);
    }

    #[test]
    fn backs_off_on_drop_and_on_timeout() {
        assert_eq!(Aimd::new().update(&dropped(busy(20.0, 20, 20))), 18.0);
        assert_eq!(Aimd::new().update(&busy(20.0, 6_000, 20)), 18.0);
        // At small limits the backoff still takes at least one away.
        assert_eq!(Aimd::new().update(&dropped(busy(5.0, 20, 20))), 4.0);
    }

    #[test]
    fn holds_when_app_limited() {
        assert_eq!(Aimd::new().update(&idle(busy(40.0, 20, 20))), 40.0);
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        let e = Aimd::new().backoff_ratio(1.0).validate().unwrap_err();
        assert!(e.to_string().contains("aimd.backoff_ratio"), "{e}");
        assert!(Aimd::new().backoff_ratio(0.4).validate().is_err());
        assert!(Aimd::new().backoff_ratio(f64::NAN).validate().is_err());
        assert!(Aimd::new().timeout(Duration::ZERO).validate().is_err());
        assert!(Aimd::new().validate().is_ok());
    }
}
