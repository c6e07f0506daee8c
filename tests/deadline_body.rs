//! The deadline bounds the response body too (HTTP and gRPC modes), in paused time: a streamed body is cut at the
//! deadline, the deadline is current while the body is polled, and a body that ends in time passes unchanged.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, ServiceExt};
use tower_backpressure::core::error::DeadlineExceeded;
use tower_backpressure::core::{Deadline, Event, Outcome, TrackedBody};
use tower_backpressure::deadline::{
    DeadlineBody, DeadlineHandle, DeadlineLayer, PropagateDeadlineLayer,
};

type Streamed = UnsyncBoxBody<Bytes, Infallible>;

/// What the body producer saw and whether it was dropped (and under which deadline).
#[derive(Debug, Default)]
struct Producer {
    /// `Deadline::current()` at each frame made.
    current: Mutex<Vec<Option<Deadline>>>,
    dropped: AtomicBool,
    current_at_drop: Mutex<Option<Deadline>>,
}

struct Guard(Arc<Producer>);

impl Drop for Guard {
    fn drop(&mut self) {
        *self.0.current_at_drop.lock().unwrap() = Deadline::current();
        self.0.dropped.store(true, Ordering::SeqCst);
    }
}

/// A body of `frames` data frames (forever with `None`), one every `period` (all ready at once for a zero period),
/// then, if given, `trailers`.
fn ticking(
    period: Duration,
    frames: Option<usize>,
    trailers: Option<HeaderMap>,
    producer: Arc<Producer>,
) -> Streamed {
    let guard = Guard(producer);
    let data = stream::unfold((0usize, guard), move |(n, guard)| async move {
        if frames == Some(n) {
            return None;
        }
        if !period.is_zero() {
            tokio::time::sleep(period).await;
        }
        guard.0.current.lock().unwrap().push(Deadline::current());
        Some((
            Ok(Frame::data(Bytes::from(format!("{n};")))),
            (n + 1, guard),
        ))
    });
    let end = stream::iter(trailers.map(|t| Ok(Frame::trailers(t))));
    StreamBody::new(data.chain(end)).boxed_unsync()
}

type Handler = BoxCloneService<Request<()>, Response<Streamed>, Infallible>;

/// A handler answering at once with a [`ticking`] body, and what its bodies' producers saw.
fn handler(
    period: Duration,
    frames: Option<usize>,
    trailers: Option<HeaderMap>,
) -> (Arc<Producer>, Handler) {
    let producer = Arc::new(Producer::default());
    let p = producer.clone();
    let handler = service_fn(move |_req: Request<()>| {
        let body = ticking(period, frames, trailers.clone(), p.clone());
        async move { Ok::<_, Infallible>(Response::new(body)) }
    });
    (producer, BoxCloneService::new(handler))
}

/// A handler whose body streams a frame a second for ever.
fn endless() -> (Arc<Producer>, Handler) {
    handler(Duration::from_secs(1), None, None)
}

fn with_timeout(value: &str) -> Request<()> {
    Request::builder()
        .header("grpc-timeout", value)
        .body(())
        .unwrap()
}

fn events() -> (
    Arc<Mutex<Vec<Event>>>,
    impl Fn(&Event) + Send + Sync + 'static,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    (log, move |e: &Event| sink.lock().unwrap().push(*e))
}

type Log = Arc<Mutex<Vec<Event>>>;

/// What the HTTP-mode server layer answers over a [`Handler`].
type Bounded = Response<TrackedBody<DeadlineBody<Streamed>>>;

/// The server layer in HTTP mode, its events logged, over [`endless`].
fn logged_http_over_endless() -> (
    Log,
    DeadlineHandle,
    Arc<Producer>,
    impl tower::Service<Request<()>, Response = Bounded, Error = Infallible>,
) {
    let (log, observer) = events();
    let layer = DeadlineLayer::builder()
        .http()
        .observer(observer)
        .build()
        .unwrap();
    let (producer, inner) = endless();
    (log, layer.handle(), producer, layer.layer(inner))
}

fn completed(log: &[Event]) -> Vec<(Outcome, Duration)> {
    log.iter()
        .filter_map(|e| match *e {
            Event::Completed {
                outcome, latency, ..
            } => Some((outcome, latency)),
            _ => None,
        })
        .collect()
}

