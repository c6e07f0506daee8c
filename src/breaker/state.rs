//! The state machine shared by every clone of a breaker: one state word changed only by compare-and-swap, the
//! window, the half-open probe word, and the open-period backoff.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::window::{Counts, Window, WindowKind};
use crate::core::observer;
use crate::core::stripe::Counter;
use crate::core::{CircuitState, Event, Observer, Outcome, Permit, Reason, Rejection, Release};

pub(crate) const LAYER: &str = "breaker";

/// Validated settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Thresholds in parts per million, so rates compare in integers.
    pub(crate) failure_ppm: u64,
    pub(crate) slow_ppm: u64,
    /// `None` while the slow-call rule is off.
    pub(crate) slow_call: Option<Duration>,
    pub(crate) window: WindowKind,
    pub(crate) minimum_calls: u64,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) open: Duration,
    pub(crate) open_max: Duration,
    pub(crate) multiplier: f64,
    pub(crate) jitter: f64,
    pub(crate) probes: u64,
    pub(crate) half_open_max_wait: Duration,
    pub(crate) seed: u64,
}

// The state word: state code in bits 0..3, a generation in bits 3..24 (bumped by every transition), and in bits
// 24..64 the instant (milliseconds since the breaker was built) at which the state times out: the end of the
// open period, or the half-open maximum wait. One compare-and-swap moves all three, so exactly one racer wins
// each transition and nobody can see a state without its deadline.
const STATE_MASK: u64 = 0b111;
const GEN_SHIFT: u32 = 3;
const GEN_BITS: u32 = 21;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const UNTIL_SHIFT: u32 = GEN_SHIFT + GEN_BITS;

/// A permit tag: the generation it was admitted in (only outcomes of the current generation count, so calls
/// that straddle a transition are not counted in the next state) and whether it is a half-open probe.
const PROBE_TAG: u64 = 1 << GEN_BITS;
// A timed permit keeps 24 bits of tag.
const _: () = assert!(PROBE_TAG + GEN_MASK <= crate::core::Permit::MAX_TIMED_TAG);

fn code(state: CircuitState) -> u64 {
    match state {
        CircuitState::Closed => 0,
        CircuitState::Open => 1,
        CircuitState::HalfOpen => 2,
        CircuitState::ForcedOpen => 3,
        CircuitState::Disabled => 4,
        CircuitState::MetricsOnly => 5,
    }
}

fn state_of(word: u64) -> CircuitState {
    match word & STATE_MASK {
        0 => CircuitState::Closed,
        1 => CircuitState::Open,
        2 => CircuitState::HalfOpen,
        3 => CircuitState::ForcedOpen,
        4 => CircuitState::Disabled,
        _ => CircuitState::MetricsOnly,
    }
}

fn gen_of(word: u64) -> u64 {
    (word >> GEN_SHIFT) & GEN_MASK
}

fn until_of(word: u64) -> u64 {
    word >> UNTIL_SHIFT
}

fn next_word(from: u64, to: CircuitState, until_ms: u64) -> u64 {
    let gen = (gen_of(from) + 1) & GEN_MASK;
    (until_ms << UNTIL_SHIFT) | (gen << GEN_SHIFT) | code(to)
}

// The probe word of the current half-open cycle: the cycle's generation (bits 40..61) and four 10-bit counts:
// probes handed out (minus those returned), successes, failures, slow probes. A word whose generation is not the
// current one reads as zero, so a new cycle needs no reset and a late probe of an older cycle changes nothing.
const P_FIELD: u32 = 10;
const P_MASK: u64 = (1 << P_FIELD) - 1;
const P_ADMITTED: u32 = 0;
const P_SUCCESS: u32 = P_FIELD;
const P_FAILURE: u32 = 2 * P_FIELD;
const P_SLOW: u32 = 3 * P_FIELD;
const P_GEN: u32 = 4 * P_FIELD;

/// The most probes a half-open cycle may admit (each count has 10 bits).
pub(crate) const MAX_PROBES: u64 = P_MASK;

#[derive(Debug, Clone, Copy, Default)]
struct Probes {
    admitted: u64,
    successes: u64,
    failures: u64,
    slow: u64,
}

impl Probes {
    fn read(word: u64, gen: u64) -> Self {
        if word >> P_GEN != gen {
            return Probes::default();
        }
        let f = |shift: u32| (word >> shift) & P_MASK;
        Probes {
            admitted: f(P_ADMITTED),
            successes: f(P_SUCCESS),
            failures: f(P_FAILURE),
            slow: f(P_SLOW),
        }
    }

    fn write(self, gen: u64) -> u64 {
        (gen << P_GEN)
            | (self.admitted << P_ADMITTED)
            | (self.successes << P_SUCCESS)
            | (self.failures << P_FAILURE)
            | (self.slow << P_SLOW)
    }
}

