//! The runtime monitor: a probe task that measures scheduling delay, and the pressure state it computes.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeMetrics};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use super::error::StartError;
use super::trip::Trip;
use crate::core::{ConfigError, Event, Observer};

const LAYER: &str = "pressure";
const CONFIG: &str = "runtime monitor";

/// The `signal` of an [`Event::PressureChanged`] the monitor emits when its task ends while under pressure.
const STOPPED: &str = "stopped";

/// Signal names of the monitor's own: a user probe may not take them.
const RESERVED_SIGNALS: [&str; 3] = ["lag", "alive_tasks", STOPPED];

/// The most samples a monitor keeps for its percentiles.
pub const MAX_WINDOW: usize = 10_000;

/// tokio's timers tick once a millisecond, so a probe cannot be finer.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The longest probe interval: a probe this rare would notice a stall an hour late, and far longer ones overflow
/// the instant the next sample is due at.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The largest lag threshold: lags are compared in whole nanoseconds held in a `u64` (about 584 years).
const MAX_LAG: Duration = Duration::from_nanos(u64::MAX);

/// Watches a tokio runtime for pressure: how late a probe task that asked to wake at time T actually runs
/// (scheduling delay, the "event-loop lag" of other ecosystems), and the runtime's own task figures.
///
/// Built with [`RuntimeMonitor::builder`], started with [`start`](RuntimeMonitor::start) (which spawns one small
/// task and returns a [`MonitorGuard`]; dropping the guard ends the task). A monitor that is not running costs
/// nothing: no task, no clock reads, and it never reports pressure.
///
/// Cloning is cheap and every clone reads the same figures. [`is_under_pressure`](RuntimeMonitor::is_under_pressure)
/// and [`is_lagging`](RuntimeMonitor::is_lagging) are one atomic load each: the probe task evaluates the
/// thresholds once per sample, so the request path never does.
#[derive(Clone)]
pub struct RuntimeMonitor {
    shared: Arc<Shared>,
}

/// Builds a [`RuntimeMonitor`]; see [`RuntimeMonitor::builder`].
pub struct RuntimeMonitorBuilder {
    interval: Duration,
    window: usize,
    min_recovery: Duration,
    lag: Option<(Duration, Duration)>,
    alive_tasks: Option<(usize, usize)>,
    probe: Option<UserProbe>,
    observer: Arc<dyn Observer>,
}

#[derive(Clone)]
struct UserProbe {
    name: &'static str,
    read: Arc<dyn Fn() -> u64 + Send + Sync>,
    trip: u64,
    recover: u64,
}

impl UserProbe {
    /// One reading, or none when the probe panics. The probe is user code run on the monitor's task: a panic
    /// escaping it would end that task, and the monitor would fail open for good, lag and all. A failed reading
    /// instead leaves the probe's signal as it was (tripped or not) until the next one.
    fn reading(&self) -> Option<u64> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| (self.read)())) {
            Ok(value) => Some(value),
            Err(_) => {
                tracing::warn!(
                    probe = self.name,
                    "runtime monitor: the user probe panicked, reading skipped"
                );
                None
            }
        }
    }
}

/// The figures of a [`RuntimeMonitor`] at one moment; see [`RuntimeMonitor::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeSnapshot {
    /// Whether the probe task is running.
    pub running: bool,
    /// Samples taken since the monitor was (last) started.
    pub samples: u64,
    /// Samples in the window the lag figures below are computed over.
    pub window: usize,
    /// The lag of the latest sample: how much later than asked the probe ran, past the timer's 1 ms tick.
    pub last_lag: Duration,
    /// The largest lag in the window.
    pub max_lag: Duration,
    /// The median lag in the window.
    pub p50_lag: Duration,
    /// The 99th percentile lag in the window (nearest rank).
    pub p99_lag: Duration,
    /// Worker threads of the runtime.
    pub workers: usize,
    /// Tasks alive on the runtime (the probe task included).
    pub alive_tasks: usize,
    /// Tasks waiting in the runtime's global queue.
    pub global_queue_depth: usize,
    /// The latest value of the user probe, if one is configured and has been read.
    pub probe: Option<u64>,
    /// Whether the lag threshold is tripped.
    pub lagging: bool,
    /// Whether any threshold is tripped.
    pub under_pressure: bool,
    /// How many times the monitor has entered the pressured state.
    pub trips: u64,
}

