//! The engine: a paused current-thread runtime, the open-loop clients and the backend.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp1, StandardNormal};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::ServiceExt;

use super::record::{Recorder, Verdict};
use super::report::Report;
use super::strategy::{Probes, Stack, Strategy};
use super::{
    Arrivals, Scenario, ScenarioError, ServiceTime, SimBody, SimResponseBody, SimService,
    PRIORITY_HEADER, WINDOW,
};
use crate::core::{BoxError, Deadline};

/// What the backend needs to know about a request, carried in its extensions.
#[derive(Debug, Clone, Copy)]
struct Demand {
    id: u32,
    class: u16,
    normal: f64,
    exp: f64,
    uniform: f64,
}

impl Default for Demand {
    // A request that did not come from a simulated client (a layer built its own): average work, no failure,
    // no give-up tracking.
    fn default() -> Self {
        Demand {
            id: u32::MAX,
            class: 0,
            normal: 0.0,
            exp: 1.0,
            uniform: 1.0,
        }
    }
}

struct Shared {
    start: Instant,
    backend: Vec<(u64, ServiceTime, f64)>,
    workers: Semaphore,
    /// `None` once the report is taken: tasks still running then (orphaned attempts) are dropped with the
    /// runtime, and their guards must find nothing to update.
    recorder: Mutex<Option<Recorder>>,
    probes: OnceLock<Probes>,
    /// tokio catches a panic in a task and carries on; a run with a lost request must not pass as sound.
    panicked: AtomicBool,
    /// Service time sampled but not yet slept, in nanoseconds (negative: slept ahead); see [`Shared::work_time`].
    carry: AtomicI64,
}

impl Shared {
    fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos() as u64
    }

    /// How long a worker sleeps for a sampled service time.
    ///
    /// tokio's timer fires on whole milliseconds and rounds every sleep up to the next one, which would add about
    /// half a millisecond to every service (5 % of a 10 ms mean) and leave the backend short of the capacity the
    /// scenario declares. So the worked time is rounded to whole milliseconds by error diffusion instead: each
    /// sleep takes on what earlier ones left over, and total busy time equals total sampled time to within 1 ms.
    /// Deterministic, as the order in which workers start is.
    fn work_time(&self, sampled: Duration) -> Duration {
        const MS: i64 = 1_000_000;
        let sampled = i64::try_from(sampled.as_nanos()).unwrap_or(i64::MAX / 2);
        let owed = sampled.saturating_add(self.carry.load(Ordering::Relaxed));
        let slept = ((owed + MS / 2).div_euclid(MS) * MS).max(0);
        self.carry.store(owed - slept, Ordering::Relaxed);
        Duration::from_nanos(slept as u64)
    }

    fn record<T: Default>(&self, f: impl FnOnce(&mut Recorder) -> T) -> T {
        // Only one thread ever touches a run; a poisoned lock means a layer panicked mid-run, and the figures
        // recorded so far are still sound.
        let mut guard: MutexGuard<'_, _> = self.recorder.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().map(f).unwrap_or_default()
    }

    fn sample(&self, now: u64) {
        let probes = self.probes.get();
        let limit = probes.and_then(|p| p.limit.as_ref()).map(|f| f());
        let queue = probes.and_then(|p| p.queue_depth.as_ref()).map(|f| f());
        self.record(|r| r.sample(now, limit, queue));
    }

    fn backend_at(&self, t: u64) -> (ServiceTime, f64) {
        let i = self.backend.partition_point(|&(from, _, _)| from <= t);
        let (_, service, error_rate) = self.backend[i.saturating_sub(1)];
        (service, error_rate)
    }
}

/// Runs `scenario` against a registered strategy.
pub fn run(scenario: &Scenario, strategy: &Strategy) -> Result<Report, ScenarioError> {
    run_stack(scenario, strategy.name, strategy.build)
}

/// Runs `scenario` against the stack `build` makes around the backend; `name` labels the report.
///
/// The run happens on a fresh current-thread tokio runtime with paused time on the calling thread, so it takes
/// a fraction of the simulated time and the same scenario and seed give the same report. Call it from
/// synchronous code (a plain `#[test]`, a thread, `spawn_blocking`), not from inside a runtime; independent runs
/// can go on separate threads in parallel. Fails only when the scenario is invalid.
///
/// # Panics
///
/// If the stack panics while serving a request (tokio would otherwise swallow it, and the request would be
/// missing from the report).
pub fn run_stack<F>(scenario: &Scenario, name: &str, build: F) -> Result<Report, ScenarioError>
where
    F: FnOnce(SimService, &Scenario) -> Stack,
{
    scenario.validate()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| ScenarioError::runtime(&scenario.name, e))?;
    let report = runtime.block_on(simulate(scenario, name, build));
    Ok(report)
}

