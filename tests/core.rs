//! Tests of the shared core: one outcome per request on every exit path, body tracking, classification tables,
//! rejection modes, Retry-After rounding.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tower_backpressure::core::{
    error, grpc::code, retry_after_millis, retry_after_secs, AnyOk, Classify, ConfigError,
    Deadline, ErrorMode, Event, GrpcClassifier, GrpcMode, HttpMode, HttpStatus, Observer, Outcome,
    Permit, Reason, RejectMode, Rejection, Release, Releaser, ResponseFuture, TrackedBody,
};

/// Records every release, so a test sees both the outcome and that there was exactly one.
#[derive(Default)]
struct Log(Mutex<Vec<Outcome>>);

impl Release for Log {
    fn release(&self, outcome: Outcome, _latency: Duration, _tag: u64) {
        self.0.lock().unwrap().push(outcome);
    }
}

impl Log {
    fn new() -> Arc<Log> {
        Arc::new(Log::default())
    }
    fn outcomes(&self) -> Vec<Outcome> {
        self.0.lock().unwrap().clone()
    }
}

fn permit(log: &Arc<Log>) -> Permit {
    Permit::new(Releaser::new(log.clone()), 0)
}

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

type Res = Result<u32, &'static str>;

// ---------------------------------------------------------------- permits: one outcome on every path

#[test]
fn permit_complete_records_once() {
    let log = Log::new();
    permit(&log).complete(Outcome::Dropped);
    assert_eq!(log.outcomes(), [Outcome::Dropped]);
}

#[test]
fn permit_dropped_records_ignored() {
    let log = Log::new();
    drop(permit(&log));
    assert_eq!(log.outcomes(), [Outcome::Ignored]);
}

#[test]
fn permit_dropped_while_panicking_records_failure() {
    let log = Log::new();
    let p = permit(&log);
    let result = catch_unwind(AssertUnwindSafe(move || {
        let _held = p;
        panic!("inner service panicked");
    }));
    assert!(result.is_err());
    assert_eq!(log.outcomes(), [Outcome::Failure]);
}

/// Dropped inside a deadline's scope once the deadline has passed: a deadline layer outside cut the request off
/// (it drops the inner future while the deadline is current), which is a timeout to the layers inside,
/// `Dropped`. Before the deadline, or outside any scope, a drop is a caller that went away, `Ignored`.
#[tokio::test(start_paused = true)]
async fn permit_dropped_after_the_current_deadline_records_dropped() {
    let log = Log::new();
    let deadline = Deadline::after(Duration::from_secs(1));
    let holding = |permits: Vec<Permit>| {
        Box::pin(deadline.scope(async move {
            let _held = permits;
            std::future::pending::<()>().await;
        }))
    };
    let mut in_time = holding(vec![permit(&log)]);
    let mut cut = holding(vec![permit(&log), permit(&log)]);
    let outside = permit(&log);
    assert!(poll_once(in_time.as_mut()).is_pending());
    assert!(poll_once(cut.as_mut()).is_pending());
    tokio::time::advance(Duration::from_millis(999)).await;
    drop(in_time);
    assert_eq!(log.outcomes(), [Outcome::Ignored], "before the deadline");
    tokio::time::advance(Duration::from_millis(1)).await;
    drop(cut);
    drop(outside);
    assert_eq!(
        log.outcomes(),
        [
            Outcome::Ignored,
            Outcome::Dropped,
            Outcome::Dropped,
            Outcome::Ignored
        ]
    );
}

#[test]
fn permit_reports_latency_and_tag() {
    struct Check(Mutex<Option<(Duration, u64)>>);
    impl Release for Check {
        fn release(&self, _o: Outcome, latency: Duration, tag: u64) {
            *self.0.lock().unwrap() = Some((latency, tag));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let check = Arc::new(Check(Mutex::new(None)));
        let p = Permit::new(Releaser::new(check.clone()), 42);
        tokio::time::advance(Duration::from_millis(250)).await;
        p.complete(Outcome::Success);
        assert_eq!(
            *check.0.lock().unwrap(),
            Some((Duration::from_millis(250), 42))
        );
    });
}

