//! The state one layer instance shares with all its services and handles.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use tokio::time::Instant;

use super::algorithm::{Algorithm, Window, LAYER};
use crate::core::stripe::{Striped, Totals};
use crate::core::{ConfigError, Event, Observer, Outcome, Release};

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
    pub(crate) in_flight: AtomicUsize,
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
            in_flight: AtomicUsize::new(0),
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

    /// Tries to admit one request: `Some(in_flight)` including it, or `None` at the limit.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<usize> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let limit = self.limit.load(Ordering::Acquire);
        if before >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let in_flight = before + 1;
        // The maximum changes rarely within a window: read before writing, so the common case writes nothing.
        if in_flight > self.max_in_flight.load(Ordering::Relaxed) {
            self.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        }
        Some(in_flight)
    }

    /// The admission tag: nanoseconds since the epoch, so that release can tell the time without a clock read.
    #[inline]
    pub(crate) fn tag(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }

    pub(crate) fn lock_updater(&self) -> MutexGuard<'_, Updater> {
        // An algorithm that panicked leaves a usable estimate behind: keep going rather than poison the layer.
        self.updater.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a finished request; returns the new limit when this request closed a window that changed it.
    fn record(&self, outcome: Outcome, latency: Duration, tag: u64) -> Option<usize> {
        let latency = nanos(latency);
        match outcome {
            Outcome::Ignored => return None,
            Outcome::Dropped => self.window.dropped(),
            Outcome::Success | Outcome::Failure => self.window.sample(latency),
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
        now.saturating_sub(self.window_start.load(Ordering::Relaxed)) >= self.min_window
            && self.window.count() >= self.min_samples
    }

    fn close_window(&self, updater: &mut Updater, now: u64) -> Option<usize> {
        let start = self.window_start.swap(now, Ordering::Relaxed);
        let Totals {
            samples,
            dropped,
            latency_sum: sum,
            latency_min: min,
        } = self.window.take();
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let max_in_flight = self
            .max_in_flight
            .swap(in_flight, Ordering::Relaxed)
            .max(in_flight);
        let mean = sum.checked_div(samples).unwrap_or(0);
        let window = Window {
            limit: updater.estimate,
            samples,
            dropped,
            mean_latency: Duration::from_nanos(mean),
            min_latency: Duration::from_nanos(if samples > 0 { min } else { 0 }),
            max_in_flight,
            duration: Duration::from_nanos(now.saturating_sub(start)),
        };
        self.windows.fetch_add(1, Ordering::Relaxed);
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
        let in_flight = self.core.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        self.observer.on_event(&Event::Completed {
            layer: "adaptive",
            outcome,
            latency,
            in_flight,
        });
        if let Some(limit) = self.core.record(outcome, latency, tag) {
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
                core.in_flight.store(in_flight, Ordering::Relaxed);
                core.max_in_flight.store(in_flight, Ordering::Relaxed);
                tag += 1_000_000;
                core.record(outcome(o), Duration::from_nanos(latency), tag);
                let limit = core.limit.load(Ordering::Relaxed);
                prop_assert!(limit >= min && limit <= max && limit > 0, "limit {} outside [{}, {}]", limit, min, max);
            }
        }
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