/// Keeps a [`RuntimeMonitor`]'s probe task alive; dropping it stops the task.
///
/// Dropping aborts the task, which the runtime then drops at its next turn; [`stop`](MonitorGuard::stop) waits
/// for that. Once the task is gone the monitor reports no pressure (it fails open) and can be started again.
#[must_use = "dropping the guard stops the monitor"]
pub struct MonitorGuard {
    monitor: RuntimeMonitor,
    task: JoinHandle<()>,
}

struct Shared {
    interval: Duration,
    min_recovery: Duration,
    lag: Option<(Duration, Duration)>,
    alive_tasks: Option<(usize, usize)>,
    probe: Option<UserProbe>,
    observer: Arc<dyn Observer>,

    running: AtomicBool,
    lagging: AtomicBool,
    under_pressure: AtomicBool,
    last_lag_nanos: AtomicU64,
    workers: AtomicUsize,
    alive: AtomicUsize,
    global_queue_depth: AtomicUsize,
    probe_value: AtomicU64,
    probe_read: AtomicBool,
    samples: AtomicU64,
    trips: AtomicU64,
    window: Mutex<Ring>,
    sampled: Notify,
}

/// The latest lags, in nanoseconds, overwriting the oldest once full.
struct Ring {
    lags: Box<[u64]>,
    len: usize,
    next: usize,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Ring {
            lags: vec![0; capacity].into_boxed_slice(),
            len: 0,
            next: 0,
        }
    }

    fn push(&mut self, lag: u64) {
        self.lags[self.next] = lag;
        self.next = (self.next + 1) % self.lags.len();
        self.len = (self.len + 1).min(self.lags.len());
    }

    fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
    }

    fn values(&self) -> &[u64] {
        &self.lags[..self.len]
    }
}

/// One probe reading.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) lag: Duration,
    pub(crate) workers: usize,
    pub(crate) alive_tasks: usize,
    pub(crate) global_queue_depth: usize,
    pub(crate) probe: Option<u64>,
}

/// The probe task's private state: the hysteresis of each configured signal.
pub(crate) struct Evaluator {
    lag: Option<Trip>,
    alive_tasks: Option<Trip>,
    probe: Option<(Trip, &'static str)>,
}

impl RuntimeMonitor {
    /// A builder with a 10 ms probe interval, a window of 100 samples (one second) and no thresholds: such a
    /// monitor measures and reports but never declares pressure until [`max_lag`](RuntimeMonitorBuilder::max_lag),
    /// [`max_alive_tasks`](RuntimeMonitorBuilder::max_alive_tasks) or
    /// [`max_probe`](RuntimeMonitorBuilder::max_probe) is set.
    pub fn builder() -> RuntimeMonitorBuilder {
        RuntimeMonitorBuilder {
            interval: Duration::from_millis(10),
            window: 100,
            min_recovery: Duration::ZERO,
            lag: None,
            alive_tasks: None,
            probe: None,
            observer: Arc::new(()),
        }
    }

    /// Spawns the probe task on the current tokio runtime (the runtime it measures).
    ///
    /// Fails outside a tokio runtime, on a runtime built without timers, and while this monitor (or a clone of it)
    /// is already running.
    pub fn start(&self) -> Result<MonitorGuard, StartError> {
        let handle = Handle::try_current().map_err(|_| StartError::no_runtime())?;
        self.start_on(&handle)
    }