/// Reads the next frame of `body`: trailers saying DEADLINE_EXCEEDED.
#[cfg(feature = "grpc")]
async fn assert_deadline_exceeded_trailers<B>(body: &mut B)
where
    B: Body + Unpin,
    B::Error: std::fmt::Debug,
{
    let frame = body.frame().await.expect("a frame").unwrap();
    let trailers = frame.into_trailers().ok().expect("trailers");
    assert_eq!(trailers["grpc-status"], "4");
    assert_eq!(trailers["grpc-message"], "deadline exceeded");
}

/// HTTP: a body streaming a frame a second under a 2.5 s deadline delivers two frames, then fails with
/// `DeadlineExceeded` at 2.5 s, when the producer is dropped; the layer records the request as `Dropped`.
#[tokio::test(start_paused = true)]
async fn http_a_streamed_body_is_cut_at_the_deadline() {
    let (log, handle, producer, service) = logged_http_over_endless();
    let start = Instant::now();
    let response = service.oneshot(with_timeout("2500m")).await.unwrap();
    let mut body = response.into_body();
    let deadline = body
        .get_ref()
        .deadline()
        .expect("the body has the request's deadline");
    assert_eq!(deadline.instant(), start + Duration::from_millis(2500));

    for n in 0..2 {
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), format!("{n};"));
    }
    assert!(!producer.dropped.load(Ordering::SeqCst));
    let error = body.frame().await.unwrap().unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
    assert!(
        producer.dropped.load(Ordering::SeqCst),
        "the producer is dropped at the deadline, not when the body is"
    );
    assert!(body.frame().await.is_none());
    assert!(body.is_end_stream());

    // The deadline was current while each frame was made, and while the producer was dropped.
    assert_eq!(*producer.current.lock().unwrap(), vec![Some(deadline); 2]);
    assert_eq!(*producer.current_at_drop.lock().unwrap(), Some(deadline));
    assert_eq!(
        completed(&log.lock().unwrap()),
        [(Outcome::Dropped, Duration::from_millis(2500))]
    );
    let snapshot = handle.snapshot();
    assert_eq!((snapshot.dropped, snapshot.in_flight), (1, 0));
}

/// gRPC: the same body ends with trailers `grpc-status: 4` (DEADLINE_EXCEEDED) instead of an error: a complete
/// response whose status says what happened.
#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_a_streamed_body_ends_with_deadline_exceeded_trailers() {
    let layer = DeadlineLayer::builder().grpc().build().unwrap();
    let (producer, inner) = endless();
    let service = layer.layer(inner);
    let start = Instant::now();
    let mut body = service
        .oneshot(with_timeout("2500m"))
        .await
        .unwrap()
        .into_body();
    for _ in 0..2 {
        assert!(body.frame().await.unwrap().unwrap().is_data());
    }
    assert_deadline_exceeded_trailers(&mut body).await;
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
    assert!(producer.dropped.load(Ordering::SeqCst));
    assert!(body.is_end_stream());
    assert!(body.frame().await.is_none());
    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.dropped, snapshot.in_flight), (1, 0));
}

/// A body whose frames are always ready (an iterator turned into a stream, read by a fast client) never waits, so
/// its timer cannot be armed on a wait: it is armed at its third frame, and the body is cut at its first poll after
/// the deadline. Without that, a server's maximum would never end such a stream.
#[tokio::test(start_paused = true)]
async fn a_body_that_never_waits_is_cut_at_the_deadline_too() {
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(1))
        .http()
        .build()
        .unwrap();
    let (producer, inner) = handler(Duration::ZERO, None, None);
    let service = layer.layer(inner);
    let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
    for _ in 0..3 {
        assert!(body.frame().await.unwrap().unwrap().is_data());
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    let error = body.frame().await.unwrap().unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert!(producer.dropped.load(Ordering::SeqCst));
    assert_eq!(layer.handle().snapshot().dropped, 1);
}

