//! An [`Observer`] that records through the [`metrics`] facade.

use super::{Event, Observer};

/// Records every layer event through the `metrics` facade, for any exporter (Prometheus, StatsD, ...).
///
/// | name | kind | labels | from |
/// |---|---|---|---|
/// | `backpressure_requests_total` | counter | `layer`, `outcome` | every finished request |
/// | `backpressure_request_duration_seconds` | histogram | `layer`, `outcome` | admission to end of response |
/// | `backpressure_in_flight` | gauge | `layer` | admitted and finished requests |
/// | `backpressure_rejections_total` | counter | `layer`, `reason` | every rejection |
/// | `backpressure_limit` | gauge | `layer` | concurrency limit changes |
/// | `backpressure_queue_depth` | gauge | `layer` | queue depth changes |
/// | `backpressure_queue_wait_seconds` | histogram | `layer` | time spent queued |
/// | `backpressure_breaker_state` | gauge | `layer` | every breaker state change: the state's code (below) |
/// | `backpressure_runtime_lag_seconds` | histogram | `layer` | every runtime monitor sample |
/// | `backpressure_runtime_alive_tasks` | gauge | `layer` | every runtime monitor sample |
/// | `backpressure_runtime_global_queue_depth` | gauge | `layer` | every runtime monitor sample |
/// | `backpressure_runtime_under_pressure` | gauge | `layer` | 1 while the runtime monitor reports pressure, else 0 |
///
/// Breaker state codes: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled, 5 metrics only.
///
/// **Several layers of one kind in a process** (a breaker per dependency, a server limiter and a client limiter)
/// would write the same series, and their gauges would overwrite each other: give each its own observer with
/// [`MetricsObserver::named`], which adds a `name` label to every series it records.
///
/// Label values are static strings, so no string is copied, but the `metrics` facade builds each key's list of
/// labels on the heap: every series recorded is one small allocation (two to four a request, by the layer's
/// events), plus whatever the installed recorder does. The layers themselves allocate nothing per request; with
/// no observer (`()`), nothing is recorded at all.
///
/// ```
/// use tower_backpressure::breaker::CircuitBreakerLayer;
/// use tower_backpressure::core::MetricsObserver;
///
/// let payments = CircuitBreakerLayer::builder().observer(MetricsObserver::named("payments")).build()?;
/// let search = CircuitBreakerLayer::builder().observer(MetricsObserver::named("search")).build()?;
/// // backpressure_breaker_state{layer="breaker",name="payments"} and {layer="breaker",name="search"}
/// # Ok::<_, tower_backpressure::core::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsObserver {
    name: Option<&'static str>,
}

impl MetricsObserver {
    /// An observer whose series carry the labels of the table only.
    #[must_use]
    pub const fn new() -> Self {
        MetricsObserver { name: None }
    }

    /// An observer whose series also carry `name="<name>"`, to tell this layer from others of its kind.
    #[must_use]
    pub const fn named(name: &'static str) -> Self {
        MetricsObserver { name: Some(name) }
    }

    /// The `name` label this observer adds, if any.
    #[must_use]
    pub const fn name(&self) -> Option<&'static str> {
        self.name
    }
}

/// Records one metric, with the observer's `name` label when it has one.
macro_rules! record {
    ($self:ident, $kind:ident!($metric:literal $(, $key:literal => $value:expr)*).$op:ident($arg:expr)) => {
        match $self.name {
            None => metrics::$kind!($metric $(, $key => $value)*).$op($arg),
            Some(name) => metrics::$kind!($metric $(, $key => $value)*, "name" => name).$op($arg),
        }
    };
}

impl Observer for MetricsObserver {
    fn on_event(&self, event: &Event) {
        match *event {
            Event::Admitted { layer, in_flight } => {
                record!(
                    self,
                    gauge!("backpressure_in_flight", "layer" => layer).set(in_flight as f64)
                );
            }
            Event::Rejected { layer, reason, .. } => {
                let reason = reason.as_str();
                record!(
                    self,
                    counter!(
                        "backpressure_rejections_total", "layer" => layer, "reason" => reason
                    )
                    .increment(1)
                );
            }
            Event::Completed {
                layer,
                outcome,
                latency,
                in_flight,
            } => {
                let outcome = outcome.as_str();
                record!(
                    self,
                    counter!("backpressure_requests_total", "layer" => layer, "outcome" => outcome)
                        .increment(1)
                );
                let seconds = latency.as_secs_f64();
                record!(self, histogram!(
                    "backpressure_request_duration_seconds", "layer" => layer, "outcome" => outcome
                ).record(seconds));
                record!(
                    self,
                    gauge!("backpressure_in_flight", "layer" => layer).set(in_flight as f64)
                );
            }
            Event::LimitChanged { layer, limit } => {
                record!(
                    self,
                    gauge!("backpressure_limit", "layer" => layer).set(limit as f64)
                );
            }
            Event::QueueDepth { layer, depth } => {
                record!(
                    self,
                    gauge!("backpressure_queue_depth", "layer" => layer).set(depth as f64)
                );
            }
            Event::QueueWait { layer, wait } => {
                record!(
                    self,
                    histogram!("backpressure_queue_wait_seconds", "layer" => layer)
                        .record(wait.as_secs_f64())
                );
            }
            Event::BreakerState { layer, to, .. } => {
                record!(
                    self,
                    gauge!("backpressure_breaker_state", "layer" => layer).set(to.as_gauge())
                );
            }
            Event::RuntimeLag {
                layer,
                lag,
                alive_tasks,
                global_queue_depth,
            } => {
                record!(
                    self,
                    histogram!("backpressure_runtime_lag_seconds", "layer" => layer)
                        .record(lag.as_secs_f64())
                );
                record!(
                    self,
                    gauge!("backpressure_runtime_alive_tasks", "layer" => layer)
                        .set(alive_tasks as f64)
                );
                record!(
                    self,
                    gauge!("backpressure_runtime_global_queue_depth", "layer" => layer)
                        .set(global_queue_depth as f64)
                );
            }
            Event::PressureChanged {
                layer,
                under_pressure,
                ..
            } => {
                record!(
                    self,
                    gauge!("backpressure_runtime_under_pressure", "layer" => layer)
                        .set(if under_pressure { 1.0 } else { 0.0 })
                );
            }
        }
    }
}
