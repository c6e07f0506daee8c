use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use super::state::{Config, Shared, MAX_PROBES};
use super::window::{WindowKind, MAX_COUNT_WINDOW};
use super::{CircuitBreaker, CircuitBreakerHandle};
use crate::core::{AnyOk, ConfigError, ErrorMode, Observer, Owner};

const NAME: &str = "circuit breaker";

/// Longest open period, half-open wait or time-window bucket accepted: far beyond any sensible setting, and well
/// inside the range the state word can hold.
const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

/// Shortest of the same: the breaker keeps its time in whole milliseconds.
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// Applies a [`CircuitBreaker`] to a service. Every service made by one layer shares one breaker.
///
/// Built with [`CircuitBreakerLayer::builder`].
pub struct CircuitBreakerLayer<C = AnyOk, M = ErrorMode, O = ()> {
    shared: Owner<Shared<O>>,
    classify: C,
    mode: M,
    readiness: bool,
}

impl<C: Clone, M: Clone, O> Clone for CircuitBreakerLayer<C, M, O> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            readiness: self.readiness,
        }
    }
}

impl<C, M, O> fmt::Debug for CircuitBreakerLayer<C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("shared", &self.shared)
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerLayer {
    /// A builder with Resilience4j's defaults for the window (the last 100 calls, at least 100 of them, 50 %
    /// failures trip it) and 10 half-open probes. The slow-call rule is off until configured (then with
    /// Resilience4j's defaults: calls over 60 s are slow, 100 % slow calls trip it); see
    /// [`slow_call_duration`](CircuitBreakerBuilder::slow_call_duration) for why. The open
    /// period starts at 5 s and doubles with each consecutive trip up to 10 s, ±20 % jitter (within the cap);
    /// half-open waits at most 10 s for its probes.
    ///
    /// The open period is short by design: a cycle costs the dependency only its 10 probes, while every second
    /// of open period after the dependency has healed is a second of needless rejections. Raise
    /// [`max_wait_in_open`](CircuitBreakerBuilder::max_wait_in_open) when probes are expensive.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder {
            settings: Settings {
                failure_rate: 50.0,
                slow_call_rate: 100.0,
                slow_call: Duration::from_secs(60),
                slow_rule: false,
                window: WindowKind::Count(100),
                minimum_calls: 100,
                consecutive_failures: None,
                open: Duration::from_secs(5),
                open_max: Duration::from_secs(10),
                multiplier: 2.0,
                jitter: 0.2,
                probes: 10,
                half_open_max_wait: Duration::from_secs(10),
                seed: 0x5EED_B4EA_C3E5_0001,
                readiness: false,
            },
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
        }
    }
}

impl<C, M, O: Observer> CircuitBreakerLayer<C, M, O> {
    /// A handle on this layer's breaker: state, snapshot, and operator controls.
    pub fn handle(&self) -> CircuitBreakerHandle<O> {
        CircuitBreakerHandle::new(self.shared.arc().clone())
    }
}

impl<S, C: Clone, M: Clone, O> Layer<S> for CircuitBreakerLayer<C, M, O> {
    type Service = CircuitBreaker<S, C, M, O>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(
            inner,
            self.shared.instance(),
            self.classify.clone(),
            self.mode.clone(),
            self.readiness,
        )
    }
}

/// Configures a [`CircuitBreakerLayer`]; see [`CircuitBreakerLayer::builder`] for the defaults.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::breaker::CircuitBreakerLayer;
///
/// let layer = CircuitBreakerLayer::builder()
///     .time_window(10, Duration::from_secs(1))
///     .minimum_calls(20)
///     .failure_rate_threshold(25.0)
///     .slow_call_duration(Duration::from_millis(500))
///     .slow_call_rate_threshold(80.0)
///     .wait_in_open(Duration::from_secs(2))
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub struct CircuitBreakerBuilder<C = AnyOk, M = ErrorMode, O = ()> {
    settings: Settings,
    classify: C,
    mode: M,
    observer: O,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    failure_rate: f64,
    slow_call_rate: f64,
    slow_call: Duration,
    /// Whether the slow-call rule is on: set by either of its two setters.
    slow_rule: bool,
    window: WindowKind,
    minimum_calls: u64,
    consecutive_failures: Option<u32>,
    open: Duration,
    open_max: Duration,
    multiplier: f64,
    jitter: f64,
    probes: u64,
    half_open_max_wait: Duration,
    seed: u64,
    readiness: bool,
}

