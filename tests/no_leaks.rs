//! "Nothing ever leaks": for every layer, in each reject mode, every way a request can leave (its future dropped
//! before or after a poll, while queued, a panic in `call` or in the future, a body dropped at any point or ending
//! in an error, readiness taken and never used) gives back what it took (in-flight counts, queue places, probe
//! slots, an inner service's reserved readiness) and records exactly one outcome per admission.
//!
//! Everything runs in paused time on the test's current-thread runtime, with a seeded generator where there is
//! chance; the one real-socket test waits on conditions, never on the clock.
#![cfg(all(feature = "http", feature = "grpc"))]

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};
use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::{BoxError, Deadline, Event, Outcome, Reason};
use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
use tower_backpressure::queue::QueueLayer;
use tower_backpressure::rate::RateLimitLayer;

// ---------------------------------------------------------------------------------------------------------------
// The backend: a service told by each request (an extension) how to answer.

/// What the backend does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmd {
    /// Answers at once: 200, `grpc-status: 0` in the head, an empty body.
    Answer,
    /// Answers 200 at once with a body the test feeds (see [`Backend::feed`]); no `grpc-status` in the head.
    Stream,
    /// Answers with this status and an empty body.
    Status(u16),
    /// Never answers.
    Hang,
    /// Answers (as `Answer`) after this many milliseconds.
    Sleep(u64),
    /// Fails with an error of its own.
    Fail,
    /// Panics in `call`.
    PanicInCall,
    /// Panics at the first poll of its future.
    PanicInPoll,
    /// Panics at the second poll of its future, after a pending one.
    PanicAfterPending,
    /// Yields to the runtime this many times, then answers (as `Answer`).
    Yield(u32),
    /// Answers 200 at once with a body of this many data frames a millisecond apart, then trailers
    /// (`grpc-status: 0`), fed by a task of its own that stops when the body is dropped.
    Drip(u32),
}

type Item = Result<Frame<Bytes>, BoxError>;
type Feed = mpsc::UnboundedSender<Item>;

/// A response body fed through a channel; the default one is empty (and says so).
#[derive(Default)]
struct ChanBody(Option<mpsc::UnboundedReceiver<Item>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        match self.0.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

#[derive(Clone, Default)]
struct Backend {
    feeds: Arc<Mutex<VecDeque<Feed>>>,
}

impl Backend {
    /// The feed of the oldest streamed response not yet fed.
    fn feed(&self) -> Feed {
        self.feeds
            .lock()
            .unwrap()
            .pop_front()
            .expect("a streamed response")
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<()>> for Backend {
    type Response = Response<ChanBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ChanBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let cmd = request
            .extensions()
            .get::<Cmd>()
            .copied()
            .unwrap_or(Cmd::Answer);
        assert!(cmd != Cmd::PanicInCall, "the inner call panics");
        let feeds = self.feeds.clone();
        Box::pin(async move {
            match cmd {
                Cmd::Hang => std::future::pending::<()>().await,
                Cmd::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Cmd::Yield(n) => {
                    for _ in 0..n {
                        tokio::task::yield_now().await;
                    }
                }
                Cmd::Fail => return Err("the backend failed".into()),
                Cmd::PanicInPoll => panic!("the inner future panics"),
                Cmd::PanicAfterPending => {
                    tokio::task::yield_now().await;
                    panic!("the inner future panics after a pending poll")
                }
                _ => {}
            }
            Ok(match cmd {
                Cmd::Stream => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    feeds.lock().unwrap().push_back(tx);
                    Response::new(ChanBody(Some(rx)))
                }
                Cmd::Drip(frames) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        for _ in 0..frames {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            if tx.send(data("drip")).is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(trailers("0"));
                    });
                    Response::new(ChanBody(Some(rx)))
                }
                Cmd::Status(code) => {
                    let mut response = Response::new(ChanBody::default());
                    *response.status_mut() = StatusCode::from_u16(code).unwrap();
                    response
                }
                _ => {
                    let mut response = Response::new(ChanBody::default());
                    response
                        .headers_mut()
                        .insert("grpc-status", HeaderValue::from_static("0"));
                    response
                }
            })
        })
    }
}

fn req(cmd: Cmd) -> Request<()> {
    let mut request = Request::new(());
    request.extensions_mut().insert(cmd);
    request
}

fn data(s: &'static str) -> Item {
    Ok(Frame::data(Bytes::from_static(s.as_bytes())))
}

fn trailers(grpc_status: &'static str) -> Item {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(grpc_status));
    Ok(Frame::trailers(t))
}

// ---------------------------------------------------------------------------------------------------------------
// What a layer reports.

/// The events one layer reported.
#[derive(Default)]
struct Log(Mutex<Vec<Event>>);

impl Log {
    /// What `pick` takes from each event reported, in order.
    fn collect<T>(&self, pick: impl FnMut(&Event) -> Option<T>) -> Vec<T> {
        self.0.lock().unwrap().iter().filter_map(pick).collect()
    }

    fn admitted(&self) -> usize {
        self.collect(|e| matches!(e, Event::Admitted { .. }).then_some(()))
            .len()
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.collect(|e| match e {
            Event::Completed { outcome, .. } => Some(*outcome),
            _ => None,
        })
    }

    fn rejections(&self) -> Vec<Reason> {
        self.collect(|e| match e {
            Event::Rejected { reason, .. } => Some(*reason),
            _ => None,
        })
    }
}

fn observer(log: &Arc<Log>) -> impl Fn(&Event) + Send + Sync + 'static {
    let log = log.clone();
    move |event: &Event| log.0.lock().unwrap().push(*event)
}

/// What a layer holds for requests under way: its in-flight count, and in `queued` its queue depth (queue layer)
/// or its half-open probes out (breaker).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Gauges {
    in_flight: usize,
    queued: usize,
}

