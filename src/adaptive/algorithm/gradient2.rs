use super::{check_range, Algorithm, Window};
use crate::core::ConfigError;

const WARMUP: u32 = 10;

/// Latency-gradient limit after Netflix concurrency-limits' `Gradient2Limit`.
///
/// Gradient2 compares the current latency (`short`, the window's mean) with a long-term exponential average
/// (`long`) that stands for the latency the service is used to:
///
/// ```text
/// long = EMA(short) over long_window windows (plain mean until 10 samples are in)
/// if long / short > 2:               long = long * 0.95      (recover quickly after a load spike)
/// if dropped > 0:                    gradient = 0.5, queue = 0   (ours: upstream ignores drops)
/// else if max_in_flight < limit / 2: unchanged (app-limited)
/// else:                              gradient = clamp(rtt_tolerance * long / short, 0.5, 1)
/// new   = limit * gradient + queue_size
/// limit = limit * (1 - smoothing) + new * smoothing
/// ```
///
/// Defaults, as published: `smoothing = 0.2`, `queue_size = 4`, `rtt_tolerance = 1.5`, `long_window = 600`
/// (samples upstream, windows here). Netflix's initial limit (20), minimum (20) and maximum (200) belong to the
/// layer here.
///
/// The warm-up of `long` is counted in samples, as upstream counts it (10), not in windows: with the layer's
/// windows of 20 samples or more it ends with the first window. A plain mean over the first 10 *windows* would
/// fold whatever queueing the initial limit builds during them into the baseline; with a backend whose every
/// request is equally slow (a hung backend at the client's timeout, scenario s5a) the limit's own queue then
/// raises `short` by less than `rtt_tolerance` over that inflated `long`, the gradient stays 1 and the limit keeps
/// growing by `smoothing × queue_size` per window (Netflix concurrency-limits issue 137). Anchored to the first
/// window, `long` stays near the latency seen before the limit queued much, and once the limit's own queue makes
/// `short` exceed `rtt_tolerance × long` the gradient brakes it. Drops remain the other brake, which is why this
/// implementation reacts to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient2 {
    smoothing: f64,
    queue_size: f64,
    rtt_tolerance: f64,
    long_window: u32,
    long_rtt: f64,
    seen: u32,
}

impl Default for Gradient2 {
    fn default() -> Self {
        Gradient2 {
            smoothing: 0.2,
            queue_size: 4.0,
            rtt_tolerance: 1.5,
            long_window: 600,
            long_rtt: 0.0,
            seen: 0,
        }
    }
}

impl Gradient2 {
    /// Gradient2 with the published defaults.
    pub fn new() -> Self {
        Gradient2::default()
    }

    /// Weight of each new estimate, in `(0, 1]` (default 0.2).
    #[must_use]
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// Requests allowed to queue: the growth step while latency is normal (default 4, at least 0).
    #[must_use]
    pub fn queue_size(mut self, queue_size: f64) -> Self {
        self.queue_size = queue_size;
        self
    }

    /// How much slower than the long-term latency the current one may be before the limit shrinks, at least 1
    /// (default 1.5).
    #[must_use]
    pub fn rtt_tolerance(mut self, tolerance: f64) -> Self {
        self.rtt_tolerance = tolerance;
        self
    }

    /// Windows in the long-term average, at least 1 (default 600).
    #[must_use]
    pub fn long_window(mut self, windows: u32) -> Self {
        self.long_window = windows;
        self
    }

    /// Feeds one window's mean into the long average: while fewer than [`WARMUP`] samples have been seen, a
    /// sample-weighted plain mean (upstream warms up over its first 10 samples, not 10 windows); then an EMA over
    /// `long_window` windows.
    fn add_long(&mut self, rtt: f64, samples: u64) -> f64 {
        if self.seen < WARMUP {
            let samples = u32::try_from(samples).unwrap_or(u32::MAX).max(1);
            self.seen = self.seen.saturating_add(samples);
            self.long_rtt += (rtt - self.long_rtt) * f64::from(samples) / f64::from(self.seen);
        } else {
            let factor = 2.0 / (f64::from(self.long_window) + 1.0);
            self.long_rtt += (rtt - self.long_rtt) * factor;
        }
        self.long_rtt
    }
}

impl Algorithm for Gradient2 {
    fn name(&self) -> &'static str {
        "gradient2"
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_range(
            "gradient2.smoothing",
            self.smoothing,
            f64::MIN_POSITIVE,
            1.0,
        )?;
        check_range("gradient2.queue_size", self.queue_size, 0.0, 1e6)?;
        check_range("gradient2.rtt_tolerance", self.rtt_tolerance, 1.0, 1e3)?;
        check_range(
            "gradient2.long_window",
            f64::from(self.long_window),
            1.0,
            1e9,
        )
    }

    fn update(&mut self, w: &Window) -> f64 {
        let limit = w.limit;
        let short = w.mean_latency.as_secs_f64();
        let (gradient, queue) = if short > 0.0 {
            let long = self.add_long(short, w.samples);
            if long / short > 2.0 {
                self.long_rtt *= 0.95;
            }
            if w.did_drop() {
                (0.5, 0.0)
            } else if w.app_limited() {
                return limit;
            } else {
                (
                    (self.rtt_tolerance * long / short).clamp(0.5, 1.0),
                    self.queue_size,
                )
            }
        } else if w.did_drop() {
            (0.5, 0.0)
        } else {
            return limit;
        };
        let new = limit * gradient + queue;
        limit * (1.0 - self.smoothing) + new * self.smoothing
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{busy, dropped, idle};
    use super::*;

    #[test]
    fn grows_by_smoothed_queue_size_at_steady_latency() {
        let mut g = Gradient2::new();
        // 20 * 1 + 4 smoothed by 0.2: 20.8.
        assert!((g.update(&busy(20.0, 20, 20)) - 20.8).abs() < 1e-9);
    }

    #[test]
    fn shrinks_when_latency_climbs() {
        let mut g = Gradient2::new();
        for _ in 0..10 {
            g.update(&busy(20.0, 20, 20));
        }
        // short = 4 x long: gradient floors at 0.5, new = 14, smoothed 20 * 0.8 + 14 * 0.2 = 18.8.
        assert!((g.update(&busy(20.0, 80, 20)) - 18.8).abs() < 1e-9);
    }

    #[test]
    fn warm_up_ends_after_ten_samples_so_an_early_climb_is_not_the_baseline() {
        let mut g = Gradient2::new();
        g.update(&busy(20.0, 20, 20));
        // long stays near 20 ms (not the 30 ms a plain mean of both windows gives): gradient 1.5 x 20.07 / 40 =
        // 0.75, so the limit shrinks instead of growing to 20.8.
        assert!(g.update(&busy(20.0, 40, 20)) < 20.0);
    }

    #[test]
    fn shrinks_on_drop() {
        let mut g = Gradient2::new();
        // Same latency, but a drop: 20 * 0.8 + 10 * 0.2 = 18.
        assert!((g.update(&dropped(idle(busy(20.0, 20, 20)))) - 18.0).abs() < 1e-9);
    }

    #[test]
    fn holds_when_app_limited() {
        let mut g = Gradient2::new();
        assert_eq!(g.update(&idle(busy(20.0, 20, 20))), 20.0);
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        assert!(Gradient2::new().smoothing(1.5).validate().is_err());
        assert!(Gradient2::new().rtt_tolerance(0.9).validate().is_err());
        assert!(Gradient2::new().long_window(0).validate().is_err());
        assert!(Gradient2::new().queue_size(-1.0).validate().is_err());
        assert!(Gradient2::new().validate().is_ok());
    }
}