fn admitted<F>(inner: F, log: &Arc<Log>) -> ResponseFuture<F, AnyOk, ErrorMode> {
    ResponseFuture::admitted(inner, Some(permit(log)), AnyOk, ErrorMode)
}

#[test]
fn future_success_records_success() {
    let log = Log::new();
    let mut fut = std::pin::pin!(admitted(std::future::ready(Res::Ok(1)), &log));
    assert!(matches!(poll_once(fut.as_mut()), Poll::Ready(Ok(1))));
    assert_eq!(log.outcomes(), [Outcome::Success]);
}

#[test]
fn future_error_records_failure() {
    let log = Log::new();
    let mut fut = std::pin::pin!(admitted(std::future::ready(Res::Err("boom")), &log));
    match poll_once(fut.as_mut()) {
        Poll::Ready(Err(e)) => assert_eq!(e.to_string(), "boom"),
        other => panic!(
            "unexpected {:?}",
            other.map(|r| r.map_err(|e| e.to_string()))
        ),
    }
    assert_eq!(log.outcomes(), [Outcome::Failure]);
}

#[test]
fn future_dropped_before_completion_records_ignored() {
    let log = Log::new();
    let mut fut = Box::pin(admitted(std::future::pending::<Res>(), &log));
    assert!(poll_once(fut.as_mut()).is_pending());
    assert!(log.outcomes().is_empty(), "nothing recorded while pending");
    drop(fut);
    assert_eq!(log.outcomes(), [Outcome::Ignored]);
}

#[test]
fn future_inner_panic_records_failure() {
    struct Panics;
    impl Future for Panics {
        type Output = Res;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Res> {
            panic!("handler bug")
        }
    }
    let log = Log::new();
    let mut fut = Box::pin(admitted(Panics, &log));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _ = poll_once(fut.as_mut());
    }));
    assert!(result.is_err());
    // The future is still alive after the panic was caught; it has not recorded yet...
    assert!(log.outcomes().is_empty());
    // ...and a panic that unwinds through it (as it would in a real task) records a failure once.
    let result = catch_unwind(AssertUnwindSafe(move || {
        let _held = fut;
        panic!("unwinding");
    }));
    assert!(result.is_err());
    assert_eq!(log.outcomes(), [Outcome::Failure]);
}

#[test]
fn closure_classifier_decides_outcome() {
    let log = Log::new();
    let classify = |r: Result<&u32, &&str>| match r {
        Ok(_) => Outcome::Success,
        Err(&"timeout") => Outcome::Dropped,
        Err(_) => Outcome::Failure,
    };
    let _ = classify.finish(Err("timeout"), Some(permit(&log)));
    let _ = classify.finish(Ok(3), Some(permit(&log)));
    let _ = classify.finish(Err("other"), None);
    assert_eq!(log.outcomes(), [Outcome::Dropped, Outcome::Success]);
}

// ---------------------------------------------------------------- rejections

#[test]
fn error_mode_downcasts_to_each_reason() {
    let wait = Some(Duration::from_millis(1500));
    macro_rules! check {
        ($reason:expr, $ty:ty, $msg:literal) => {{
            let r: Result<(), _> = <ErrorMode as RejectMode<(), Infallible>>::reject(
                &ErrorMode,
                Rejection::new($reason).with_retry_after(wait),
            );
            let err = r.unwrap_err();
            assert_eq!(err.to_string(), $msg);
            let typed = err
                .downcast_ref::<$ty>()
                .expect("downcast to the reason's type");
            assert_eq!(typed.retry_after(), wait);
        }};
    }
    check!(Reason::Overloaded, error::Overloaded, "service overloaded");
    check!(Reason::QueueFull, error::QueueFull, "request queue full");
    check!(
        Reason::QueueTimeout,
        error::QueueTimeout,
        "request timed out in queue"
    );
    check!(
        Reason::CircuitOpen,
        error::CircuitOpen,
        "circuit breaker open"
    );
    check!(
        Reason::DeadlineExceeded,
        error::DeadlineExceeded,
        "deadline exceeded"
    );
    check!(
        Reason::RateLimited,
        error::RateLimited,
        "rate limit exceeded"
    );
}

