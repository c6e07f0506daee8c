//! An [`Observer`] that records through the [`metrics`] facade.

use std::fmt;
use std::sync::{Arc, OnceLock};

use metrics::{Key, Label, Level, Metadata};

use super::{Event, Observer, Outcome, Reason};

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
/// Recording allocates nothing. The keys of a layer's series (name and labels) are built the first time the layer
/// records anything, once per process for unnamed observers and once per named observer, and every event hands
/// the installed recorder a key by reference; the `metrics` macros would build the key, with its list of labels on
/// the heap, at every call. What the recorder does with the key is its own affair (Prometheus's looks the series
/// up and takes a reference to it). Events of a layer of your own, under any other `layer` name, get their key
/// built at each event, as the macros would. The layers themselves allocate nothing per request; with no observer
/// (`()`), nothing is recorded at all.
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
#[derive(Clone, Default)]
pub struct MetricsObserver {
    name: Option<&'static str>,
    // The keys of a named observer's series (they carry its name); an unnamed observer's are shared by all.
    keys: Option<Arc<Keys>>,
}

impl MetricsObserver {
    /// An observer whose series carry the labels of the table only.
    #[must_use]
    pub const fn new() -> Self {
        MetricsObserver {
            name: None,
            keys: None,
        }
    }

    /// An observer whose series also carry `name="<name>"`, to tell this layer from others of its kind.
    #[must_use]
    pub fn named(name: &'static str) -> Self {
        MetricsObserver {
            name: Some(name),
            keys: Some(Arc::new(Keys::new())),
        }
    }

    /// The `name` label this observer adds, if any.
    #[must_use]
    pub const fn name(&self) -> Option<&'static str> {
        self.name
    }

    /// Hands `use_key` the key of `series` for `layer`: built once per observer for this crate's layers, and per
    /// call for any other.
    fn with_key<T>(
        &self,
        layer: &'static str,
        series: Series,
        use_key: impl FnOnce(&Key) -> T,
    ) -> T {
        let keys = self.keys.as_deref().unwrap_or(&UNNAMED);
        match LAYERS.iter().position(|known| *known == layer) {
            Some(i) => {
                let built = keys.0[i].get_or_init(|| LayerKeys::new(layer, self.name));
                use_key(&built.0[series.index()])
            }
            None => use_key(&series.key(layer, self.name)),
        }
    }

    fn counter(&self, layer: &'static str, series: Series, n: u64) {
        self.with_key(layer, series, |key| {
            metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(n)
        });
    }

    fn gauge(&self, layer: &'static str, series: Series, value: f64) {
        self.with_key(layer, series, |key| {
            metrics::with_recorder(|r| r.register_gauge(key, &METADATA)).set(value)
        });
    }

    fn histogram(&self, layer: &'static str, series: Series, value: f64) {
        self.with_key(layer, series, |key| {
            metrics::with_recorder(|r| r.register_histogram(key, &METADATA)).record(value)
        });
    }
}

impl fmt::Debug for MetricsObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsObserver")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What the `metrics` macros would say of a call site in this module.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The layer kinds of this crate, as their events name them: the series whose keys are built ahead.
const LAYERS: [&str; 7] = [
    "adaptive",
    "breaker",
    "deadline",
    "pressure",
    "propagate_deadline",
    "queue",
    "rate",
];

/// Every outcome, in the order of their keys.
const OUTCOMES: [Outcome; 4] = [
    Outcome::Success,
    Outcome::Failure,
    Outcome::Dropped,
    Outcome::Ignored,
];

/// Every reason for a refusal, in the order of their keys.
const REASONS: [Reason; 6] = Reason::ALL;

/// One series of one layer: a metric of the table, with its `outcome` or `reason` label if it has one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Series {
    InFlight,
    Requests(Outcome),
    Duration(Outcome),
    Rejections(Reason),
    Limit,
    QueueDepth,
    QueueWait,
    BreakerState,
    RuntimeLag,
    RuntimeAliveTasks,
    RuntimeGlobalQueueDepth,
    RuntimeUnderPressure,
}

/// How many series a layer has.
const SERIES: usize = 1 + 2 * OUTCOMES.len() + REASONS.len() + 8;