async fn simulate<F>(scenario: &Scenario, name: &str, build: F) -> Report
where
    F: FnOnce(SimService, &Scenario) -> Stack,
{
    let mut ends = Vec::with_capacity(scenario.phases.len());
    let mut backend = Vec::new();
    let mut elapsed = 0.0;
    let (mut service, mut error_rate) = (scenario.backend.service, scenario.backend.error_rate);
    for phase in &scenario.phases {
        let from = secs_to_ns(elapsed);
        if let Some(change) = &phase.backend {
            service = change.service.unwrap_or(service);
            error_rate = change.error_rate.unwrap_or(error_rate);
        }
        backend.push((from, service, error_rate));
        elapsed += phase.duration_s;
        ends.push(secs_to_ns(elapsed));
    }
    let classes = scenario.classes.len().max(1);
    let shared = Arc::new(Shared {
        start: Instant::now(),
        backend,
        workers: Semaphore::new(scenario.backend.workers),
        recorder: Mutex::new(Some(Recorder::new(ends, classes, WINDOW.as_nanos() as u64))),
        probes: OnceLock::new(),
        panicked: AtomicBool::new(false),
        carry: AtomicI64::new(0),
    });

    let backend_shared = shared.clone();
    let backend = SimService::new(tower::service_fn(move |request| {
        serve(backend_shared.clone(), request)
    }));
    let stack = build(backend, scenario);
    let client_side = stack.client_side;
    let service = stack.service;
    shared.probes.set(stack.probes).expect("probes set once");
    shared.sample(0);

    generate(&shared, scenario, &service, client_side).await;

    let longest = scenario
        .classes
        .iter()
        .filter_map(|c| c.timeout_ms)
        .chain([scenario.client.timeout_ms])
        .max()
        .unwrap_or(0);
    // Every client has given up or finished by then, so every issued request has its verdict.
    let settle = shared.start + scenario.duration() + Duration::from_millis(longest + 1);
    tokio::time::sleep_until(settle).await;

    assert!(
        !shared.panicked.load(Ordering::Relaxed),
        "the stack under test panicked while serving a request in scenario `{}`",
        scenario.name
    );
    let recorder = shared
        .recorder
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .expect("the report is taken once");
    let (rows, series, requests, attempts) = recorder.report(scenario, name);
    Report {
        scenario: scenario.name.clone(),
        strategy: name.to_owned(),
        seed: scenario.seed,
        rows,
        series,
        requests,
        attempts,
    }
}

fn secs_to_ns(secs: f64) -> u64 {
    (secs * 1e9).round() as u64
}

/// Per-class client settings.
struct ClassSpec {
    priority: HeaderValue,
    timeout: Duration,
}

/// The open-loop load generator: Poisson arrivals whose rate is piecewise linear in time.
async fn generate(
    shared: &Arc<Shared>,
    scenario: &Scenario,
    service: &SimService,
    client_side: bool,
) {
    let specs: Vec<ClassSpec> = if scenario.classes.is_empty() {
        vec![ClassSpec {
            priority: HeaderValue::from_static(super::Priority::Critical.as_str()),
            timeout: Duration::from_millis(scenario.client.timeout_ms),
        }]
    } else {
        scenario
            .classes
            .iter()
            .map(|c| ClassSpec {
                priority: HeaderValue::from_static(c.priority.as_str()),
                timeout: Duration::from_millis(c.timeout_ms.unwrap_or(scenario.client.timeout_ms)),
            })
            .collect()
    };
    let specs = Arc::new(specs);
    let schedule = Schedule::new(scenario);
    let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
    // Phases are half-open: an arrival at the very end would belong to no phase.
    let end = secs_to_ns(scenario.phases.iter().map(|p| p.duration_s).sum());
    let mut sleep = pin!(tokio::time::sleep_until(shared.start));
    let mut t = 0.0;
    let mut phase = 0;
    let mut id: u32 = 0;
    loop {
        let hazard: f64 = match scenario.client.arrivals {
            Arrivals::Poisson => Exp1.sample(&mut rng),
            Arrivals::Uniform => 1.0,
        };
        let Some((next, next_phase)) = schedule.next_arrival(t, phase, hazard) else {
            break;
        };
        if secs_to_ns(next) >= end {
            break;
        }
        t = next;
        phase = next_phase;
        let at = shared.start + Duration::from_nanos(secs_to_ns(t));
        sleep.as_mut().reset(at);
        sleep.as_mut().await;
        let class = schedule.pick_class(phase, rng.random::<f64>());
        let now = shared.now();
        let issue_phase = shared.record(|r| r.issue(now, id, class));
        shared.sample(now);
        tokio::spawn(client(
            shared.clone(),
            service.clone(),
            specs.clone(),
            Pending {
                id,
                class,
                phase: issue_phase,
                issued: Instant::now(),
                seed: scenario.seed,
                attempt: 0,
                deadline: match (scenario.client.send_deadline, client_side) {
                    (false, _) => SendDeadline::No,
                    (true, false) => SendDeadline::Header,
                    (true, true) => SendDeadline::Scope,
                },
                cancel_on_timeout: scenario.client.cancel_on_timeout,
                retries: scenario.client.retries,
            },
        ));
        id = id.checked_add(1).expect("fewer than 2^32 requests per run");
    }
}

