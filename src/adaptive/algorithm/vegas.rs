use super::{check_range, log10_root, Algorithm, Window};
use crate::core::ConfigError;

/// Delay-based limit after TCP Vegas, following Netflix concurrency-limits' `VegasLimit`.
///
/// Vegas keeps `rtt_noload`, the lowest window latency seen, and estimates how many requests are queued:
///
/// ```text
/// queue = ceil(limit * (1 - rtt_noload / rtt))          rtt = the window's mean latency
/// l = max(1, floor(log10(limit)))
/// if dropped > 0:                   limit = limit - l
/// else if max_in_flight * 2 < limit: unchanged (app-limited)
/// else if queue <= threshold * l:   limit = limit + beta * l   (no queueing: grow fast)
/// else if queue <  alpha * l:       limit = limit + l
/// else if queue >  beta * l:        limit = limit - l
/// else:                             unchanged
/// limit = (1 - smoothing) * old + smoothing * limit
/// ```
///
/// A window faster than `rtt_noload` only lowers `rtt_noload` (the limit is left alone). Every
/// `probe_multiplier × limit` samples (with a jitter of 0.5–1×) `rtt_noload` is reset to the current window's
/// latency so that a baseline measured before the service slowed down does not pin the limit low. Either
/// window still backs off if it dropped requests (upstream leaves the limit alone there too; but the survivors
/// of a window whose slow requests timed out have a low mean, so exactly the windows with drops would keep it).
///
/// Defaults, as published: `alpha = 3`, `beta = 6`, `threshold = 1` (each multiplied by `l`), `smoothing = 1.0`,
/// `probe_multiplier = 30`. Netflix's initial limit (20) and maximum (1000) belong to the layer here.
///
/// A known weakness kept on purpose (it is the published behaviour): one lucky fast window sets a baseline no
/// later window can match, the queue estimate then stays high and the limit walks down until the next probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Vegas {
    alpha: f64,
    beta: f64,
    threshold: f64,
    smoothing: f64,
    probe_multiplier: f64,
    rtt_noload: f64,
    samples_since_probe: f64,
    jitter: f64,
    rng: u64,
}

impl Default for Vegas {
    fn default() -> Self {
        let mut v = Vegas {
            alpha: 3.0,
            beta: 6.0,
            threshold: 1.0,
            smoothing: 1.0,
            probe_multiplier: 30.0,
            rtt_noload: 0.0,
            samples_since_probe: 0.0,
            jitter: 1.0,
            rng: 0x9E37_79B9_7F4A_7C15,
        };
        v.next_jitter();
        v
    }
}

impl Vegas {
    /// Vegas with the published defaults.
    pub fn new() -> Self {
        Vegas::default()
    }

    /// Queue size (in units of `log10(limit)`) below which the limit grows by one unit (default 3).
    #[must_use]
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Queue size above which the limit shrinks, and the fast-growth step (default 6).
    #[must_use]
    pub fn beta(mut self, beta: f64) -> Self {
        self.beta = beta;
        self
    }

    /// Queue size at or below which growth is fast (default 1).
    #[must_use]
    pub fn threshold(mut self, threshold: f64) -> Self {
        self.threshold = threshold;
        self
    }

    /// Weight of the new estimate, in `(0, 1]` (default 1: no smoothing).
    #[must_use]
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// The baseline is re-measured every `probe_multiplier × limit` samples (default 30, at least 1).
    #[must_use]
    pub fn probe_multiplier(mut self, multiplier: f64) -> Self {
        self.probe_multiplier = multiplier;
        self
    }

    /// A deterministic jitter in [0.5, 1) so that many limiters do not probe in lockstep.
    fn next_jitter(&mut self) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.jitter = 0.5 + (self.rng >> 11) as f64 / (1u64 << 53) as f64 * 0.5;
    }
}

