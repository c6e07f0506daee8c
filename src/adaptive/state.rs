//! The state one layer instance shares with all its services and handles.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use tokio::time::Instant;

use super::algorithm::{Algorithm, Window, LAYER};
use crate::core::stripe::{Striped, Totals};
use crate::core::{observer, ConfigError, Event, Observer, Outcome, Release};

/// The algorithm and its fractional estimate: touched by one updater at a time.
#[derive(Debug)]
pub(crate) struct Updater {
    pub(crate) algorithm: Box<dyn Algorithm>,
    pub(crate) estimate: f64,
}

/// Everything but the observer: what handles see.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) epoch: Instant,
    pub(crate) limit: AtomicUsize,
    /// Requests admitted and finished so far (both wrap): in flight is their difference, and a window's
    /// completions are the growth of `released`, so that no finishing request has a counter of its own to add to.
    admitted: AtomicUsize,
    released: AtomicUsize,
    /// `released` when the current window opened; written only by the updater.
    released_base: AtomicUsize,
    /// One request in `timing_mask + 1` is timed (see [`Core::timing_mask`]); 0 while every request is.
    timing_mask: AtomicU32,
    /// Whether timing may be thinned out at all: not when an observer is told every latency.
    thin_timing: bool,
    pub(crate) min_limit: AtomicUsize,
    pub(crate) max_limit: AtomicUsize,
    pub(crate) rejected: AtomicU64,
    pub(crate) windows: AtomicU64,
    /// Exponential average of window mean latencies, in nanoseconds; 0 until the first window.
    pub(crate) expected_latency: AtomicU64,
    min_samples: u64,
    min_window: u64,
    // The current window, filled by every finishing request into its own thread's stripe, so that two threads
    // finishing requests do not fight over these cache lines.
    window: Striped,
    max_in_flight: AtomicUsize,
    window_start: AtomicU64,
    pub(crate) updater: Mutex<Updater>,
}

pub(crate) struct Config {
    pub(crate) initial: usize,
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) min_samples: u64,
    pub(crate) window: Duration,
    pub(crate) algorithm: Box<dyn Algorithm>,
}

pub(crate) fn check_bounds(min: usize, max: usize) -> Result<(), ConfigError> {
    if min == 0 {
        return Err(ConfigError::new(LAYER, "min_limit", "must be at least 1"));
    }
    if min > max {
        return Err(ConfigError::new(
            LAYER,
            "min_limit",
            format!("must not exceed max_limit ({min} > {max})"),
        ));
    }
    Ok(())
}

impl Core {
    pub(crate) fn new(config: Config) -> Result<Self, ConfigError> {
        if config.initial == 0 {
            return Err(ConfigError::new(
                LAYER,
                "initial_limit",
                "must be at least 1",
            ));
        }
        check_bounds(config.min, config.max)?;
        if !(config.min..=config.max).contains(&config.initial) {
            return Err(ConfigError::new(
                LAYER,
                "initial_limit",
                format!(
                    "must be within [min_limit, max_limit] = [{}, {}], got {}",
                    config.min, config.max, config.initial
                ),
            ));
        }
        if config.min_samples == 0 {
            return Err(ConfigError::new(LAYER, "min_samples", "must be at least 1"));
        }
        if config.window.is_zero() {
            return Err(ConfigError::new(LAYER, "window", "must be positive"));
        }
        config.algorithm.validate()?;
        Ok(Core {
            epoch: Instant::now(),
            limit: AtomicUsize::new(config.initial),
            admitted: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
            released_base: AtomicUsize::new(0),
            timing_mask: AtomicU32::new(0),
            thin_timing: true,
            min_limit: AtomicUsize::new(config.min),
            max_limit: AtomicUsize::new(config.max),
            rejected: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            expected_latency: AtomicU64::new(0),
            min_samples: config.min_samples,
            min_window: nanos(config.window),
            window: Striped::default(),
            max_in_flight: AtomicUsize::new(0),
            window_start: AtomicU64::new(0),
            updater: Mutex::new(Updater {
                algorithm: config.algorithm,
                estimate: config.initial as f64,
            }),
        })
    }