struct Pending {
    id: u32,
    class: usize,
    phase: usize,
    issued: Instant,
    seed: u64,
    attempt: u32,
    deadline: SendDeadline,
    cancel_on_timeout: bool,
    retries: u32,
}

/// How a client tells the stack its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendDeadline {
    /// Not at all.
    No,
    /// As a remote client does: the remaining budget in a `grpc-timeout` header.
    Header,
    /// As a handler calling a client-side stack does: current around the call.
    Scope,
}

/// One client request: attempts until success, a final failure or the deadline.
async fn client(
    shared: Arc<Shared>,
    service: SimService,
    specs: Arc<Vec<ClassSpec>>,
    mut req: Pending,
) {
    let _watch = PanicWatch(&shared);
    let spec = &specs[req.class];
    let deadline = req.issued + spec.timeout;
    let mut retries = req.retries;
    let mut service = Some(service);
    let verdict = loop {
        let request = build_request(&mut req, spec, deadline);
        let this_attempt = if retries == 0 {
            service.take()
        } else {
            service.clone()
        };
        let this_attempt = this_attempt.expect("a service is kept while retries remain");
        let scope = (req.deadline == SendDeadline::Scope).then_some(Deadline::at(deadline));
        let mut attempt = pin!(attempt(&shared, this_attempt, request, scope));
        match tokio::time::timeout_at(deadline, attempt.as_mut()).await {
            Ok(Verdict::Good) => break Verdict::Good,
            Ok(verdict) if retries == 0 || Instant::now() >= deadline => break verdict,
            Ok(_) => retries -= 1,
            Err(_) => {
                let now = Instant::now();
                let latency = (now - req.issued).as_nanos() as u64;
                let at = shared.now();
                shared.record(|r| {
                    r.finish(at, req.id, req.class, req.phase, Verdict::Timeout, latency)
                });
                if !req.cancel_on_timeout {
                    // Across a real network the server does not notice that the client left.
                    attempt.await;
                }
                return;
            }
        }
    };
    let latency = (Instant::now() - req.issued).as_nanos() as u64;
    let at = shared.now();
    shared.record(|r| r.finish(at, req.id, req.class, req.phase, verdict, latency));
}

fn build_request(req: &mut Pending, spec: &ClassSpec, deadline: Instant) -> http::Request<SimBody> {
    // Each attempt draws its demand from its own place in its request's own stream, so its work is the same
    // whatever the strategy does and whatever other requests drew. Built per attempt rather than kept in the
    // task, whose size every spawn copies.
    let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
    rng.set_stream(u64::from(req.id) + 1);
    rng.set_word_pos(u128::from(req.attempt) * ATTEMPT_WORDS);
    req.attempt += 1;
    let demand = Demand {
        id: req.id,
        class: req.class as u16,
        normal: StandardNormal.sample(&mut rng),
        exp: Exp1.sample(&mut rng),
        uniform: rng.random::<f64>(),
    };
    let mut request = http::Request::new(SimBody::new());
    request
        .headers_mut()
        .insert(PRIORITY_HEADER, spec.priority.clone());
    if req.deadline == SendDeadline::Header {
        let remaining = deadline.saturating_duration_since(Instant::now());
        request
            .headers_mut()
            .insert("grpc-timeout", grpc_timeout(remaining));
    }
    request.extensions_mut().insert(demand);
    request
}

/// Words of the RNG stream reserved per attempt: far more than three draws ever take.
const ATTEMPT_WORDS: u128 = 64;

