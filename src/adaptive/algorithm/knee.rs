use super::{check_range, Algorithm, Window};
use crate::core::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Windows since the last probe.
    Normal(u64),
    /// Probing: seconds left until the requests admitted before the probe have drained.
    Draining(f64),
}

/// `Knee`, the default algorithm: keep the service just past the knee of its latency curve, found by Little's
/// law.
///
/// # Control law
///
/// A service with `W` workers and service time `S` completes at most `W / S` requests per second. Below the
/// knee (`in_flight <= W`) latency stays at `S` and throughput grows with concurrency; past it throughput stays
/// at `W / S` and every extra request only waits. The knee is the service's bandwidth-delay product
/// `throughput × unloaded latency`:
///
/// ```text
/// x     = throughput of windows that were not app-limited: average completions over average window
///         duration (weight `smoothing`, default 0.25). Not an average of per-window rates: a window starts
///         and ends at a completion, so its own rate overestimates by about one completion in twenty, and
///         past the knee that bias alone is enough to cancel the probe's contraction (below)
/// r0    = latency of probe windows: averaged in (weight 2 × smoothing, default 0.5; at most +25 % per
///         probe, so that an imperfectly drained probe cannot start a runaway), or taken as is when it
///         fell about as much as the limit did before the first probe that did not (the first estimate may
///         come from a queued window), which then starts the next probe at once
/// knee  = x * r0
/// limit = min(gain * knee + headroom, 1.25 * limit + 1)     (default 2 × knee + 2)
/// ```
///
/// with these guards:
///
/// - unsaturated window (in-flight never reached the limit; stricter than app-limited): throughput was demand,
///   not capacity, so the limit holds, nothing is learnt and no probe starts;
/// - a window with a drop caps the limit at `backoff × limit` (default 0.9);
/// - **saturated throughout**: a window that reached the limit only for a moment (by Little's law,
///   `samples × mean latency / duration`, it was on average below three quarters of the limit) neither teaches
///   nor probes. It is the head of a burst, or a burst after a quiet spell (a window starts when the last one
///   closed, so it spans the quiet time): its throughput is not capacity, and a limit sized on it would drop
///   below the knee just as the burst needs draining; a queue in front would then stand and shed it. Requests
///   as long as a quarter of the window or more make that estimate unreliable, and such a window counts as
///   saturated throughout;
/// - **probe**: at the first saturated window and then every `probe_interval` saturated windows (default 12)
///   the limit drops to `ceil(probe_factor × knee)` (default 0.92; at least one below the knee once it is 4 or
///   more) until the requests admitted before have drained (1.5 mean latencies), and the next window's
///   mean latency — free of queueing if the probe limit is at or below `W` — updates `r0`.
///
/// # Why it holds where the anchors fail
///
/// - **Lucky fast sample (Vegas).** `r0` is an average of whole probe windows, never a minimum of single
///   requests, so one fast request cannot set a baseline that later windows are judged against.
/// - **Constant latency at the timeout (s5a).** Growth needs throughput: when every request takes as long as
///   the timeout, `x × r0` is still the number of requests the backend serves at once, so the limit settles at
///   `gain × W + headroom` instead of climbing to its maximum.
/// - **Modest sustained overload (s5b).** Overloaded from the start, no ordinary window is free of queueing.
///   The probe is: if `probe_factor × knee` is still past the knee, the probe latency is `probe_factor ×` the
///   current estimate's and the estimate contracts by that factor; at or below the knee the probe measures `S`
///   itself. The estimate contracts towards `W` and cannot creep up.
/// - **Baseline re-measurement (Envoy's min-RTT probe).** The probe lowers the limit to 92 % of the knee for
///   about one latency plus one window, not to a fixed minimum, so throughput barely dips and no burst of
///   rejections follows.
/// - **Slowdown (s4).** When `S` triples the backend still has `W` workers: `x` falls and, at the next probe,
///   `r0` rises; their product, the limit, returns to where it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Knee {
    gain: f64,
    headroom: f64,
    probe_interval: u64,
    probe_factor: f64,
    smoothing: f64,
    backoff: f64,
    throughput: f64,
    /// Averages of the completions and of the duration of the windows behind `throughput`, which is their
    /// ratio: an average of per-window rates would overestimate (a window ends at a completion).
    completions: f64,
    span: f64,
    base_latency: f64,
    probe_limit: f64,
    phase: Phase,
    /// Whether a probe has found the knee once; until then probes repeat while latency keeps falling.
    settled: bool,
}