    /// Requests holding a permit now.
    pub(crate) fn in_flight(&self) -> usize {
        // Released first: it never passes the admissions read after it.
        let released = self.released.load(Ordering::Acquire);
        let admitted = self.admitted.load(Ordering::Acquire);
        usize::try_from(admitted.wrapping_sub(released) as isize).unwrap_or(0)
    }

    /// Tries to admit one request: `Some((in_flight, number))` (in flight including it, and its admission
    /// number, counted from 0), or `None` at the limit.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<(usize, usize)> {
        let limit = self.limit.load(Ordering::Acquire);
        let mut admitted = self.admitted.load(Ordering::Relaxed);
        let (before, number) = loop {
            let released = self.released.load(Ordering::Acquire);
            // Negative when requests admitted after our read have finished since: read again.
            let Ok(before) = usize::try_from(admitted.wrapping_sub(released) as isize) else {
                admitted = self.admitted.load(Ordering::Relaxed);
                continue;
            };
            if before >= limit {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            // Succeeds only if nobody was admitted since our read: then everything counted in `released` was
            // admitted before it, and `before` is at least the true count, never below it.
            match self.admitted.compare_exchange_weak(
                admitted,
                admitted.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break (before, admitted),
                Err(now) => admitted = now,
            }
        };
        let in_flight = before + 1;
        // The maximum changes rarely within a window: read before writing, so the common case writes nothing.
        if in_flight > self.max_in_flight.load(Ordering::Relaxed) {
            self.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        }
        Some((in_flight, number))
    }

    /// Whether to time the request admitted as `number`: one in `timing_mask + 1`, picked by hashing the
    /// number (Fibonacci hashing spreads consecutive numbers, and every arithmetic progression of them, evenly),
    /// so the picks follow no pattern in the traffic (every second request of a client that alternates cheap and
    /// costly calls, say) and cost no thread-local state.
    #[inline]
    pub(crate) fn timed(&self, number: usize) -> bool {
        let mask = self.timing_mask();
        mask == 0 || ((number as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32 & mask == 0
    }

    /// The tag of a request timed at `now`: nanoseconds since the epoch, kept below [`UNTIMED`] (146 years in), so
    /// that it fits a permit's tag and never reads as untimed. Its release reads the clock once and works out
    /// both the latency and the window's time from the two.
    #[inline]
    pub(crate) fn tag(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch)).min(UNTIMED - 1)
    }

    /// Which admitted requests to time, for a layer without an observer (an observer is told every request's
    /// latency, so with one every request is timed): one in `mask + 1`, picked by [`Core::timed`].
    ///
    /// Reading the clock twice per request is the largest part of this layer's cost. A window's mean latency
    /// needs a few hundred samples, not every request of a busy service: once a window holds
    /// `4 × max(1024, min_samples)` samples, the next one times half, a quarter, ... down to one request in
    /// 64, so that every window keeps at least about `2 × max(1024, min_samples)` timed samples. Every finished
    /// request is still counted (the window's `samples`, drops, in-flight), and the mean and minimum latency are
    /// those of the timed ones; at lower rates (the usual case, and every simulator scenario) every request is
    /// timed.
    #[inline]
    pub(crate) fn timing_mask(&self) -> u32 {
        self.timing_mask.load(Ordering::Relaxed)
    }

    /// Times every request, whatever the rate: for a layer whose observer is told every latency.
    pub(crate) fn time_every_request(&mut self) {
        self.thin_timing = false;
    }

