use super::{check_range, Algorithm, Window};
use crate::core::ConfigError;

const MAX_HISTORY: usize = 32;
const PROBE_WINDOWS: u64 = 2;

/// `Knee`, the default algorithm: keep the service just past the knee of its latency curve, found by Little's
/// law.
///
/// # Control law
///
/// A service with `W` workers and service time `S` completes at most `W / S` requests per second. Below the
/// knee (`in_flight <= W`) latency stays at `S` and throughput grows with concurrency; past it throughput stays
/// at `W / S` and every extra request only waits. The knee itself is the service's bandwidth-delay product
/// `BDP = max throughput × unloaded latency`, which Knee estimates from its last `history` windows:
///
/// ```text
/// x_max = max(throughput of each window)      completions per second
/// r_min = min(mean latency of each window)
/// bdp   = x_max * r_min
/// limit = gain * bdp + headroom               (default 1.5 × bdp + 2)
/// ```
///
/// with these guards, applied in order:
///
/// - app-limited (in-flight stayed below half the limit): the limit may shrink but never grow;
/// - growth is at most ×2 per window;
/// - a window with a drop caps the limit at `backoff × limit` (default 0.9);
/// - probe: every `probe_interval` windows (default 8) the limit runs for two windows at
///   `probe_factor × bdp` (default 0.85) so that `r_min` is measured without a queue.
///
/// # Why it holds where the anchors fail
///
/// - **Lucky fast sample (Vegas).** `r_min` is the minimum of window *means*, not of single requests, and it
///   expires after `history` windows; one fast request cannot define the baseline, and a stale baseline ages
///   out.
/// - **Constant latency at the timeout (s5a).** Growth needs throughput: when every request takes as long as
///   the timeout, `x_max × r_min` is still the number of requests the backend actually serves at once, so the
///   limit settles at `gain × W + headroom` instead of climbing to its maximum.
/// - **Modest sustained overload (s5b).** When overloaded from the start there is no unqueued window, so every
///   window mean includes queueing. The probe windows run at `0.85 × bdp`: if that is still past the knee, the
///   probe's latency is `0.85 ×` the previous estimate's and the estimate shrinks by that factor; below the knee
///   the probe measures the true `S`. The estimate therefore contracts to `W` and cannot creep up.
/// - **Baseline re-measurement (Envoy's min-RTT probe).** The probe lowers the limit to 85 % of the knee for two
///   windows, not to a fixed minimum, so throughput barely dips and no burst of rejections follows.
/// - **Slowdown (s4).** When `S` triples the backend still has `W` workers: `x_max` falls and `r_min` rises as
///   the old windows expire, and their product, the limit, stays put.
#[derive(Debug, Clone, PartialEq)]
pub struct Knee {
    gain: f64,
    headroom: f64,
    history: usize,
    probe_interval: u64,
    probe_factor: f64,
    backoff: f64,
    throughput: [f64; MAX_HISTORY],
    latency: [f64; MAX_HISTORY],
    recorded: usize,
    windows: u64,
}

impl Default for Knee {
    fn default() -> Self {
        Knee {
            gain: 1.5,
            headroom: 2.0,
            history: 16,
            probe_interval: 8,
            probe_factor: 0.85,
            backoff: 0.9,
            throughput: [0.0; MAX_HISTORY],
            latency: [0.0; MAX_HISTORY],
            recorded: 0,
            windows: 0,
        }
    }
}

impl Knee {
    /// Knee with its defaults.
    pub fn new() -> Self {
        Knee::default()
    }

    /// Multiple of the estimated knee allowed in flight, in `[1, 4]` (default 1.5).
    #[must_use]
    pub fn gain(mut self, gain: f64) -> Self {
        self.gain = gain;
        self
    }

    /// Requests allowed on top of `gain × knee`, in `[0, 1000]` (default 2): keeps small services busy.
    #[must_use]
    pub fn headroom(mut self, headroom: f64) -> Self {
        self.headroom = headroom;
        self
    }

    /// Windows the throughput maximum and latency minimum look back over, in `[2, 32]` (default 16).
    #[must_use]
    pub fn history(mut self, windows: usize) -> Self {
        self.history = windows;
        self
    }

    /// Windows between the starts of two probes, in `[3, 10000]` (default 8).
    #[must_use]
    pub fn probe_interval(mut self, windows: u64) -> Self {
        self.probe_interval = windows;
        self
    }

    /// The limit during a probe, as a fraction of the estimated knee, in `[0.5, 1)` (default 0.85).
    #[must_use]
    pub fn probe_factor(mut self, factor: f64) -> Self {
        self.probe_factor = factor;
        self
    }

    /// The factor a drop caps the limit at, in `[0.5, 1)` (default 0.9).
    #[must_use]
    pub fn backoff(mut self, backoff: f64) -> Self {
        self.backoff = backoff;
        self
    }

