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
/// | `backpressure_breaker_state` | gauge | `layer` | 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled, 5 metrics only |
/// | `backpressure_runtime_lag_seconds` | histogram | `layer` | every runtime monitor sample |
/// | `backpressure_runtime_alive_tasks` | gauge | `layer` | every runtime monitor sample |
/// | `backpressure_runtime_global_queue_depth` | gauge | `layer` | every runtime monitor sample |
/// | `backpressure_runtime_under_pressure` | gauge | `layer` | 1 while the runtime monitor reports pressure, else 0 |
///
/// Label values are static strings: recording allocates nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsObserver;

impl Observer for MetricsObserver {
    fn on_event(&self, event: &Event) {
        match *event {
            Event::Admitted { layer, in_flight } => {
                metrics::gauge!("backpressure_in_flight", "layer" => layer).set(in_flight as f64);
            }
            Event::Rejected { layer, reason, .. } => {
                metrics::counter!("backpressure_rejections_total", "layer" => layer, "reason" => reason.as_str())
                    .increment(1);
            }
            Event::Completed {
                layer,
                outcome,
                latency,
                in_flight,
            } => {
                let outcome = outcome.as_str();
                metrics::counter!("backpressure_requests_total", "layer" => layer, "outcome" => outcome).increment(1);
                metrics::histogram!("backpressure_request_duration_seconds", "layer" => layer, "outcome" => outcome)
                    .record(latency.as_secs_f64());
                metrics::gauge!("backpressure_in_flight", "layer" => layer).set(in_flight as f64);
            }
            Event::LimitChanged { layer, limit } => {
                metrics::gauge!("backpressure_limit", "layer" => layer).set(limit as f64);
            }
            Event::QueueDepth { layer, depth } => {
                metrics::gauge!("backpressure_queue_depth", "layer" => layer).set(depth as f64);
            }
            Event::QueueWait { layer, wait } => {
                metrics::histogram!("backpressure_queue_wait_seconds", "layer" => layer)
                    .record(wait.as_secs_f64());
            }
            Event::BreakerState { layer, to, .. } => {
                metrics::gauge!("backpressure_breaker_state", "layer" => layer).set(to.as_gauge());
            }
            Event::RuntimeLag {
                layer,
                lag,
                alive_tasks,
                global_queue_depth,
            } => {
                metrics::histogram!("backpressure_runtime_lag_seconds", "layer" => layer)
                    .record(lag.as_secs_f64());
                metrics::gauge!("backpressure_runtime_alive_tasks", "layer" => layer)
                    .set(alive_tasks as f64);
                metrics::gauge!("backpressure_runtime_global_queue_depth", "layer" => layer)
                    .set(global_queue_depth as f64);
            }
            Event::PressureChanged {
                layer,
                under_pressure,
                ..
            } => {
                metrics::gauge!("backpressure_runtime_under_pressure", "layer" => layer)
                    .set(if under_pressure { 1.0 } else { 0.0 });
            }
        }
    }
}