type Gauge = Box<dyn Fn() -> Gauges>;

type Res = Response<UnsyncBoxBody<Bytes, BoxError>>;
type Svc = BoxCloneService<Request<()>, Res, BoxError>;

fn boxed<S, B>(svc: S) -> Svc
where
    S: Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneService::new(
        svc.map_response(|r: Response<B>| r.map(|b| b.map_err(Into::into).boxed_unsync()))
            .map_err(Into::into),
    )
}

// ---------------------------------------------------------------------------------------------------------------
// One layer over an inner service, in one mode.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Adaptive,
    Queue,
    Breaker,
    BreakerReadiness,
    Deadline,
    Propagate,
    Rate,
    Pressure,
}

const KINDS: [Kind; 8] = [
    Kind::Adaptive,
    Kind::Queue,
    Kind::Breaker,
    Kind::BreakerReadiness,
    Kind::Deadline,
    Kind::Propagate,
    Kind::Rate,
    Kind::Pressure,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Error,
    Http,
    Grpc,
}

const MODES: [Mode; 3] = [Mode::Error, Mode::Http, Mode::Grpc];

struct Rig {
    name: String,
    svc: Svc,
    log: Arc<Log>,
    gauges: Gauge,
    /// Whether the layer admits with a permit (all but the rate limiter, which only counts).
    permits: bool,
}

/// Builds `$builder` in `$mode`, layers it over `$inner`: the boxed service and the layer's handle.
macro_rules! moded {
    ($mode:expr, $builder:expr, $inner:expr) => {{
        let builder = $builder;
        match $mode {
            Mode::Error => {
                let layer = builder.build().unwrap();
                (boxed(layer.layer($inner)), layer.handle())
            }
            Mode::Http => {
                let layer = builder.http().build().unwrap();
                (boxed(layer.layer($inner)), layer.handle())
            }
            Mode::Grpc => {
                let layer = builder.grpc().build().unwrap();
                (boxed(layer.layer($inner)), layer.handle())
            }
        }
    }};
}

/// A gauge reading `$handle` as `$gauges`.
macro_rules! gauge {
    (|$handle:ident| $gauges:expr, $h:expr) => {{
        let $handle = $h;
        Box::new(move || $gauges) as Gauge
    }};
    // A layer that queues nothing: its snapshot's in-flight figure alone.
    (in_flight $h:expr) => {
        gauge!(
            |h| Gauges {
                in_flight: h.snapshot().in_flight,
                queued: 0
            },
            $h
        )
    };
}

/// Requests through the propagating layer carry a deadline (it has nothing to do without one).
fn with_deadline(mut request: Request<()>) -> Request<()> {
    request
        .extensions_mut()
        .insert(Deadline::after(Duration::from_secs(60)));
    request
}

fn rig<S>(kind: Kind, mode: Mode, inner: S) -> Rig
where
    S: Service<Request<()>, Response = Response<ChanBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let log = Arc::new(Log::default());
    let obs = observer(&log);
    let (svc, gauges) = match kind {
        Kind::Adaptive => {
            let builder = AdaptiveConcurrencyLayer::builder()
                .initial_limit(4)
                .observer(obs);
            let (svc, h) = moded!(mode, builder, inner);
            let gauges = gauge!(in_flight h);
            (svc, gauges)
        }
        Kind::Queue => {
            let builder = QueueLayer::builder()
                .limit(4usize)
                .max_depth(8)
                .max_wait(Duration::from_secs(10))
                .observer(obs);
            let (svc, h) = moded!(mode, builder, inner);
            let gauges = gauge!(
                |h| {
                    let s = h.snapshot();
                    Gauges {
                        in_flight: s.in_flight,
                        queued: s.depth,
                    }
                },
                h
            );
            (svc, gauges)
        }
        Kind::Breaker | Kind::BreakerReadiness => {
            let builder = CircuitBreakerLayer::builder()
                .count_window(100)
                .minimum_calls(100)
                .readiness_mode(kind == Kind::BreakerReadiness)
                .observer(obs);
            let (svc, h) = moded!(mode, builder, inner);
            let gauges = gauge!(
                |h| {
                    let s = h.snapshot();
                    Gauges {
                        in_flight: s.in_flight,
                        queued: s.probes_admitted as usize,
                    }
                },
                h
            );
            (svc, gauges)
        }
        Kind::Deadline => {
            let builder = DeadlineLayer::builder()
                .max_timeout(Duration::from_secs(60))
                .observer(obs);
            let (svc, h) = moded!(mode, builder, inner);
            let gauges = gauge!(in_flight h);
            (svc, gauges)
        }
        Kind::Propagate => {
            let builder = PropagateDeadlineLayer::builder().observer(obs);
            let (svc, h) = moded!(mode, builder, inner);
            let gauges = gauge!(in_flight h);
            (BoxCloneService::new(svc.map_request(with_deadline)), gauges)
        }
        Kind::Rate => {
            let builder = RateLimitLayer::builder()
                .rate(1_000_000, Duration::from_secs(1))
                .burst(10_000)
                .observer(obs);
            let (svc, _h) = moded!(mode, builder, inner);
            (svc, Box::new(Gauges::default) as Gauge)
        }
        Kind::Pressure => {
            // A monitor that is not running never reports pressure: every request is admitted.
            let monitor = RuntimeMonitor::builder()
                .max_lag(Duration::from_millis(50), Duration::from_millis(10))
                .build()
                .unwrap();
            let builder = PressureLayer::builder(&monitor).observer(obs);
            let (svc, h) = moded!(mode, builder, inner);
            let gauges = gauge!(in_flight h);
            (svc, gauges)
        }
    };
    Rig {
        name: format!("{kind:?} in {mode:?} mode"),
        svc,
        log,
        gauges,
        permits: kind != Kind::Rate,
    }
}