#[test]
fn http_mode_status_and_retry_after() {
    let cases = [
        (Reason::Overloaded, 503),
        (Reason::QueueFull, 503),
        (Reason::QueueTimeout, 503),
        (Reason::CircuitOpen, 503),
        (Reason::DeadlineExceeded, 504),
        (Reason::RateLimited, 429),
    ];
    for (reason, status) in cases {
        let rejection = Rejection::new(reason).with_retry_after(Some(Duration::from_millis(1200)));
        let res: http::Response<Empty<Bytes>> =
            <HttpMode as RejectMode<_, Infallible>>::reject(&HttpMode, rejection).unwrap();
        assert_eq!(res.status().as_u16(), status, "{reason}");
        assert_eq!(res.headers()["retry-after"], "2", "{reason}");
    }
    let res: http::Response<Empty<Bytes>> = <HttpMode as RejectMode<_, Infallible>>::reject(
        &HttpMode,
        Rejection::new(Reason::Overloaded),
    )
    .unwrap();
    assert!(
        res.headers().get("retry-after").is_none(),
        "no hint, no header"
    );
    let zero = Rejection::new(Reason::Overloaded).with_retry_after(Some(Duration::ZERO));
    let res: http::Response<Empty<Bytes>> =
        <HttpMode as RejectMode<_, Infallible>>::reject(&HttpMode, zero).unwrap();
    assert!(
        res.headers().get("retry-after").is_none(),
        "a zero wait leaves the header out"
    );
}

#[test]
fn grpc_mode_trailers_only() {
    let cases = [
        (Reason::Overloaded, "14"),
        (Reason::QueueFull, "14"),
        (Reason::QueueTimeout, "14"),
        (Reason::CircuitOpen, "14"),
        (Reason::DeadlineExceeded, "4"),
        (Reason::RateLimited, "8"),
    ];
    for (reason, grpc_status) in cases {
        let rejection = Rejection::new(reason).with_retry_after(Some(Duration::from_micros(2500)));
        let res: http::Response<Empty<Bytes>> =
            <GrpcMode as RejectMode<_, Infallible>>::reject(&GrpcMode, rejection).unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], grpc_status, "{reason}");
        assert_eq!(res.headers()["grpc-message"], reason.message());
        assert_eq!(
            res.headers()["grpc-retry-pushback-ms"],
            "3",
            "2.5 ms rounds up"
        );
        assert!(res.body().is_end_stream());
    }
    let res: http::Response<Empty<Bytes>> = <GrpcMode as RejectMode<_, Infallible>>::reject(
        &GrpcMode,
        Rejection::new(Reason::Overloaded),
    )
    .unwrap();
    assert!(res.headers().get("grpc-retry-pushback-ms").is_none());
}

#[test]
fn retry_after_rounds_up() {
    assert_eq!(retry_after_secs(Duration::from_millis(1200)), Some(2));
    assert_eq!(retry_after_secs(Duration::from_secs(1)), Some(1));
    assert_eq!(retry_after_secs(Duration::from_millis(1)), Some(1));
    assert_eq!(retry_after_secs(Duration::from_nanos(1)), Some(1));
    assert_eq!(retry_after_secs(Duration::ZERO), None);
    assert_eq!(retry_after_millis(Duration::from_micros(1500)), Some(2));
    assert_eq!(retry_after_millis(Duration::from_millis(7)), Some(7));
    assert_eq!(retry_after_millis(Duration::ZERO), None);
    // Rounding up saturates instead of overflowing (a panic in debug builds, a wrap to 0 in release).
    assert_eq!(retry_after_secs(Duration::MAX), Some(u64::MAX));
    assert_eq!(retry_after_millis(Duration::MAX), Some(u64::MAX));
}

// ---------------------------------------------------------------- classification tables