    pub(crate) fn lock_updater(&self) -> MutexGuard<'_, Updater> {
        // An algorithm that panicked leaves a usable estimate behind: keep going rather than poison the layer.
        self.updater.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a finished request (it no longer counts in flight); returns the new limit when this request
    /// closed a window that changed it.
    fn record(&self, outcome: Outcome, latency: Duration, tag: u64) -> Option<usize> {
        // Counted among the window's completions by this add alone; only the rarer outcomes (ignored, dropped)
        // and timed samples are written anywhere else.
        self.released.fetch_add(1, Ordering::AcqRel);
        let timed = tag != UNTIMED;
        let latency = nanos(latency);
        match outcome {
            Outcome::Ignored => {
                self.window.ignored();
                return None;
            }
            Outcome::Dropped => self.window.dropped(),
            Outcome::Success | Outcome::Failure if timed => self.window.sample(latency),
            Outcome::Success | Outcome::Failure => {}
        }
        if !timed {
            // Without the time it cannot close a window.
            return None;
        }
        let now = tag.saturating_add(latency);
        if !self.window_due(now) {
            return None;
        }
        // Whoever finds the window due first applies it; everyone else carries on without waiting.
        let mut updater = match self.updater.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        // Another updater may have closed the window between our check and the lock.
        if !self.window_due(now) {
            return None;
        }
        Some(self.close_window(&mut updater, now)).flatten()
    }

    fn window_due(&self, now: u64) -> bool {
        // Time first: one shared read; the stripes are summed only once the window is old enough.
        if now.saturating_sub(self.window_start.load(Ordering::Relaxed)) < self.min_window {
            return false;
        }
        let t = self.window.peek();
        let (completions, _) = self.completions();
        let count = completions.saturating_sub(t.ignored);
        let samples = count.saturating_sub(t.dropped);
        // A window closed by a timed drop while thinned-out timing had no latency yet would report a mean of 0:
        // wait for one. (A window of drops only has no latency to report, and closes.)
        count >= self.min_samples && (t.timed > 0 || samples == 0)
    }

    /// Requests finished since the current window opened (every outcome), and the released count that says so.
    fn completions(&self) -> (u64, usize) {
        let released = self.released.load(Ordering::Acquire);
        let since = released.wrapping_sub(self.released_base.load(Ordering::Relaxed));
        (since as u64, released)
    }

    fn close_window(&self, updater: &mut Updater, now: u64) -> Option<usize> {
        let start = self.window_start.swap(now, Ordering::Relaxed);
        // Completions first, then the stripes: a request finishing in between is counted in this window's
        // completions and, if it was dropped or ignored, in the next window's stripes; the next window's
        // completions start from this reading, so nothing is lost or counted twice overall.
        // Only the updater (we hold its lock) moves the base, so reading it and then storing is no race.
        let (completions, released) = self.completions();
        self.released_base.store(released, Ordering::Relaxed);
        let Totals {
            timed,
            ignored,
            dropped,
            latency_sum: sum,
            latency_min: min,
        } = self.window.take();
        let samples = completions.saturating_sub(ignored).saturating_sub(dropped);
        let in_flight = self.in_flight();
        let max_in_flight = self
            .max_in_flight
            .swap(in_flight, Ordering::Relaxed)
            .max(in_flight);
        let mean = sum.checked_div(timed).unwrap_or(0);
        let window = Window {
            limit: updater.estimate,
            samples,
            dropped,
            mean_latency: Duration::from_nanos(mean),
            min_latency: Duration::from_nanos(if timed > 0 { min } else { 0 }),
            max_in_flight,
            duration: Duration::from_nanos(now.saturating_sub(start)),
        };
        self.windows.fetch_add(1, Ordering::Relaxed);
        if self.thin_timing {
            self.timing_mask
                .store(timing_mask(samples, self.min_samples), Ordering::Relaxed);
        }
        if mean > 0 {
            let old = self.expected_latency.load(Ordering::Relaxed);
            let new = if old == 0 {
                mean
            } else {
                old - old / 8 + mean / 8
            };
            self.expected_latency.store(new.max(1), Ordering::Relaxed);
        }
        let proposed = updater.algorithm.update(&window);
        if proposed.is_finite() {
            updater.estimate = proposed;
        }
        self.apply_estimate(updater)
    }