impl Default for Knee {
    fn default() -> Self {
        Knee {
            gain: 2.0,
            headroom: 2.0,
            probe_interval: 12,
            probe_factor: 0.92,
            smoothing: 0.25,
            backoff: 0.9,
            throughput: 0.0,
            completions: 0.0,
            span: 0.0,
            base_latency: 0.0,
            probe_limit: 0.0,
            // The first saturated window starts a probe: its latency may include a queue.
            phase: Phase::Normal(12),
            settled: false,
        }
    }
}

impl Knee {
    /// Knee with its defaults.
    pub fn new() -> Self {
        Knee::default()
    }

    /// Multiple of the estimated knee allowed in flight, in `[1, 4]` (default 2).
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

    /// Saturated windows between two probes, in `[2, 10000]` (default 12).
    #[must_use]
    pub fn probe_interval(mut self, windows: u64) -> Self {
        self.probe_interval = windows;
        self.phase = Phase::Normal(windows);
        self
    }

    /// The limit during a probe, as a fraction of the estimated knee (rounded up), in `[0.5, 0.999]` (default 0.92).
    #[must_use]
    pub fn probe_factor(mut self, factor: f64) -> Self {
        self.probe_factor = factor;
        self
    }

    /// Weight of each new throughput and probe latency measurement in their averages, in `[0.001, 1]`
    /// (default 0.25 for throughput; probes weigh twice as much).
    #[must_use]
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// The factor a drop caps the limit at, in `[0.5, 0.999]` (default 0.9).
    #[must_use]
    pub fn backoff(mut self, backoff: f64) -> Self {
        self.backoff = backoff;
        self
    }

    /// Lowers the limit to `probe_factor × knee` until the requests admitted before have drained.
    fn start_probe(&mut self, latency: f64) -> f64 {
        let knee = self.throughput * self.base_latency;
        let mut probe = (self.probe_factor * knee).ceil();
        // Rounding up would leave a mid-sized knee (below 1 / (1 - probe_factor)) unprobed: at least one request
        // below it. Small knees are left alone: one request there is a large share of capacity.
        if knee >= 4.0 {
            probe = probe.min(knee.ceil() - 1.0);
        }
        self.probe_limit = probe.max(1.0);
        // Latency is a mean: the slowest requests admitted before the probe take longer to drain.
        self.phase = Phase::Draining(1.5 * latency);
        self.probe_limit
    }

    fn average(old: f64, new: f64, weight: f64) -> f64 {
        if old > 0.0 {
            old + (new - old) * weight
        } else {
            new
        }
    }
}

impl Algorithm for Knee {
    fn name(&self) -> &'static str {
        "knee"
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_range("knee.gain", self.gain, 1.0, 4.0)?;
        check_range("knee.headroom", self.headroom, 0.0, 1000.0)?;
        check_range(
            "knee.probe_interval",
            self.probe_interval as f64,
            2.0,
            10_000.0,
        )?;
        check_range("knee.probe_factor", self.probe_factor, 0.5, 0.999)?;
        check_range("knee.smoothing", self.smoothing, 0.001, 1.0)?;
        check_range("knee.backoff", self.backoff, 0.5, 0.999)
    }

    fn update(&mut self, w: &Window) -> f64 {
        let next = self.next_limit(w);
        if w.did_drop() {
            next.min(w.limit * self.backoff).max(1.0)
        } else {
            next
        }
    }
}

