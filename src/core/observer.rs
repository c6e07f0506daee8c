//! Observer hooks: what layers report as they work.

use std::fmt;
use std::time::Duration;

use super::{Outcome, Reason};

/// A circuit breaker's state, as reported to observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// A limited number of probe calls test whether the dependency has healed.
    HalfOpen,
    /// Held open by the operator.
    ForcedOpen,
    /// Switched off: every call flows, nothing is counted.
    Disabled,
    /// Counts and reports, never trips.
    MetricsOnly,
}

impl CircuitState {
    /// A short lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::Disabled => "disabled",
            CircuitState::MetricsOnly => "metrics_only",
        }
    }

    /// The value exported as the `backpressure_breaker_state` gauge: 0 closed, 1 open, 2 half-open,
    /// 3 forced open, 4 disabled, 5 metrics only.
    pub const fn as_gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
            CircuitState::ForcedOpen => 3.0,
            CircuitState::Disabled => 4.0,
            CircuitState::MetricsOnly => 5.0,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something a layer did. `layer` names the layer kind (`"adaptive"`, `"queue"`, `"breaker"`, `"deadline"`,
/// `"rate"`, ...) and is a metrics label.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A request was admitted; `in_flight` counts it.
    Admitted {
        /// The layer kind.
        layer: &'static str,
        /// Requests in flight through this layer, this one included.
        in_flight: usize,
    },
    /// A request was refused.
    Rejected {
        /// The layer kind.
        layer: &'static str,
        /// Why.
        reason: Reason,
        /// The retry hint given, if any.
        retry_after: Option<Duration>,
    },
    /// An admitted request finished.
    Completed {
        /// The layer kind.
        layer: &'static str,
        /// Its outcome.
        outcome: Outcome,
        /// From admission to the end of the response.
        latency: Duration,
        /// Requests still in flight through this layer.
        in_flight: usize,
    },
    /// The concurrency limit changed.
    LimitChanged {
        /// The layer kind.
        layer: &'static str,
        /// The new limit.
        limit: usize,
    },
    /// The wait queue's depth changed.
    QueueDepth {
        /// The layer kind.
        layer: &'static str,
        /// Requests waiting now.
        depth: usize,
    },
    /// A request left the wait queue (admitted or not) after waiting this long.
    QueueWait {
        /// The layer kind.
        layer: &'static str,
        /// Time spent waiting.
        wait: Duration,
    },
    /// A circuit breaker changed state.
    BreakerState {
        /// The layer kind.
        layer: &'static str,
        /// The state before.
        from: CircuitState,
        /// The state now.
        to: CircuitState,
    },
    /// A runtime monitor took a sample: how late its probe ran, and the runtime's task figures.
    RuntimeLag {
        /// The layer kind.
        layer: &'static str,
        /// How much later than asked the probe task ran (scheduling delay, event-loop lag), past the timer's 1 ms
        /// tick.
        lag: Duration,
        /// Tasks alive on the runtime.
        alive_tasks: usize,
        /// Tasks waiting in the runtime's global queue.
        global_queue_depth: usize,
    },
    /// A runtime monitor entered or left the pressured state.
    PressureChanged {
        /// The layer kind.
        layer: &'static str,
        /// Whether the runtime is under pressure now.
        under_pressure: bool,
        /// The signal that tripped (entering) or recovered last (leaving): `"lag"`, `"alive_tasks"`, or the
        /// name of a user probe; or `"stopped"` (leaving) when the monitor's task ended while under pressure
        /// (guard dropped, runtime shut down), since a stopped monitor reports no pressure.
        signal: &'static str,
    },
}

/// Receives the [`Event`]s of a layer.
///
/// `()` is the default observer and compiles to nothing. Closures `Fn(&Event)` work, as do [`TracingObserver`],
/// the `metrics`-facade `MetricsObserver` (feature `metrics`), and pairs `(A, B)` to feed two observers.
///
/// Observers run inline on the request path: keep them cheap and never block.
pub trait Observer: Send + Sync + 'static {
    /// Called for every event.
    fn on_event(&self, event: &Event);
}