impl Rig {
    /// The service, made ready.
    async fn ready(&mut self) -> &mut Svc {
        self.svc.ready().await.unwrap()
    }

    /// Asserts that nothing is held any more, that every admission recorded exactly one outcome, and that those
    /// were `expected` (none for a layer without permits), in order.
    fn assert_clean(&self, what: &str, expected: &[Outcome]) {
        let name = &self.name;
        assert_eq!((self.gauges)(), Gauges::default(), "{name}, {what}: gauges");
        let outcomes = self.log.outcomes();
        if self.permits {
            assert_eq!(outcomes, expected, "{name}, {what}: outcomes");
            assert_eq!(
                self.log.admitted(),
                outcomes.len(),
                "{name}, {what}: one outcome per admission"
            );
        } else {
            assert!(
                outcomes.is_empty(),
                "{name}, {what}: no permits, no outcomes"
            );
        }
    }

    /// Asserts that exactly `n` requests are held now (by a layer with permits).
    fn assert_holding(&self, what: &str, n: usize) {
        if self.permits {
            assert_eq!(
                (self.gauges)().in_flight,
                n,
                "{}, {what}: held while under way",
                self.name
            );
        }
    }
}

fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    future.poll_unpin(&mut Context::from_waker(&waker))
}

// ---------------------------------------------------------------------------------------------------------------
// 1 and 2: futures dropped, inner services that panic, errors and successes, in every layer and mode.