/// Encodes a `grpc-timeout` value as the simulated clients send it: at most 8 digits and a unit, in milliseconds
/// (or the first of seconds, minutes and hours that fits), rounded down so the server never believes it has more
/// time than the client gives it. Coarser than the finest unit the protocol allows (the crate's own
/// [`encode_grpc_timeout`](crate::deadline::codec::encode_grpc_timeout) picks that); kept so, since every
/// scenario figure was measured with it.
fn grpc_timeout(budget: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ms = budget.as_millis();
    let (value, unit) = if ms <= MAX {
        (ms, 'm')
    } else if ms / 1000 <= MAX {
        (ms / 1000, 'S')
    } else if ms / 60_000 <= MAX {
        (ms / 60_000, 'M')
    } else {
        ((ms / 3_600_000).min(MAX), 'H')
    };
    HeaderValue::try_from(format!("{value}{unit}"))
        .expect("digits and a unit letter are a valid header value")
}

/// One attempt through the stack, the response body read to its end; the call made under `scope` if given.
async fn attempt(
    shared: &Shared,
    service: SimService,
    request: http::Request<SimBody>,
    scope: Option<Deadline>,
) -> Verdict {
    let _in_flight = InFlight::enter(shared);
    let call = service.oneshot(request);
    let answer = match scope {
        Some(deadline) => probed_after_call(shared, deadline.scope(call)).await,
        None => probed_after_call(shared, call).await,
    };
    let response = match answer {
        Ok(response) => response,
        Err(_) => return Verdict::Rejected,
    };
    let verdict = classify(&response);
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return Verdict::Error;
        }
    }
    verdict
}

/// Runs a call through the stack, reading the stack's probes right after its first poll: that poll calls the
/// stack (`oneshot` does once the stack is ready), where the request joins a queue or takes a permit, and the
/// depth or limit it leaves must be seen before anything else happens (the next event may be an answer that
/// lets a waiting request in, and the deepest queue would go unseen).
async fn probed_after_call<F: Future>(shared: &Shared, call: F) -> F::Output {
    let mut call = pin!(call);
    let mut called = false;
    std::future::poll_fn(|cx| {
        let poll = call.as_mut().poll(cx);
        if !called {
            called = true;
            shared.sample(shared.now());
        }
        poll
    })
    .await
}

fn classify(response: &Response<SimResponseBody>) -> Verdict {
    match response.status() {
        StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::TOO_MANY_REQUESTS
        | StatusCode::GATEWAY_TIMEOUT => Verdict::Rejected,
        // Any other refusal (400, 408, 500, ...) did not serve the request: not goodput.
        status if status.is_client_error() || status.is_server_error() => Verdict::Error,
        // gRPC-mode layers answer trailers-only with HTTP 200 and the status in the headers.
        _ => match response
            .headers()
            .get("grpc-status")
            .map(HeaderValue::as_bytes)
        {
            None | Some(b"0") => Verdict::Good,
            Some(b"4" | b"8" | b"14") => Verdict::Rejected,
            Some(_) => Verdict::Error,
        },
    }
}

/// Notes a panic unwinding through a client task.
struct PanicWatch<'a>(&'a Shared);

impl Drop for PanicWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// Counts an attempt inside the stack until it ends or is dropped.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.now();
        shared.record(|r| r.attempt_started(now));
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let now = self.0.now();
        self.0.record(|r| r.attempt_ended(now));
        self.0.sample(now);
    }
}

/// The backend: waits for a worker in FIFO order, works for the request's service time, answers 200 or 500.
/// Dropping the future leaves the queue or frees the worker at once, as a cancelled server handler does.
fn serve(
    shared: Arc<Shared>,
    request: http::Request<SimBody>,
) -> impl Future<Output = Result<Response<SimResponseBody>, BoxError>> {
    // Only the demand crosses into the future: a queued request then costs a few hundred bytes less.
    let demand = request
        .extensions()
        .get::<Demand>()
        .copied()
        .unwrap_or_default();
    async move {
        // Released permits go straight to waiters, so a free one means nobody is queued: FIFO holds.
        let _worker = match shared.workers.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let _queued = Queued::enter(&shared);
                shared.workers.acquire().await?
            }
        };
        let start = shared.now();
        let (service, error_rate) = shared.backend_at(start);
        let slot =
            shared.record(|r| r.service_started(start, demand.id, usize::from(demand.class)));
        let mut busy = Busy {
            shared: &shared,
            slot,
            finished: false,
        };
        tokio::time::sleep(shared.work_time(service.sample(demand.normal, demand.exp))).await;
        busy.finished = true;
        let mut response = Response::new(SimResponseBody::default());
        if demand.uniform < error_rate {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        Ok(response)
    }
}