#[test]
fn http_status_table() {
    let c = HttpStatus::new();
    let table = [
        (200, Outcome::Success),
        (204, Outcome::Success),
        (301, Outcome::Success),
        (400, Outcome::Success),
        (404, Outcome::Success),
        (429, Outcome::Dropped),
        (500, Outcome::Failure),
        (502, Outcome::Failure),
        (503, Outcome::Dropped),
        (504, Outcome::Dropped),
        (599, Outcome::Failure),
    ];
    for (status, outcome) in table {
        assert_eq!(
            c.outcome_for(StatusCode::from_u16(status).unwrap()),
            outcome,
            "{status}"
        );
    }
    let custom = c
        .status(StatusCode::NOT_FOUND, Outcome::Failure)
        .status(StatusCode::BAD_GATEWAY, Outcome::Dropped);
    assert_eq!(custom.outcome_for(StatusCode::NOT_FOUND), Outcome::Failure);
    assert_eq!(
        custom.outcome_for(StatusCode::BAD_GATEWAY),
        Outcome::Dropped
    );
    assert_eq!(
        custom.outcome_for(StatusCode::SERVICE_UNAVAILABLE),
        Outcome::Dropped
    );
    assert_eq!(custom.outcome_for(StatusCode::OK), Outcome::Success);
}

#[tokio::test]
async fn http_status_codes_above_599_are_classified_without_panicking() {
    // `StatusCode` admits 100 to 999; codes past 599 are outside every standard class and count as success.
    let odd = StatusCode::from_u16(600).unwrap();
    let last = StatusCode::from_u16(999).unwrap();
    assert_eq!(HttpStatus::new().outcome_for(last), Outcome::Success);
    let custom = HttpStatus::new()
        .status(odd, Outcome::Failure)
        .status(last, Outcome::Dropped);
    assert_eq!(custom.outcome_for(odd), Outcome::Failure);
    assert_eq!(custom.outcome_for(last), Outcome::Dropped);
    assert_eq!(
        custom.outcome_for(StatusCode::from_u16(799).unwrap()),
        Outcome::Success
    );
    assert_eq!(
        custom.outcome_for(StatusCode::SERVICE_UNAVAILABLE),
        Outcome::Dropped
    );

    // On the response path: a customised classifier given an unmapped 799 records the default outcome.
    let log = Log::new();
    let mut response = http::Response::new(Empty::<Bytes>::new());
    *response.status_mut() = StatusCode::from_u16(799).unwrap();
    let classify = HttpStatus::new().status(StatusCode::NOT_FOUND, Outcome::Ignored);
    let res: Result<_, Infallible> = classify.finish(Ok(response), Some(permit(&log)));
    res.unwrap().into_body().collect().await.unwrap();
    assert_eq!(log.outcomes(), [Outcome::Success]);
}

#[test]
fn grpc_code_table() {
    let c = GrpcClassifier::new();
    let table = [
        (code::OK, Outcome::Success),
        (code::CANCELLED, Outcome::Ignored),
        (code::UNKNOWN, Outcome::Failure),
        (code::INVALID_ARGUMENT, Outcome::Success),
        (code::DEADLINE_EXCEEDED, Outcome::Dropped),
        (code::NOT_FOUND, Outcome::Success),
        (code::PERMISSION_DENIED, Outcome::Success),
        (code::RESOURCE_EXHAUSTED, Outcome::Dropped),
        (code::UNIMPLEMENTED, Outcome::Success),
        (code::INTERNAL, Outcome::Failure),
        (code::UNAVAILABLE, Outcome::Dropped),
        (code::DATA_LOSS, Outcome::Failure),
        (17, Outcome::Failure),
    ];
    for (code, outcome) in table {
        assert_eq!(c.outcome_for_code(code), outcome, "code {code}");
    }
    let mut headers = HeaderMap::new();
    assert_eq!(c.outcome_for_headers(&headers), None);
    for (value, outcome) in [
        ("14", Outcome::Dropped),
        ("0", Outcome::Success),
        ("x", Outcome::Failure),
        ("", Outcome::Failure),
        ("0014", Outcome::Failure),
    ] {
        headers.insert("grpc-status", HeaderValue::from_static(value));
        assert_eq!(c.outcome_for_headers(&headers), Some(outcome), "{value:?}");
    }
}