/// What `admit` decided.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Admit with a permit carrying this tag.
    Tag(u64),
    /// Let through uncounted (disabled).
    Bypass,
    Reject(Rejection),
}

/// Keeps a hot atomic on a cache line of its own (128 bytes: adjacent-line prefetching pairs lines), so that
/// the counters every call writes do not evict the read-mostly state word and settings from other cores.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The breaker's shared state; the owner of its permits.
pub(crate) struct Shared<O> {
    // Read on every call, written only by transitions.
    word: Padded<AtomicU64>,
    pub(crate) config: Config,
    probes: AtomicU64,
    consecutive_trips: AtomicU32,
    window: Window,
    // Written on every call.
    /// Figures only (no decision reads it): striped per thread.
    in_flight: Counter,
    consecutive_failures: Padded<AtomicU32>,
    rng: AtomicU64,
    base: Instant,
    // Told of every operator's change (`force`): services blocked in readiness mode wait on it beside their timer,
    // since nothing else announces the end of a forced or cut-short open state.
    operator: Arc<Notify>,
    observer: O,
}

impl<O> fmt::Debug for Shared<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("state", &state_of(self.word.load(Ordering::Relaxed)))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The generator's first state: the seed run through splitmix64, so that nearby seeds (1, 2, 3, ...) give unrelated
/// sequences, and never zero, where xorshift would stay.
fn seed_of(config: &Config) -> u64 {
    let mut z = config.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z == 0 {
        0x9E37_79B9_7F4A_7C15
    } else {
        z
    }
}