impl Algorithm for Vegas {
    fn name(&self) -> &'static str {
        "vegas"
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_range("vegas.alpha", self.alpha, 0.0, 1e6)?;
        check_range("vegas.beta", self.beta, self.alpha, 1e6)?;
        check_range("vegas.threshold", self.threshold, 0.0, self.alpha)?;
        check_range("vegas.smoothing", self.smoothing, f64::MIN_POSITIVE, 1.0)?;
        check_range("vegas.probe_multiplier", self.probe_multiplier, 1.0, 1e6)
    }

    fn update(&mut self, w: &Window) -> f64 {
        let limit = w.limit;
        let rtt = w.mean_latency.as_secs_f64();
        self.samples_since_probe += w.samples as f64;
        if rtt > 0.0 {
            let probe = self.jitter * self.probe_multiplier * limit <= self.samples_since_probe;
            if probe {
                self.next_jitter();
                self.samples_since_probe = 0.0;
            }
            if probe || self.rtt_noload == 0.0 || rtt < self.rtt_noload {
                // A new baseline, which holds the limit, unless requests were dropped: then it backs off below.
                // (Upstream returns first; but a window whose slow requests timed out has a low mean of the
                // survivors, so exactly the windows with drops would keep their limit.)
                self.rtt_noload = rtt;
                if !w.did_drop() {
                    return limit;
                }
            }
        }
        let l = log10_root(limit);
        let target = if w.did_drop() {
            limit - l
        } else if w.app_limited() || rtt == 0.0 {
            return limit;
        } else {
            let queue = (limit * (1.0 - self.rtt_noload / rtt)).ceil();
            if queue <= self.threshold * l {
                limit + self.beta * l
            } else if queue < self.alpha * l {
                limit + l
            } else if queue > self.beta * l {
                limit - l
            } else {
                return limit;
            }
        };
        (1.0 - self.smoothing) * limit + self.smoothing * target.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{busy, dropped, idle};
    use super::*;

    fn warmed(baseline_ms: u64) -> Vegas {
        let mut v = Vegas::new();
        v.update(&busy(20.0, baseline_ms, 20));
        v
    }

    /// Every window with drops backs off, as the module docs say of every algorithm: the first one (no baseline
    /// yet), one faster than the baseline (its slow requests timed out, so the survivors' mean is low), and a
    /// probe window. The baseline still moves in each.
    #[test]
    fn backs_off_on_drops_in_baseline_and_probe_windows() {
        let mut first = Vegas::new();
        assert!(first.update(&dropped(busy(100.0, 20, 50))) < 100.0);
        assert_eq!(first.rtt_noload, 0.020);
        let mut faster = warmed(20);
        assert!(faster.update(&dropped(busy(100.0, 15, 50))) < 100.0);
        assert_eq!(faster.rtt_noload, 0.015);
        let mut probing = warmed(20);
        probing.samples_since_probe = 1e9;
        assert!(probing.update(&dropped(busy(100.0, 30, 50))) < 100.0);
        assert_eq!(
            (probing.rtt_noload, probing.samples_since_probe),
            (0.030, 0.0)
        );
        // Without drops those windows hold the limit.
        let mut probing = warmed(20);
        probing.samples_since_probe = 1e9;
        assert_eq!(probing.update(&busy(100.0, 30, 50)), 100.0);
    }

    #[test]
    fn grows_fast_without_queueing() {
        let mut v = warmed(20);
        // 20 ms again: no queue, grow by beta * log10(20) = 6.
        assert_eq!(v.update(&busy(20.0, 20, 20)), 26.0);
    }

    #[test]
    fn shrinks_when_queueing() {
        let mut v = warmed(20);
        // rtt doubled: half of the 20 in flight are queued (10 > beta = 6).
        assert_eq!(v.update(&busy(20.0, 40, 20)), 19.0);
    }

    #[test]
    fn shrinks_on_drop_even_when_app_limited() {
        let mut v = warmed(20);
        assert_eq!(v.update(&dropped(idle(busy(20.0, 20, 20)))), 19.0);
    }

    #[test]
    fn holds_when_app_limited() {
        let mut v = warmed(20);
        assert_eq!(v.update(&idle(busy(20.0, 20, 20))), 20.0);
    }

    #[test]
    fn probes_the_baseline_again() {
        let mut v = warmed(20);
        let mut resets = 0;
        for _ in 0..200 {
            let before = v.rtt_noload;
            v.update(&busy(20.0, 30, 20));
            if v.rtt_noload != before {
                resets += 1;
            }
        }
        assert!(resets > 0, "baseline never re-measured");
        assert_eq!(v.rtt_noload, 0.030);
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        assert!(Vegas::new().smoothing(0.0).validate().is_err());
        assert!(Vegas::new().beta(1.0).validate().is_err());
        assert!(Vegas::new().probe_multiplier(0.5).validate().is_err());
        assert!(Vegas::new().validate().is_ok());
    }
}