fn grpc_response<B>(
    status: StatusCode,
    grpc_status: Option<&'static str>,
    body: B,
) -> http::Response<B> {
    let mut res = http::Response::new(body);
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    if let Some(s) = grpc_status {
        res.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(s));
    }
    res
}

type Frames = mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>;
type Streaming = StreamBody<mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>>;

fn streaming() -> (Frames, Streaming) {
    let (tx, rx) = mpsc::unbounded();
    (tx, StreamBody::new(rx))
}

/// A gRPC answer (200, with `grpc-status` in its head if given) whose streaming body is tracked by the classifier
/// with a permit logged into `log`, and the sender that feeds the body.
fn tracked_grpc_stream(
    log: &Arc<Log>,
    head_status: Option<&'static str>,
) -> (Frames, TrackedBody<Streaming, GrpcClassifier>) {
    let (tx, body) = streaming();
    let res: Result<_, Infallible> = GrpcClassifier::new().finish(
        Ok(grpc_response(StatusCode::OK, head_status, body)),
        Some(permit(log)),
    );
    (tx, res.unwrap().into_body())
}

fn trailers(grpc_status: &'static str) -> Frame<Bytes> {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(grpc_status));
    Frame::trailers(t)
}

#[tokio::test]
async fn grpc_trailers_only_head_decides() {
    let log = Log::new();
    let res: Result<_, Infallible> = GrpcClassifier::new().finish(
        Ok(grpc_response(
            StatusCode::OK,
            Some("14"),
            Empty::<Bytes>::new(),
        )),
        Some(permit(&log)),
    );
    // An empty body is at its end already: released at once, with the header's code.
    assert!(!res.unwrap().body().holds_permit());
    assert_eq!(log.outcomes(), [Outcome::Dropped]);
}

#[tokio::test]
async fn grpc_status_in_trailers_at_end_of_body() {
    for (status, outcome) in [
        ("0", Outcome::Success),
        ("13", Outcome::Failure),
        ("8", Outcome::Dropped),
        ("5", Outcome::Success),
    ] {
        let log = Log::new();
        let (tx, mut body) = tracked_grpc_stream(&log, None);
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"msg"))))
            .unwrap();
        let _ = body.frame().await.unwrap().unwrap();
        assert!(log.outcomes().is_empty(), "held while streaming");
        tx.unbounded_send(Ok(trailers(status))).unwrap();
        drop(tx);
        let _ = body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        assert_eq!(log.outcomes(), [outcome], "grpc-status {status}");
    }
}

#[tokio::test]
async fn grpc_body_dropped_right_after_its_trailers_keeps_their_outcome() {
    // hyper (HTTP/1 and HTTP/2 alike) sends the trailers frame and drops the body without polling it again, and
    // a streaming body need not report its end before it is polled once more: the trailers are the end.
    for (status, outcome) in [("0", Outcome::Success), ("14", Outcome::Dropped)] {
        let log = Log::new();
        let (tx, mut body) = tracked_grpc_stream(&log, None);
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"msg"))))
            .unwrap();
        tx.unbounded_send(Ok(trailers(status))).unwrap();
        let _ = body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        drop(body);
        assert_eq!(log.outcomes(), [outcome], "grpc-status {status}");
    }
    // The same for plain HTTP: a 200 whose body ended with trailers was served.
    let log = Log::new();
    let (tx, body) = streaming();
    let res: Result<_, Infallible> =
        HttpStatus::new().finish(Ok(http::Response::new(body)), Some(permit(&log)));
    let mut body = res.unwrap().into_body();
    tx.unbounded_send(Ok(Frame::trailers(HeaderMap::new())))
        .unwrap();
    assert!(body.frame().await.unwrap().unwrap().is_trailers());
    assert!(!body.holds_permit(), "released at the trailers");
    drop(body);
    assert_eq!(log.outcomes(), [Outcome::Success]);
}

