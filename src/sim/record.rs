//! Accounting of one run: per phase and class counters, latency histograms, busy time and the time series.

use hdrhistogram::Histogram;

use super::report::{Row, SeriesPoint};
use super::Scenario;

/// How a request ended, from its client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Good,
    Rejected,
    Error,
    Timeout,
}

/// Not given up yet.
const NEVER: u64 = u64::MAX;

/// `part / whole`, or 0 when `whole` is.
fn share(part: u64, whole: u64) -> f64 {
    if whole > 0 {
        part as f64 / whole as f64
    } else {
        0.0
    }
}

fn histogram() -> Histogram<u32> {
    // Microseconds up to an hour at 3 significant digits; u32 counts keep each histogram small.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

struct ClassStats {
    offered: u64,
    started: u64,
    good: u64,
    rejected: u64,
    timeout: u64,
    error: u64,
    busy_ns: u64,
    wasted_ns: u64,
    cut_ns: u64,
    latency: Histogram<u32>,
}

impl ClassStats {
    fn new() -> Self {
        ClassStats {
            offered: 0,
            started: 0,
            good: 0,
            rejected: 0,
            timeout: 0,
            error: 0,
            busy_ns: 0,
            wasted_ns: 0,
            cut_ns: 0,
            latency: histogram(),
        }
    }
}

struct PhaseStats {
    classes: Vec<ClassStats>,
    limit_ns: f64,
    max_queue: usize,
}

struct Window {
    end: u64,
    good: u64,
    latency: Histogram<u32>,
    limit_ns: f64,
    in_flight_ns: f64,
    max_queue: usize,
    max_backend_queue: usize,
}

/// Everything a run measures. Time is in nanoseconds since the start of the run.
pub(crate) struct Recorder {
    phase_ends: Vec<u64>,
    window_ns: u64,
    phases: Vec<PhaseStats>,
    give_up: Vec<u64>,
    cursor: u64,
    phase: usize,
    limit: Option<usize>,
    queue: Option<usize>,
    in_flight: usize,
    backend_queue: usize,
    window: Window,
    series: Vec<SeriesPoint>,
    attempts: u64,
    /// Backend work under way, by slot: at most one slot per worker plus the free ones in `free_slots`. Work
    /// still under way when the report is taken counts up to the end of the run.
    in_service: Vec<Option<InService>>,
    free_slots: Vec<usize>,
}

/// Backend work under way on a request.
#[derive(Clone, Copy)]
struct InService {
    start: u64,
    id: u32,
    class: usize,
}

impl Recorder {
    pub(crate) fn new(phase_ends: Vec<u64>, classes: usize, window_ns: u64) -> Self {
        let phases = phase_ends
            .iter()
            .map(|_| PhaseStats {
                classes: (0..classes).map(|_| ClassStats::new()).collect(),
                limit_ns: 0.0,
                max_queue: 0,
            })
            .collect();
        Recorder {
            phase_ends,
            window_ns,
            phases,
            give_up: Vec::new(),
            cursor: 0,
            phase: 0,
            limit: None,
            queue: None,
            in_flight: 0,
            backend_queue: 0,
            window: Window {
                end: window_ns,
                good: 0,
                latency: histogram(),
                limit_ns: 0.0,
                in_flight_ns: 0.0,
                max_queue: 0,
                max_backend_queue: 0,
            },
            series: Vec::new(),
            attempts: 0,
            in_service: Vec::new(),
            free_slots: Vec::new(),
        }
    }

    fn end(&self) -> u64 {
        *self.phase_ends.last().expect("at least one phase")
    }

    /// The phase at `t`, `None` after the end.
    pub(crate) fn phase_at(&self, t: u64) -> Option<usize> {
        let i = self.phase_ends.partition_point(|&end| end <= t);
        (i < self.phase_ends.len()).then_some(i)
    }

    /// Moves the clock to `now`, integrating the time-weighted figures over the elapsed stretch.
    fn advance(&mut self, now: u64) {
        let end = self.end();
        while self.cursor < now.min(end) {
            let next = now.min(self.phase_ends[self.phase]).min(self.window.end);
            let dt = (next - self.cursor) as f64;
            if let Some(limit) = self.limit {
                self.phases[self.phase].limit_ns += limit as f64 * dt;
                self.window.limit_ns += limit as f64 * dt;
            }
            self.window.in_flight_ns += self.in_flight as f64 * dt;
            self.cursor = next;
            if next == self.phase_ends[self.phase] {
                self.phase += 1;
            }
            if next == self.window.end || next == end {
                self.flush_window();
            }
        }
    }

    fn flush_window(&mut self) {
        let start = self.window.end - self.window_ns;
        let len = (self.cursor - start) as f64;
        let w = &mut self.window;
        self.series.push(SeriesPoint {
            t_s: start as f64 / 1e9,
            goodput_rps: w.good as f64 / (len / 1e9),
            p99_ms: (w.good > 0).then(|| w.latency.value_at_quantile(0.99) as f64 / 1e3),
            limit: self.limit.map(|_| w.limit_ns / len),
            in_flight: w.in_flight_ns / len,
            queue_depth: self.queue.map(|_| w.max_queue),
            backend_queue: w.max_backend_queue,
        });
        w.end += self.window_ns;
        w.good = 0;
        w.latency.reset();
        w.limit_ns = 0.0;
        w.in_flight_ns = 0.0;
        w.max_queue = self.queue.unwrap_or(0);
        w.max_backend_queue = self.backend_queue;
    }

    /// Takes new readings of the stack's probes at `now`.
    pub(crate) fn sample(&mut self, now: u64, limit: Option<usize>, queue: Option<usize>) {
        self.advance(now);
        self.limit = limit;
        self.queue = queue;
        if let (Some(q), Some(phase)) = (queue, self.phases.get_mut(self.phase)) {
            phase.max_queue = phase.max_queue.max(q);
            self.window.max_queue = self.window.max_queue.max(q);
        }
    }

    /// A client issues request `id` (ids are consecutive from 0); returns its phase.
    pub(crate) fn issue(&mut self, now: u64, id: u32, class: usize) -> usize {
        debug_assert_eq!(self.give_up.len(), id as usize);
        self.give_up.push(NEVER);
        let phase = self.phase_at(now).unwrap_or(self.phases.len() - 1);
        self.phases[phase].classes[class].offered += 1;
        phase
    }

    pub(crate) fn attempt_started(&mut self, now: u64) {
        self.advance(now);
        self.in_flight += 1;
        self.attempts += 1;
    }

    pub(crate) fn attempt_ended(&mut self, now: u64) {
        self.advance(now);
        self.in_flight -= 1;
    }

    /// The client of request `id` is done with it: any backend work on it from now on is wasted.
    pub(crate) fn finish(
        &mut self,
        now: u64,
        id: u32,
        class: usize,
        phase: usize,
        verdict: Verdict,
        latency_ns: u64,
    ) {
        self.advance(now);
        self.give_up[id as usize] = now;
        let stats = &mut self.phases[phase].classes[class];
        match verdict {
            Verdict::Good => {
                stats.good += 1;
                let us = latency_ns.div_ceil(1000).max(1);
                stats.latency.saturating_record(us);
                if now < self.end() {
                    self.window.good += 1;
                    self.window.latency.saturating_record(us);
                }
            }
            Verdict::Rejected => stats.rejected += 1,
            Verdict::Error => stats.error += 1,
            Verdict::Timeout => stats.timeout += 1,
        }
    }

    pub(crate) fn backend_enqueued(&mut self) {
        self.backend_queue += 1;
        self.window.max_backend_queue = self.window.max_backend_queue.max(self.backend_queue);
    }

    pub(crate) fn backend_dequeued(&mut self) {
        self.backend_queue -= 1;
    }

    /// The backend starts work on request `id` at `now`; returns the slot to end it with.
    pub(crate) fn service_started(&mut self, now: u64, id: u32, class: usize) -> usize {
        if let Some(phase) = self.phase_at(now) {
            self.phases[phase].classes[class].started += 1;
        }
        let work = Some(InService {
            start: now,
            id,
            class,
        });
        match self.free_slots.pop() {
            Some(slot) => {
                self.in_service[slot] = work;
                slot
            }
            None => {
                self.in_service.push(work);
                self.in_service.len() - 1
            }
        }
    }

    /// The backend's work in `slot` ended at `end`, `finished` or cut off before it was done.
    pub(crate) fn service_ended(&mut self, slot: usize, end: u64, finished: bool) {
        let Some(work) = self.in_service.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        self.busy(work, end, !finished);
    }

    /// The backend worked on a request from its start to `end`: splits that busy time over the phases, counts as
    /// wasted the part after the client was done with the request, and as cut all of it if it was `cut` off.
    fn busy(&mut self, work: InService, end: u64, cut: bool) {
        let InService { start, id, class } = work;
        let give_up = self.give_up.get(id as usize).copied().unwrap_or(NEVER);
        let Some(mut phase) = self.phase_at(start) else {
            return;
        };
        let mut t = start;
        while t < end && phase < self.phases.len() {
            let seg_end = end.min(self.phase_ends[phase]);
            let stats = &mut self.phases[phase].classes[class];
            stats.busy_ns += seg_end - t;
            stats.wasted_ns += seg_end.saturating_sub(give_up.max(t));
            if cut {
                stats.cut_ns += seg_end - t;
            }
            t = seg_end;
            phase += 1;
        }
    }

    /// The rows and series of the finished run.
    pub(crate) fn report(
        mut self,
        scenario: &Scenario,
        strategy: &str,
    ) -> (Vec<Row>, Vec<SeriesPoint>, u64, u64) {
        let end = self.end();
        self.advance(end);
        // Work still under way (the backend busy on a request its client gave up on, say) was busy time all the
        // same, up to the end of the run; its guard, dropped with the runtime, finds no recorder.
        for work in std::mem::take(&mut self.in_service).into_iter().flatten() {
            self.busy(work, end, false);
        }
        let has_limit = self.limit.is_some();
        let has_queue = self.queue.is_some();
        let mut backend = (scenario.backend.service, scenario.backend.error_rate);
        let mut rows = Vec::new();
        let mut requests = 0;
        let class_names: Vec<&str> = if scenario.classes.is_empty() {
            vec!["default"]
        } else {
            scenario.classes.iter().map(|c| c.name.as_str()).collect()
        };
        for (phase, stats) in scenario.phases.iter().zip(&self.phases) {
            if let Some(service) = phase.backend.as_ref().and_then(|b| b.service) {
                backend.0 = service;
            }
            let duration = phase.duration_s;
            let capacity = scenario.backend.workers as f64 * 1000.0 / backend.0.mean_ms();
            let mean_limit = has_limit.then(|| stats.limit_ns / (duration * 1e9));
            let max_queue = has_queue.then_some(stats.max_queue);
            let mut all = ClassStats::new();
            for c in &stats.classes {
                all.offered += c.offered;
                all.started += c.started;
                all.good += c.good;
                all.rejected += c.rejected;
                all.timeout += c.timeout;
                all.error += c.error;
                all.busy_ns += c.busy_ns;
                all.wasted_ns += c.wasted_ns;
                all.cut_ns += c.cut_ns;
                all.latency.add(&c.latency).expect("same histogram bounds");
            }
            requests += all.offered;
            let row = |name: &str, c: &ClassStats| {
                let rate = |n: u64| n as f64 / duration;
                let quantile =
                    |q: f64| (c.good > 0).then(|| c.latency.value_at_quantile(q) as f64 / 1e3);
                Row {
                    scenario: scenario.name.clone(),
                    strategy: strategy.to_owned(),
                    phase: phase.name.clone(),
                    class: name.to_owned(),
                    duration_s: duration,
                    capacity_rps: capacity,
                    offered_rps: rate(c.offered),
                    backend_rps: rate(c.started),
                    goodput_rps: rate(c.good),
                    rejected_rps: rate(c.rejected),
                    timeout_rps: rate(c.timeout),
                    error_rps: rate(c.error),
                    availability: (c.offered > 0).then(|| c.good as f64 / c.offered as f64),
                    p50_ms: quantile(0.5),
                    p99_ms: quantile(0.99),
                    wasted_work: share(c.wasted_ns, c.busy_ns),
                    cut_work: share(c.cut_ns, c.busy_ns),
                    mean_limit,
                    max_queue_depth: max_queue,
                }
            };
            rows.push(row("all", &all));
            for (name, c) in class_names.iter().zip(&stats.classes) {
                rows.push(row(name, c));
            }
        }
        (rows, self.series, requests, self.attempts)
    }
}