impl<C, M, O> fmt::Debug for CircuitBreakerBuilder<C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),+) => $field:ident = $value:expr) => {
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, $($arg: $ty),+) -> Self {
            self.settings.$field = $value;
            self
        }
    };
}

impl<C, M, O> CircuitBreakerBuilder<C, M, O> {
    setter!(
        /// Trip when at least this percentage of the calls in the window failed (`Outcome::is_failure`). In
        /// (0, 100].
        failure_rate_threshold(percent: f64) => failure_rate = percent
    );
    /// Turns the slow-call rule on: trip when at least this percentage of the calls in the window were slow (a
    /// call is slow from [`slow_call_duration`](Self::slow_call_duration), 60 s unless set). In (0, 100].
    #[must_use]
    pub fn slow_call_rate_threshold(mut self, percent: f64) -> Self {
        self.settings.slow_call_rate = percent;
        self.settings.slow_rule = true;
        self
    }

    /// Turns the slow-call rule on: a call taking at least this long (admission to end of response, failed or
    /// not) counts as slow, and the breaker trips once the share of slow calls in the window reaches
    /// [`slow_call_rate_threshold`](Self::slow_call_rate_threshold) (100 % unless set).
    ///
    /// Off by default, unlike Resilience4j, whose default rule (calls over 60 s, all of them) fires only on a
    /// dependency that hangs outright, and would cost every call two clock reads, more than the rest of the
    /// closed path. Such a hang is better cut short by a deadline: a [`deadline`](crate::deadline) layer
    /// placed outside the breaker (the typical client stack) drops the call at its deadline, which the breaker
    /// counts as `Dropped`, a failure. A deadline layer inside the breaker answers with its own
    /// deadline-exceeded instead, which the breaker's classifiers take for a local refusal and ignore.
    ///
    /// Without the rule (and without an observer, which is told every latency) the closed path with a count
    /// window reads no clock.
    #[must_use]
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.settings.slow_call = duration;
        self.settings.slow_rule = true;
        self
    }
    setter!(
        /// Measure over the last `calls` calls: a true sliding window (a ring; 1 to 2^20 calls).
        count_window(calls: usize) => window = WindowKind::Count(calls)
    );
    setter!(
        /// Measure over the last `buckets × bucket_width` of time, in `buckets` fixed buckets (1 to 1000, each
        /// 1 ms to 365 days wide) that expire whole. Each call reads the clock; a call that finds a failure or a
        /// slow call in the window also reads every bucket back to judge the rates (O(buckets)), while a healthy
        /// dependency's calls cost the same whatever the number of buckets.
        time_window(buckets: usize, bucket_width: Duration)
            => window = WindowKind::Time { buckets, width: bucket_width }
    );
    setter!(
        /// The rate rules apply only once the window holds at least this many calls (at least 1, and for a
        /// count window at most its size).
        minimum_calls(calls: u64) => minimum_calls = calls
    );
    setter!(
        /// Also trip after this many failures in a row, whatever the window says (off by default).
        consecutive_failures(failures: u32) => consecutive_failures = Some(failures)
    );
    setter!(
        /// The first open period, before backoff (1 ms to 365 days).
        wait_in_open(duration: Duration) => open = duration
    );
    setter!(
        /// The open period is multiplied by this for each consecutive trip without a recovery in between (≥ 1).
        backoff_multiplier(multiplier: f64) => multiplier = multiplier
    );
    setter!(
        /// The longest open period, jitter included (1 ms to 365 days, and not shorter than the first).
        max_wait_in_open(duration: Duration) => open_max = duration
    );
    setter!(
        /// Spreads each open period by up to ± this fraction of itself (in [0, 1)), so that the many clients of
        /// one dependency do not probe it in lockstep.
        jitter(fraction: f64) => jitter = fraction
    );
    setter!(
        /// The seed of the jitter's random sequence: a given seed gives the same open periods on every run.
        seed(seed: u64) => seed = seed
    );
    setter!(
        /// How many probe calls each half-open cycle admits (1 to 1023).
        permitted_calls_in_half_open(calls: u32) => probes = u64::from(calls)
    );
    setter!(
        /// The longest half-open waits for its probes (1 ms to 365 days). Past it, the probes that finished
        /// decide: closed if at least one finished and they stayed under both thresholds, open again (with
        /// backoff) otherwise. A half-open that has sent no probe yet (no call came) has learnt nothing: it waits
        /// on, for as long again, rather than open on the dependency's account.
        max_wait_in_half_open(duration: Duration) => half_open_max_wait = duration
    );
    setter!(
        /// Readiness mode: while open, `poll_ready` is not ready and wakes the task when the open period ends,
        /// or at once when an operator ends the open state (`force_closed`, `reset`, `disable`, `metrics_only`
        /// on the handle), so a balancer such as `tower::balance` routes around this endpoint. Only a blocked
        /// `poll_ready` pays for the operator's wake-up; the closed path reads the state word and nothing more.
        /// Calls made anyway are still
        /// rejected, as are calls beyond the probes while half-open (readiness cannot reserve a probe slot).
        /// Off by default (fail-fast: every call is answered at once).
        readiness_mode(enabled: bool) => readiness = enabled
    );

    /// Decides what counts as a failure ([`Outcome::is_failure`](crate::core::Outcome::is_failure));
    /// `Outcome::Ignored` is not counted at all.
    #[must_use]
    pub fn classifier<C2>(self, classify: C2) -> CircuitBreakerBuilder<C2, M, O> {
        CircuitBreakerBuilder {
            settings: self.settings,
            classify,
            mode: self.mode,
            observer: self.observer,
        }
    }

    /// How rejections leave the layer (default [`ErrorMode`]).
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> CircuitBreakerBuilder<C, M2, O> {
        CircuitBreakerBuilder {
            settings: self.settings,
            classify: self.classify,
            mode,
            observer: self.observer,
        }
    }

    /// Receives admissions, rejections, completions and state changes (`Event::BreakerState`, once per
    /// transition).
    #[must_use]
    pub fn observer<O2>(self, observer: O2) -> CircuitBreakerBuilder<C, M, O2> {
        CircuitBreakerBuilder {
            settings: self.settings,
            classify: self.classify,
            mode: self.mode,
            observer,
        }
    }

    /// HTTP: classify by status ([`HttpStatus`](crate::core::HttpStatus)) and reject with 503 and
    /// `Retry-After` ([`HttpMode`](crate::core::HttpMode)).
    #[cfg(feature = "http")]
    #[must_use]
    pub fn http(self) -> CircuitBreakerBuilder<crate::core::HttpStatus, crate::core::HttpMode, O> {
        self.classifier(crate::core::HttpStatus::new())
            .reject_mode(crate::core::HttpMode)
    }

    /// gRPC: classify by `grpc-status` ([`GrpcClassifier`](crate::core::GrpcClassifier)) and reject with a
    /// trailers-only UNAVAILABLE and `grpc-retry-pushback-ms` ([`GrpcMode`](crate::core::GrpcMode)).
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(
        self,
    ) -> CircuitBreakerBuilder<crate::core::GrpcClassifier, crate::core::GrpcMode, O> {
        self.classifier(crate::core::GrpcClassifier::new())
            .reject_mode(crate::core::GrpcMode)
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer<C, M, O>, ConfigError>
    where
        O: Observer,
    {
        let config = self.settings.validate()?;
        Ok(CircuitBreakerLayer {
            shared: Owner::new(Shared::new(config, self.observer)),
            classify: self.classify,
            mode: self.mode,
            readiness: self.settings.readiness,
        })
    }
}