#[tokio::test]
async fn grpc_stream_ending_without_status_is_failure() {
    let log = Log::new();
    let (tx, mut body) = tracked_grpc_stream(&log, None);
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(log.outcomes(), [Outcome::Failure]);
}

#[tokio::test]
async fn grpc_non_200_is_classified_by_http_status() {
    let log = Log::new();
    let res: Result<_, Infallible> = GrpcClassifier::new().finish(
        Ok(grpc_response(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Full::new(Bytes::from_static(b"proxy")),
        )),
        Some(permit(&log)),
    );
    let body = res.unwrap().into_body().collect().await.unwrap();
    assert_eq!(body.to_bytes(), "proxy");
    assert_eq!(log.outcomes(), [Outcome::Dropped]);
}

// ---------------------------------------------------------------- HTTP body tracking

#[tokio::test]
async fn body_held_until_stream_ends() {
    let log = Log::new();
    let (tx, body) = streaming();
    let res: Result<_, Infallible> =
        HttpStatus::new().finish(Ok(http::Response::new(body)), Some(permit(&log)));
    let mut body = res.unwrap().into_body();
    assert!(body.holds_permit());
    tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"a"))))
        .unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    assert!(log.outcomes().is_empty());
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(log.outcomes(), [Outcome::Success]);
    assert!(
        body.frame().await.is_none(),
        "polling past the end records nothing more"
    );
    drop(body);
    assert_eq!(log.outcomes(), [Outcome::Success]);
}

#[tokio::test]
async fn body_error_records_failure() {
    let log = Log::new();
    let (tx, body) = streaming();
    let res: Result<_, Infallible> =
        HttpStatus::new().finish(Ok(http::Response::new(body)), Some(permit(&log)));
    let mut body = res.unwrap().into_body();
    tx.unbounded_send(Err(std::io::Error::other("reset")))
        .unwrap();
    assert!(body.frame().await.unwrap().is_err());
    drop(body);
    assert_eq!(log.outcomes(), [Outcome::Failure]);
}

#[tokio::test]
async fn body_dropped_half_read_records_ignored() {
    let log = Log::new();
    let (tx, body) = streaming();
    let res: Result<_, Infallible> =
        HttpStatus::new().finish(Ok(http::Response::new(body)), Some(permit(&log)));
    let mut body = res.unwrap().into_body();
    tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"half"))))
        .unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    drop(body);
    assert_eq!(log.outcomes(), [Outcome::Ignored]);
}

#[tokio::test]
async fn body_of_a_failed_response_dropped_unread_keeps_the_heads_outcome() {
    // A caller that checks the status and drops the body (`if !res.status().is_success() { return .. }`) has
    // still been answered 503 or 500: the dependency said so, and a breaker or limiter outside must hear it.
    for (status, outcome) in [
        (StatusCode::SERVICE_UNAVAILABLE, Outcome::Dropped),
        (StatusCode::INTERNAL_SERVER_ERROR, Outcome::Failure),
        (StatusCode::OK, Outcome::Ignored),
    ] {
        let log = Log::new();
        let mut res = http::Response::new(Full::new(Bytes::from_static(b"unread")));
        *res.status_mut() = status;
        let res: Result<_, Infallible> = HttpStatus::new().finish(Ok(res), Some(permit(&log)));
        let res = res.unwrap();
        assert!(res.body().holds_permit());
        drop(res);
        assert_eq!(log.outcomes(), [outcome], "{status}");
    }
    // The same for a gRPC status in the head of a stream, dropped half-read.
    let log = Log::new();
    let (tx, mut body) = tracked_grpc_stream(&log, Some("14"));
    tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"half"))))
        .unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    drop(body);
    assert_eq!(log.outcomes(), [Outcome::Dropped]);
}