#[tokio::test(start_paused = true)]
async fn every_layer_releases_a_future_dropped_before_or_after_a_poll() {
    for polled in [false, true] {
        for kind in KINDS {
            for mode in MODES {
                let mut rig = rig(kind, mode, Backend::default());
                let mut future = rig.ready().await.call(req(Cmd::Hang));
                if polled {
                    assert!(poll_once(&mut future).is_pending());
                }
                rig.assert_holding("under way", 1);
                drop(future);
                rig.assert_clean(&format!("dropped (polled: {polled})"), &[Outcome::Ignored]);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_layer_releases_a_request_whose_inner_call_panics() {
    for kind in KINDS {
        for mode in MODES {
            let mut rig = rig(kind, mode, Backend::default());
            let svc = rig.ready().await;
            let unwound = catch_unwind(AssertUnwindSafe(|| drop(svc.call(req(Cmd::PanicInCall)))));
            assert!(unwound.is_err(), "the inner call panicked");
            rig.assert_clean("inner call panicked", &[Outcome::Failure]);
            // Still usable.
            let answered = rig.ready().await.call(req(Cmd::Answer)).await;
            assert!(answered.is_ok());
            rig.assert_clean(
                "answered after the panic",
                &[Outcome::Failure, Outcome::Success],
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_layer_records_a_panic_in_the_inner_future_as_a_failure() {
    for cmd in [Cmd::PanicInPoll, Cmd::PanicAfterPending] {
        for kind in KINDS {
            for mode in MODES {
                let mut rig = rig(kind, mode, Backend::default());
                let future = rig.ready().await.call(req(cmd));
                // The runtime drops a task's future while the panic unwinds.
                let joined = tokio::spawn(future).await;
                assert!(joined.unwrap_err().is_panic());
                rig.assert_clean(&format!("{cmd:?}"), &[Outcome::Failure]);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_layer_records_errors_failed_statuses_and_successes_once() {
    for kind in KINDS {
        for mode in MODES {
            let mut rig = rig(kind, mode, Backend::default());
            assert!(rig.ready().await.call(req(Cmd::Fail)).await.is_err());
            let answered = rig.ready().await.call(req(Cmd::Sleep(30))).await;
            drop(answered.unwrap());
            let expected = match mode {
                Mode::Error => vec![Outcome::Failure, Outcome::Success],
                Mode::Http | Mode::Grpc => {
                    // A 503 read by its head and dropped unread keeps the head's outcome.
                    let unavailable = rig.ready().await.call(req(Cmd::Status(503))).await;
                    drop(unavailable.unwrap());
                    vec![Outcome::Failure, Outcome::Success, Outcome::Dropped]
                }
            };
            rig.assert_clean("error, success, 503", &expected);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3: response bodies (HTTP and gRPC modes).

/// How a streamed body is left.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// Dropped before its first frame.
    Unread,
    /// Dropped after one data frame.
    HalfRead,
    /// Dropped right after its trailers (`grpc-status: 0`), not polled for its end.
    AfterTrailers,
    /// Trailers, then polled to its end.
    ReadThroughTrailers,
    /// One data frame, then the end of the stream, without trailers.
    ReadToTheEnd,
    /// One data frame, then an error frame.
    Error,
}

#[tokio::test(start_paused = true)]
async fn every_layer_holds_its_permit_until_the_body_is_done_and_releases_it_once() {
    use Leave::*;
    for leave in [
        Unread,
        HalfRead,
        AfterTrailers,
        ReadThroughTrailers,
        ReadToTheEnd,
        Error,
    ] {
        for kind in KINDS {
            for mode in [Mode::Http, Mode::Grpc] {
                let backend = Backend::default();
                let mut rig = rig(kind, mode, backend.clone());
                let response = rig.ready().await.call(req(Cmd::Stream)).await.unwrap();
                assert_eq!(response.status(), 200);
                let feed = backend.feed();
                let mut body = response.into_body();
                rig.assert_holding(&format!("{leave:?}: head out"), 1);
                let what = format!("{leave:?}");
                let expected = match leave {
                    Unread => Outcome::Ignored,
                    HalfRead => {
                        feed.send(data("first")).unwrap();
                        assert!(body.frame().await.unwrap().unwrap().is_data());
                        rig.assert_holding(&what, 1);
                        Outcome::Ignored
                    }
                    AfterTrailers | ReadThroughTrailers => {
                        feed.send(data("first")).unwrap();
                        feed.send(trailers("0")).unwrap();
                        assert!(body.frame().await.unwrap().unwrap().is_data());
                        assert!(body.frame().await.unwrap().unwrap().is_trailers());
                        if let ReadThroughTrailers = leave {
                            drop(feed);
                            assert!(body.frame().await.is_none());
                        }
                        Outcome::Success
                    }
                    ReadToTheEnd => {
                        feed.send(data("first")).unwrap();
                        drop(feed);
                        assert!(body.frame().await.unwrap().unwrap().is_data());
                        assert!(body.frame().await.is_none());
                        // gRPC: a stream that ends without a status is a failure.
                        match mode {
                            Mode::Grpc => Outcome::Failure,
                            _ => Outcome::Success,
                        }
                    }
                    Error => {
                        feed.send(data("first")).unwrap();
                        feed.send(Err("the stream broke".into())).unwrap();
                        assert!(body.frame().await.unwrap().unwrap().is_data());
                        assert!(body.frame().await.unwrap().is_err());
                        Outcome::Failure
                    }
                };
                drop(body);
                rig.assert_clean(&what, &[expected]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 4: readiness taken and never used.

#[tokio::test(start_paused = true)]
async fn readiness_taken_and_dropped_without_a_call_reserves_nothing() {
    for kind in KINDS {
        for mode in MODES {
            // The inner service reserves capacity in `poll_ready`, as tower's `Buffer` and `ConcurrencyLimit` do.
            let inner = tower::limit::ConcurrencyLimitLayer::new(1).layer(Backend::default());
            let rig = rig(kind, mode, inner);
            for _ in 0..3 {
                let mut idle = rig.svc.clone();
                idle.ready().await.unwrap();
                drop(idle);
            }
            // Then a call through a fresh clone: ready at once, admitted once, released once.
            let mut other = rig.svc.clone();
            let ready = poll_once(&mut std::future::poll_fn(|cx| other.poll_ready(cx)));
            assert!(
                matches!(ready, Poll::Ready(Ok(()))),
                "{}: the inner service's readiness was given back",
                rig.name
            );
            let answered = other.call(req(Cmd::Answer)).await;
            assert!(answered.is_ok());
            rig.assert_clean("readiness dropped, then one call", &[Outcome::Success]);
            assert_eq!(rig.log.admitted(), usize::from(rig.permits));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_breaker_in_readiness_mode_dropped_while_blocked_holds_nothing() {
    for mode in MODES {
        let log = Arc::new(Log::default());
        let layer = CircuitBreakerLayer::builder()
            .count_window(2)
            .minimum_calls(2)
            .readiness_mode(true)
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_secs(1))
            .jitter(0.0)
            .observer(observer(&log));
        let (mut svc, h) = moded!(mode, layer, Backend::default());
        let gauges = move || {
            let s = h.snapshot();
            (s.in_flight, s.probes_admitted, s.state)
        };
        for _ in 0..2 {
            let _ = svc.ready().await.unwrap().call(req(Cmd::Fail)).await;
        }
        assert_eq!(gauges().2, tower_backpressure::core::CircuitState::Open);
        // Blocked: pending readiness, then dropped.
        let mut blocked = svc.clone();
        assert!(poll_once(&mut std::future::poll_fn(|cx| blocked.poll_ready(cx))).is_pending());
        drop(blocked);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Half-open: a probe's readiness taken and dropped takes no probe.
        let mut probe = svc.clone();
        probe.ready().await.unwrap();
        drop(probe);
        let (in_flight, probes, _) = gauges();
        assert_eq!((in_flight, probes), (0, 0), "{mode:?}");
        // The probe that is sent closes it.
        svc.ready()
            .await
            .unwrap()
            .call(req(Cmd::Answer))
            .await
            .unwrap();
        let (in_flight, _, state) = gauges();
        assert_eq!(
            (in_flight, state),
            (0, tower_backpressure::core::CircuitState::Closed),
            "{mode:?}"
        );
        assert_eq!(log.admitted(), log.outcomes().len());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 1 (queue): requests dropped while queued, timed out, handed a slot they never collect, or whose inner call
// panics once they get their slot.

fn queue_rig<S>(mode: Mode, inner: S) -> (Svc, tower_backpressure::queue::QueueHandle, Arc<Log>)
where
    S: Service<Request<()>, Response = Response<ChanBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let log = Arc::new(Log::default());
    let builder = QueueLayer::builder()
        .limit(1usize)
        .max_depth(8)
        .max_wait(Duration::from_secs(1))
        // Plain FIFO with a fixed wait: who gets a slot is up to the test.
        .codel(false)
        .adaptive_lifo(false)
        .observer(observer(&log));
    let (svc, handle) = moded!(mode, builder, inner);
    (svc, handle, log)
}

#[tokio::test(start_paused = true)]
async fn the_queue_gives_back_every_place_and_slot_whatever_its_waiters_do() {
    for mode in MODES {
        let (mut svc, handle, log) = queue_rig(mode, Backend::default());
        let depth = || handle.snapshot().depth;
        let mut holder = svc.ready().await.unwrap().call(req(Cmd::Hang));
        assert!(poll_once(&mut holder).is_pending());

        // Dropped while queued, before its first poll and after one.
        let queued = svc.ready().await.unwrap().call(req(Cmd::Hang));
        assert_eq!(depth(), 1, "{mode:?}");
        drop(queued);
        assert_eq!(depth(), 0, "{mode:?}");
        let mut queued = svc.ready().await.unwrap().call(req(Cmd::Hang));
        assert!(poll_once(&mut queued).is_pending());
        drop(queued);
        assert_eq!(depth(), 0, "{mode:?}");

        // Timed out in the queue.
        let timed_out = svc.ready().await.unwrap().call(req(Cmd::Answer));
        let answer = timed_out.await;
        match mode {
            Mode::Error => assert!(answer.is_err()),
            Mode::Http => assert_eq!(answer.unwrap().status(), 503),
            Mode::Grpc => assert_eq!(answer.unwrap().headers()["grpc-status"], "14"),
        }

        // Handed the slot, then dropped before collecting it: the slot goes on to the next in line.
        let unclaimed = svc.ready().await.unwrap().call(req(Cmd::Answer));
        let mut next = svc.ready().await.unwrap().call(req(Cmd::PanicInCall));
        assert!(poll_once(&mut next).is_pending());
        let last = svc.ready().await.unwrap().call(req(Cmd::Answer));
        assert_eq!(depth(), 3, "{mode:?}");
        drop(holder);
        drop(unclaimed);
        // Granted, then its inner call panics: the permit it just got goes back, and the last waiter gets it.
        let joined = tokio::spawn(next).await;
        assert!(joined.unwrap_err().is_panic(), "{mode:?}");
        last.await.unwrap();

        let s = handle.snapshot();
        assert_eq!((s.in_flight, s.depth), (0, 0), "{mode:?}");
        assert_eq!((s.cancelled, s.rejected_queue_timeout), (3, 1), "{mode:?}");
        assert_eq!(s.admitted, s.completed, "{mode:?}");
        assert_eq!(
            s.completed, 3,
            "{mode:?}: the holder, the panicking call and the last"
        );
        assert_eq!(
            log.outcomes(),
            [Outcome::Ignored, Outcome::Failure, Outcome::Success],
            "{mode:?}"
        );
        assert_eq!(log.admitted(), 3, "{mode:?}");
        assert_eq!(log.rejections(), [Reason::QueueTimeout], "{mode:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_dropped_gives_back_the_readiness_it_carried() {
    for mode in MODES {
        // The queue hands a queued request the inner service polled ready for it: that readiness (here a
        // `ConcurrencyLimit` permit) must go when the request does.
        let inner = tower::limit::ConcurrencyLimitLayer::new(2).layer(Backend::default());
        let (mut svc, handle, log) = queue_rig(mode, inner);
        let mut holder = svc.ready().await.unwrap().call(req(Cmd::Hang));
        assert!(poll_once(&mut holder).is_pending());
        for poll_first in [false, true] {
            let mut queued = svc.ready().await.unwrap().call(req(Cmd::Hang));
            if poll_first {
                assert!(poll_once(&mut queued).is_pending());
            }
            drop(queued);
            let mut fresh = svc.clone();
            let ready = poll_once(&mut std::future::poll_fn(|cx| fresh.poll_ready(cx)));
            assert!(
                matches!(ready, Poll::Ready(Ok(()))),
                "{mode:?}: the dropped request kept the inner service's readiness"
            );
        }
        drop(holder);
        svc.ready()
            .await
            .unwrap()
            .call(req(Cmd::Answer))
            .await
            .unwrap();
        let s = handle.snapshot();
        assert_eq!((s.in_flight, s.depth, s.cancelled), (0, 0, 2), "{mode:?}");
        assert_eq!(log.outcomes(), [Outcome::Ignored, Outcome::Success]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 5: stacks, with deadlines expiring mid-flight, mid-queue and mid-body.

/// A stack of layers over a backend: the service, each layer's log, and every gauge by name.
struct Stack {
    svc: Svc,
    logs: Vec<(&'static str, Arc<Log>)>,
    gauges: Box<dyn Fn() -> Vec<(&'static str, usize)>>,
}

impl Stack {
    fn log(&self, name: &str) -> &Log {
        &self.logs.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Asserts that every gauge is back to zero and every admission recorded exactly one outcome.
    fn assert_clean(&self, what: &str) {
        for (name, value) in (self.gauges)() {
            assert_eq!(value, 0, "{what}: {name}");
        }
        for (name, log) in &self.logs {
            assert_eq!(
                log.admitted(),
                log.outcomes().len(),
                "{what}: {name}: one outcome per admission"
            );
        }
    }
}

macro_rules! in_mode {
    (Error, $builder:expr) => {
        $builder
    };
    (Http, $builder:expr) => {
        $builder.http()
    };
    (Grpc, $builder:expr) => {
        $builder.grpc()
    };
}

/// Deadline (`timeout` for every request) → Queue (limit from the limiter; CoDel if `codel`) → Adaptive (limit
/// `limit`) → backend.
macro_rules! server_stack {
    ($m:ident, $backend:expr, $timeout:expr, $limit:expr, $codel:expr) => {{
        let logs: Vec<(&'static str, Arc<Log>)> = ["deadline", "queue", "adaptive"]
            .into_iter()
            .map(|n| (n, Arc::new(Log::default())))
            .collect();
        let limiter = in_mode!(
            $m,
            AdaptiveConcurrencyLayer::builder()
                .initial_limit($limit)
                .min_limit(1)
                .max_limit(1000)
                .observer(observer(&logs[2].1))
        )
        .build()
        .unwrap();
        let queue = in_mode!(
            $m,
            QueueLayer::builder()
                .limit(limiter.handle())
                .max_depth(200)
                .max_wait(Duration::from_secs(10))
                .codel($codel)
                .observer(observer(&logs[1].1))
        )
        .build()
        .unwrap();
        let deadline = in_mode!(
            $m,
            DeadlineLayer::builder()
                .max_timeout($timeout)
                .observer(observer(&logs[0].1))
        )
        .build()
        .unwrap();
        let (d, q, a) = (deadline.handle(), queue.handle(), limiter.handle());
        let svc = boxed(deadline.layer(queue.layer(limiter.layer($backend))));
        Stack {
            svc,
            logs,
            gauges: Box::new(move || {
                let qs = q.snapshot();
                vec![
                    ("deadline in flight", d.snapshot().in_flight),
                    ("queue in flight", qs.in_flight),
                    ("queue depth", qs.depth),
                    ("adaptive in flight", a.snapshot().in_flight),
                ]
            }),
        }
    }};
}

/// PropagateDeadline → Breaker → Adaptive (limit `limit`) → backend; requests carry a deadline `timeout` away.
macro_rules! client_stack {
    ($m:ident, $backend:expr, $timeout:expr, $limit:expr) => {{
        let logs: Vec<(&'static str, Arc<Log>)> = ["propagate", "breaker", "adaptive"]
            .into_iter()
            .map(|n| (n, Arc::new(Log::default())))
            .collect();
        let limiter = in_mode!(
            $m,
            AdaptiveConcurrencyLayer::builder()
                .initial_limit($limit)
                .observer(observer(&logs[2].1))
        )
        .build()
        .unwrap();
        let breaker = in_mode!(
            $m,
            CircuitBreakerLayer::builder()
                .count_window(1000)
                .minimum_calls(1000)
                .observer(observer(&logs[1].1))
        )
        .build()
        .unwrap();
        let propagate = in_mode!(
            $m,
            PropagateDeadlineLayer::builder().observer(observer(&logs[0].1))
        )
        .build()
        .unwrap();
        let (p, b, a) = (propagate.handle(), breaker.handle(), limiter.handle());
        let timeout: Duration = $timeout;
        let svc = boxed(propagate.layer(breaker.layer(limiter.layer($backend))));
        let svc = BoxCloneService::new(svc.map_request(move |mut r: Request<()>| {
            r.extensions_mut().insert(Deadline::after(timeout));
            r
        }));
        Stack {
            svc,
            logs,
            gauges: Box::new(move || {
                let bs = b.snapshot();
                vec![
                    ("propagate in flight", p.snapshot().in_flight),
                    ("breaker in flight", bs.in_flight),
                    ("breaker probes", bs.probes_admitted as usize),
                    ("adaptive in flight", a.snapshot().in_flight),
                ]
            }),
        }
    }};
}

fn server(mode: Mode, backend: Backend, timeout: Duration, limit: usize, codel: bool) -> Stack {
    match mode {
        Mode::Error => server_stack!(Error, backend, timeout, limit, codel),
        Mode::Http => server_stack!(Http, backend, timeout, limit, codel),
        Mode::Grpc => server_stack!(Grpc, backend, timeout, limit, codel),
    }
}

fn client(mode: Mode, backend: Backend, timeout: Duration, limit: usize) -> Stack {
    match mode {
        Mode::Error => client_stack!(Error, backend, timeout, limit),
        Mode::Http => client_stack!(Http, backend, timeout, limit),
        Mode::Grpc => client_stack!(Grpc, backend, timeout, limit),
    }
}

/// The server stack (no CoDel) or the client stack in `mode`, both with a deadline of `timeout` and a limit of 1,
/// and the label for assertions.
fn either_stack(
    mode: Mode,
    server_side: bool,
    backend: Backend,
    timeout: Duration,
) -> (Stack, String) {
    let (stack, side) = if server_side {
        (server(mode, backend, timeout, 1, false), "server")
    } else {
        (client(mode, backend, timeout, 1), "client")
    };
    (stack, format!("{mode:?}, {side}"))
}

/// Whether `answer` says the deadline was exceeded, in `mode`.
fn deadline_exceeded(mode: Mode, answer: &Result<Res, BoxError>) -> bool {
    match (mode, answer) {
        (Mode::Error, Err(e)) => e.is::<tower_backpressure::core::error::DeadlineExceeded>(),
        (Mode::Http, Ok(r)) => r.status() == 504,
        (Mode::Grpc, Ok(r)) => r.headers().get("grpc-status").is_some_and(|s| s == "4"),
        _ => false,
    }
}

#[tokio::test(start_paused = true)]
async fn stacks_give_everything_back_when_the_deadline_passes_in_flight_or_in_the_queue() {
    for mode in MODES {
        for server_side in [true, false] {
            let timeout = Duration::from_millis(100);
            let (mut stack, what) = either_stack(mode, server_side, Backend::default(), timeout);
            // The first runs into its deadline in flight; the second, on the server, waits in the queue behind
            // it until its own deadline passes (on the client the limiter refuses it at once).
            let first = stack.svc.ready().await.unwrap().call(req(Cmd::Hang));
            let second = stack.svc.ready().await.unwrap().call(req(Cmd::Hang));
            let (first, second) = (tokio::spawn(first), tokio::spawn(second));
            let first = first.await.unwrap();
            let second = second.await.unwrap();
            assert!(deadline_exceeded(mode, &first), "{what}: first");
            stack.assert_clean(&what);
            let outer = if server_side { "deadline" } else { "propagate" };
            assert_eq!(
                stack.log("adaptive").outcomes(),
                [Outcome::Dropped],
                "{what}"
            );
            if server_side {
                assert!(deadline_exceeded(mode, &second), "{what}: second");
                // The queue admitted only the first; the second left it refused at its deadline.
                assert_eq!(stack.log("queue").outcomes(), [Outcome::Dropped], "{what}");
                assert_eq!(
                    stack.log("queue").rejections(),
                    [Reason::DeadlineExceeded],
                    "{what}"
                );
            } else {
                // The limiter refused the second at once: a local refusal, ignored by the breaker.
                assert_eq!(
                    stack.log("breaker").outcomes(),
                    [Outcome::Ignored, Outcome::Dropped],
                    "{what}"
                );
            }
            // Both were admitted by the outermost layer, and each recorded one outcome; the first's is the expiry.
            // (The second's answer is a refusal from a layer inside, which it records as such.)
            let outcomes = stack.log(outer).outcomes();
            assert_eq!(outcomes.len(), 2, "{what}");
            assert!(outcomes.contains(&Outcome::Dropped), "{what}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn stacks_give_everything_back_when_the_deadline_cuts_a_body() {
    for mode in [Mode::Http, Mode::Grpc] {
        for server_side in [true, false] {
            let backend = Backend::default();
            let timeout = Duration::from_millis(100);
            let (mut stack, what) = either_stack(mode, server_side, backend.clone(), timeout);
            let response = stack
                .svc
                .ready()
                .await
                .unwrap()
                .call(req(Cmd::Stream))
                .await
                .unwrap();
            let feed = backend.feed();
            let mut body = response.into_body();
            feed.send(data("first")).unwrap();
            assert!(body.frame().await.unwrap().unwrap().is_data());
            for (name, value) in (stack.gauges)() {
                if name.ends_with("in flight") {
                    assert_eq!(value, 1, "{what}: {name} while the body is read");
                }
            }
            // Nothing more comes: the deadline cuts the body.
            let last = body.frame().await.unwrap();
            match mode {
                Mode::Http => assert!(last.is_err(), "{what}"),
                _ => {
                    let trailers = last.unwrap().into_trailers().unwrap();
                    assert_eq!(trailers["grpc-status"], "4", "{what}");
                }
            }
            assert!(feed.is_closed(), "{what}: the inner body went with the cut");
            drop(body);
            stack.assert_clean(&what);
            for (name, log) in &stack.logs {
                assert_eq!(log.outcomes(), [Outcome::Dropped], "{what}: {name}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 6: many requests at once, leaving in every way at random.

/// splitmix64: a seeded generator, enough to pick plans.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// How a caller leaves its request.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Reads the answer to its end.
    ReadAll,
    /// Drops the response future before polling it.
    DropAtOnce,
    /// Gives up after this many milliseconds (a client timeout), wherever the request is then.
    GiveUpAfter(u64),
    /// Reads the head and one frame, then drops the body.
    ReadOne,
}

/// A random request: its command and `grpc-timeout`, and how its caller leaves it.
fn random_request(rng: &mut Rng) -> (Request<()>, Plan) {
    let cmd = match rng.below(10) {
        0 => Cmd::Answer,
        1 => Cmd::Hang,
        2 => Cmd::Fail,
        3 => Cmd::Status(503),
        4 => Cmd::PanicInCall,
        5 => Cmd::PanicInPoll,
        6 => Cmd::PanicAfterPending,
        7 => Cmd::Drip(1 + rng.below(5) as u32),
        _ => Cmd::Sleep(rng.below(80)),
    };
    let mut request = req(cmd);
    let timeout = format!("{}m", 5 + rng.below(300));
    request
        .headers_mut()
        .insert("grpc-timeout", HeaderValue::from_str(&timeout).unwrap());
    let plan = match rng.below(4) {
        0 => Plan::ReadAll,
        1 => Plan::DropAtOnce,
        2 => Plan::GiveUpAfter(rng.below(150)),
        _ => Plan::ReadOne,
    };
    (request, plan)
}

/// Sends `request` through `svc` and leaves it as `plan` says.
async fn send(mut svc: Svc, request: Request<()>, plan: Plan) {
    let future = svc.ready().await.unwrap().call(request);
    match plan {
        Plan::ReadAll => {
            if let Ok(response) = future.await {
                let _ = response.into_body().collect().await;
            }
        }
        Plan::DropAtOnce => drop(future),
        Plan::GiveUpAfter(ms) => {
            let read_all = async {
                if let Ok(response) = future.await {
                    let _ = response.into_body().collect().await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(ms), read_all).await;
        }
        Plan::ReadOne => {
            if let Ok(response) = future.await {
                let _ = response.into_body().frame().await;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_requests_leaving_at_random_leave_nothing_behind() {
    for mode in MODES {
        for server_side in [true, false] {
            let what = format!(
                "{mode:?}, {}",
                if server_side { "server" } else { "client" }
            );
            let stack = if server_side {
                server(mode, Backend::default(), Duration::from_secs(60), 20, true)
            } else {
                client(mode, Backend::default(), Duration::from_millis(200), 50)
            };
            let mut rng = Rng(0x5EED ^ mode as u64 ^ u64::from(server_side));
            let mut tasks = Vec::new();
            for _ in 0..1000 {
                let (request, plan) = random_request(&mut rng);
                let start = Duration::from_millis(rng.below(100));
                let svc = stack.svc.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(start).await;
                    send(svc, request, plan).await;
                }));
            }
            let mut panicked = 0;
            for task in tasks {
                if task.await.is_err() {
                    panicked += 1;
                }
            }
            assert!(panicked > 0, "{what}: some inner services panicked");
            stack.assert_clean(&what);
            let outer = stack.logs[0].1.outcomes();
            for outcome in [
                Outcome::Success,
                Outcome::Failure,
                Outcome::Dropped,
                Outcome::Ignored,
            ] {
                assert!(outer.contains(&outcome), "{what}: some {outcome:?}");
            }
        }
    }
}

/// The same on a multi-thread runtime with a limit high enough that the limiter parks tokens per thread, and
/// without timers: the counts must come back to zero however the threads interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_on_two_threads_leave_nothing_behind() {
    for mode in [Mode::Http, Mode::Error] {
        let stack = server(
            mode,
            Backend::default(),
            Duration::from_secs(600),
            512,
            false,
        );
        let mut rng = Rng(0xD1CE ^ mode as u64);
        let mut tasks = Vec::new();
        for _ in 0..2000 {
            let cmd = match rng.below(5) {
                0 => Cmd::Answer,
                1 => Cmd::Fail,
                2 => Cmd::PanicInPoll,
                _ => Cmd::Yield(rng.below(20) as u32),
            };
            let polls = rng.below(4);
            let mut svc = stack.svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut future = svc.ready().await.unwrap().call(req(cmd));
                // Polled a few times, or not at all, then dropped unless it answered.
                for _ in 0..polls {
                    if let Poll::Ready(answer) = poll_once(&mut future) {
                        if let Ok(response) = answer {
                            let _ = response.into_body().collect().await;
                        }
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        stack.assert_clean(&format!("{mode:?}, two threads"));
        assert_eq!(stack.logs[0].1.admitted(), 2000, "{mode:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A real socket: hyper serving the server stack over loopback, clients that hang up.

/// Waits until `done` holds, yielding to the runtime (which polls the sockets between yields); the timeout only
/// guards against a hang.
async fn until(what: &str, done: impl Fn() -> bool) {
    within(what, async {
        while !done() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// `future`'s output; a failure naming `what` instead of a hang if the socket never delivers it.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), future).await {
        Ok(output) => output,
        Err(_) => panic!("never happened: {what}"),
    }
}

/// A bare HTTP/1 connection to `addr` sending `GET path`: the response (or the pending request) and the
/// connection's task, which hangs up when aborted.
async fn get(
    addr: std::net::SocketAddr,
    path: &str,
) -> (
    tokio::task::JoinHandle<Result<Response<hyper::body::Incoming>, hyper::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(socket);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(path)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(request).await });
    (response, connection)
}

#[tokio::test]
async fn clients_that_hang_up_over_a_real_socket_leave_nothing_behind() {
    let backend = Backend::default();
    let stack = server(
        Mode::Http,
        backend.clone(),
        Duration::from_secs(600),
        1,
        false,
    );
    let svc = tower::ServiceBuilder::new()
        .map_request(|request: Request<hyper::body::Incoming>| {
            let cmd = match request.uri().path() {
                "/stream" => Cmd::Stream,
                _ => Cmd::Hang,
            };
            req(cmd)
        })
        .service(stack.svc.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Local tasks: the compiler cannot prove the connection future of a boxed service `Send` (its `dyn Error`
    // bounds are higher-ranked), and the test needs no second thread.
    let local = tokio::task::LocalSet::new();
    let server = local.spawn_local(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::task::spawn_local(async move {
                let io = hyper_util::rt::TokioIo::new(socket);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    let gauge = |name: &str| {
        (stack.gauges)()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    };

    local
        .run_until(async {
            // One client streams a response and holds the only slot...
            let (streaming, streaming_connection) = within("connected", get(addr, "/stream")).await;
            let response = within("the streaming head", streaming)
                .await
                .unwrap()
                .unwrap();
            let feed = backend.feed();
            let mut body = response.into_body();
            feed.send(data("first")).unwrap();
            let first = within("the first frame", body.frame()).await;
            assert!(first.unwrap().unwrap().is_data());
            assert_eq!(gauge("adaptive in flight"), 1);

            // ...a second waits in the queue behind it, and hangs up there.
            let (queued, queued_connection) = within("connected", get(addr, "/hang")).await;
            until("the second request is queued", || gauge("queue depth") == 1).await;
            queued_connection.abort();
            queued.abort();
            until("the queued request's place is given back", || {
                gauge("queue depth") == 0 && gauge("deadline in flight") == 1
            })
            .await;

            // The first hangs up with its body half read.
            drop(body);
            streaming_connection.abort();
            until("the streaming request is released", || {
                (stack.gauges)().iter().all(|(_, value)| *value == 0)
            })
            .await;
            assert!(feed.is_closed(), "the handler's body was dropped");

            // A third is admitted, its handler never answers, and it hangs up before the head.
            let (pending, pending_connection) = within("connected", get(addr, "/hang")).await;
            until("the third request is admitted", || {
                gauge("adaptive in flight") == 1
            })
            .await;
            pending_connection.abort();
            pending.abort();
            until("the pending request is released", || {
                (stack.gauges)().iter().all(|(_, value)| *value == 0)
            })
            .await;

            server.abort();
        })
        .await;
    stack.assert_clean("real socket");
    assert_eq!(
        stack.log("queue").outcomes(),
        [Outcome::Ignored, Outcome::Ignored]
    );
    assert_eq!(
        stack.log("deadline").outcomes(),
        [Outcome::Ignored, Outcome::Ignored, Outcome::Ignored]
    );
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_whose_body_is_dropped_unread_gives_its_slot_back() {
    for mode in [Mode::Http, Mode::Grpc] {
        let backend = Backend::default();
        let log = Arc::new(Log::default());
        let builder = CircuitBreakerLayer::builder()
            .count_window(2)
            .minimum_calls(2)
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_secs(1))
            .jitter(0.0)
            .observer(observer(&log));
        let (mut svc, handle) = moded!(mode, builder, backend.clone());
        for _ in 0..2 {
            let _ = svc.ready().await.unwrap().call(req(Cmd::Status(500))).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The one probe answers with a streamed body, which the caller drops unread and half read.
        for read_one in [false, true] {
            let probe = svc.ready().await.unwrap().call(req(Cmd::Stream)).await;
            let mut body = probe.unwrap().into_body();
            let feed = backend.feed();
            assert_eq!(handle.snapshot().probes_admitted, 1, "{mode:?}");
            if read_one {
                feed.send(data("first")).unwrap();
                assert!(body.frame().await.unwrap().unwrap().is_data());
            }
            drop(body);
            let s = handle.snapshot();
            assert_eq!((s.in_flight, s.probes_admitted), (0, 0), "{mode:?}");
            assert_eq!(s.state, tower_backpressure::core::CircuitState::HalfOpen);
        }
        // The slot is there for the next probe, which closes the breaker.
        let answered = svc.ready().await.unwrap().call(req(Cmd::Answer)).await;
        drop(answered.unwrap());
        let s = handle.snapshot();
        assert_eq!(
            s.state,
            tower_backpressure::core::CircuitState::Closed,
            "{mode:?}"
        );
        assert_eq!(s.in_flight, 0, "{mode:?}");
        assert_eq!(log.admitted(), log.outcomes().len(), "{mode:?}");
    }
}