    /// Clamps the estimate into the bounds and publishes its integer part; `Some(limit)` when it changed.
    pub(crate) fn apply_estimate(&self, updater: &mut Updater) -> Option<usize> {
        let min = self.min_limit.load(Ordering::Relaxed);
        let max = self.max_limit.load(Ordering::Relaxed);
        updater.estimate = updater.estimate.clamp(min as f64, max as f64);
        let limit = (updater.estimate as usize).clamp(min, max).max(1);
        let old = self.limit.swap(limit, Ordering::AcqRel);
        (old != limit).then_some(limit)
    }
}

/// The tag of a permit that was not timed: no admission instant, no latency.
pub(crate) const UNTIMED: u64 = crate::core::Permit::MAX_UNTIMED_TAG;

/// Timed samples a window should hold before timing is thinned out; more add nothing to a window's mean.
const TIMED_TARGET: u64 = 1024;

/// At least one request in `2^MAX_TIMING_SHIFT` (64) is timed, whatever the rate.
const MAX_TIMING_SHIFT: u32 = 6;

/// The timing mask for the next window, from the samples the last one held: every request is timed until a
/// window holds `4 × target` samples, then one in 2, 4, ... 64, so that a window keeps about `2 × target` timed
/// samples or more (and still `target` if the load halves).
fn timing_mask(samples: u64, min_samples: u64) -> u32 {
    let target = TIMED_TARGET.max(min_samples);
    let mut shift = 0;
    while shift < MAX_TIMING_SHIFT && samples >> (shift + 1) >= 2 * target {
        shift += 1;
    }
    (1u32 << shift) - 1
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The core plus the observer: what the permits release into.
#[derive(Debug)]
pub(crate) struct Shared<O> {
    pub(crate) core: Core,
    pub(crate) observer: O,
}

impl<O: Observer> Shared<O> {
    pub(crate) fn limit_changed(&self, limit: usize) {
        self.observer.on_event(&Event::LimitChanged {
            layer: "adaptive",
            limit,
        });
    }
}

impl<O: Observer> Release for Shared<O> {
    fn release(&self, outcome: Outcome, latency: Duration, tag: u64) {
        // Permits are untimed as far as `Permit` goes: a timed request's tag is its admission instant, exact to the
        // nanosecond, and the latency is worked out here.
        let latency = if tag == UNTIMED {
            latency
        } else {
            Duration::from_nanos(self.core.tag(Instant::now()).saturating_sub(tag))
        };
        let changed = self.core.record(outcome, latency, tag);
        if !observer::is_noop::<O>() {
            self.observer.on_event(&Event::Completed {
                layer: "adaptive",
                outcome,
                latency,
                in_flight: self.core.in_flight(),
            });
        }
        if let Some(limit) = changed {
            self.limit_changed(limit);
        }
    }
}

/// What a handle needs from a `Shared<O>` without knowing `O`.
pub(crate) trait Control: Send + Sync + 'static {
    fn core(&self) -> &Core;
    fn limit_changed(&self, limit: usize);
}

impl<O: Observer> Control for Shared<O> {
    fn core(&self) -> &Core {
        &self.core
    }