impl Knee {
    fn next_limit(&mut self, w: &Window) -> f64 {
        let limit = w.limit;
        let latency = w.mean_latency.as_secs_f64();
        match self.phase {
            Phase::Draining(left) if left > 0.0 => {
                self.phase = Phase::Draining(left - w.duration.as_secs_f64());
                return self.probe_limit.min(limit);
            }
            Phase::Draining(_) => {
                // Every request of this window was admitted under the probe limit. Until the knee has been found
                // once (the first latency may be a queued one), a latency that fell about as much as the limit
                // did means the limit was past the knee: take it and probe again lower at once, which descends
                // from a far too high first estimate in a few probes. Afterwards probes only average in, so
                // that noise cannot ratchet the estimate down.
                let base = self.base_latency;
                if !self.settled
                    && latency > 0.0
                    && latency < base * (1.0 + self.probe_factor) / 2.0
                {
                    self.base_latency = latency;
                    return self.start_probe(latency).min(limit);
                }
                if latency > 0.0 {
                    // A probe that did not drain fully measures some queue; letting that raise the baseline
                    // freely would raise the limit, hence the queue, hence the next probe: a runaway. Rises are
                    // therefore bounded per probe (a real slowdown still gets through in a few probes).
                    let averaged = Self::average(base, latency, (2.0 * self.smoothing).min(1.0));
                    self.base_latency = averaged.min(base * 1.25);
                }
                self.settled = true;
                self.phase = Phase::Normal(0);
            }
            // Below the limit throughput is demand, not capacity, and latency may or may not include a queue:
            // nothing to learn, and no reason to probe.
            Phase::Normal(_) if !saturated(w) => {}
            // A window that reached the limit for a moment only has the throughput of the demand before it, not
            // capacity: the head of a burst, or a burst after an idle spell, whose window (started when the last
            // one closed) spans the idle time too. Learnt from, it would drop the limit far below the knee just as
            // the burst needs draining (a 60 s lull took a learnt 16 down to 2). Only a window saturated throughout
            // measures capacity.
            Phase::Normal(_) if !saturated_throughout(w) => {}
            Phase::Normal(n) => {
                if self.base_latency == 0.0 && latency > 0.0 {
                    self.base_latency = latency;
                }
                let completions = (w.samples + w.dropped) as f64;
                let span = w.duration.as_secs_f64();
                if completions > 0.0 && span > 0.0 {
                    self.completions = Self::average(self.completions, completions, self.smoothing);
                    self.span = Self::average(self.span, span, self.smoothing);
                    self.throughput = self.completions / self.span;
                }
                if n + 1 >= self.probe_interval {
                    return self.start_probe(latency).min(limit);
                }
                self.phase = Phase::Normal(n + 1);
            }
        }
        let knee = self.throughput * self.base_latency;
        let target = if knee > 0.0 && saturated(w) {
            (self.gain * knee + self.headroom).min(limit * 1.25 + 1.0)
        } else {
            limit
        };
        target.max(1.0)
    }
}

/// Whether in-flight reached the enforced limit during the window: only then is throughput capacity.
fn saturated(w: &Window) -> bool {
    w.max_in_flight as f64 >= w.limit.floor()
}