fn err(field: &'static str, problem: String) -> ConfigError {
    ConfigError::new(NAME, field, problem)
}

fn percent_to_ppm(field: &'static str, percent: f64) -> Result<u64, ConfigError> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(err(
            field,
            format!("must be a percentage in (0, 100], got {percent}"),
        ));
    }
    Ok((percent * 10_000.0).round().max(1.0) as u64)
}

fn period(field: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d < MIN_PERIOD {
        return Err(err(
            field,
            format!("must be at least 1 ms (the breaker counts whole milliseconds), got {d:?}"),
        ));
    }
    if d > MAX_PERIOD {
        return Err(err(field, format!("must be at most 365 days, got {d:?}")));
    }
    Ok(d)
}

impl Settings {
    fn validate(self) -> Result<Config, ConfigError> {
        let failure_ppm = percent_to_ppm("failure_rate_threshold", self.failure_rate)?;
        let slow_ppm = percent_to_ppm("slow_call_rate_threshold", self.slow_call_rate)?;
        if self.slow_call.is_zero() {
            return Err(err("slow_call_duration", "must be longer than zero".into()));
        }
        match self.window {
            WindowKind::Count(0) => {
                return Err(err("count_window", "must hold at least 1 call".into()))
            }
            WindowKind::Count(n) if n > MAX_COUNT_WINDOW => {
                return Err(err(
                    "count_window",
                    format!("must be at most {MAX_COUNT_WINDOW} calls, got {n}"),
                ))
            }
            WindowKind::Count(n) if self.minimum_calls > n as u64 => {
                return Err(err(
                    "minimum_calls",
                    format!(
                        "must not exceed the count window ({} > {n}): the breaker could never trip",
                        self.minimum_calls
                    ),
                ))
            }
            WindowKind::Time { buckets, .. } if !(1..=1000).contains(&buckets) => {
                return Err(err(
                    "time_window",
                    format!("buckets must be in 1..=1000, got {buckets}"),
                ))
            }
            WindowKind::Time { width, .. } if !(MIN_PERIOD..=MAX_PERIOD).contains(&width) => {
                return Err(err(
                    "time_window",
                    format!("bucket width must be from 1 ms to 365 days, got {width:?}"),
                ))
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(err("minimum_calls", "must be at least 1".into()));
        }
        if self.consecutive_failures == Some(0) {
            return Err(err("consecutive_failures", "must be at least 1".into()));
        }
        let open = period("wait_in_open", self.open)?;
        let open_max = period("max_wait_in_open", self.open_max)?;
        if open_max < open {
            return Err(err(
                "max_wait_in_open",
                format!("must not be shorter than wait_in_open ({open_max:?} < {open:?})"),
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(err(
                "backoff_multiplier",
                format!("must be a finite number ≥ 1, got {}", self.multiplier),
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(err(
                "jitter",
                format!("must be a fraction in [0, 1), got {}", self.jitter),
            ));
        }
        if !(1..=MAX_PROBES).contains(&self.probes) {
            return Err(err(
                "permitted_calls_in_half_open",
                format!("must be in 1..={MAX_PROBES}, got {}", self.probes),
            ));
        }
        let half_open_max_wait = period("max_wait_in_half_open", self.half_open_max_wait)?;
        Ok(Config {
            failure_ppm,
            slow_ppm,
            slow_call: self.slow_rule.then_some(self.slow_call),
            window: self.window,
            minimum_calls: self.minimum_calls,
            consecutive_failures: self.consecutive_failures,
            open,
            open_max,
            multiplier: self.multiplier,
            jitter: self.jitter,
            probes: self.probes,
            half_open_max_wait,
            seed: self.seed,
        })
    }
}