    fn limit_changed(&self, limit: usize) {
        Shared::limit_changed(self, limit)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::algorithm::{Aimd, Gradient2, Knee, Vegas};
    use super::*;

    fn core(algorithm: Box<dyn Algorithm>, min: usize, max: usize) -> Core {
        Core::new(Config {
            initial: min,
            min,
            max,
            min_samples: 1,
            window: Duration::from_nanos(1),
            algorithm,
        })
        .unwrap()
    }

    fn outcome(i: u8) -> Outcome {
        [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Dropped,
            Outcome::Ignored,
        ][usize::from(i % 4)]
    }

    proptest! {
        /// Whatever the samples, every algorithm's limit stays within [min, max] and never reaches 0.
        #[test]
        fn limit_stays_within_bounds(
            which in 0usize..4,
            min in 1usize..50,
            span in 0usize..200,
            samples in proptest::collection::vec((0u8..4, 0u64..20_000_000_000, 0usize..300), 1..300),
        ) {
            let max = min + span;
            let algorithm: Box<dyn Algorithm> = match which {
                0 => Box::new(Knee::new()),
                1 => Box::new(Aimd::new()),
                2 => Box::new(Vegas::new()),
                _ => Box::new(Gradient2::new()),
            };
            let core = core(algorithm, min, max);
            let mut tag = 0u64;
            for (o, latency, in_flight) in samples {
                // `record` below finishes one request: admit it first, over `in_flight` others.
                let released = core.released.load(Ordering::Relaxed);
                core.admitted.store(released + in_flight + 1, Ordering::Relaxed);
                core.max_in_flight.store(in_flight, Ordering::Relaxed);
                tag += 1_000_000;
                core.record(outcome(o), Duration::from_nanos(latency), tag);
                let limit = core.limit.load(Ordering::Relaxed);
                prop_assert!(limit >= min && limit <= max && limit > 0, "limit {} outside [{}, {}]", limit, min, max);
            }
        }
    }

    /// Hands every window it is given to the test, and keeps the limit.
    #[derive(Debug)]
    struct Recorder(std::sync::mpsc::Sender<Window>);

    impl Algorithm for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn validate(&self) -> Result<(), ConfigError> {
            Ok(())
        }
        fn update(&mut self, window: &Window) -> f64 {
            self.0.send(*window).unwrap();
            window.limit
        }
    }

    /// A core with 100 ms windows whose windows are sent to the returned receiver.
    fn recorded(min_samples: u64) -> (Core, std::sync::mpsc::Receiver<Window>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let core = Core::new(Config {
            initial: 10,
            min: 1,
            max: 100,
            min_samples,
            window: Duration::from_millis(100),
            algorithm: Box::new(Recorder(tx)),
        })
        .unwrap();
        (core, rx)
    }

    #[test]
    fn timed_requests_are_spread_evenly_over_admission_numbers() {
        let (core, _rx) = recorded(1);
        assert!((0..1000).all(|n| core.timed(n)), "mask 0 times everything");
        core.timing_mask.store(63, Ordering::Relaxed);
        let picked = (0..64_000).filter(|&n| core.timed(n)).count();
        assert!(
            (900..1100).contains(&picked),
            "{picked} of 64 000 timed, expected about 1 000"
        );
        // No pattern: every second request (a client alternating two kinds of calls) gets its share.
        let odd = (0..64_000).filter(|&n| n % 2 == 1 && core.timed(n)).count();
        assert!(
            (400..600).contains(&odd),
            "{odd} odd requests timed, expected about 500"
        );
        let third = (0..64_000).filter(|&n| n % 3 == 0 && core.timed(n)).count();
        assert!(
            (250..420).contains(&third),
            "{third} of every third timed, expected about 333"
        );
    }

    #[test]
    fn timing_thins_out_only_past_thousands_of_samples_per_window() {
        assert_eq!(timing_mask(0, 20), 0);
        assert_eq!(
            timing_mask(4095, 20),
            0,
            "below 2 x 2 x 1024: everything timed"
        );
        assert_eq!(timing_mask(4096, 20), 1);
        assert_eq!(timing_mask(8192, 20), 3);
        assert_eq!(
            timing_mask(10_000_000, 20),
            63,
            "never fewer than one in 64"
        );
        assert_eq!(
            timing_mask(16_000, 5000),
            0,
            "the target follows min_samples"
        );
        assert_eq!(timing_mask(20_000, 5000), 1);
    }