/// A body that ends before the deadline passes unchanged, trailers included, and counts as the classifier says: a
/// success for HTTP 200, and for gRPC what its own `grpc-status` says.
#[tokio::test(start_paused = true)]
async fn a_body_that_ends_in_time_passes_unchanged() {
    let mut ok = HeaderMap::new();
    ok.insert("grpc-status", "0".parse().unwrap());
    let mut unavailable = HeaderMap::new();
    unavailable.insert("grpc-status", "14".parse().unwrap());
    let http = DeadlineLayer::builder().http().build().unwrap();
    #[cfg(feature = "grpc")]
    let grpc = DeadlineLayer::builder().grpc().build().unwrap();

    let run = |trailers: HeaderMap| handler(Duration::from_secs(1), Some(2), Some(trailers));

    let (producer, handler) = run(ok.clone());
    let collected = http
        .layer(handler)
        .oneshot(with_timeout("5S"))
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(collected.trailers(), Some(&ok));
    assert_eq!(collected.to_bytes(), "0;1;");
    assert!(
        producer.dropped.load(Ordering::SeqCst),
        "the ended producer is dropped"
    );
    let snapshot = http.handle().snapshot();
    assert_eq!(
        (snapshot.admitted, snapshot.dropped, snapshot.in_flight),
        (1, 0, 0)
    );

    #[cfg(feature = "grpc")]
    for (trailers, code) in [(ok, "0"), (unavailable, "14")] {
        let (_, handler) = run(trailers);
        let mut body = grpc
            .layer(handler)
            .oneshot(with_timeout("5S"))
            .await
            .unwrap()
            .into_body();
        let mut last = None;
        while let Some(frame) = body.frame().await {
            last = frame.unwrap().into_trailers().ok();
        }
        assert_eq!(last.unwrap()["grpc-status"], code);
    }
    // UNAVAILABLE from the handler is the overload signal it always was; nothing was cut.
    #[cfg(feature = "grpc")]
    assert_eq!(grpc.handle().snapshot().dropped, 1);
}

/// With no deadline anywhere (no header, no maximum) the body is not bounded, and nothing is current while it is
/// polled.
#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_body_is_not_bounded() {
    let layer = DeadlineLayer::builder().http().build().unwrap();
    let (producer, inner) = handler(Duration::from_secs(100), Some(3), None);
    let service = layer.layer(inner);
    let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
    assert_eq!(body.get_ref().deadline(), None);
    let start = Instant::now();
    let bytes = (&mut body).collect().await.unwrap().to_bytes();
    assert_eq!(bytes, "0;1;2;");
    assert_eq!(start.elapsed(), Duration::from_secs(300));
    assert_eq!(*producer.current.lock().unwrap(), vec![None; 3]);
}

/// A body dropped half-read (the client went away) drops its producer inside the deadline's scope, and the request
/// counts as `Ignored`, not as cut.
#[tokio::test(start_paused = true)]
async fn a_body_dropped_half_read_drops_its_producer_under_the_deadline() {
    let (log, handle, producer, service) = logged_http_over_endless();
    let mut body = service
        .oneshot(with_timeout("10S"))
        .await
        .unwrap()
        .into_body();
    let deadline = body.get_ref().deadline();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    drop(body);
    assert!(producer.dropped.load(Ordering::SeqCst));
    assert_eq!(*producer.current_at_drop.lock().unwrap(), deadline);
    assert_eq!(Deadline::current(), None, "the scope ends with the drop");
    assert_eq!(
        completed(&log.lock().unwrap()),
        [(Outcome::Ignored, Duration::from_secs(1))]
    );
    assert_eq!(handle.snapshot().dropped, 0);
}

/// The client side bounds the dependency's response body by the caller's deadline: a dependency that keeps
/// streaming past it (one that ignores the `grpc-timeout` it was sent) is cut locally, and a gRPC caller sees
/// DEADLINE_EXCEEDED in the trailers.
#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn the_propagating_layer_bounds_the_dependencys_body_by_the_callers_deadline() {
    let client = PropagateDeadlineLayer::builder().grpc().build().unwrap();
    let (producer, inner) = endless();
    let dependency = client.layer(inner);
    let start = Instant::now();
    let deadline = Deadline::after(Duration::from_millis(1500));
    let response = deadline
        .scope(dependency.oneshot(Request::new(())))
        .await
        .unwrap();
    let mut body = response.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    assert_deadline_exceeded_trailers(&mut body).await;
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert!(producer.dropped.load(Ordering::SeqCst));
    assert_eq!(client.handle().snapshot().dropped, 1);
}

