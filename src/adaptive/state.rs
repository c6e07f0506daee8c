//! The state one layer instance shares with all its services and handles.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use tokio::time::Instant;

use super::algorithm::{Algorithm, Window, LAYER};
use crate::core::stripe::{Stripe, Striped, Totals};
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
    /// Admission tokens taken from and given back to the shared count so far (both wrap). Their difference is
    /// the requests in flight plus the tokens parked in the threads' stripes (see [`Core::try_acquire`]).
    admitted: AtomicUsize,
    released: AtomicUsize,
    /// Set when a stripe may hold parked tokens; cleared by [`Core::sweep`], which gives them all back.
    parked_hint: AtomicBool,
    /// The stripes' completed sum when the current window opened; written only by the updater.
    completed_base: AtomicU64,
    /// One request in `timing_mask + 1` is timed (see [`Core::timing_mask`]); 0 while every request is.
    timing_mask: AtomicU32,
    /// Whether timing may be thinned out at all: not when an observer is told every latency.
    thin_timing: bool,
    pub(crate) min_limit: AtomicUsize,
    pub(crate) max_limit: AtomicUsize,
    /// Requests refused at the limit.
    pub(crate) rejected_overloaded: AtomicU64,
    /// Requests refused because their deadline could not be met (counted by the service, which judges them).
    pub(crate) rejected_deadline: AtomicU64,
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
            parked_hint: AtomicBool::new(false),
            completed_base: AtomicU64::new(0),
            timing_mask: AtomicU32::new(0),
            thin_timing: true,
            min_limit: AtomicUsize::new(config.min),
            max_limit: AtomicUsize::new(config.max),
            rejected_overloaded: AtomicU64::new(0),
            rejected_deadline: AtomicU64::new(0),
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

    /// Requests holding a permit now: tokens out of the shared count, less those parked in stripes. Exact while
    /// no other thread admits or finishes a request; while they do, it may be off by a few (a batch at most) as
    /// tokens move between the shared count and the stripes.
    pub(crate) fn in_flight(&self) -> usize {
        let outstanding = self.outstanding();
        outstanding.saturating_sub(self.window.parked())
    }

    /// Tokens out of the shared count: requests in flight plus tokens parked in stripes.
    #[inline]
    fn outstanding(&self) -> usize {
        // Released first: it never passes the admissions read after it.
        let released = self.released.load(Ordering::Acquire);
        let admitted = self.admitted.load(Ordering::Acquire);
        usize::try_from(admitted.wrapping_sub(released) as isize).unwrap_or(0)
    }

    /// Tries to admit one request on this thread: `Some((in_flight, stripe))` (in flight including it, and this
    /// thread's stripe), or `None` at the limit.
    ///
    /// # Parked tokens
    ///
    /// The shared count is one cache line that every admission and every release would otherwise write, and
    /// with two threads its transfer between cores is most of this layer's cost. So while in flight stays far
    /// below the limit (with a limit of at least [`PARK_FROM`]), a thread takes tokens in small batches and
    /// keeps the rest of each batch in its own stripe, and a request finishing there gives its token back to the
    /// stripe. In that state admission and release touch only the thread's own cache line, and the shared count
    /// is only read.
    ///
    /// The limit stays exact:
    /// - Tokens are parked only while the shared count's tokens (in flight plus every parked token) are at most
    ///   3/8 of the limit, and a stripe parks about `2 × batch` at most.
    /// - Every parked token is given back before a request is refused at the limit, and before an admission
    ///   would put in flight at half the limit or more. So the window's maximum in flight, which the algorithms
    ///   compare with half the limit (app-limited) and with the limit (saturated), is exact wherever it decides
    ///   anything; below half the limit it may count other threads' parked tokens.
    /// - An admission from a parked token that finds the limit lowered under it gives the token back and goes
    ///   through the shared count.
    ///
    /// With one thread (the simulator) admissions, refusals and the in-flight figures are exactly those of a
    /// single shared count. With several, a request may be refused while a thread is between taking a batch and
    /// parking its rest, i.e. up to one batch below the limit for that instant.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<(usize, &Stripe)> {
        let stripe = self.window.mine();
        let mut parked = stripe.parked.load(Ordering::Relaxed);
        while parked > 0 {
            match stripe.parked.compare_exchange_weak(
                parked,
                parked - 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // The shared count's tokens less this stripe's, read after them: a sweep in between makes the
                    // figure high, never low. Exact with one thread; with several, other stripes' parked tokens
                    // make it high, which matters from half the limit on.
                    let outstanding = self.outstanding();
                    let in_flight =
                        outstanding.saturating_sub(stripe.parked.load(Ordering::Relaxed));
                    if in_flight * 2 >= self.limit.load(Ordering::Relaxed) {
                        return self.admitted_near_half(stripe);
                    }
                    self.note_in_flight(in_flight);
                    return Some((in_flight, stripe));
                }
                Err(now) => parked = now,
            }
        }
        self.acquire_shared(stripe)
    }

    /// A request admitted from a parked token whose figure reached half the limit: the parked tokens go back,
    /// the figure is taken again, exactly, and if the limit was lowered below it the token goes back too and
    /// the request is decided through the shared count.
    #[cold]
    #[inline(never)]
    fn admitted_near_half<'a>(&'a self, stripe: &'a Stripe) -> Option<(usize, &'a Stripe)> {
        self.sweep();
        let in_flight = self.in_flight();
        if in_flight > self.limit.load(Ordering::Acquire) {
            self.released.fetch_add(1, Ordering::AcqRel);
            return self.acquire_shared(stripe);
        }
        self.note_in_flight(in_flight);
        Some((in_flight, stripe))
    }

    /// Admission through the shared count: one token, or a batch whose rest is parked in `stripe`.
    #[inline(never)]
    fn acquire_shared<'a>(&'a self, stripe: &'a Stripe) -> Option<(usize, &'a Stripe)> {
        let mut swept = false;
        let limit = self.limit.load(Ordering::Acquire);
        let mut admitted = self.admitted.load(Ordering::Relaxed);
        loop {
            let released = self.released.load(Ordering::Acquire);
            // Negative when requests admitted after our read have finished since: read again.
            let Ok(before) = usize::try_from(admitted.wrapping_sub(released) as isize) else {
                admitted = self.admitted.load(Ordering::Relaxed);
                continue;
            };
            // Tokens parked in other stripes make `before` high: give them back before refusing anybody, and
            // before this admission's figure reaches half the limit.
            if (before + 1) * 2 >= limit && !swept && self.parked_hint.load(Ordering::SeqCst) {
                self.sweep();
                swept = true;
                admitted = self.admitted.load(Ordering::Relaxed);
                continue;
            }
            if before >= limit {
                self.rejected_overloaded.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let batch = batch(limit);
            let take = if batch > 1 && parks(before + batch, limit) {
                batch
            } else {
                1
            };
            // Succeeds only if nobody was admitted since our read: then everything counted in `released` was
            // admitted before it, and `before` is at least the true count, never below it.
            match self.admitted.compare_exchange_weak(
                admitted,
                admitted.wrapping_add(take),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if take > 1 {
                        self.park(stripe, take - 1);
                    }
                    let in_flight = before + 1;
                    self.note_in_flight(in_flight);
                    return Some((in_flight, stripe));
                }
                Err(now) => admitted = now,
            }
        }
    }

    /// Keeps `n` tokens in `stripe`, and says so to whoever may have to give them back.
    #[inline]
    fn park(&self, stripe: &Stripe, n: usize) {
        stripe.parked.fetch_add(n, Ordering::SeqCst);
        // Sequentially consistent with the sweep's clear-then-take: either the sweep takes these tokens, or this
        // load comes after its clear and sets the hint again.
        if !self.parked_hint.load(Ordering::SeqCst) {
            self.parked_hint.store(true, Ordering::SeqCst);
        }
    }

    /// Gives every parked token back to the shared count.
    #[cold]
    fn sweep(&self) {
        self.parked_hint.store(false, Ordering::SeqCst);
        let mut tokens = 0usize;
        for stripe in self.window.all() {
            // Sequentially consistent, like the store above: a relaxed load could be ordered before it and miss
            // tokens parked by a thread that then saw the hint still set.
            if stripe.parked.load(Ordering::SeqCst) > 0 {
                tokens += stripe.parked.swap(0, Ordering::SeqCst);
            }
        }
        if tokens > 0 {
            self.released.fetch_add(tokens, Ordering::AcqRel);
        }
    }

    /// A finished request's token: back into its thread's stripe while in flight is far below the limit and the
    /// stripe holds few, else back to the shared count.
    #[inline]
    fn give_back(&self, stripe: &Stripe) {
        let limit = self.limit.load(Ordering::Relaxed);
        let batch = batch(limit);
        if batch > 1
            && stripe.parked.load(Ordering::Relaxed) < 2 * batch
            && parks(self.outstanding(), limit)
        {
            self.park(stripe, 1);
        } else {
            self.released.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Raises the window's maximum in flight to `in_flight`.
    #[inline]
    fn note_in_flight(&self, in_flight: usize) {
        // The maximum changes rarely within a window: read before writing, so the common case writes nothing.
        if in_flight > self.max_in_flight.load(Ordering::Relaxed) {
            self.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        }
    }

    /// Whether to time the request just admitted on `stripe`: every request while the mask is 0; else one in
    /// `timing_mask + 1`, [`picked`] by its admission number, the count of this thread's admissions (kept in its
    /// stripe, and only counted while timing is thinned out).
    #[inline]
    pub(crate) fn timed_on(&self, stripe: &Stripe) -> bool {
        let mask = self.timing_mask();
        mask == 0 || picked(stripe.admits.fetch_add(1, Ordering::Relaxed), mask)
    }

    /// The tag of a request timed at `now`: nanoseconds since the epoch, kept below [`UNTIMED`] (146 years in), so
    /// that it fits a permit's tag and never reads as untimed. Its release reads the clock once and works out
    /// both the latency and the window's time from the two.
    #[inline]
    pub(crate) fn tag(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch)).min(UNTIMED - 1)
    }

    /// Which admitted requests to time, for a layer without an observer (an observer is told every request's
    /// latency, so with one every request is timed): one in `mask + 1`, chosen by [`Core::timed_on`].
    ///
    /// Reading the clock twice per request is the largest part of this layer's cost. A window's mean latency
    /// needs a few hundred samples, not every request of a busy service: once a window holds
    /// `4 × max(1024, min_samples)` samples, the next one times half, a quarter, ... down to one request in
    /// 64, so that every window keeps at least about `2 × max(1024, min_samples)` timed samples. Every finished
    /// request is still counted (the window's completions, drops, in-flight), and the mean and minimum latency are
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
        // Counted among the window's completions in this thread's stripe; the token goes back there too while
        // in flight is far below the limit. Only the rarer outcomes (ignored, dropped) and timed samples are
        // written anywhere else.
        let stripe = self.window.mine();
        stripe.completed.fetch_add(1, Ordering::AcqRel);
        self.give_back(stripe);
        let timed = tag != UNTIMED;
        let latency = nanos(latency);
        match outcome {
            Outcome::Ignored => {
                stripe.ignored.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Outcome::Dropped => {
                stripe.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Success | Outcome::Failure if timed => stripe.sample(latency),
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

    /// Requests finished since the current window opened (every outcome), and the completed count that says so.
    fn completions(&self) -> (u64, u64) {
        let completed = self.window.completed();
        let since = completed.wrapping_sub(self.completed_base.load(Ordering::Relaxed));
        (since, completed)
    }

    fn close_window(&self, updater: &mut Updater, now: u64) -> Option<usize> {
        let start = self.window_start.swap(now, Ordering::Relaxed);
        // Completions first, then the stripes: a request finishing in between is counted in this window's
        // completions and, if it was dropped or ignored, in the next window's stripes; the next window's
        // completions start from this reading, so nothing is lost or counted twice overall.
        // Only the updater (we hold its lock) moves the base, so reading it and then storing is no race.
        let (completions, completed) = self.completions();
        self.completed_base.store(completed, Ordering::Relaxed);
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
        if limit < old && self.parked_hint.load(Ordering::SeqCst) {
            // Tokens parked under the old limit may be too many for the new one.
            self.sweep();
        }
        (old != limit).then_some(limit)
    }
}

/// The tag of a permit that was not timed: no admission instant, no latency.
pub(crate) const UNTIMED: u64 = crate::core::Permit::MAX_UNTIMED_TAG;

/// Whether admission `number` is one of the one in `mask + 1` that are timed. Fibonacci hashing of the number
/// spreads consecutive numbers, and every arithmetic progression of them, evenly, so the picks follow no pattern
/// in the traffic (every second request of a client that alternates cheap and costly calls, say).
#[inline]
fn picked(number: u64, mask: u32) -> bool {
    (number.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32 & mask == 0
}

/// The smallest limit under which threads park tokens (see [`Core::try_acquire`]).
pub(crate) const PARK_FROM: usize = 256;

/// How many tokens a thread takes from the shared count at once under `limit`: 1 below [`PARK_FROM`], then a
/// 128th of the limit, at most 16. A stripe parks about twice that at most.
#[inline]
fn batch(limit: usize) -> usize {
    if limit < PARK_FROM {
        1
    } else {
        (limit / 128).min(16)
    }
}

/// Whether tokens may be parked with `outstanding` tokens out of the shared count: at most 3/8 of the limit. The
/// gap to half the limit, where they are swept back, keeps a load near half the limit from sweeping and parking
/// by turns.
#[inline]
fn parks(outstanding: usize, limit: usize) -> bool {
    outstanding.saturating_mul(8) <= limit.saturating_mul(3)
}

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
    /// Tells the observer the limit moved. The event carries the limit in force when it is sent, not the value the
    /// change computed, and is sent again if the limit moved while it was being told: changes are told after the
    /// updater's lock is let go (an observer may call the handle), so two close together may be told in the other
    /// order on two threads, and the last event must still be the limit in force (a gauge keeps the last value it
    /// was given). Whoever moves the limit after the last check tells it too.
    pub(crate) fn limit_changed(&self) {
        let mut limit = self.core.limit.load(Ordering::Acquire);
        loop {
            self.observer.on_event(&Event::LimitChanged {
                layer: "adaptive",
                limit,
            });
            let now = self.core.limit.load(Ordering::Acquire);
            if now == limit {
                return;
            }
            limit = now;
        }
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
        observer::completed(&self.observer, "adaptive", outcome, latency, || {
            self.core.in_flight()
        });
        if changed.is_some() {
            self.limit_changed();
        }
    }
}

/// What a handle needs from a `Shared<O>` without knowing `O`.
pub(crate) trait Control: Send + Sync + 'static {
    fn core(&self) -> &Core;
    fn limit_changed(&self);
}

impl<O: Observer> Control for Shared<O> {
    fn core(&self) -> &Core {
        &self.core
    }

    fn limit_changed(&self) {
        Shared::limit_changed(self)
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
        let stripe = core.window.mine();
        assert!(
            (0..1000).all(|_| core.timed_on(stripe)),
            "mask 0 times everything"
        );
        assert_eq!(
            stripe.admits.load(Ordering::Relaxed),
            0,
            "and numbers nothing"
        );
        core.timing_mask.store(63, Ordering::Relaxed);
        let timed = (0..64_000).filter(|_| core.timed_on(stripe)).count();
        assert!(
            (900..1100).contains(&timed),
            "{timed} of 64 000 timed, expected about 1 000"
        );
        // No pattern: every second request (a client alternating two kinds of calls) gets its share.
        let odd = (0..64_000u64)
            .filter(|&n| n % 2 == 1 && picked(n, 63))
            .count();
        assert!(
            (400..600).contains(&odd),
            "{odd} odd requests timed, expected about 500"
        );
        let third = (0..64_000u64)
            .filter(|&n| n % 3 == 0 && picked(n, 63))
            .count();
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

    /// A core whose limit stays at `limit` (no window closes in a test).
    fn fixed(limit: usize) -> Core {
        Core::new(Config {
            initial: limit,
            min: 1,
            max: limit,
            min_samples: 1,
            window: Duration::from_secs(3600),
            algorithm: Box::new(Aimd::new()),
        })
        .unwrap()
    }

    fn finish(core: &Core) {
        core.record(Outcome::Success, Duration::ZERO, UNTIMED);
    }

    /// On a thread whose stripe is not this thread's, admits and finishes 100 requests far below the limit,
    /// which leaves tokens parked in that thread's stripe.
    fn park_on_another_stripe(core: &std::sync::Arc<Core>) {
        let here = crate::core::stripe::index();
        for _ in 0..crate::core::stripe::STRIPES {
            let core = core.clone();
            let ran = std::thread::spawn(move || {
                if crate::core::stripe::index() == here {
                    return false;
                }
                for _ in 0..100 {
                    core.try_acquire().unwrap();
                    finish(&core);
                }
                assert!(core.window.mine().parked.load(Ordering::Relaxed) > 0);
                true
            })
            .join()
            .unwrap();
            if ran {
                return;
            }
        }
        panic!("no thread on another stripe");
    }

    #[test]
    fn far_below_the_limit_a_thread_parks_tokens_and_in_flight_stays_exact() {
        let core = fixed(1000);
        assert_eq!(batch(1000), 7);
        let mut held = 0;
        for round in 0..50 {
            for _ in 0..5 {
                let (in_flight, _) = core.try_acquire().unwrap();
                held += 1;
                assert_eq!(in_flight, held, "round {round}");
                assert_eq!(core.in_flight(), held);
            }
            for _ in 0..3 {
                finish(&core);
                held -= 1;
                assert_eq!(core.in_flight(), held);
            }
        }
        assert_eq!(held, 100);
        assert!(core.window.parked() > 0, "tokens are parked");
        assert!(core.window.parked() <= 2 * batch(1000));
        // The last round reached 98 + 5.
        assert_eq!(core.max_in_flight.load(Ordering::Relaxed), 103);
        for _ in 0..held {
            finish(&core);
        }
        assert_eq!(core.in_flight(), 0);
        // What is parked is all that is out of the shared count.
        assert_eq!(core.outstanding(), core.window.parked());
    }

    #[test]
    fn a_small_limit_parks_nothing() {
        let core = fixed(PARK_FROM - 1);
        for _ in 0..100 {
            core.try_acquire().unwrap();
            finish(&core);
        }
        assert_eq!(core.window.parked(), 0);
        assert!(!core.parked_hint.load(Ordering::SeqCst));
    }

    #[test]
    fn tokens_parked_on_another_thread_never_cost_an_admission_at_the_limit() {
        let core = std::sync::Arc::new(fixed(1000));
        park_on_another_stripe(&core);
        assert!(core.window.parked() > 0);
        assert_eq!(core.in_flight(), 0);
        // All 1000 requests are admitted here, and the 1001st refused.
        for n in 1..=1000 {
            let (in_flight, _) = core
                .try_acquire()
                .unwrap_or_else(|| panic!("request {n} refused below the limit"));
            // The admission's own figure may count the other stripe's parked tokens while it stays below half the
            // limit; from half the limit on it is exact. The handle's figure always is (nothing moves here).
            if in_flight * 2 >= 1000 {
                assert_eq!(in_flight, n);
            } else {
                assert!((n..=n + 2 * batch(1000)).contains(&in_flight));
            }
            assert_eq!(core.in_flight(), n);
        }
        assert!(core.try_acquire().is_none());
        assert_eq!(core.window.parked(), 0, "given back before refusing");
        assert_eq!(core.in_flight(), 1000);
        assert_eq!(core.max_in_flight.load(Ordering::Relaxed), 1000);
        for _ in 0..1000 {
            finish(&core);
        }
        assert_eq!(core.in_flight(), 0);
    }

    #[test]
    fn passing_half_the_limit_gives_parked_tokens_back() {
        let core = std::sync::Arc::new(fixed(1000));
        park_on_another_stripe(&core);
        let parked = core.window.parked();
        assert!(parked > 0);
        // Here, in flight climbs to just below half the limit: the other stripe's tokens go back as the figure
        // reaches half, so the window's maximum is exact and the window reads app-limited (the algorithms' test
        // is `max_in_flight * 2 < limit`), not raised to half the limit by the parked tokens.
        for _ in 0..499 {
            core.try_acquire().unwrap();
        }
        assert_eq!(core.window.parked(), 0);
        assert_eq!(core.max_in_flight.load(Ordering::Relaxed), 499);
        assert_eq!(core.in_flight(), 499);
        for _ in 0..2 {
            core.try_acquire().unwrap();
        }
        assert_eq!(core.max_in_flight.load(Ordering::Relaxed), 501);
        assert_eq!(core.in_flight(), 501);
    }

    #[test]
    fn a_parked_token_does_not_admit_past_a_lowered_limit() {
        let core = fixed(1000);
        for _ in 0..10 {
            core.try_acquire().unwrap();
        }
        let parked = core.window.parked();
        assert!(parked > 0);
        // The limit drops to 10 without the sweep a window would make (as when an admission reads the stripe just
        // before the change): the parked tokens must not admit an eleventh request.
        core.limit.store(10, Ordering::SeqCst);
        assert!(core.try_acquire().is_none());
        assert_eq!(core.window.parked(), 0);
        assert_eq!(core.in_flight(), 10);
        finish(&core);
        assert_eq!(core.try_acquire().map(|(n, _)| n), Some(10));
        assert!(core.try_acquire().is_none());
    }

    #[test]
    fn a_lower_limit_takes_parked_tokens_back() {
        let core = fixed(1000);
        for _ in 0..10 {
            core.try_acquire().unwrap();
        }
        assert!(core.window.parked() > 0);
        core.max_limit.store(300, Ordering::Relaxed);
        let changed = core.apply_estimate(&mut core.lock_updater());
        assert_eq!(changed, Some(300));
        assert_eq!(core.window.parked(), 0);
        assert_eq!(core.in_flight(), 10);
    }

    #[test]
    fn threads_sharing_a_limit_never_hold_more_than_it() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::{Arc, Barrier};
        const LIMIT: usize = 300;
        const THREADS: usize = 4;
        let core = Arc::new(fixed(LIMIT));
        let held = Arc::new(AtomicUsize::new(0));
        // The threads meet at barriers, so they record what they see rather than panic (a panicking thread
        // would leave the others waiting); the test thread checks it all once they are done.
        let peak = Arc::new(AtomicUsize::new(0));
        let full_at_barrier = Arc::new(AtomicUsize::new(0));
        let refused_when_full = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let (core, held, peak, barrier) =
                    (core.clone(), held.clone(), peak.clone(), barrier.clone());
                let (full, refused) = (full_at_barrier.clone(), refused_when_full.clone());
                std::thread::spawn(move || {
                    let mut mine = 0usize;
                    let acquire = |mine: &mut usize| {
                        if core.try_acquire().is_some() {
                            *mine += 1;
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                        }
                    };
                    // Wandering: each thread heads for 150 requests held, then for 10, and so on, so that
                    // together they cross half the limit and meet it again and again, however the threads
                    // happen to be scheduled against each other.
                    let mut x = (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    for i in 0..100_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let target = if (i / 5_000) % 2 == 0 { 150 } else { 10 };
                        if (mine < target) == (x % 4 != 0) {
                            acquire(&mut mine);
                        } else if mine > 0 {
                            mine -= 1;
                            held.fetch_sub(1, Ordering::SeqCst);
                            finish(&core);
                        }
                    }
                    barrier.wait();
                    // Filling: nobody finishes anything now, and the threads want 400 between them, so together
                    // they hold the whole limit (a refusal while a thread parks a batch is only momentary).
                    for _ in 0..1_000_000 {
                        if mine == 100 || held.load(Ordering::SeqCst) >= LIMIT {
                            break;
                        }
                        acquire(&mut mine);
                    }
                    barrier.wait();
                    if held.load(Ordering::SeqCst) == LIMIT {
                        full.fetch_add(1, Ordering::SeqCst);
                    }
                    if core.try_acquire().is_none() {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    barrier.wait();
                    for _ in 0..mine {
                        held.fetch_sub(1, Ordering::SeqCst);
                        finish(&core);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            peak <= LIMIT,
            "{peak} requests held under a limit of {LIMIT}"
        );
        assert_eq!(
            full_at_barrier.load(Ordering::SeqCst),
            THREADS,
            "filling held the whole limit"
        );
        assert_eq!(
            refused_when_full.load(Ordering::SeqCst),
            THREADS,
            "every thread refused at the limit"
        );
        assert_eq!(held.load(Ordering::SeqCst), 0);
        assert_eq!(core.in_flight(), 0);
        assert_eq!(core.outstanding(), core.window.parked());
        // Whatever the threads left parked in their stripes, the whole limit is here for the taking.
        for n in 1..=LIMIT {
            assert!(core.try_acquire().is_some(), "request {n} refused");
        }
        assert!(core.try_acquire().is_none());
    }
}