    #[test]
    fn untimed_requests_count_but_only_timed_ones_make_the_latency() {
        let (core, rx) = recorded(3);
        let ms = 1_000_000;
        // A busy window: 5 000 timed samples thin out the next window's timing.
        for _ in 0..5000 {
            core.record(Outcome::Success, Duration::from_millis(1), 50 * ms);
        }
        core.record(Outcome::Success, Duration::from_millis(1), 200 * ms);
        assert_eq!(rx.try_recv().unwrap().samples, 5001);
        assert_eq!(core.timing_mask(), 1);

        // Untimed completions never close a window, however many and however late.
        for _ in 0..10 {
            assert_eq!(core.record(Outcome::Success, Duration::ZERO, UNTIMED), None);
        }
        core.record(Outcome::Dropped, Duration::ZERO, UNTIMED);
        core.record(Outcome::Ignored, Duration::ZERO, UNTIMED);
        assert!(rx.try_recv().is_err());
        // The first timed completion past the window's end closes it: every completion counted, the latency
        // that of the timed ones.
        core.record(Outcome::Success, Duration::from_millis(40), 300 * ms);
        core.record(Outcome::Failure, Duration::from_millis(20), 310 * ms);
        let w = rx.try_recv().unwrap();
        assert_eq!((w.samples, w.dropped), (11, 1));
        assert_eq!(w.mean_latency, Duration::from_millis(40));
        assert_eq!(w.min_latency, Duration::from_millis(40));
        assert_eq!(
            core.timing_mask(),
            0,
            "an ordinary window times everything again"
        );
    }

    #[test]
    fn a_timed_drop_does_not_close_a_window_whose_samples_are_all_untimed() {
        let (core, rx) = recorded(1);
        let ms = 1_000_000;
        core.record(Outcome::Success, Duration::ZERO, UNTIMED);
        core.record(Outcome::Dropped, Duration::from_millis(5), 200 * ms);
        assert!(rx.try_recv().is_err(), "no latency to report yet");
        core.record(Outcome::Success, Duration::from_millis(30), 210 * ms);
        let w = rx.try_recv().unwrap();
        assert_eq!((w.samples, w.dropped), (2, 1));
        assert_eq!(w.mean_latency, Duration::from_millis(30));
        // A window of drops only has no latency, and closes.
        core.record(Outcome::Dropped, Duration::from_millis(5), 400 * ms);
        let w = rx.try_recv().unwrap();
        assert_eq!((w.samples, w.dropped), (0, 1));
    }

    #[test]
    fn window_closes_only_with_enough_samples_and_time() {
        let core = Core::new(Config {
            initial: 10,
            min: 1,
            max: 100,
            min_samples: 3,
            window: Duration::from_millis(100),
            algorithm: Box::new(Aimd::new()),
        })
        .unwrap();
        core.max_in_flight.store(10, Ordering::Relaxed);
        let ms = 1_000_000;
        core.record(Outcome::Success, Duration::from_millis(10), 200 * ms);
        core.record(Outcome::Success, Duration::from_millis(10), 200 * ms);
        assert_eq!(
            core.windows.load(Ordering::Relaxed),
            0,
            "two samples are not a window"
        );
        assert_eq!(
            core.record(Outcome::Success, Duration::from_millis(10), 200 * ms),
            Some(11)
        );
        assert_eq!(core.windows.load(Ordering::Relaxed), 1);
        // Three more samples but only 50 ms later: the window is not over yet.
        for _ in 0..3 {
            core.record(Outcome::Success, Duration::from_millis(10), 250 * ms);
        }
        assert_eq!(core.windows.load(Ordering::Relaxed), 1);
        core.record(Outcome::Ignored, Duration::from_millis(10), 400 * ms);
        assert_eq!(
            core.windows.load(Ordering::Relaxed),
            1,
            "ignored outcomes are not samples"
        );
        core.record(Outcome::Success, Duration::from_millis(10), 400 * ms);
        assert_eq!(core.windows.load(Ordering::Relaxed), 2);
    }
}