    /// Spawns the probe task on the runtime behind `handle`, from anywhere (before `block_on`, from another
    /// thread). Fails on a runtime built without timers, and while this monitor is already running.
    ///
    /// A runtime without timers is told by creating the probe's timer here: tokio has no way to ask, and panics
    /// when a timer is created on such a runtime. The panic is caught and returned as the error (the panic hook
    /// still prints tokio's message, and under `panic = "abort"` the process aborts, as it would at the first
    /// timer the application itself created there).
    pub fn start_on(&self, handle: &Handle) -> Result<MonitorGuard, StartError> {
        let sleep = timer(handle)?;
        if self.shared.running.swap(true, Relaxed) {
            return Err(StartError::already_running());
        }
        // A fresh run shows none of the last run's figures until its first sample.
        let s = &self.shared;
        s.samples.store(0, Relaxed);
        s.last_lag_nanos.store(0, Relaxed);
        s.workers.store(0, Relaxed);
        s.alive.store(0, Relaxed);
        s.global_queue_depth.store(0, Relaxed);
        s.probe_read.store(false, Relaxed);
        s.lock_window().clear();
        // Created outside the task so that a task dropped before its first poll still marks the monitor stopped.
        let running = Running(self.shared.clone());
        let task = handle.spawn(probe(self.shared.clone(), handle.metrics(), running, sleep));
        Ok(MonitorGuard {
            monitor: self.clone(),
            task,
        })
    }

    /// Whether the probe task is running.
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Relaxed)
    }

    /// Whether any threshold is tripped: what [`PressureLayer`](super::PressureLayer) sheds on. One atomic load.
    /// Always `false` while the monitor is stopped.
    #[inline]
    pub fn is_under_pressure(&self) -> bool {
        self.shared.under_pressure.load(Relaxed)
    }

    /// Whether the lag threshold ([`max_lag`](RuntimeMonitorBuilder::max_lag)) is tripped: what
    /// [`LagAware`](super::LagAware) turns into [`Outcome::Dropped`](crate::core::Outcome::Dropped). One atomic
    /// load. Always `false` without a lag threshold or while the monitor is stopped.
    #[inline]
    pub fn is_lagging(&self) -> bool {
        self.shared.lagging.load(Relaxed)
    }

    /// The probe interval.
    pub fn interval(&self) -> Duration {
        self.shared.interval
    }

    /// Waits until the probe task records its next sample. Never completes while the monitor is stopped.
    pub async fn next_sample(&self) {
        self.shared.sampled.notified().await
    }

    /// The current figures. Copies and sorts the window (at most [`MAX_WINDOW`] numbers): meant for dashboards
    /// and tests, not for every request.
    pub fn snapshot(&self) -> RuntimeSnapshot {
        let s = &self.shared;
        let mut lags = s.lock_window().values().to_vec();
        lags.sort_unstable();
        let rank = |q: f64| -> Duration {
            if lags.is_empty() {
                return Duration::ZERO;
            }
            let idx = ((q * lags.len() as f64).ceil() as usize).clamp(1, lags.len()) - 1;
            Duration::from_nanos(lags[idx])
        };
        RuntimeSnapshot {
            running: s.running.load(Relaxed),
            samples: s.samples.load(Relaxed),
            window: lags.len(),
            last_lag: Duration::from_nanos(s.last_lag_nanos.load(Relaxed)),
            max_lag: lags
                .last()
                .map_or(Duration::ZERO, |&n| Duration::from_nanos(n)),
            p50_lag: rank(0.5),
            p99_lag: rank(0.99),
            workers: s.workers.load(Relaxed),
            alive_tasks: s.alive.load(Relaxed),
            global_queue_depth: s.global_queue_depth.load(Relaxed),
            probe: s
                .probe_read
                .load(Relaxed)
                .then(|| s.probe_value.load(Relaxed)),
            lagging: s.lagging.load(Relaxed),
            under_pressure: s.under_pressure.load(Relaxed),
            trips: s.trips.load(Relaxed),
        }
    }

    /// Whether any threshold is configured, i.e. whether this monitor can ever report pressure.
    pub(crate) fn has_thresholds(&self) -> bool {
        let s = &self.shared;
        s.lag.is_some() || s.alive_tasks.is_some() || s.probe.is_some()
    }

    /// A fresh evaluator for this monitor's thresholds.
    pub(crate) fn evaluator(&self) -> Evaluator {
        self.shared.evaluator()
    }

    /// Records `sample`, taken at `now`: what the probe task does once per interval. Tests feed synthetic samples
    /// through here.
    pub(crate) fn record(&self, eval: &mut Evaluator, sample: &Sample, now: Instant) {
        self.shared.record(eval, sample, now)
    }
}