#[tokio::test]
async fn full_body_released_when_its_only_frame_is_read() {
    let log = Log::new();
    let mut res = http::Response::new(Full::new(Bytes::from_static(b"all")));
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    let res: Result<_, Infallible> = HttpStatus::new().finish(Ok(res), Some(permit(&log)));
    let mut body = res.unwrap().into_body();
    assert!(body.holds_permit());
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "all");
    assert_eq!(
        log.outcomes(),
        [Outcome::Failure],
        "released at the last frame, with the head's outcome"
    );
}

#[tokio::test]
async fn http_error_result_records_failure() {
    let log = Log::new();
    let res: Result<http::Response<TrackedEmpty>, &str> =
        HttpStatus::new().finish(Err("refused"), Some(permit(&log)));
    assert!(res.is_err());
    assert_eq!(log.outcomes(), [Outcome::Failure]);
}
type TrackedEmpty = TrackedBody<Empty<Bytes>>;

// ---------------------------------------------------------------- observers, config errors, deadlines

#[test]
fn observers_compose() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let a = {
        let seen = seen.clone();
        move |e: &Event| seen.lock().unwrap().push(format!("a:{e:?}"))
    };
    let b = {
        let seen = seen.clone();
        move |e: &Event| seen.lock().unwrap().push(format!("b:{e:?}"))
    };
    let both = (a, ((), b));
    both.on_event(&Event::LimitChanged {
        layer: "adaptive",
        limit: 7,
    });
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].starts_with("a:LimitChanged"));
    assert!(seen[1].starts_with("b:LimitChanged"));
}

#[test]
fn config_error_names_layer_field_and_problem() {
    let e = ConfigError::new(
        "adaptive concurrency",
        "min_limit",
        "must not exceed max_limit (10 > 5)",
    );
    assert_eq!(
        e.to_string(),
        "invalid adaptive concurrency config: min_limit: must not exceed max_limit (10 > 5)"
    );
    assert_eq!(e.field(), "min_limit");
    assert_eq!(e.layer(), "adaptive concurrency");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_deadline_scope_is_seen_only_by_its_own_future() {
    let a = Deadline::after(Duration::from_secs(1));
    let b = Deadline::after(Duration::from_secs(2));
    // Two tasks on one thread, taking turns: each sees its own deadline after every turn of the other.
    let turns = |mine: Deadline| async move {
        for _ in 0..10 {
            assert_eq!(Deadline::current(), Some(mine));
            tokio::task::yield_now().await;
        }
        // A task spawned from inside the scope does not inherit it.
        tokio::spawn(async { Deadline::current() }).await.unwrap()
    };
    let (ta, tb) = (
        tokio::spawn(a.scope(turns(a))),
        tokio::spawn(b.scope(turns(b))),
    );
    assert_eq!(ta.await.unwrap(), None);
    assert_eq!(tb.await.unwrap(), None);
    assert_eq!(Deadline::current(), None);
}

/// Records the current deadline when dropped.
struct RecordOnDrop<F>(F, Arc<Mutex<Vec<Option<Deadline>>>>);

impl<F: Future + Unpin> Future for RecordOnDrop<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<F> Drop for RecordOnDrop<F> {
    fn drop(&mut self) {
        self.1.lock().unwrap().push(Deadline::current());
    }
}

#[test]
fn a_deadline_scope_drops_its_future_inside_the_scope_and_survives_a_panic() {
    let deadline = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(1));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut cx = Context::from_waker(Waker::noop());

    // Answered: the inner future is dropped at once, inside the scope.
    let mut done = Box::pin(deadline.scope(RecordOnDrop(std::future::ready(7), log.clone())));
    assert_eq!(done.as_mut().poll(&mut cx), Poll::Ready(7));
    assert_eq!(*log.lock().unwrap(), [Some(deadline)]);
    drop(done);
    assert_eq!(log.lock().unwrap().len(), 1, "dropped once");

    // Dropped before answering: likewise.
    let mut pending =
        Box::pin(deadline.scope(RecordOnDrop(std::future::pending::<()>(), log.clone())));
    assert_eq!(pending.as_mut().poll(&mut cx), Poll::Pending);
    assert_eq!(Deadline::current(), None, "restored after the poll");
    drop(pending);
    assert_eq!(*log.lock().unwrap(), [Some(deadline), Some(deadline)]);

    // A panicking inner future leaves no deadline behind on the thread.
    let outer = Deadline::at(deadline.instant() + Duration::from_secs(1));
    let mut panicking = Box::pin(outer.scope(deadline.scope(std::future::poll_fn(
        |_| -> Poll<()> { panic!("inner service panicked") },
    ))));
    let unwound = catch_unwind(AssertUnwindSafe(|| panicking.as_mut().poll(&mut cx)));
    assert!(unwound.is_err());
    assert_eq!(Deadline::current(), None);
}