struct Queued<'a>(&'a Shared);

impl<'a> Queued<'a> {
    fn enter(shared: &'a Shared) -> Self {
        shared.record(Recorder::backend_enqueued);
        Queued(shared)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.record(Recorder::backend_dequeued);
    }
}

/// Records the backend's busy time on drop, whether the work completed or was cancelled.
struct Busy<'a> {
    shared: &'a Shared,
    /// The work's slot in the recorder.
    slot: usize,
    /// Whether the work was done; dropped before, it was cut off.
    finished: bool,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let end = self.shared.now();
        let (slot, finished) = (self.slot, self.finished);
        self.shared.record(|r| r.service_ended(slot, end, finished));
    }
}

/// Arrival rates over time.
struct Schedule {
    /// Per phase: start (s), end (s), rate at start, slope (per s²), cumulative class weights.
    phases: Vec<(f64, f64, f64, f64, Vec<f64>)>,
}

impl Schedule {
    fn new(scenario: &Scenario) -> Self {
        let classes = scenario.classes.len().max(1);
        let mut start = 0.0;
        let phases = scenario
            .phases
            .iter()
            .map(|p| {
                let end = start + p.duration_s;
                let (rate, slope, weights) = match (&p.rps, &p.class_rps) {
                    (_, Some(rates)) => {
                        let weights: Vec<f64> = scenario
                            .classes
                            .iter()
                            .map(|c| rates.get(&c.name).copied().unwrap_or(0.0))
                            .collect();
                        (weights.iter().sum(), 0.0, weights)
                    }
                    (rps, None) => {
                        let rate = rps.unwrap_or(0.0);
                        let slope = p.rps_end.map_or(0.0, |e| (e - rate) / p.duration_s);
                        (rate, slope, vec![1.0; classes])
                    }
                };
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                let cumulative = weights
                    .iter()
                    .map(|w| {
                        acc += w / total.max(f64::MIN_POSITIVE);
                        acc
                    })
                    .collect();
                let phase = (start, end, rate, slope, cumulative);
                start = end;
                phase
            })
            .collect();
        Schedule { phases }
    }

    /// The first arrival after `t` (seconds, in `phase`) given an exponential `hazard`: the instant at which the
    /// integral of the rate from `t` reaches `hazard`. Exact for piecewise linear rates.
    fn next_arrival(&self, mut t: f64, mut phase: usize, mut hazard: f64) -> Option<(f64, usize)> {
        while let Some(&(start, end, rate0, slope, _)) = self.phases.get(phase) {
            let rate = rate0 + slope * (t - start);
            let span = end - t;
            let available = rate * span + slope * span * span / 2.0;
            if available > hazard {
                let dt = if slope.abs() < 1e-12 {
                    hazard / rate
                } else {
                    (-rate + (rate * rate + 2.0 * slope * hazard).max(0.0).sqrt()) / slope
                };
                return Some(((t + dt).min(end), phase));
            }
            hazard -= available.max(0.0);
            t = end;
            phase += 1;
        }
        None
    }

    fn pick_class(&self, phase: usize, u: f64) -> usize {
        let cumulative = &self.phases[phase].4;
        cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(cumulative.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_fits_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_micros(999)), "0m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(grpc_timeout(Duration::from_secs(u64::MAX / 4)), "99999999H");
    }

    #[test]
    fn only_an_answer_that_served_the_request_is_a_success() {
        use http_body_util::BodyExt;
        let answer = |status: u16, grpc: Option<&str>| {
            let mut response = Response::new(String::new().map_err(|e| match e {}).boxed_unsync());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(code) = grpc {
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from_str(code).unwrap());
            }
            classify(&response)
        };
        for status in [200, 204, 304] {
            assert_eq!(answer(status, None), Verdict::Good, "{status}");
        }
        for status in [429, 503, 504] {
            assert_eq!(answer(status, None), Verdict::Rejected, "{status}");
        }
        for status in [400, 404, 408, 500, 502] {
            assert_eq!(answer(status, None), Verdict::Error, "{status}");
        }
        assert_eq!(answer(200, Some("0")), Verdict::Good);
        assert_eq!(answer(200, Some("14")), Verdict::Rejected);
        assert_eq!(answer(200, Some("13")), Verdict::Error);
    }
}