impl Shared {
    fn lock_window(&self) -> std::sync::MutexGuard<'_, Ring> {
        // The window holds plain numbers, consistent after any panic.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the observer, from the probe task. The observer is user code: a panic escaping it would end the task
    /// and the monitor would fail open for good, so it costs that one event instead.
    fn tell(&self, event: &Event) {
        if std::panic::catch_unwind(AssertUnwindSafe(|| self.observer.on_event(event))).is_err() {
            tracing::warn!("runtime monitor: the observer panicked on {event:?}");
        }
    }

    fn evaluator(&self) -> Evaluator {
        Evaluator {
            lag: self
                .lag
                .map(|(trip, recover)| Trip::new(nanos(trip), nanos(recover), self.min_recovery)),
            alive_tasks: self
                .alive_tasks
                .map(|(trip, recover)| Trip::new(trip as u64, recover as u64, self.min_recovery)),
            probe: self
                .probe
                .as_ref()
                .map(|p| (Trip::new(p.trip, p.recover, self.min_recovery), p.name)),
        }
    }

    fn record(&self, eval: &mut Evaluator, sample: &Sample, now: Instant) {
        let lag = nanos(sample.lag);
        self.lock_window().push(lag);
        self.last_lag_nanos.store(lag, Relaxed);
        self.workers.store(sample.workers, Relaxed);
        self.alive.store(sample.alive_tasks, Relaxed);
        self.global_queue_depth
            .store(sample.global_queue_depth, Relaxed);
        if let Some(value) = sample.probe {
            self.probe_value.store(value, Relaxed);
            self.probe_read.store(true, Relaxed);
        }

        let mut pressured = false;
        let mut changed = None;
        let mut feed = |trip: &mut Trip, value: u64, name: &'static str| {
            let before = trip.is_tripped();
            let after = trip.update(value, now);
            if before != after {
                changed = Some(name);
            }
            pressured |= after;
            after
        };
        let lagging = eval.lag.as_mut().is_some_and(|t| feed(t, lag, "lag"));
        if let Some(t) = eval.alive_tasks.as_mut() {
            feed(t, sample.alive_tasks as u64, "alive_tasks");
        }
        if let Some((t, name)) = eval.probe.as_mut() {
            match sample.probe {
                Some(value) => {
                    feed(t, value, name);
                }
                // No reading (the probe panicked): the signal stays as it was, tripped included.
                None => pressured |= t.is_tripped(),
            }
        }

        self.lagging.store(lagging, Relaxed);
        // The overall state only changes when some signal does, so `changed` names it. A trip is counted as the
        // pressure goes on, before any observer is told, so that a snapshot never shows one without the other.
        let was = self.under_pressure.load(Relaxed);
        let change = (was != pressured).then_some(changed).flatten();
        if change.is_some() && pressured {
            self.trips.fetch_add(1, Relaxed);
        }
        self.under_pressure.store(pressured, Relaxed);
        self.samples.fetch_add(1, Relaxed);
        self.tell(&Event::RuntimeLag {
            layer: LAYER,
            lag: sample.lag,
            alive_tasks: sample.alive_tasks,
            global_queue_depth: sample.global_queue_depth,
        });
        if let Some(signal) = change {
            self.tell(&Event::PressureChanged {
                layer: LAYER,
                under_pressure: pressured,
                signal,
            });
        }
        self.sampled.notify_waiters();
    }
}

/// Marks the monitor stopped, and drops any pressure it reported, when the probe task goes away however it goes
/// (guard dropped, runtime shut down).
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        let s = &self.0;
        s.lagging.store(false, Relaxed);
        if s.under_pressure.swap(false, Relaxed) {
            s.tell(&Event::PressureChanged {
                layer: LAYER,
                under_pressure: false,
                signal: STOPPED,
            });
        }
        s.running.store(false, Relaxed);
    }
}

/// A timer on `handle`'s runtime for the probe task, or the error for a runtime built without timers.
///
/// Created here rather than in the task: there, tokio's "timers are disabled" panic killed the task after `start`
/// had returned `Ok`, and the monitor failed open without a word.
fn timer(handle: &Handle) -> Result<Sleep, StartError> {
    let _entered = handle.enter();
    std::panic::catch_unwind(|| tokio::time::sleep(Duration::ZERO))
        .map_err(|_| StartError::timers_disabled())
}