#[tokio::test(start_paused = true)]
async fn nested_deadline_scopes_keep_the_earliest() {
    assert_eq!(Deadline::current(), None);
    let outer = Deadline::after(Duration::from_secs(10));
    let inner_later = Deadline::after(Duration::from_secs(20));
    let inner_sooner = Deadline::after(Duration::from_secs(5));
    outer
        .scope(async move {
            assert_eq!(Deadline::current(), Some(outer));
            inner_later
                .scope(async move { assert_eq!(Deadline::current(), Some(outer)) })
                .await;
            inner_sooner
                .scope(async move { assert_eq!(Deadline::current(), Some(inner_sooner)) })
                .await;
        })
        .await;
    // A scope made first and awaited inside a shorter one: the shorter deadline stays current while it is
    // polled, and while it is dropped unfinished.
    let made_first = inner_later.scope(async move { Deadline::current() });
    assert_eq!(outer.scope(made_first).await, Some(outer));
    let pending = inner_later.scope(async move {
        let _seen = SeenOnDrop;
        std::future::pending::<()>().await
    });
    let mut pending = Box::pin(outer.scope(pending));
    assert!(futures::poll!(pending.as_mut()).is_pending());
    drop(pending);
    assert_eq!(DROPPED_UNDER.with(Cell::get), Some(outer));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(inner_sooner.is_expired());
    assert_eq!(outer.remaining(), Duration::from_secs(4));
    assert!(outer.can_finish(tokio::time::Instant::now(), Duration::from_secs(3)));
    assert!(!outer.can_finish(tokio::time::Instant::now(), Duration::from_secs(4)));
}

thread_local! {
    static DROPPED_UNDER: Cell<Option<Deadline>> = const { Cell::new(None) };
}

/// Records the deadline current when it is dropped.
struct SeenOnDrop;

impl Drop for SeenOnDrop {
    fn drop(&mut self) {
        DROPPED_UNDER.with(|c| c.set(Deadline::current()));
    }
}

#[tokio::test]
async fn local_rejections_are_ignored_by_outer_classifiers() {
    let log = Log::new();
    let refused: http::Response<Empty<Bytes>> = <HttpMode as RejectMode<_, Infallible>>::reject(
        &HttpMode,
        Rejection::new(Reason::Overloaded),
    )
    .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let _ = <HttpStatus as Classify<_, Infallible>>::finish(
        &HttpStatus::new(),
        Ok(refused),
        Some(permit(&log)),
    );
    let refused: http::Response<Empty<Bytes>> = <GrpcMode as RejectMode<_, Infallible>>::reject(
        &GrpcMode,
        Rejection::new(Reason::CircuitOpen),
    )
    .unwrap();
    let _ = <GrpcClassifier as Classify<_, Infallible>>::finish(
        &GrpcClassifier::new(),
        Ok(refused),
        Some(permit(&log)),
    );
    // The same statuses from the service itself are overload signals.
    let mut upstream = http::Response::new(Empty::<Bytes>::new());
    *upstream.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let _ = <HttpStatus as Classify<_, Infallible>>::finish(
        &HttpStatus::new(),
        Ok(upstream),
        Some(permit(&log)),
    );
    assert_eq!(
        log.outcomes(),
        [Outcome::Ignored, Outcome::Ignored, Outcome::Dropped]
    );
}