    fn record(&mut self, throughput: f64, latency: f64) {
        let slot = self.recorded % self.history;
        self.throughput[slot] = throughput;
        self.latency[slot] = latency;
        self.recorded += 1;
    }

    fn knee(&self) -> Option<f64> {
        let n = self.recorded.min(self.history);
        if n == 0 {
            return None;
        }
        let x_max = self.throughput[..n].iter().copied().fold(0.0, f64::max);
        let r_min = self.latency[..n]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        Some(x_max * r_min)
    }
}

impl Algorithm for Knee {
    fn name(&self) -> &'static str {
        "knee"
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_range("knee.gain", self.gain, 1.0, 4.0)?;
        check_range("knee.headroom", self.headroom, 0.0, 1000.0)?;
        check_range("knee.history", self.history as f64, 2.0, MAX_HISTORY as f64)?;
        check_range(
            "knee.probe_interval",
            self.probe_interval as f64,
            3.0,
            10_000.0,
        )?;
        check_range("knee.probe_factor", self.probe_factor, 0.5, 0.999)?;
        check_range("knee.backoff", self.backoff, 0.5, 0.999)
    }

    fn update(&mut self, w: &Window) -> f64 {
        let limit = w.limit;
        let latency = w.mean_latency.as_secs_f64();
        let throughput = w.throughput();
        if latency > 0.0 && throughput > 0.0 {
            self.record(throughput, latency);
        }
        self.windows += 1;
        let Some(knee) = self.knee() else {
            return if w.did_drop() {
                limit * self.backoff
            } else {
                limit
            };
        };
        let mut target = self.gain * knee + self.headroom;
        if w.app_limited() {
            target = target.min(limit);
        }
        target = target.min(limit * 2.0);
        if w.did_drop() {
            target = target.min(limit * self.backoff);
        }
        if self.windows % self.probe_interval >= self.probe_interval - PROBE_WINDOWS
            && !w.app_limited()
        {
            target = target.min(self.probe_factor * knee);
        }
        target.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_util::{busy, dropped, idle};
    use super::*;

    /// A closed-loop model of a backend with `workers` workers and service time `service_ms`, run under
    /// unlimited demand: in-flight is always the limit.
    fn saturated(
        knee: &mut Knee,
        workers: f64,
        service_ms: f64,
        mut limit: f64,
        windows: usize,
    ) -> Vec<f64> {
        let mut limits = Vec::new();
        for _ in 0..windows {
            let in_flight = limit.floor().max(1.0);
            let busy_workers = in_flight.min(workers);
            let latency_ms = service_ms * (in_flight / workers).max(1.0);
            let duration = Duration::from_millis(250);
            let throughput = busy_workers / (service_ms / 1000.0);
            let samples = (throughput * duration.as_secs_f64()) as u64;
            let w = Window {
                limit,
                samples,
                dropped: 0,
                mean_latency: Duration::from_secs_f64(latency_ms / 1000.0),
                min_latency: Duration::from_secs_f64(latency_ms / 1000.0),
                max_in_flight: in_flight as usize,
                duration,
            };
            limit = knee.update(&w).max(1.0);
            limits.push(limit);
        }
        limits
    }

    #[test]
    fn settles_near_gain_times_workers_from_above() {
        let mut k = Knee::new();
        // Overloaded from the start with a far too high limit: no unqueued window ever seen.
        let limits = saturated(&mut k, 8.0, 40.0, 100.0, 200);
        let late = &limits[150..];
        let mean = late.iter().sum::<f64>() / late.len() as f64;
        assert!((8.0..=16.0).contains(&mean), "mean limit {mean}, {late:?}");
    }

    #[test]
    fn grows_from_below_to_the_knee() {
        let mut k = Knee::new();
        let limits = saturated(&mut k, 8.0, 40.0, 2.0, 100);
        let max = limits[50..].iter().copied().fold(0.0, f64::max);
        assert!((12.0..=16.0).contains(&max), "{limits:?}");
    }

    #[test]
    fn constant_latency_at_the_timeout_does_not_grow_to_max() {
        let mut k = Knee::new();
        let limits = saturated(&mut k, 8.0, 2000.0, 20.0, 200);
        assert!(limits.iter().all(|&l| l <= 32.0), "{limits:?}");
    }

    #[test]
    fn backs_off_on_drop() {
        let mut k = Knee::new();
        k.update(&busy(20.0, 20, 40));
        let after = k.update(&dropped(busy(20.0, 20, 40)));
        assert!(after <= 18.0, "{after}");
    }

    #[test]
    fn holds_when_app_limited() {
        let mut k = Knee::new();
        let w = idle(busy(10.0, 20, 2000));
        assert!(k.update(&w) <= 10.0);
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        assert!(Knee::new().gain(0.5).validate().is_err());
        assert!(Knee::new().history(1).validate().is_err());
        assert!(Knee::new().history(33).validate().is_err());
        assert!(Knee::new().probe_factor(1.0).validate().is_err());
        assert!(Knee::new().validate().is_ok());
    }
}