async fn probe(shared: Arc<Shared>, metrics: RuntimeMetrics, running: Running, sleep: Sleep) {
    let _running = running;
    let monitor = RuntimeMonitor { shared };
    let mut eval = monitor.evaluator();
    let interval = monitor.shared.interval;
    // From the first poll, not from `start`: a monitor started before its runtime runs must not count the wait.
    let mut due = Instant::now() + interval;
    let mut sleep = pin!(sleep);
    sleep.as_mut().reset(due);
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        let sample = Sample {
            lag: lag_past(due, now),
            workers: metrics.num_workers(),
            alive_tasks: metrics.num_alive_tasks(),
            global_queue_depth: metrics.global_queue_depth(),
            probe: monitor.shared.probe.as_ref().and_then(UserProbe::reading),
        };
        monitor.record(&mut eval, &sample, now);
        // From a fresh reading taken after this sample's own work, not from `now`: the user probe and the observer
        // run in between, and counting their time as lag would make the monitor report (and shed on) its own work.
        // One clock read per interval, off the request path. Not from the missed deadline either: after a stall
        // the probe takes one late sample, not a burst of catch-up samples that would each report the same stall.
        due = Instant::now() + interval;
        sleep.as_mut().reset(due);
    }
}

/// How late a probe due at `due` ran, woken at `woke`, not counting the timer's own tick.
///
/// tokio fires a timer at the first millisecond tick at or after its deadline, so a probe whose deadline falls
/// between ticks wakes up to a tick late on a perfectly idle runtime (measured idle lag before this correction:
/// a median of about 1.2 ms, and the audit's 1 ms `recover` never cleared). That delay is the timer's granularity,
/// not a busy runtime, so it is taken off, as event-loop monitors elsewhere take their timer's resolution off
/// the delay they measure: an idle runtime then reads a fraction of a millisecond (the wake-up itself, plus the
/// park timeout being rounded up to a whole millisecond too), and a real stall reads its length less at most a
/// millisecond. The thresholds compare against this figure, so `recover` means lag beyond what an idle runtime
/// shows.
pub(crate) fn lag_past(due: Instant, woke: Instant) -> Duration {
    woke.saturating_duration_since(due)
        .saturating_sub(TIMER_RESOLUTION)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl RuntimeMonitorBuilder {
    /// How often the probe runs (default 10 ms, at least 1 ms, at most an hour). Each run is one timer wake-up
    /// and a few atomic stores; a shorter interval notices a stall sooner but never measures it more precisely
    /// than the stall itself.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// let monitor = RuntimeMonitor::builder().interval(Duration::from_millis(5)).build()?;
    /// assert_eq!(monitor.interval(), Duration::from_millis(5));
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How many recent samples the snapshot's max and percentiles cover (default 100, at most [`MAX_WINDOW`]).
    ///
    /// ```
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// let monitor = RuntimeMonitor::builder().window(500).build()?;
    /// assert_eq!(monitor.snapshot().window, 0, "no samples before it starts");
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn window(mut self, samples: usize) -> Self {
        self.window = samples;
        self
    }

    /// Declares pressure once a sample's lag goes above `trip`, and clears it once lags stay below `recover`
    /// (at least 1 ms, below `trip`) for [`min_recovery`](Self::min_recovery).
    ///
    /// Lag is counted past the timer's 1 ms tick (a timer fires at the first tick at or after its deadline, so up
    /// to a tick late is the timer's granularity, not a busy runtime): an idle runtime reads a fraction of a
    /// millisecond, and a stall reads its length less at most a millisecond.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// let monitor = RuntimeMonitor::builder()
    ///     .max_lag(Duration::from_millis(100), Duration::from_millis(20))
    ///     .build()?;
    /// assert!(!monitor.is_lagging());
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn max_lag(mut self, trip: Duration, recover: Duration) -> Self {
        self.lag = Some((trip, recover));
        self
    }

    /// Declares pressure once the runtime's alive tasks go above `trip`, and clears it once they stay below
    /// `recover` (at least 2, since the monitor's own task is alive; below `trip`) for
    /// [`min_recovery`](Self::min_recovery). A rising task count is queued work the runtime has not got to.
    ///
    /// ```
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// let monitor = RuntimeMonitor::builder().max_alive_tasks(50_000, 40_000).build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn max_alive_tasks(mut self, trip: usize, recover: usize) -> Self {
        self.alive_tasks = Some((trip, recover));
        self
    }

    /// Declares pressure once `probe()` returns more than `trip`, and clears it once it stays below `recover`
    /// (above 0, below `trip`) for [`min_recovery`](Self::min_recovery). The probe runs on the monitor task once
    /// per interval, never on the request path, so it may read `/proc` or an allocator's statistics. Its own run
    /// time is not counted as lag (the next sample is due one interval after it returns), but it must not block
    /// for long: it holds up the worker it runs on like any blocking call, and delays the next sample. A reading
    /// that panics is skipped (with a `tracing` warning), leaving the signal as it was; the monitor runs on. `name`
    /// labels the signal in [`Event::PressureChanged`]; it must not be empty, nor one of the monitor's own signals
    /// (`"lag"`, `"alive_tasks"`, `"stopped"`).
    ///
    /// ```
    /// # use std::sync::atomic::{AtomicU64, Ordering};
    /// # use std::sync::Arc;
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// // Resident memory as the application tracks it.
    /// let resident = Arc::new(AtomicU64::new(0));
    /// let probe = { let r = resident.clone(); move || r.load(Ordering::Relaxed) };
    /// let monitor = RuntimeMonitor::builder()
    ///     .max_probe("memory", probe, 2 << 30, 1 << 30)
    ///     .build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn max_probe<F>(mut self, name: &'static str, probe: F, trip: u64, recover: u64) -> Self
    where
        F: Fn() -> u64 + Send + Sync + 'static,
    {
        self.probe = Some(UserProbe {
            name,
            read: Arc::new(probe),
            trip,
            recover,
        });
        self
    }

    /// How long every tripped signal must stay below its `recover` threshold before the pressure clears
    /// (default zero: the first calm sample clears it). A hold stops a shedding layer from flapping when the
    /// shedding itself is what calms the runtime.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// let monitor = RuntimeMonitor::builder()
    ///     .max_lag(Duration::from_millis(100), Duration::from_millis(20))
    ///     .min_recovery(Duration::from_millis(500))
    ///     .build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn min_recovery(mut self, hold: Duration) -> Self {
        self.min_recovery = hold;
        self
    }

    /// Receives an [`Event::RuntimeLag`] per sample and an [`Event::PressureChanged`] per transition, from the
    /// probe task (default: none). A panic in the observer loses that event (with a `tracing` warning); the
    /// monitor runs on.
    ///
    /// ```
    /// # use tower_backpressure::core::TracingObserver;
    /// # use tower_backpressure::pressure::RuntimeMonitor;
    /// let monitor = RuntimeMonitor::builder().observer(TracingObserver).build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Arc::new(observer);
        self
    }

    /// Checks the configuration and builds the monitor (not yet started).
    pub fn build(self) -> Result<RuntimeMonitor, ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::new(
                CONFIG,
                "interval",
                "must be greater than zero",
            ));
        }
        if self.interval < TIMER_RESOLUTION {
            return Err(ConfigError::new(
                CONFIG,
                "interval",
                format!(
                    "must be at least 1ms, the tokio timer resolution (got {:?})",
                    self.interval
                ),
            ));
        }
        if self.interval > MAX_INTERVAL {
            return Err(ConfigError::new(
                CONFIG,
                "interval",
                format!(
                    "must be at most {MAX_INTERVAL:?}: a rarer probe would notice a stall that late (got {:?})",
                    self.interval
                ),
            ));
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(ConfigError::new(
                CONFIG,
                "window",
                format!(
                    "must be between 1 and {MAX_WINDOW} samples (got {})",
                    self.window
                ),
            ));
        }
        if let Some((trip, recover)) = self.lag {
            check_order("max_lag", &trip, &recover)?;
            // Past this, trip and recover would both round to the same u64 of nanoseconds.
            if trip > MAX_LAG {
                return Err(ConfigError::new(
                    CONFIG,
                    "max_lag",
                    format!("trip must be at most {MAX_LAG:?}, the largest lag it is compared in (got {trip:?})"),
                ));
            }
            if recover < TIMER_RESOLUTION {
                return Err(ConfigError::new(
                    CONFIG,
                    "max_lag",
                    format!(
                        "recover must be at least 1ms: even past the timer's 1ms tick, waking up takes an idle \
                         runtime a fraction of a millisecond, so the pressure might never clear (got {recover:?})"
                    ),
                ));
            }
        }
        if let Some((trip, recover)) = self.alive_tasks {
            check_order("max_alive_tasks", &trip, &recover)?;
            // The signal clears once fewer than `recover` tasks are alive; the probe task itself always is.
            if recover < 2 {
                return Err(ConfigError::new(
                    CONFIG,
                    "max_alive_tasks",
                    format!(
                        "recover must be at least 2: the pressure clears once fewer than recover tasks are alive, \
                         and the monitor's own task always is, so it would never clear (got {recover})"
                    ),
                ));
            }
        }
        if let Some(p) = &self.probe {
            if p.name.is_empty() {
                return Err(ConfigError::new(
                    CONFIG,
                    "max_probe",
                    "name must not be empty",
                ));
            }
            if RESERVED_SIGNALS.contains(&p.name) {
                return Err(ConfigError::new(
                    CONFIG,
                    "max_probe",
                    format!(
                        "name {:?} is reserved: PressureChanged events use \"lag\", \"alive_tasks\" and \"stopped\" \
                         for the monitor's own signals",
                        p.name
                    ),
                ));
            }
            check_order("max_probe", &p.trip, &p.recover)?;
            if p.recover == 0 {
                return Err(ConfigError::new(
                    CONFIG,
                    "max_probe",
                    "recover must be above 0: the pressure clears once the probe reads below recover, and no \
                     reading is below 0, so it would never clear",
                ));
            }
        }
        Ok(RuntimeMonitor {
            shared: Arc::new(Shared {
                interval: self.interval,
                min_recovery: self.min_recovery,
                lag: self.lag,
                alive_tasks: self.alive_tasks,
                probe: self.probe,
                observer: self.observer,
                running: AtomicBool::new(false),
                lagging: AtomicBool::new(false),
                under_pressure: AtomicBool::new(false),
                last_lag_nanos: AtomicU64::new(0),
                workers: AtomicUsize::new(0),
                alive: AtomicUsize::new(0),
                global_queue_depth: AtomicUsize::new(0),
                probe_value: AtomicU64::new(0),
                probe_read: AtomicBool::new(false),
                samples: AtomicU64::new(0),
                trips: AtomicU64::new(0),
                window: Mutex::new(Ring::new(self.window)),
                sampled: Notify::new(),
            }),
        })
    }
}