/// `a / b ≥ ppm / 10^6`, in integers.
fn rate_reached(part: u64, whole: u64, ppm: u64) -> bool {
    whole > 0 && u128::from(part) * 1_000_000 >= u128::from(ppm) * u128::from(whole)
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

impl<O: Observer> Shared<O> {
    pub(crate) fn new(config: Config, observer: O) -> Self {
        let base = Instant::now();
        let seed = seed_of(&config);
        Shared {
            window: Window::new(config.window, base),
            config,
            word: Padded(AtomicU64::new(0)),
            probes: AtomicU64::new(0),
            consecutive_failures: Padded(AtomicU32::new(0)),
            consecutive_trips: AtomicU32::new(0),
            in_flight: Counter::default(),
            rng: AtomicU64::new(seed),
            base,
            operator: Arc::new(Notify::new()),
            observer,
        }
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    fn ms_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    fn instant_at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Decides on a call. Closed and metrics-only cost one atomic load (plus the in-flight count); the clock is
    /// read only in the open and half-open states, where deadlines matter.
    pub(crate) fn admit(&self) -> Admit {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            match state_of(word) {
                CircuitState::Closed | CircuitState::MetricsOnly => {
                    return self.admitted(gen_of(word))
                }
                CircuitState::Disabled => return Admit::Bypass,
                CircuitState::ForcedOpen => return self.rejected(None),
                CircuitState::Open => {
                    let now = self.now_ms();
                    let until = until_of(word);
                    if now < until {
                        return self.rejected(Some(Duration::from_millis(until - now)));
                    }
                    let next = self.half_open_word(word, now);
                    word = match self.transition(word, next) {
                        Ok(()) => next,
                        Err(actual) => actual,
                    };
                }
                CircuitState::HalfOpen => {
                    let now = self.now_ms();
                    if now >= until_of(word) {
                        self.half_open_expired(word, now);
                        word = self.word.load(Ordering::Acquire);
                        continue;
                    }
                    return match self.take_probe(gen_of(word)) {
                        true => self.admitted(gen_of(word) | PROBE_TAG),
                        false => self.rejected(None),
                    };
                }
            }
        }
    }

    fn admitted(&self, tag: u64) -> Admit {
        self.in_flight.add(1);
        Admit::Tag(tag)
    }

    /// Tells the observer of an admission, once the permit that releases it exists (an observer that panics then
    /// cannot keep a half-open probe's slot or the in-flight count).
    pub(crate) fn note_admitted(&self, permit: &Permit) {
        observer::admitted(&self.observer, LAYER, permit, || {
            self.in_flight.sum() as usize
        });
    }

    fn rejected(&self, retry_after: Option<Duration>) -> Admit {
        self.observer.on_event(&Event::Rejected {
            layer: LAYER,
            reason: Reason::CircuitOpen,
            retry_after,
        });
        Admit::Reject(Rejection::new(Reason::CircuitOpen).with_retry_after(retry_after))
    }

    fn take_probe(&self, gen: u64) -> bool {
        self.probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let mut p = Probes::read(w, gen);
                (p.admitted < self.config.probes).then(|| {
                    p.admitted += 1;
                    p.write(gen)
                })
            })
            .is_ok()
    }

    /// When the breaker blocks readiness (open, or forced open), the instant to check again.
    pub(crate) fn blocked_until(&self) -> Option<Instant> {
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CircuitState::Open => {
                let now = Instant::now();
                let until = self.instant_at(until_of(word));
                (now < until).then_some(until)
            }
            // Held open by an operator: nothing announces the end, so look again after one base open period.
            CircuitState::ForcedOpen => Some(Instant::now() + self.config.open),
            _ => None,
        }
    }

    /// Moves the state word from `from` to `to` if nobody else moved it first, and reports the change.
    fn transition(&self, from: u64, to: u64) -> Result<(), u64> {
        self.word
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)?;
        let (before, after) = (state_of(from), state_of(to));
        match after {
            CircuitState::Closed | CircuitState::MetricsOnly => {
                // A fresh start: outcomes from before the transition say nothing about the state now.
                self.window.clear();
                self.consecutive_failures.store(0, Ordering::Relaxed);
                if after == CircuitState::Closed {
                    self.consecutive_trips.store(0, Ordering::Relaxed);
                }
            }
            CircuitState::Open => {
                self.consecutive_trips.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if before != after {
            self.observer.on_event(&Event::BreakerState {
                layer: LAYER,
                from: before,
                to: after,
            });
        }
        Ok(())
    }

    /// A new half-open cycle from `from` (open, or a half-open that sent no probe), waiting for its probes until
    /// its maximum has passed.
    fn half_open_word(&self, from: u64, now_ms: u64) -> u64 {
        let until = now_ms.saturating_add(self.config.half_open_max_wait.as_millis() as u64);
        next_word(from, CircuitState::HalfOpen, until)
    }

    /// Opens from `from` (closed or half-open) with the next backed-off open period.
    fn trip(&self, from: u64, now_ms: u64) {
        let period = self.open_period(self.consecutive_trips.load(Ordering::Relaxed));
        let until = now_ms.saturating_add(period.as_millis() as u64);
        let _ = self.transition(from, next_word(from, CircuitState::Open, until));
    }

    /// `open × multiplier^trips`, capped, with ±jitter, capped again.
    fn open_period(&self, trips: u32) -> Duration {
        let c = &self.config;
        let grown = c.open.as_secs_f64() * c.multiplier.powi(trips.min(64) as i32);
        let capped = grown.min(c.open_max.as_secs_f64());
        let unit = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64;
        let jittered = capped * (1.0 + c.jitter * (2.0 * unit - 1.0));
        Duration::from_secs_f64(jittered.clamp(0.001, c.open_max.as_secs_f64()))
    }

    /// xorshift64*: enough to spread open periods, seedable so simulations repeat exactly.
    fn next_random(&self) -> u64 {
        let step = |mut x: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        let prev = self
            .rng
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        step(prev).wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Half-open has waited its maximum: the probes that did finish decide (closed when there was at least one
    /// and they stayed under both thresholds); with none finished, the dependency is still not answering, so it
    /// opens again. With no probe sent at all (no call came, or every one went away untold), there is nothing to
    /// judge the dependency by: half-open starts its wait again, without a trip or its backoff.
    fn half_open_expired(&self, word: u64, now_ms: u64) {
        let p = Probes::read(self.probes.load(Ordering::Acquire), gen_of(word));
        let finished = p.successes + p.failures;
        if p.admitted == 0 && finished == 0 {
            let _ = self.transition(word, self.half_open_word(word, now_ms));
            return;
        }
        let healthy = finished > 0
            && !rate_reached(p.failures, finished, self.config.failure_ppm)
            && !rate_reached(p.slow, finished, self.config.slow_ppm);
        if healthy {
            let _ = self.transition(word, next_word(word, CircuitState::Closed, 0));
        } else {
            self.trip(word, now_ms);
        }
    }

    fn record_probe(&self, gen: u64, outcome: Outcome, slow: bool) {
        let updated = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                if w >> P_GEN != gen {
                    return None;
                }
                let mut p = Probes::read(w, gen);
                match outcome {
                    // The probe never told us anything: its slot goes back for another call to use.
                    Outcome::Ignored => p.admitted = p.admitted.saturating_sub(1),
                    o if o.is_failure() => p.failures += 1,
                    _ => p.successes += 1,
                }
                if slow && outcome != Outcome::Ignored {
                    p.slow += 1;
                }
                Some(p.write(gen))
            });
        let Ok(before) = updated else { return };
        if outcome == Outcome::Ignored {
            return;
        }
        let word = self.word.load(Ordering::Acquire);
        if state_of(word) != CircuitState::HalfOpen || gen_of(word) != gen {
            return;
        }
        let mut p = Probes::read(before, gen);
        if outcome.is_failure() {
            p.failures += 1;
        } else {
            p.successes += 1;
        }
        if slow {
            p.slow += 1;
        }
        // The verdict is over all N probes, but it is taken as soon as it cannot change: enough failures (or slow
        // probes) to reach a threshold, or so many successes that even all remaining probes failing could not.
        let n = self.config.probes;
        let open = rate_reached(p.failures, n, self.config.failure_ppm)
            || rate_reached(p.slow, n, self.config.slow_ppm);
        let pending = n.saturating_sub(p.successes + p.failures);
        let close = !rate_reached(p.failures + pending, n, self.config.failure_ppm)
            && !rate_reached(p.slow + pending, n, self.config.slow_ppm);
        if open {
            self.trip(word, self.now_ms());
        } else if close {
            let _ = self.transition(word, next_word(word, CircuitState::Closed, 0));
        }
    }

    /// Forces a state from the handle.
    pub(crate) fn force(&self, to: CircuitState) {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            match self.transition(word, next_word(word, to, 0)) {
                Ok(()) => break,
                Err(actual) => word = actual,
            }
        }
        self.operator.notify_waiters();
    }

    /// Completes at the next operator's change ([`force`](Self::force)) after it is enabled or first polled.
    pub(crate) fn operator_change(&self) -> OwnedNotified {
        self.operator.clone().notified_owned()
    }

    /// As if just built: closed, counts and backoff forgotten, and the jitter sequence restarted from the seed
    /// so that a replay behaves the same.
    pub(crate) fn reset(&self) {
        self.rng.store(seed_of(&self.config), Ordering::Relaxed);
        self.force(CircuitState::Closed);
    }

    /// The state, after applying any time-driven transition that is due (open period over, half-open waited
    /// too long): the breaker never runs a timer of its own, so it catches up whenever it is consulted.
    pub(crate) fn state(&self) -> CircuitState {
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CircuitState::Open if self.now_ms() >= until_of(word) => {
                let _ = self.transition(word, self.half_open_word(word, self.now_ms()));
            }
            CircuitState::HalfOpen if self.now_ms() >= until_of(word) => {
                self.half_open_expired(word, self.now_ms());
            }
            _ => {}
        }
        state_of(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn snapshot(&self) -> super::Snapshot {
        let state = self.state();
        let word = self.word.load(Ordering::Acquire);
        let Counts {
            calls,
            failures,
            slow,
        } = self.window.counts();
        let p = Probes::read(self.probes.load(Ordering::Acquire), gen_of(word));
        let open_remaining = match state_of(word) {
            CircuitState::Open => Some(Duration::from_millis(
                until_of(word).saturating_sub(self.now_ms()),
            )),
            _ => None,
        };
        super::Snapshot {
            state,
            calls,
            failures,
            slow_calls: slow,
            failure_rate: percent(failures, calls),
            slow_call_rate: percent(slow, calls),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            consecutive_trips: self.consecutive_trips.load(Ordering::Relaxed),
            in_flight: self.in_flight.sum() as usize,
            probes_admitted: if state == CircuitState::HalfOpen {
                p.admitted
            } else {
                0
            },
            open_remaining,
        }
    }
}