impl Series {
    /// Every series, in the order of [`Series::index`].
    fn all() -> impl Iterator<Item = Series> {
        let per_outcome = |series: fn(Outcome) -> Series| OUTCOMES.into_iter().map(series);
        std::iter::once(Series::InFlight)
            .chain(per_outcome(Series::Requests))
            .chain(per_outcome(Series::Duration))
            .chain(REASONS.into_iter().map(Series::Rejections))
            .chain([
                Series::Limit,
                Series::QueueDepth,
                Series::QueueWait,
                Series::BreakerState,
                Series::RuntimeLag,
                Series::RuntimeAliveTasks,
                Series::RuntimeGlobalQueueDepth,
                Series::RuntimeUnderPressure,
            ])
    }

    /// Where the series' key is among a layer's.
    fn index(self) -> usize {
        let outcome = |o: Outcome| match o {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Dropped => 2,
            Outcome::Ignored => 3,
        };
        let after_outcomes = 1 + 2 * OUTCOMES.len();
        let after_reasons = after_outcomes + REASONS.len();
        match self {
            Series::InFlight => 0,
            Series::Requests(o) => 1 + outcome(o),
            Series::Duration(o) => 1 + OUTCOMES.len() + outcome(o),
            Series::Rejections(r) => {
                after_outcomes
                    + match r {
                        Reason::Overloaded => 0,
                        Reason::QueueFull => 1,
                        Reason::QueueTimeout => 2,
                        Reason::CircuitOpen => 3,
                        Reason::DeadlineExceeded => 4,
                        Reason::RateLimited => 5,
                    }
            }
            Series::Limit => after_reasons,
            Series::QueueDepth => after_reasons + 1,
            Series::QueueWait => after_reasons + 2,
            Series::BreakerState => after_reasons + 3,
            Series::RuntimeLag => after_reasons + 4,
            Series::RuntimeAliveTasks => after_reasons + 5,
            Series::RuntimeGlobalQueueDepth => after_reasons + 6,
            Series::RuntimeUnderPressure => after_reasons + 7,
        }
    }

    /// The metric's name, and its second label.
    fn parts(self) -> (&'static str, Option<(&'static str, &'static str)>) {
        match self {
            Series::InFlight => ("backpressure_in_flight", None),
            Series::Requests(o) => ("backpressure_requests_total", Some(("outcome", o.as_str()))),
            Series::Duration(o) => (
                "backpressure_request_duration_seconds",
                Some(("outcome", o.as_str())),
            ),
            Series::Rejections(r) => (
                "backpressure_rejections_total",
                Some(("reason", r.as_str())),
            ),
            Series::Limit => ("backpressure_limit", None),
            Series::QueueDepth => ("backpressure_queue_depth", None),
            Series::QueueWait => ("backpressure_queue_wait_seconds", None),
            Series::BreakerState => ("backpressure_breaker_state", None),
            Series::RuntimeLag => ("backpressure_runtime_lag_seconds", None),
            Series::RuntimeAliveTasks => ("backpressure_runtime_alive_tasks", None),
            Series::RuntimeGlobalQueueDepth => ("backpressure_runtime_global_queue_depth", None),
            Series::RuntimeUnderPressure => ("backpressure_runtime_under_pressure", None),
        }
    }

    /// The series' key for `layer`, labelled `layer`, then `outcome` or `reason`, then `name`: the labels, in the
    /// order, that the `metrics` macros gave them before keys were built ahead.
    fn key(self, layer: &'static str, name: Option<&'static str>) -> Key {
        let (metric, label) = self.parts();
        let labels: Vec<Label> = [Some(("layer", layer)), label, name.map(|n| ("name", n))]
            .into_iter()
            .flatten()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect();
        Key::from_parts(metric, labels)
    }
}

/// The keys of one layer's series, by [`Series::index`].
struct LayerKeys([Key; SERIES]);

impl LayerKeys {
    fn new(layer: &'static str, name: Option<&'static str>) -> Self {
        let mut all = Series::all();
        LayerKeys(std::array::from_fn(|_| {
            all.next().expect("one series per key").key(layer, name)
        }))
    }
}

/// The keys of each of [`LAYERS`], each layer's built on its first event.
struct Keys([OnceLock<LayerKeys>; LAYERS.len()]);

impl Keys {
    const fn new() -> Self {
        Keys([const { OnceLock::new() }; LAYERS.len()])
    }
}

/// The keys of every unnamed observer.
static UNNAMED: Keys = Keys::new();