fn check_order<T: PartialOrd + fmt::Debug>(
    field: &'static str,
    trip: &T,
    recover: &T,
) -> Result<(), ConfigError> {
    if recover < trip {
        Ok(())
    } else {
        Err(ConfigError::new(
            CONFIG,
            field,
            format!("recover ({recover:?}) must be below trip ({trip:?}), or the state would flap"),
        ))
    }
}

impl MonitorGuard {
    /// The monitor this guard runs.
    pub fn monitor(&self) -> &RuntimeMonitor {
        &self.monitor
    }

    /// Stops the probe task and waits until it is gone.
    pub async fn stop(mut self) {
        self.task.abort();
        // The task never panics and is only ever cancelled here: the join result says nothing new.
        let _ = (&mut self.task).await;
    }
}

impl Drop for MonitorGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for RuntimeMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeMonitor")
            .field("interval", &self.shared.interval)
            .field("running", &self.is_running())
            .field("under_pressure", &self.is_under_pressure())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RuntimeMonitorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeMonitorBuilder")
            .field("interval", &self.interval)
            .field("window", &self.window)
            .field("min_recovery", &self.min_recovery)
            .field("max_lag", &self.lag)
            .field("max_alive_tasks", &self.alive_tasks)
            .field(
                "max_probe",
                &self.probe.as_ref().map(|p| (p.name, p.trip, p.recover)),
            )
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for MonitorGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MonitorGuard")
            .field("monitor", &self.monitor)
            .finish_non_exhaustive()
    }
}