impl<O: Observer> Release for Shared<O> {
    fn release(&self, outcome: Outcome, latency: Duration, tag: u64) {
        self.in_flight.sub(1);
        observer::completed(&self.observer, LAYER, outcome, latency, || {
            self.in_flight.sum() as usize
        });
        let slow = self.config.slow_call.is_some_and(|d| latency >= d);
        let gen = tag & GEN_MASK;
        if tag & PROBE_TAG != 0 {
            self.record_probe(gen, outcome, slow);
            return;
        }
        if outcome == Outcome::Ignored {
            return;
        }
        let word = self.word.load(Ordering::Acquire);
        let state = state_of(word);
        if gen_of(word) != gen || !matches!(state, CircuitState::Closed | CircuitState::MetricsOnly)
        {
            return;
        }
        let failure = outcome.is_failure();
        let consecutive = if failure {
            self.consecutive_failures
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
        } else {
            // Read first: a healthy stream of successes then costs no write to a shared cache line.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            0
        };
        let counts = self
            .window
            .record(failure, slow, state == CircuitState::Closed);
        if state != CircuitState::Closed {
            return;
        }
        let by_rate = counts.is_some_and(|c| {
            c.calls >= self.config.minimum_calls
                && (rate_reached(c.failures, c.calls, self.config.failure_ppm)
                    || rate_reached(c.slow, c.calls, self.config.slow_ppm))
        });
        let by_streak = self
            .config
            .consecutive_failures
            .is_some_and(|n| consecutive >= n);
        if by_rate || by_streak {
            self.trip(word, self.now_ms());
        }
    }
}
