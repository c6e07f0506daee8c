//! What a run measures.

use serde::Serialize;

/// The figures of one (scenario, strategy, phase, class); class `"all"` sums the classes. Field names and
/// meanings are those of the `overload` example's JSON output.
///
/// Requests are attributed to the phase in which their client issued them; backend figures (`backend_rps`,
/// `wasted_work`, `cut_work`) to the phase in which the backend did the work.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Strategy name.
    pub strategy: String,
    /// Phase name.
    pub phase: String,
    /// Class name, or `"all"`.
    pub class: String,
    /// Phase length in seconds.
    pub duration_s: f64,
    /// Backend capacity during the phase: workers / mean service time.
    pub capacity_rps: f64,
    /// First attempts issued by clients in the phase, per second.
    pub offered_rps: f64,
    /// Requests that started service at the backend, per second.
    pub backend_rps: f64,
    /// Requests issued in the phase that succeeded within the client's timeout, per second.
    pub goodput_rps: f64,
    /// Requests rejected by a layer (an `Err`, or status 503, 429 or 504), per second.
    pub rejected_rps: f64,
    /// Requests the client gave up on, per second.
    pub timeout_rps: f64,
    /// Requests that failed at the backend (status 500), per second.
    pub error_rps: f64,
    /// `goodput_rps / offered_rps` (`null` when nothing was offered).
    pub availability: Option<f64>,
    /// Median latency of the good requests in milliseconds (`null` when none).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency of the good requests in milliseconds (`null` when none).
    pub p99_ms: Option<f64>,
    /// Share of the backend's busy time spent on requests whose client had already given up (or had already
    /// received its answer). Work still under way when the run ends counts up to the end.
    pub wasted_work: f64,
    /// Share of the backend's busy time spent on work cut off before it was done (a layer dropped the request at
    /// its deadline, or the client cancelled it): work that produced no answer, though not counted as wasted when
    /// it was cut before the client gave up.
    pub cut_work: f64,
    /// Time-averaged concurrency limit of the stack (`null` when it has no limit probe). Phase-wide: the same in
    /// every class row of the phase, as is `max_queue_depth`.
    pub mean_limit: Option<f64>,
    /// Deepest queue seen in the stack (`null` when it has no queue probe).
    pub max_queue_depth: Option<usize>,
}

/// The figures of one window of a run's time series (for charts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Start of the window, in seconds from the start of the run.
    pub t_s: f64,
    /// Successful requests completed in the window, per second.
    pub goodput_rps: f64,
    /// 99th percentile latency of those, in milliseconds.
    pub p99_ms: Option<f64>,
    /// Time-averaged limit of the stack (`None` without a limit probe).
    pub limit: Option<f64>,
    /// Time-averaged number of attempts inside the stack.
    pub in_flight: f64,
    /// Deepest queue of the stack seen in the window (`None` without a queue probe).
    pub queue_depth: Option<usize>,
    /// Deepest backend queue seen in the window.
    pub backend_queue: usize,
}

/// The result of running one scenario against one stack.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Strategy name.
    pub strategy: String,
    /// The seed used.
    pub seed: u64,
    /// Rows per phase: class `"all"` first, then each class in file order.
    pub rows: Vec<Row>,
    /// One point per window of [`WINDOW`](super::WINDOW).
    pub series: Vec<SeriesPoint>,
    /// Requests issued (first attempts).
    pub requests: u64,
    /// Attempts issued, retries included.
    pub attempts: u64,
}

impl Report {
    /// The row of `phase` and `class` (`"all"` for the sum).
    pub fn row(&self, phase: &str, class: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.phase == phase && r.class == class)
    }
}

/// The JSON document of the `overload` example: `{"rows": [...]}` with the rows of all `reports` in order.
/// Deterministic: the same reports give the same bytes.
pub fn to_json<'a>(reports: impl IntoIterator<Item = &'a Report>) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        rows: Vec<&'a Row>,
    }
    let rows = reports.into_iter().flat_map(|r| r.rows.iter()).collect();
    serde_json::to_string_pretty(&Doc { rows }).expect("rows serialize")
}