impl Observer for () {
    #[inline(always)]
    fn on_event(&self, _event: &Event) {}
}

impl<F> Observer for F
where
    F: Fn(&Event) + Send + Sync + 'static,
{
    #[inline]
    fn on_event(&self, event: &Event) {
        self(event)
    }
}

impl<A: Observer, B: Observer> Observer for (A, B) {
    #[inline]
    fn on_event(&self, event: &Event) {
        self.0.on_event(event);
        self.1.on_event(event);
    }
}

/// Emits every event as a structured `tracing` event (target `tower_backpressure`): rejections, breaker
/// transitions and runtime pressure changes at `INFO`, the rest at `DEBUG`/`TRACE`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingObserver;

impl Observer for TracingObserver {
    fn on_event(&self, event: &Event) {
        const T: &str = "tower_backpressure";
        match *event {
            Event::Admitted { layer, in_flight } => {
                tracing::trace!(target: T, layer, in_flight, "admitted")
            }
            Event::Rejected {
                layer,
                reason,
                retry_after,
            } => tracing::info!(
                target: T,
                layer,
                reason = reason.as_str(),
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                "rejected"
            ),
            Event::Completed {
                layer,
                outcome,
                latency,
                in_flight,
            } => tracing::trace!(
                target: T,
                layer,
                outcome = outcome.as_str(),
                latency_us = latency.as_micros() as u64,
                in_flight,
                "completed"
            ),
            Event::LimitChanged { layer, limit } => {
                tracing::debug!(target: T, layer, limit, "limit changed")
            }
            Event::QueueDepth { layer, depth } => {
                tracing::trace!(target: T, layer, depth, "queue depth")
            }
            Event::QueueWait { layer, wait } => {
                tracing::trace!(target: T, layer, wait_us = wait.as_micros() as u64, "queue wait")
            }
            Event::BreakerState { layer, from, to } => tracing::info!(
                target: T,
                layer,
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker state changed"
            ),
            Event::RuntimeLag {
                layer,
                lag,
                alive_tasks,
                global_queue_depth,
            } => tracing::trace!(
                target: T,
                layer,
                lag_us = lag.as_micros() as u64,
                alive_tasks,
                global_queue_depth,
                "runtime lag"
            ),
            Event::PressureChanged {
                layer,
                under_pressure,
                signal,
            } => {
                tracing::info!(target: T, layer, under_pressure, signal, "runtime pressure changed")
            }
        }
    }
}

/// Whether `O` is the no-op observer `()`: figures only an observer would see need not be computed for it (the
/// comparison of two constants, folded away at compile time).
pub(crate) fn is_noop<O: Observer>() -> bool {
    std::any::TypeId::of::<O>() == std::any::TypeId::of::<()>()
}

/// Tells `observer` that a request was admitted, with the in-flight count `in_flight` works out; nothing at all
/// for `()`, which neither computes the count (a sum over stripes, in most layers) nor sees the event.
///
/// It asks for the request's `permit`, which it does not use, so that no layer can tell the observer before the
/// permit exists: an observer is user code and may panic, and the permit is what gives back what the admission
/// took (an in-flight count, a slot, a probe) when that panic unwinds.
#[inline]
pub(crate) fn admitted<O: Observer>(
    observer: &O,
    layer: &'static str,
    _permit: &super::Permit,
    in_flight: impl FnOnce() -> usize,
) {
    if !is_noop::<O>() {
        observer.on_event(&Event::Admitted {
            layer,
            in_flight: in_flight(),
        });
    }
}

/// Tells `observer` that a request finished, with the in-flight count `in_flight` works out; nothing at all for
/// `()`.
#[inline]
pub(crate) fn completed<O: Observer>(
    observer: &O,
    layer: &'static str,
    outcome: Outcome,
    latency: Duration,
    in_flight: impl FnOnce() -> usize,
) {
    if !is_noop::<O>() {
        observer.on_event(&Event::Completed {
            layer,
            outcome,
            latency,
            in_flight: in_flight(),
        });
    }
}