/// Whether the window was saturated throughout, not only for a moment: by Little's law the requests that finished
/// in it were in flight, on average, at three quarters of the limit or more. Little's law over one window only
/// holds for requests much shorter than the window; with longer ones the window counts as saturated throughout.
fn saturated_throughout(w: &Window) -> bool {
    let secs = w.duration.as_secs_f64();
    let latency = w.mean_latency.as_secs_f64();
    let occupancy = w.samples as f64 * latency / secs.max(f64::MIN_POSITIVE);
    saturated(w) && (4.0 * latency > secs || occupancy >= 0.75 * w.limit.floor())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_util::{busy, dropped, idle};
    use super::*;

    /// One window of a closed-loop model of a backend with `workers` workers and service time `service_ms`
    /// under unlimited demand (in-flight is always the limit); `latency_ms` overrides the modelled latency.
    fn model(workers: f64, service_ms: f64, limit: f64, latency_ms: Option<f64>) -> Window {
        let in_flight = limit.floor().max(1.0);
        let latency_ms = latency_ms.unwrap_or(service_ms * (in_flight / workers).max(1.0));
        let duration = Duration::from_millis(250);
        let throughput = in_flight.min(workers) / (service_ms / 1000.0);
        Window {
            limit,
            samples: (throughput * duration.as_secs_f64()) as u64,
            dropped: 0,
            mean_latency: Duration::from_secs_f64(latency_ms / 1000.0),
            min_latency: Duration::from_secs_f64(latency_ms / 1000.0),
            max_in_flight: in_flight as usize,
            duration,
        }
    }

    fn saturated(
        knee: &mut Knee,
        workers: f64,
        service_ms: f64,
        mut limit: f64,
        windows: usize,
    ) -> Vec<f64> {
        let mut limits = Vec::new();
        for _ in 0..windows {
            limit = knee
                .update(&model(workers, service_ms, limit, None))
                .max(1.0);
            limits.push(limit);
        }
        limits
    }

    #[test]
    fn one_lucky_fast_probe_does_not_collapse_the_limit() {
        let mut k = Knee::new();
        let mut limit = *saturated(&mut k, 8.0, 40.0, 20.0, 100).last().unwrap();
        let mut lucky = false;
        let mut after = Vec::new();
        for _ in 0..80 {
            let measuring = matches!(k.phase, Phase::Draining(left) if left <= 0.0);
            // The probe window that sets the baseline comes out 20 times faster than the service can be.
            let latency = (measuring && !lucky).then_some(2.0);
            lucky |= latency.is_some();
            let before = limit;
            limit = k.update(&model(8.0, 40.0, limit, latency)).max(1.0);
            // The limit the service runs at between probes, read as each probe starts.
            if lucky && matches!(k.phase, Phase::Draining(left) if left > 0.0) {
                after.push(before);
            }
        }
        assert!(lucky, "no probe measured");
        assert!(
            after.len() >= 2 && after.iter().all(|&l| l >= 8.0),
            "{after:?}"
        );
    }

    #[test]
    fn settles_near_gain_times_workers_from_above() {
        let mut k = Knee::new();
        // Overloaded from the start with a far too high limit: no unqueued window ever seen.
        let limits = saturated(&mut k, 8.0, 40.0, 40.0, 300);
        let late = &limits[250..];
        let mean = late.iter().sum::<f64>() / late.len() as f64;
        assert!((8.0..=20.0).contains(&mean), "mean limit {mean}, {late:?}");
    }

    #[test]
    fn grows_from_below_to_the_knee() {
        let mut k = Knee::new();
        let limits = saturated(&mut k, 8.0, 40.0, 2.0, 100);
        let max = limits[50..].iter().copied().fold(0.0, f64::max);
        assert!((16.0..=20.0).contains(&max), "{limits:?}");
    }

    #[test]
    fn constant_latency_at_the_timeout_does_not_grow_to_max() {
        let mut k = Knee::new();
        let limits = saturated(&mut k, 8.0, 2000.0, 20.0, 200);
        assert!(limits.iter().all(|&l| l <= 32.0), "{limits:?}");
    }

    #[test]
    fn a_burst_touching_the_limit_does_not_start_the_first_probe() {
        let mut k = Knee::new();
        // 16 workers, 10 ms: half-loaded for 100 ms, then a burst brings in-flight to the limit for an instant.
        let burst = Window {
            limit: 20.0,
            samples: 80,
            dropped: 0,
            mean_latency: Duration::from_millis(10),
            min_latency: Duration::from_millis(1),
            max_in_flight: 20,
            duration: Duration::from_millis(100),
        };
        assert_eq!(k.update(&burst), 20.0);
        assert_eq!(k.phase, Phase::Normal(12));
        // A window saturated throughout (in flight at the limit, 16 served at once) does start it.
        let next = k.update(&model(16.0, 10.0, 20.0, None));
        assert!(matches!(k.phase, Phase::Draining(_)), "{:?}", k.phase);
        assert!((16.0..20.0).contains(&next), "{next}");
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
        assert!(Knee::new().probe_interval(1).validate().is_err());
        assert!(Knee::new().smoothing(0.0).validate().is_err());
        assert!(Knee::new().probe_factor(1.0).validate().is_err());
        assert!(Knee::new().validate().is_ok());
    }
}