impl Observer for MetricsObserver {
    fn on_event(&self, event: &Event) {
        match *event {
            Event::Admitted { layer, in_flight } => {
                self.gauge(layer, Series::InFlight, in_flight as f64);
            }
            Event::Rejected { layer, reason, .. } => {
                self.counter(layer, Series::Rejections(reason), 1);
            }
            Event::Completed {
                layer,
                outcome,
                latency,
                in_flight,
            } => {
                self.counter(layer, Series::Requests(outcome), 1);
                self.histogram(layer, Series::Duration(outcome), latency.as_secs_f64());
                self.gauge(layer, Series::InFlight, in_flight as f64);
            }
            Event::LimitChanged { layer, limit } => self.gauge(layer, Series::Limit, limit as f64),
            Event::QueueDepth { layer, depth } => {
                self.gauge(layer, Series::QueueDepth, depth as f64)
            }
            Event::QueueWait { layer, wait } => {
                self.histogram(layer, Series::QueueWait, wait.as_secs_f64());
            }
            Event::BreakerState { layer, to, .. } => {
                self.gauge(layer, Series::BreakerState, to.as_gauge());
            }
            Event::RuntimeLag {
                layer,
                lag,
                alive_tasks,
                global_queue_depth,
            } => {
                self.histogram(layer, Series::RuntimeLag, lag.as_secs_f64());
                self.gauge(layer, Series::RuntimeAliveTasks, alive_tasks as f64);
                self.gauge(
                    layer,
                    Series::RuntimeGlobalQueueDepth,
                    global_queue_depth as f64,
                );
            }
            Event::PressureChanged {
                layer,
                under_pressure,
                ..
            } => {
                let value = if under_pressure { 1.0 } else { 0.0 };
                self.gauge(layer, Series::RuntimeUnderPressure, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, KeyName, Recorder,
        SharedString, Unit,
    };

    use super::*;
    use crate::core::CircuitState;

    /// Each series recorded into, and the value: `(kind, key, value)`.
    type Notes = Arc<Mutex<Vec<(&'static str, Key, f64)>>>;

    /// A recorder that notes each series a call records into, and the value.
    #[derive(Default)]
    struct Capture(Notes);

    struct Handle(&'static str, Key, Notes);

    /// A series recorded into and the value, as an exporter sees it: kind, name, labels in their order, value.
    type Seen = (&'static str, String, Vec<(String, String)>, f64);

    impl Handle {
        fn note(&self, value: f64) {
            self.2.lock().unwrap().push((self.0, self.1.clone(), value));
        }
    }

    impl CounterFn for Handle {
        fn increment(&self, value: u64) {
            self.note(value as f64);
        }
        fn absolute(&self, _: u64) {
            unreachable!("not recorded");
        }
    }

    impl GaugeFn for Handle {
        fn increment(&self, _: f64) {
            unreachable!("not recorded");
        }
        fn decrement(&self, _: f64) {
            unreachable!("not recorded");
        }
        fn set(&self, value: f64) {
            self.note(value);
        }
    }

    impl HistogramFn for Handle {
        fn record(&self, value: f64) {
            self.note(value);
        }
    }

    impl Recorder for Capture {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(Arc::new(Handle("counter", key.clone(), self.0.clone())))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(Arc::new(Handle("gauge", key.clone(), self.0.clone())))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(Handle("histogram", key.clone(), self.0.clone())))
        }
    }

    /// One event of every kind, with every outcome and reason, for `layer`.
    fn every_event(layer: &'static str) -> Vec<Event> {
        let mut events = vec![Event::Admitted {
            layer,
            in_flight: 3,
        }];
        events.extend(REASONS.map(|reason| Event::Rejected {
            layer,
            reason,
            retry_after: None,
        }));
        events.extend(OUTCOMES.map(|outcome| Event::Completed {
            layer,
            outcome,
            latency: Duration::from_millis(250),
            in_flight: 2,
        }));
        events.extend([
            Event::LimitChanged { layer, limit: 40 },
            Event::QueueDepth { layer, depth: 7 },
            Event::QueueWait {
                layer,
                wait: Duration::from_millis(5),
            },
            Event::BreakerState {
                layer,
                from: CircuitState::Closed,
                to: CircuitState::Open,
            },
            Event::RuntimeLag {
                layer,
                lag: Duration::from_millis(12),
                alive_tasks: 100,
                global_queue_depth: 9,
            },
            Event::PressureChanged {
                layer,
                under_pressure: true,
                signal: "lag",
            },
        ]);
        events
    }

    /// What the `metrics` macros record for `event`: the way the observer recorded before it built keys ahead,
    /// and the oracle for the keys it builds now.
    fn through_macros(event: &Event, name: Option<&'static str>) {
        macro_rules! record {
            ($kind:ident!($metric:literal $(, $key:literal => $value:expr)*).$op:ident($arg:expr)) => {
                match name {
                    None => metrics::$kind!($metric $(, $key => $value)*).$op($arg),
                    Some(name) => metrics::$kind!($metric $(, $key => $value)*, "name" => name).$op($arg),
                }
            };
        }
        match *event {
            Event::Admitted { layer, in_flight } => {
                record!(gauge!("backpressure_in_flight", "layer" => layer).set(in_flight as f64));
            }
            Event::Rejected { layer, reason, .. } => record!(counter!(
                "backpressure_rejections_total", "layer" => layer, "reason" => reason.as_str()
            )
            .increment(1)),
            Event::Completed {
                layer,
                outcome,
                latency,
                in_flight,
            } => {
                let outcome = outcome.as_str();
                record!(
                    counter!("backpressure_requests_total", "layer" => layer, "outcome" => outcome)
                        .increment(1)
                );
                record!(histogram!(
                    "backpressure_request_duration_seconds", "layer" => layer, "outcome" => outcome
                )
                .record(latency.as_secs_f64()));
                record!(gauge!("backpressure_in_flight", "layer" => layer).set(in_flight as f64));
            }
            Event::LimitChanged { layer, limit } => {
                record!(gauge!("backpressure_limit", "layer" => layer).set(limit as f64));
            }
            Event::QueueDepth { layer, depth } => {
                record!(gauge!("backpressure_queue_depth", "layer" => layer).set(depth as f64));
            }
            Event::QueueWait { layer, wait } => record!(
                histogram!("backpressure_queue_wait_seconds", "layer" => layer)
                    .record(wait.as_secs_f64())
            ),
            Event::BreakerState { layer, to, .. } => {
                record!(gauge!("backpressure_breaker_state", "layer" => layer).set(to.as_gauge()));
            }
            Event::RuntimeLag {
                layer,
                lag,
                alive_tasks,
                global_queue_depth,
            } => {
                record!(
                    histogram!("backpressure_runtime_lag_seconds", "layer" => layer)
                        .record(lag.as_secs_f64())
                );
                record!(gauge!("backpressure_runtime_alive_tasks", "layer" => layer)
                    .set(alive_tasks as f64));
                record!(
                    gauge!("backpressure_runtime_global_queue_depth", "layer" => layer)
                        .set(global_queue_depth as f64)
                );
            }
            Event::PressureChanged {
                layer,
                under_pressure,
                ..
            } => record!(
                gauge!("backpressure_runtime_under_pressure", "layer" => layer)
                    .set(if under_pressure { 1.0 } else { 0.0 })
            ),
        }
    }

    /// What `record` records: kind, name, labels in their order (keys compare equal whatever the order of their
    /// labels, exporters write them in it), value.
    fn captured(record: impl FnOnce()) -> Vec<Seen> {
        let capture = Capture::default();
        metrics::with_local_recorder(&capture, record);
        let seen = capture.0.lock().unwrap();
        seen.iter()
            .map(|(kind, key, value)| {
                let labels = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                (*kind, key.name().to_owned(), labels, *value)
            })
            .collect()
    }

    #[test]
    fn every_event_records_the_series_and_values_the_metrics_macros_record() {
        for name in [None, Some("payments")] {
            let observer = name.map_or_else(MetricsObserver::new, MetricsObserver::named);
            // A layer of your own goes through keys built per event; this crate's through keys built ahead.
            for layer in LAYERS.into_iter().chain(["my_layer"]) {
                for event in every_event(layer) {
                    // Twice: the first event of a layer builds its keys, the second uses them.
                    for _ in 0..2 {
                        let ours = captured(|| observer.on_event(&event));
                        let macros = captured(|| through_macros(&event, name));
                        assert!(!ours.is_empty(), "{event:?}");
                        assert_eq!(ours, macros, "{event:?} (name {name:?})");
                    }
                }
            }
        }
    }

    #[test]
    fn series_are_listed_in_the_order_of_their_keys() {
        let all: Vec<Series> = Series::all().collect();
        assert_eq!(all.len(), SERIES);
        for (i, series) in all.into_iter().enumerate() {
            assert_eq!(series.index(), i, "{series:?}");
        }
    }
}