/// A body that fails with a transport error at `fail_at`, after a frame every 100 ms: what a client reads when
/// the next hop cuts its body.
fn failing_at(fail_at: Instant) -> UnsyncBoxBody<Bytes, std::io::Error> {
    let frames = stream::unfold((), move |()| async move {
        let next = Instant::now() + Duration::from_millis(100);
        tokio::time::sleep_until(next.min(fail_at)).await;
        let item = if Instant::now() >= fail_at {
            Err(std::io::Error::other(
                "connection closed before message completed",
            ))
        } else {
            Ok(Frame::data(Bytes::from_static(b"x")))
        };
        Some((item, ()))
    });
    StreamBody::new(frames).boxed_unsync()
}

/// Client side, HTTP: the next hop, given the budget minus the margin, cuts its body before our deadline, and our
/// transport reports that as its own error. Once the budget sent is spent, that error is the deadline: the body
/// fails with `DeadlineExceeded` and the outcome is `Dropped` (not a `Failure` a breaker would count). An error
/// before then is passed on as a failure.
#[tokio::test(start_paused = true)]
async fn a_body_error_once_the_sent_budget_is_spent_is_the_deadline() {
    for (fails_after, cut) in [(995, true), (550, false)] {
        let (log, observer) = events();
        let client = PropagateDeadlineLayer::builder()
            .margin(Duration::from_millis(10))
            .http()
            .observer(observer)
            .build()
            .unwrap();
        let start = Instant::now();
        let fail_at = start + Duration::from_millis(fails_after);
        let dependency = client.layer(service_fn(move |_req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(failing_at(fail_at)))
        }));
        let response = Deadline::after(Duration::from_secs(1))
            .scope(dependency.oneshot(Request::new(())))
            .await
            .unwrap();
        let error = response.into_body().collect().await.unwrap_err();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(fails_after),
            "before the deadline (1 s)"
        );
        assert_eq!(error.is::<DeadlineExceeded>(), cut, "{error}");
        let outcome = if cut {
            Outcome::Dropped
        } else {
            Outcome::Failure
        };
        assert_eq!(completed(&log.lock().unwrap())[0].0, outcome);
    }
}

/// Trailers are the last frame even when the inner body does not say so (`StreamBody`, axum's `Body::from_stream`
/// keep `is_end_stream` false): a body whose trailers came in time ends with them, and is not cut at the deadline
/// while its end is still to be asked for (which would add a second, DEADLINE_EXCEEDED, trailers frame in gRPC).
#[tokio::test(start_paused = true)]
async fn a_body_ends_with_its_trailers() {
    let mut ok = HeaderMap::new();
    ok.insert("grpc-status", "0".parse().unwrap());
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(2))
        .http()
        .build()
        .unwrap();
    let body = move || {
        let frames = stream::iter([
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"all"))),
            Ok(Frame::trailers(ok.clone())),
        ]);
        // The stream's own end never comes.
        StreamBody::new(frames.chain(stream::pending())).boxed_unsync()
    };
    let service = layer.layer(service_fn(move |_req: Request<()>| {
        let body = body();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    assert!(body.frame().await.unwrap().unwrap().is_trailers());
    assert!(body.is_end_stream());
    let start = Instant::now();
    assert!(body.frame().await.is_none());
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the end comes at once, not at the deadline"
    );
    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.dropped, snapshot.in_flight), (0, 0));
}

/// A body that has ended (`is_end_stream`), polled for its end only after the deadline, ends: http-body says an
/// ended body's `poll_frame` returns `None`.
#[tokio::test(start_paused = true)]
async fn an_ended_body_polled_after_the_deadline_ends() {
    #[derive(Default)]
    struct EndsLater(Arc<AtomicBool>);
    impl Body for EndsLater {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.load(Ordering::SeqCst) {
                true => std::task::Poll::Ready(None),
                false => std::task::Poll::Pending,
            }
        }
        fn is_end_stream(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
    let ended = Arc::new(AtomicBool::new(false));
    let flag = ended.clone();
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(1))
        .http()
        .build()
        .unwrap();
    let service = layer.layer(service_fn(move |_req: Request<()>| {
        let body = EndsLater(flag.clone());
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
    // Waits once (which arms the timer); its end arrives in time; its reader comes back after the deadline.
    assert!(futures::poll!(body.frame()).is_pending());
    ended.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(body.is_end_stream());
    assert!(body.frame().await.is_none());
    assert_eq!(layer.handle().snapshot().dropped, 0);
}
