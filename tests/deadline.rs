//! Server `DeadlineLayer` and client `PropagateDeadlineLayer`, in paused time.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_backpressure::core::error::DeadlineExceeded;
use tower_backpressure::core::{BoxError, Deadline, Event, Outcome, Reason};
use tower_backpressure::deadline::{DeadlineLayer, InvalidTimeout, PropagateDeadlineLayer};

/// What the inner service saw: the deadline in the extensions and in the task-local scope.
#[derive(Debug, Default)]
struct Seen {
    /// Calls of the inner service's `call`, counted in `call` itself: a call whose future is dropped unpolled
    /// counts too.
    calls: AtomicUsize,
    deadlines: Mutex<Vec<(Option<Deadline>, Option<Deadline>)>>,
    headers: Mutex<Vec<http::HeaderMap>>,
}

/// An inner service that counts its calls in `call` and, once its future is polled, records what it saw and
/// answers 200 after `work`.
fn recording(
    seen: Arc<Seen>,
    work: Duration,
) -> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |req: Request<String>| {
        // The closure runs in `call`, its `async` block when the future is polled.
        seen.calls.fetch_add(1, Ordering::SeqCst);
        let seen = seen.clone();
        async move {
            seen.deadlines
                .lock()
                .unwrap()
                .push((Deadline::of(&req), Deadline::current()));
            seen.headers.lock().unwrap().push(req.headers().clone());
            tokio::time::sleep(work).await;
            Ok::<_, Infallible>(Response::new(String::from("done")))
        }
    })
}

fn request(headers: &[(&str, &str)]) -> Request<String> {
    let mut builder = Request::builder().uri("/");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(String::new()).unwrap()
}

/// [`request`] with headers held as owned strings.
fn owned_request(headers: &[(String, String)]) -> Request<String> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    request(&pairs)
}

fn events() -> (
    Arc<Mutex<Vec<Event>>>,
    impl Fn(&Event) + Send + Sync + 'static,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    (log, move |e: &Event| sink.lock().unwrap().push(*e))
}

/// The outcomes of the `Completed` events in `log`, in order.
fn completed(log: &Mutex<Vec<Event>>) -> Vec<Outcome> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Completed { outcome, .. } => Some(*outcome),
            _ => None,
        })
        .collect()
}

type Boxed = tower::util::BoxService<Request<String>, Response<String>, BoxError>;

/// The server layer (`server`) or the propagating one, with defaults and `observer`, over `inner`: the service and
/// the layer's handle.
fn server_or_client<S>(
    server: bool,
    observer: impl Fn(&Event) + Send + Sync + 'static,
    inner: S,
) -> (Boxed, tower_backpressure::deadline::DeadlineHandle)
where
    S: Service<Request<String>, Response = Response<String>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    if server {
        let layer = DeadlineLayer::builder().observer(observer).build().unwrap();
        (Boxed::new(layer.layer(inner)), layer.handle())
    } else {
        let layer = PropagateDeadlineLayer::builder()
            .observer(observer)
            .build()
            .unwrap();
        (Boxed::new(layer.layer(inner)), layer.handle())
    }
}

#[tokio::test(start_paused = true)]
async fn effective_deadline_is_the_earliest_of_header_max_and_existing() {
    for store in [false, true] {
        let start = Instant::now();
        let seen = Arc::new(Seen::default());
        let layer = DeadlineLayer::builder()
            .max_timeout(Duration::from_secs(10))
            .request_extension(store)
            .build()
            .unwrap();
        let svc = layer.layer(recording(seen.clone(), Duration::ZERO));

        // Header smallest (grpc-timeout and the ms header: the smaller of the two).
        svc.clone()
            .oneshot(request(&[
                ("grpc-timeout", "3S"),
                ("x-request-timeout-ms", "2500"),
            ]))
            .await
            .unwrap();
        // Maximum smallest.
        svc.clone()
            .oneshot(request(&[("grpc-timeout", "1M")]))
            .await
            .unwrap();
        // Existing deadline smallest.
        let mut req = request(&[("x-request-timeout-ms", "5000")]);
        req.extensions_mut()
            .insert(Deadline::at(start + Duration::from_secs(1)));
        svc.clone().oneshot(req).await.unwrap();
        // An outer task-local scope counts too.
        Deadline::at(start + Duration::from_millis(700))
            .scope(svc.clone().oneshot(request(&[("grpc-timeout", "3S")])))
            .await
            .unwrap();

        let expected =
            [2500, 10_000, 1000, 700].map(|ms| Deadline::at(start + Duration::from_millis(ms)));
        // In the extensions: the layer's deadline if it stores it; without, only the request that brought one
        // has one (kept, as it is the earliest).
        let stored = [store, store, true, store];
        let deadlines = seen.deadlines.lock().unwrap();
        assert_eq!(deadlines.len(), 4);
        for ((seen, expected), stored) in deadlines.iter().zip(expected).zip(stored) {
            let in_extension = stored.then_some(expected);
            assert_eq!(*seen, (in_extension, Some(expected)), "store: {store}");
        }
        assert_eq!(layer.handle().snapshot().admitted, 4);
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_headers_are_found_among_few_or_many_other_headers() {
    // The layer compares names one by one on maps of up to 16 names and looks them up on larger ones: both ways
    // must find each header alone and both together, read every one of repeated values, and never take a name
    // of the same length for ours.
    let seen = Arc::new(Seen::default());
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(recording(seen.clone(), Duration::ZERO));
    let start = Instant::now();
    let others = |n: usize| -> Vec<(String, String)> {
        let mut headers = vec![
            // Same lengths as ours, different names, valid values: never read.
            ("grpc-timeoux".to_string(), "1m".to_string()),
            ("x-request-timeout-mz".to_string(), "1".to_string()),
            ("accept".to_string(), "*/*".to_string()),
        ];
        headers.extend((0..n).map(|i| (format!("x-other-{i}"), "v".to_string())));
        headers.truncate(n);
        headers
    };
    // (timeout headers, in order, and the budget expected)
    let cases: [(&[(&str, &str)], u64); 6] = [
        (&[], 10_000),
        (&[("grpc-timeout", "1200m")], 1200),
        (&[("x-request-timeout-ms", "1500")], 1500),
        (
            &[("grpc-timeout", "1200m"), ("x-request-timeout-ms", "1500")],
            1200,
        ),
        (
            &[("x-request-timeout-ms", "1500"), ("grpc-timeout", "2S")],
            1500,
        ),
        // Repeated: the smallest value counts, wherever it comes.
        (
            &[
                ("x-request-timeout-ms", "1500"),
                ("x-request-timeout-ms", "900"),
            ],
            900,
        ),
    ];
    // From no other header to well past the 16 names compared one by one.
    let counts = [0usize, 1, 7, 13, 14, 15, 16, 17, 40];
    let mut expected = Vec::new();
    for &n in &counts {
        for (ours, budget) in cases {
            let mut headers = others(n);
            // In the middle, so that a scan starting late or stopping early misses them.
            let at = headers.len() / 2;
            for (i, (name, value)) in ours.iter().enumerate() {
                headers.insert(at + i, (name.to_string(), value.to_string()));
            }
            svc.clone().oneshot(owned_request(&headers)).await.unwrap();
            expected.push((n, ours, budget));
        }
    }
    {
        let deadlines = seen.deadlines.lock().unwrap();
        assert_eq!(deadlines.len(), expected.len());
        for (seen, (n, ours, budget)) in deadlines.iter().zip(&expected) {
            let deadline = Deadline::at(start + Duration::from_millis(*budget));
            // Current, and not in the extensions (the layer's default).
            assert_eq!(
                *seen,
                (None, Some(deadline)),
                "{n} other headers, timeout headers {ours:?}"
            );
        }
    }

    // A configured name that is a standard header is found both ways too.
    let seen = Arc::new(Seen::default());
    let svc = DeadlineLayer::builder()
        .timeout_header("age")
        .build()
        .unwrap()
        .layer(recording(seen.clone(), Duration::ZERO));
    for n in [3, 20] {
        let mut headers = others(n);
        headers.insert(1, ("age".into(), "250".into()));
        svc.clone().oneshot(owned_request(&headers)).await.unwrap();
    }
    let quarter = Deadline::at(start + Duration::from_millis(250));
    assert_eq!(
        *seen.deadlines.lock().unwrap(),
        vec![(None, Some(quarter)); 2]
    );
}

/// An extension of the caller's own, to show the layer leaves other extensions alone.
#[derive(Debug, Clone, PartialEq)]
struct Tag(&'static str);

#[tokio::test(start_paused = true)]
async fn a_later_deadline_already_in_the_extensions_is_replaced_by_the_earliest() {
    let start = Instant::now();
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<String>| async move {
        let seen = (
            Deadline::of(&req),
            Deadline::current(),
            req.extensions().get::<Tag>().cloned(),
        );
        Ok::<_, Infallible>(Response::new(seen))
    }));

    // An existing deadline later than the header's: the header's wins, in the extensions and in scope.
    let mut req = request(&[("grpc-timeout", "3S")]);
    req.extensions_mut().insert(Tag("caller"));
    req.extensions_mut()
        .insert(Deadline::at(start + Duration::from_secs(20)));
    let seen = svc.clone().oneshot(req).await.unwrap().into_body();
    let header = Deadline::at(start + Duration::from_secs(3));
    assert_eq!(seen, (Some(header), Some(header), Some(Tag("caller"))));

    // An existing deadline later than the maximum: the maximum wins.
    let mut req = request(&[]);
    req.extensions_mut()
        .insert(Deadline::at(start + Duration::from_secs(60)));
    let seen = svc.clone().oneshot(req).await.unwrap().into_body();
    let max = Deadline::at(start + Duration::from_secs(10));
    assert_eq!(seen, (Some(max), Some(max), None));
}

/// The current deadline and the one in the request's extensions, as a service saw them.
type Pair = (Option<Deadline>, Option<Deadline>);

/// An inner service that records the current deadline and the extension during its `call`, and the current
/// deadline again when its future is polled.
#[derive(Clone, Default)]
struct CallWatcher {
    in_call: Arc<Mutex<Vec<Pair>>>,
    in_poll: Arc<Mutex<Vec<Option<Deadline>>>>,
}

impl CallWatcher {
    /// Asserts the one request seen had `deadline` current during its `call` and its poll, and in its extensions
    /// during the `call` only if `stored`.
    fn saw(&self, deadline: Deadline, stored: bool) {
        let in_call = self.in_call.lock().unwrap()[0];
        assert_eq!(
            in_call,
            (Some(deadline), stored.then_some(deadline)),
            "stored: {stored}"
        );
        assert_eq!(
            *self.in_poll.lock().unwrap(),
            [Some(deadline)],
            "stored: {stored}"
        );
    }
}

impl Service<Request<String>> for CallWatcher {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<String>, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        self.in_call
            .lock()
            .unwrap()
            .push((Deadline::current(), Deadline::of(&req)));
        let in_poll = self.in_poll.clone();
        Box::pin(async move {
            in_poll.lock().unwrap().push(Deadline::current());
            Ok(Response::new(String::new()))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn the_inner_call_sees_the_deadline_with_or_without_the_extension() {
    for store in [true, false] {
        let watcher = CallWatcher::default();
        let mut svc = DeadlineLayer::builder()
            .max_timeout(Duration::from_secs(10))
            .request_extension(store)
            .build()
            .unwrap()
            .layer(watcher.clone());
        let expected = Deadline::at(Instant::now() + Duration::from_secs(4));
        let future = svc
            .ready()
            .await
            .unwrap()
            .call(request(&[("grpc-timeout", "4S")]));
        // The call scope ends with the inner `call`: nothing is left behind on this thread.
        assert_eq!(Deadline::current(), None);
        future.await.unwrap();
        watcher.saw(expected, store);
    }
}

#[tokio::test(start_paused = true)]
async fn the_propagating_layer_gives_the_inner_call_the_deadline_with_or_without_the_extension() {
    for store in [true, false] {
        let watcher = CallWatcher::default();
        let mut svc = PropagateDeadlineLayer::builder()
            .request_extension(store)
            .build()
            .unwrap()
            .layer(watcher.clone());
        // The deadline comes from the caller's scope only: whatever extension the inner call sees, the layer put.
        let deadline = Deadline::after(Duration::from_secs(3));
        let call = deadline.scope(async { svc.ready().await.unwrap().call(request(&[])).await });
        call.await.unwrap();
        watcher.saw(deadline, store);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_leaves_no_deadline_behind() {
    let mut svc = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .layer(service_fn(
            |_req: Request<String>| -> std::future::Ready<Result<Response<String>, Infallible>> {
                panic!("the inner call panics")
            },
        ));
    svc.ready().await.unwrap();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(request(&[])));
    }));
    assert!(unwound.is_err());
    assert_eq!(Deadline::current(), None);
}

/// How a request can leave a deadline layer before answering: its caller drops the response future while the
/// work is in flight, the inner future panics, or the inner `call` panics.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Dropped,
    PanicInFuture,
    PanicInCall,
}

/// An inner service that leaves the way `exit` says.
fn leaving(
    exit: Exit,
) -> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |_req: Request<String>| {
        if let Exit::PanicInCall = exit {
            panic!("the inner call panics");
        }
        async move {
            match exit {
                Exit::PanicInFuture => panic!("the inner future panics"),
                _ => std::future::pending::<()>().await,
            }
            Ok::<_, Infallible>(Response::new(String::new()))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn no_request_stays_in_flight_when_its_future_is_dropped_or_the_inner_service_panics() {
    use futures::FutureExt;
    use std::panic::AssertUnwindSafe;

    for exit in [Exit::Dropped, Exit::PanicInFuture, Exit::PanicInCall] {
        for server in [true, false] {
            let (log, observer) = events();
            let (mut svc, handle) = server_or_client(server, observer, leaving(exit));
            let deadline = Deadline::after(Duration::from_secs(5));
            let left = deadline
                .scope(async {
                    svc.ready().await.unwrap();
                    let call = AssertUnwindSafe(|| svc.call(request(&[("grpc-timeout", "5S")])));
                    let Ok(mut future) = std::panic::catch_unwind(call) else {
                        return "call";
                    };
                    let polled = AssertUnwindSafe(futures::future::poll_fn(|cx| {
                        Poll::Ready(future.poll_unpin(cx).is_pending())
                    }))
                    .catch_unwind()
                    .await;
                    // Pending or unwound, the future still holds the request's permit.
                    assert_eq!(handle.snapshot().in_flight, 1);
                    drop(future);
                    if polled.is_ok() {
                        "dropped"
                    } else {
                        "future"
                    }
                })
                .await;
            let what = format!("{exit:?}, server {server}, left in {left}");
            let snapshot = handle.snapshot();
            assert_eq!(snapshot.in_flight, 0, "{what}");
            assert_eq!(snapshot.admitted, 1, "{what}");
            // Exactly one outcome a request: a caller going away is nobody's signal; a panic in the inner
            // service is its failure when it unwinds through the permit, and is otherwise caught (by the runtime
            // or, here, the test) before the future holding the permit is dropped.
            let expected = match exit {
                Exit::PanicInCall => Outcome::Failure,
                _ => Outcome::Ignored,
            };
            assert_eq!(completed(&log), vec![expected], "{what}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn find_takes_the_earlier_of_the_extension_and_the_current_deadline() {
    let soon = Deadline::after(Duration::from_secs(1));
    let later = Deadline::after(Duration::from_secs(2));
    let with = |d: Option<Deadline>| {
        let mut req = request(&[]);
        if let Some(d) = d {
            req.extensions_mut().insert(d);
        }
        req
    };
    assert_eq!(Deadline::find(&with(None)), None);
    assert_eq!(Deadline::find(&with(Some(later))), Some(later));
    let in_scope = |d: Option<Deadline>| later.scope(async move { Deadline::find(&with(d)) });
    assert_eq!(in_scope(None).await, Some(later));
    assert_eq!(in_scope(Some(soon)).await, Some(soon));
    let in_soon_scope = soon.scope(async { Deadline::find(&with(Some(later))) });
    assert_eq!(in_soon_scope.await, Some(soon));
}

/// A limit source that expects every request to take `expected`.
#[derive(Clone)]
struct Expecting(Duration);

impl tower_backpressure::core::LimitSource for Expecting {
    fn limit(&self) -> usize {
        10
    }

    fn expected_latency(&self) -> Option<Duration> {
        Some(self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_inside_sheds_what_cannot_finish_whichever_way_it_reads_the_deadline() {
    use tower_backpressure::core::RequestDeadline;
    use tower_backpressure::queue::QueueLayer;

    // The default source reads only the current deadline, `RequestDeadline` the extension too; with the extension
    // stored or not, both must see 10 ms left for 20 ms of work and refuse before the handler runs.
    for (request_source, store) in [(false, true), (false, false), (true, true), (true, false)] {
        let seen = Arc::new(Seen::default());
        let queue = QueueLayer::builder().limit(Expecting(Duration::from_millis(20)));
        let inner = recording(seen.clone(), Duration::from_millis(20));
        let inner = if request_source {
            tower::util::BoxCloneService::new(
                queue
                    .deadline_source(RequestDeadline)
                    .build()
                    .unwrap()
                    .layer(inner),
            )
        } else {
            tower::util::BoxCloneService::new(queue.build().unwrap().layer(inner))
        };
        let mut svc = DeadlineLayer::builder()
            .request_extension(store)
            .build()
            .unwrap()
            .layer(inner);
        let start = Instant::now();
        let answer = svc
            .ready()
            .await
            .unwrap()
            .call(request(&[("x-request-timeout-ms", "10")]))
            .await;
        let case = format!("request source: {request_source}, extension: {store}");
        assert!(
            matches!(&answer, Err(e) if e.is::<DeadlineExceeded>()),
            "{case}: {answer:?}"
        );
        assert_eq!(start.elapsed(), Duration::ZERO, "{case}");
        assert_eq!(seen.calls.load(Ordering::SeqCst), 0, "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn behind_a_buffer_an_http_queue_finds_the_deadline_in_the_request() {
    use tower_backpressure::queue::QueueLayer;

    // The queue is called on the buffer's worker task, where the deadline layer's scope is not current: it finds
    // the deadline only in the request's extensions, where the layer is built to store it, and only through the
    // source `.http()` picks. With the default source it lets the doomed request run (into the layer's timer).
    for (request_source, store) in [(true, true), (false, true), (true, false)] {
        let seen = Arc::new(Seen::default());
        let queue = QueueLayer::builder()
            .limit(Expecting(Duration::from_millis(20)))
            .http();
        let inner = recording(seen.clone(), Duration::from_millis(20));
        let queued = if request_source {
            tower::util::BoxCloneService::new(queue.build().unwrap().layer(inner))
        } else {
            let queue = queue.deadline_source(tower_backpressure::core::CurrentDeadline);
            tower::util::BoxCloneService::new(queue.build().unwrap().layer(inner))
        };
        let mut svc = DeadlineLayer::builder()
            .http()
            .request_extension(store)
            .build()
            .unwrap()
            .layer(tower::buffer::Buffer::new(queued, 8));
        let case = format!("request source: {request_source}, extension: {store}");
        let start = Instant::now();
        let doomed = svc
            .ready()
            .await
            .unwrap()
            .call(request(&[("x-request-timeout-ms", "10")]))
            .await
            .unwrap();
        assert_eq!(doomed.status(), StatusCode::GATEWAY_TIMEOUT, "{case}");
        let refused = seen.calls.load(Ordering::SeqCst) == 0;
        assert_eq!(refused, request_source && store, "{case}");
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(if refused { 0 } else { 10 }),
            "{case}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn no_deadline_anywhere_passes_through_untouched() {
    let seen = Arc::new(Seen::default());
    let layer = DeadlineLayer::builder().build().unwrap();
    let mut svc = layer.layer(recording(seen.clone(), Duration::from_secs(3600)));
    let future = svc.ready().await.unwrap().call(request(&[]));
    // No timer was made for it (the timer lives only in the running state).
    assert_eq!(
        format!("{future:?}"),
        r#"ResponseFuture { state: "passthrough" }"#
    );
    let response = future.await.unwrap();
    assert_eq!(response.into_body(), "done");
    assert_eq!(seen.deadlines.lock().unwrap()[0], (None, None));
    let snapshot = layer.handle().snapshot();
    assert_eq!(
        (snapshot.admitted, snapshot.rejected, snapshot.in_flight),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn expired_or_too_short_budgets_are_rejected_before_the_inner_service_is_called() {
    let seen = Arc::new(Seen::default());
    let (log, observer) = events();
    let layer = DeadlineLayer::builder()
        .min_budget(Duration::from_millis(50))
        .observer(observer)
        .build()
        .unwrap();
    let svc = layer.layer(recording(seen.clone(), Duration::ZERO));

    let mut past = request(&[]);
    past.extensions_mut().insert(Deadline::at(Instant::now()));
    let requests = [
        request(&[("grpc-timeout", "0n")]),
        request(&[("x-request-timeout-ms", "0")]),
        request(&[("grpc-timeout", "49999u")]),
        past,
    ];
    for req in requests {
        let error = svc.clone().oneshot(req).await.unwrap_err();
        assert!(error.is::<DeadlineExceeded>(), "{error}");
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    assert_eq!(layer.handle().snapshot().rejected, 4);
    assert!(log.lock().unwrap().iter().all(|e| matches!(
        e,
        Event::Rejected {
            layer: "deadline",
            reason: Reason::DeadlineExceeded,
            ..
        }
    )));

    // Exactly the minimum budget is enough.
    svc.clone()
        .oneshot(request(&[("grpc-timeout", "50m")]))
        .await
        .unwrap();
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);

    // HTTP mode answers 504, still without calling the inner service.
    let http = DeadlineLayer::builder().http().build().unwrap();
    let response = http
        .layer(recording(seen.clone(), Duration::ZERO))
        .oneshot(request(&[("grpc-timeout", "0n")]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
}

/// Drops of the inner future are counted, to show expiry cancels the work.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_mid_flight_answers_504_and_records_dropped() {
    let (log, observer) = events();
    let layer = DeadlineLayer::builder()
        .http()
        .observer(observer)
        .build()
        .unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = dropped.clone();
    let slow = service_fn(move |_req: Request<String>| {
        let guard = DropCount(counter.clone());
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(guard);
            Ok::<_, Infallible>(Response::new(String::new()))
        }
    });
    let start = Instant::now();
    let response = layer
        .layer(slow)
        .oneshot(request(&[("grpc-timeout", "1500m")]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the inner future is dropped at expiry"
    );

    let log = log.lock().unwrap();
    assert!(matches!(
        log[0],
        Event::Admitted {
            layer: "deadline",
            in_flight: 1
        }
    ));
    match log[1] {
        Event::Completed {
            layer: "deadline",
            outcome,
            latency,
            in_flight: 0,
        } => {
            assert_eq!(outcome, Outcome::Dropped);
            assert_eq!(latency, Duration::from_millis(1500));
        }
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(layer.handle().snapshot().dropped, 1);
}

/// The budget runs from the layer's `call`, not from the response future's first poll, as tower's `Timeout`'s
/// does. The two are apart when the future is polled by a different task from the one that called: a tower `Buffer`
/// above the layer (its worker calls, the caller's task polls once woken), or a hyper service that calls the stack
/// directly under hyper's HTTP/2 server (which runs the response future as a task of its own). The wait in between
/// is time the caller has spent and must count. A layer that read the clock later (at the first poll, or at the
/// first `Pending`) would move the deadline 600 ms later and answer 200 at 1.1 s, after the deadline.
#[tokio::test(start_paused = true)]
async fn the_budget_runs_from_the_call_not_from_the_first_poll() {
    for (max, header) in [
        (Some(1000), None),
        (None, Some("1000m")),
        (Some(5000), Some("1S")),
    ] {
        let case = format!("max {max:?} ms, grpc-timeout {header:?}");
        let seen = Arc::new(Seen::default());
        let mut builder = DeadlineLayer::builder().http();
        if let Some(max) = max {
            builder = builder.max_timeout(Duration::from_millis(max));
        }
        let layer = builder.build().unwrap();
        let mut svc = layer.layer(recording(seen.clone(), Duration::from_millis(500)));
        let headers: Vec<(&str, &str)> = header.map(|h| ("grpc-timeout", h)).into_iter().collect();
        let start = Instant::now();
        let future = svc.ready().await.unwrap().call(request(&headers));
        // The future waits 600 ms before anyone polls it; then its handler needs 500 ms more.
        tokio::time::advance(Duration::from_millis(600)).await;
        let response = tokio::spawn(future).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{case}");
        assert_eq!(start.elapsed(), Duration::from_secs(1), "{case}");
        let (_, current) = seen.deadlines.lock().unwrap()[0];
        assert_eq!(
            current,
            Some(Deadline::at(start + Duration::from_secs(1))),
            "{case}: the handler sees the deadline fixed at the call"
        );
        assert_eq!(layer.handle().snapshot().dropped, 1, "{case}");
    }
}

/// The same through tower's `Buffer` above the layer: its worker task calls the layer, and the caller's task polls
/// the response future when it next runs, here 600 ms later. The wait counts.
#[tokio::test(start_paused = true)]
async fn behind_a_buffer_the_wait_before_the_first_poll_counts() {
    let seen = Arc::new(Seen::default());
    let layer = DeadlineLayer::builder()
        .http()
        .max_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    // Tells the test when the worker has called the deadline layer (in the same synchronous `call`, before the
    // clock can move).
    let (called, mut worker_called) = tokio::sync::mpsc::unbounded_channel();
    let stack = tower::ServiceBuilder::new()
        .map_request(move |req: Request<String>| {
            called.send(()).unwrap();
            req
        })
        .layer(layer.clone())
        .service(recording(seen.clone(), Duration::from_millis(500)));
    let mut buffered = tower::buffer::Buffer::new(stack, 4);
    let start = Instant::now();
    let future = buffered.ready().await.unwrap().call(request(&[]));
    worker_called.recv().await.unwrap();
    tokio::time::advance(Duration::from_millis(600)).await;
    let response = future.await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let (_, current) = seen.deadlines.lock().unwrap()[0];
    assert_eq!(current, Some(Deadline::at(start + Duration::from_secs(1))));
    assert_eq!(layer.handle().snapshot().dropped, 1);
}

/// The timer is armed only when the inner future is pending: an answer ready at the first poll makes none, so
/// it needs no runtime at all (making a timer outside one panics).
#[test]
fn an_answer_ready_at_once_arms_no_timer() {
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // Ready at its first poll, which runs inside the scope.
    let mut svc = layer.layer(service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::new(Deadline::current()))
    }));
    let response = futures::executor::block_on(svc.call(request(&[]))).unwrap();
    assert!(response.into_body().is_some(), "ran inside the scope");
    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.admitted, snapshot.in_flight), (1, 0));
}

/// An answer leaves the response future's state as it was, with its scope empty: it reads as done, holds no
/// permit any more, and a second poll panics rather than answering twice.
#[test]
fn a_second_poll_after_the_answer_panics() {
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let mut future = Box::pin(svc.call(request(&[])));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(future.as_mut().poll(&mut cx).is_ready());
    assert_eq!(format!("{future:?}"), r#"ResponseFuture { state: "done" }"#);
    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.admitted, snapshot.in_flight), (1, 0));
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        future.as_mut().poll(&mut cx)
    }));
    assert!(again.is_err());
    assert_eq!(
        Deadline::current(),
        None,
        "the unwinding poll left no deadline"
    );
    drop(future);
    let snapshot = layer.handle().snapshot();
    assert_eq!(
        (snapshot.admitted, snapshot.in_flight, snapshot.dropped),
        (1, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn work_finishing_in_time_is_delivered_and_counted_a_success() {
    let (log, observer) = events();
    let seen = Arc::new(Seen::default());
    let layer = DeadlineLayer::builder().observer(observer).build().unwrap();
    // Finishing exactly at the deadline still counts: the inner future is polled before the timer.
    let response = layer
        .layer(recording(seen, Duration::from_secs(2)))
        .oneshot(request(&[("grpc-timeout", "2S")]))
        .await
        .unwrap();
    assert_eq!(response.into_body(), "done");
    // The answer came after the timer was armed (the work was pending first): one completion, a success, and
    // nothing left in flight once the future is gone.
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(matches!(
        log[1],
        Event::Completed {
            outcome: Outcome::Success,
            in_flight: 0,
            ..
        }
    ));
    let snapshot = layer.handle().snapshot();
    assert_eq!(
        (snapshot.admitted, snapshot.in_flight, snapshot.dropped),
        (1, 0, 0)
    );
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_mode_answers_deadline_exceeded_never_cancelled() {
    let layer = DeadlineLayer::builder().grpc().build().unwrap();
    let slow = service_fn(|_req: Request<String>| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let svc = layer.layer(slow);
    for headers in [[("grpc-timeout", "1S")], [("grpc-timeout", "0n")]] {
        let response = svc.clone().oneshot(request(&headers)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        assert_eq!(response.headers()["content-type"], "application/grpc");
    }
    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.dropped, snapshot.rejected), (1, 1));
}

const MALFORMED: [(&str, &str); 8] = [
    ("grpc-timeout", "123456789S"),
    ("grpc-timeout", "10s"),
    ("grpc-timeout", "1.5S"),
    ("grpc-timeout", "S"),
    ("grpc-timeout", "-1S"),
    ("x-request-timeout-ms", "99999999999999999999999"),
    ("x-request-timeout-ms", "1e3"),
    ("x-request-timeout-ms", "soon"),
];

#[tokio::test(start_paused = true)]
async fn malformed_headers_are_ignored_by_default() {
    let seen = Arc::new(Seen::default());
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let svc = layer.layer(recording(seen.clone(), Duration::ZERO));
    let start = Instant::now();
    for header in MALFORMED {
        svc.clone().oneshot(request(&[header])).await.unwrap();
    }
    // A valid header next to a malformed one still counts.
    svc.clone()
        .oneshot(request(&[
            ("grpc-timeout", "junk"),
            ("x-request-timeout-ms", "1000"),
        ]))
        .await
        .unwrap();
    let deadlines = seen.deadlines.lock().unwrap();
    let max = Deadline::at(start + Duration::from_secs(5));
    assert!(deadlines[..MALFORMED.len()]
        .iter()
        .all(|d| *d == (None, Some(max))));
    let one_second = Deadline::at(start + Duration::from_secs(1));
    assert_eq!(deadlines[MALFORMED.len()], (None, Some(one_second)));
    assert_eq!(
        layer.handle().snapshot().invalid,
        MALFORMED.len() as u64 + 1
    );
}

#[tokio::test(start_paused = true)]
async fn a_repeated_timeout_header_counts_its_smallest_value() {
    let seen = Arc::new(Seen::default());
    let layer = DeadlineLayer::builder().build().unwrap();
    let svc = layer.layer(recording(seen.clone(), Duration::ZERO));
    let start = Instant::now();
    // Whichever order the values come in (a proxy may append its own shorter one), and in either header.
    let repeated: [&[(&str, &str)]; 4] = [
        &[("grpc-timeout", "100H"), ("grpc-timeout", "1m")],
        &[("grpc-timeout", "1m"), ("grpc-timeout", "100H")],
        &[
            ("x-request-timeout-ms", "3600000"),
            ("x-request-timeout-ms", "1"),
        ],
        &[
            ("x-request-timeout-ms", "1"),
            ("x-request-timeout-ms", "3600000"),
        ],
    ];
    for headers in repeated {
        svc.clone().oneshot(request(headers)).await.unwrap();
    }
    // A malformed value among valid ones is a malformed header: ignored by default, the valid ones still count.
    svc.clone()
        .oneshot(request(&[("grpc-timeout", "1S"), ("grpc-timeout", "junk")]))
        .await
        .unwrap();
    let one_ms = Deadline::at(start + Duration::from_millis(1));
    let one_s = Deadline::at(start + Duration::from_secs(1));
    let deadlines = seen.deadlines.lock().unwrap().clone();
    assert_eq!(
        deadlines,
        [(None, Some(one_ms)); 4]
            .into_iter()
            .chain([(None, Some(one_s))])
            .collect::<Vec<_>>()
    );
    assert_eq!(layer.handle().snapshot().invalid, 1);

    // Strict mode refuses it, whether the malformed value comes first or last.
    let strict = DeadlineLayer::builder()
        .strict(true)
        .http()
        .build()
        .unwrap();
    for headers in [
        [("grpc-timeout", "1S"), ("grpc-timeout", "junk")],
        [("grpc-timeout", "junk"), ("grpc-timeout", "1S")],
        [
            ("x-request-timeout-ms", "1000"),
            ("x-request-timeout-ms", "1e3"),
        ],
    ] {
        let response = strict
            .layer(recording(seen.clone(), Duration::ZERO))
            .oneshot(request(&headers))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{headers:?}");
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn strict_mode_rejects_malformed_headers_in_every_mode() {
    let seen = Arc::new(Seen::default());
    let errors = DeadlineLayer::builder().strict(true).build().unwrap();
    let http = DeadlineLayer::builder()
        .strict(true)
        .http()
        .build()
        .unwrap();
    for header in MALFORMED {
        let error: BoxError = errors
            .layer(recording(seen.clone(), Duration::ZERO))
            .oneshot(request(&[header]))
            .await
            .unwrap_err();
        assert!(error.is::<InvalidTimeout>(), "{header:?}: {error}");
        let response = http
            .layer(recording(seen.clone(), Duration::ZERO))
            .oneshot(request(&[header]))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{header:?}");
    }
    #[cfg(feature = "grpc")]
    {
        let grpc = DeadlineLayer::builder()
            .strict(true)
            .grpc()
            .build()
            .unwrap();
        let response = grpc
            .layer(recording(seen.clone(), Duration::ZERO))
            .oneshot(request(&[("grpc-timeout", "9999999999n")]))
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "3");
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    // Strict mode still accepts well-formed headers.
    errors
        .layer(recording(seen.clone(), Duration::ZERO))
        .oneshot(request(&[("grpc-timeout", "99999999H")]))
        .await
        .unwrap();
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn builders_validate() {
    let zero = DeadlineLayer::builder()
        .max_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(
        zero.to_string(),
        "invalid deadline config: max_timeout: must be greater than zero"
    );
    let inverted = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(1))
        .min_budget(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(inverted.field(), "min_budget");
    assert_eq!(
        DeadlineLayer::builder()
            .timeout_header("bad header")
            .build()
            .unwrap_err()
            .field(),
        "timeout_header"
    );
    assert!(PropagateDeadlineLayer::builder()
        .timeout_header("grpc-timeout")
        .build()
        .is_err());
    assert!(PropagateDeadlineLayer::builder()
        .timeout_header("X-Budget-Ms")
        .build()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_later_deadline_the_request_brought_is_overwritten_by_the_propagating_layer() {
    // Built without storing its own (the default), the layer still leaves no later deadline in the extensions
    // than the one it enforces and sends; with `request_extension(true)` it stores it on every request.
    for store in [false, true] {
        let seen = Arc::new(Seen::default());
        let client = PropagateDeadlineLayer::builder()
            .request_extension(store)
            .build()
            .unwrap()
            .layer(recording(seen.clone(), Duration::ZERO));
        let scope = Deadline::after(Duration::from_secs(2));
        let mut late = request(&[]);
        late.extensions_mut()
            .insert(Deadline::after(Duration::from_secs(9)));
        scope.scope(client.clone().oneshot(late)).await.unwrap();
        scope.scope(client.oneshot(request(&[]))).await.unwrap();
        assert_eq!(
            *seen.deadlines.lock().unwrap(),
            vec![
                (Some(scope), Some(scope)),
                (store.then_some(scope), Some(scope))
            ],
            "store: {store}"
        );
    }
}

/// A propagating client with a 10 ms margin in front of [`recording`], and what the latter saw.
fn propagating_with_10ms_margin() -> (
    Arc<Seen>,
    impl Service<Request<String>, Response = Response<String>, Error = BoxError> + Clone,
) {
    let seen = Arc::new(Seen::default());
    let client = PropagateDeadlineLayer::builder()
        .margin(Duration::from_millis(10))
        .build()
        .unwrap()
        .layer(recording(seen.clone(), Duration::ZERO));
    (seen, client)
}

#[tokio::test(start_paused = true)]
async fn propagation_writes_the_budget_minus_the_margin() {
    let (seen, client) = propagating_with_10ms_margin();
    let deadline = Deadline::after(Duration::from_secs(2));

    // From the task-local scope ...
    deadline
        .scope(client.clone().oneshot(request(&[])))
        .await
        .unwrap();
    // ... or from the request's extensions, when earlier.
    let mut req = request(&[]);
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(1500)));
    Deadline::after(Duration::from_secs(9))
        .scope(client.clone().oneshot(req))
        .await
        .unwrap();
    // A caller's own smaller timeout is kept.
    deadline
        .scope(client.clone().oneshot(request(&[("grpc-timeout", "100m")])))
        .await
        .unwrap();
    // No deadline: nothing written.
    client.clone().oneshot(request(&[])).await.unwrap();

    let headers = seen.headers.lock().unwrap();
    let written = |i: usize| {
        (
            headers[i]
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned()),
            headers[i]
                .get("x-request-timeout-ms")
                .map(|v| v.to_str().unwrap().to_owned()),
        )
    };
    assert_eq!(written(0), (Some("1990000u".into()), Some("1990".into())));
    assert_eq!(written(1), (Some("1490000u".into()), Some("1490".into())));
    assert_eq!(written(2), (Some("100m".into()), Some("1990".into())));
    assert_eq!(written(3), (None, None));
    // The inner client stack sees the deadline too (for shedding doomed calls): current, and in the extensions
    // only where the request brought one (the layer's default stores none).
    let deadlines = seen.deadlines.lock().unwrap();
    assert_eq!(deadlines[0], (None, Some(deadline)));
    let brought = Deadline::at(deadline.instant() - Duration::from_millis(500));
    assert_eq!(deadlines[1], (Some(brought), Some(brought)));
}

#[tokio::test(start_paused = true)]
async fn propagation_passes_on_only_the_smallest_value_the_caller_set() {
    let (seen, client) = propagating_with_10ms_margin();
    let deadline = Deadline::after(Duration::from_secs(1));
    let calls: [&[(&str, &str)]; 4] = [
        // A smaller value the caller set is kept, alone: a next hop reading any one of several values (tonic reads
        // the first, grpc-go the last) must not find a larger one.
        &[
            ("grpc-timeout", "100m"),
            ("grpc-timeout", "99H"),
            ("x-request-timeout-ms", "100"),
            ("x-request-timeout-ms", "99999999"),
        ],
        &[
            ("grpc-timeout", "99H"),
            ("grpc-timeout", "100m"),
            ("x-request-timeout-ms", "99999999"),
            ("x-request-timeout-ms", "100"),
        ],
        // A malformed value goes too.
        &[("grpc-timeout", "junk"), ("grpc-timeout", "100m")],
        // Values all larger than the budget give way to it.
        &[("grpc-timeout", "99H"), ("grpc-timeout", "50H")],
    ];
    for headers in calls {
        deadline
            .scope(client.clone().oneshot(request(headers)))
            .await
            .unwrap();
    }
    let headers = seen.headers.lock().unwrap();
    let sent = |i: usize, name: &str| -> Vec<String> {
        headers[i]
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    for i in 0..2 {
        assert_eq!(sent(i, "grpc-timeout"), ["100m"], "call {i}");
        assert_eq!(sent(i, "x-request-timeout-ms"), ["100"], "call {i}");
    }
    assert_eq!(sent(2, "grpc-timeout"), ["100m"]);
    assert_eq!(sent(2, "x-request-timeout-ms"), ["990"]);
    assert_eq!(sent(3, "grpc-timeout"), ["990000u"]);
}

#[tokio::test(start_paused = true)]
async fn propagation_with_nothing_left_fails_at_once_and_sends_nothing() {
    let (mut mock, mut handle) = tower_test::mock::pair::<Request<String>, Response<String>>();
    let layer = PropagateDeadlineLayer::builder()
        .margin(Duration::from_millis(10))
        .http()
        .build()
        .unwrap();
    let deadline = Deadline::after(Duration::from_millis(10));
    handle.allow(1);
    let mut client = layer.layer(&mut mock);
    std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .unwrap();
    // `call` reads the task-local deadline, so it must run inside the scope.
    let response = deadline
        .scope(async { client.call(request(&[])).await })
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(client);
    drop(mock);
    assert!(handle.next_request().await.is_none(), "nothing may be sent");
    assert_eq!(layer.handle().snapshot().rejected, 1);
}

/// Less than a millisecond after the margin: the millisecond header would carry `0`, which tells the next hop
/// its budget is spent, so the call is refused without being sent; with `grpc-timeout` alone (nanoseconds) it
/// goes out.
#[tokio::test(start_paused = true)]
async fn propagation_refuses_a_budget_the_headers_would_carry_as_zero() {
    for ms_header in [true, false] {
        let seen = Arc::new(Seen::default());
        let mut builder = PropagateDeadlineLayer::builder()
            .margin(Duration::from_millis(10))
            .http();
        if !ms_header {
            builder = builder.no_timeout_header();
        }
        let layer = builder.build().unwrap();
        let client = layer.layer(recording(seen.clone(), Duration::ZERO));
        let deadline = Deadline::after(Duration::from_micros(10_500));
        let response = deadline.scope(client.oneshot(request(&[]))).await.unwrap();
        let snapshot = layer.handle().snapshot();
        if ms_header {
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(seen.calls.load(Ordering::SeqCst), 0, "nothing may be sent");
            assert_eq!((snapshot.rejected, snapshot.admitted), (1, 0));
        } else {
            assert_eq!(response.status(), StatusCode::OK);
            let headers = seen.headers.lock().unwrap();
            assert_eq!(headers[0].get("grpc-timeout").unwrap(), "500000n");
            assert_eq!((snapshot.rejected, snapshot.admitted), (0, 1));
        }
    }
    // A caller's own zero is kept (it is smaller than the budget), and refused the same way.
    let seen = Arc::new(Seen::default());
    let layer = PropagateDeadlineLayer::builder().http().build().unwrap();
    let client = layer.layer(recording(seen.clone(), Duration::ZERO));
    let response = Deadline::after(Duration::from_secs(1))
        .scope(client.oneshot(request(&[("grpc-timeout", "0m")])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.rejected, snapshot.admitted), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn propagation_enforces_the_deadline_locally() {
    let layer = PropagateDeadlineLayer::builder().build().unwrap();
    let hang = service_fn(|_req: Request<String>| {
        std::future::pending::<Result<Response<String>, Infallible>>()
    });
    let start = Instant::now();
    let error = Deadline::after(Duration::from_secs(3))
        .scope(layer.layer(hang).oneshot(request(&[])))
        .await
        .unwrap_err();
    assert!(error.is::<DeadlineExceeded>());
    // Enforced at the deadline itself: the margin only shortens what the next hop is told.
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(layer.handle().snapshot().dropped, 1);
}

/// An inner service that fails `after` the call with a transport error, as a channel enforcing the timeout it
/// was sent does.
fn failing_after(
    after: Duration,
) -> impl Service<Request<String>, Response = Response<String>, Error = BoxError> + Clone {
    service_fn(move |_req: Request<String>| async move {
        tokio::time::sleep(after).await;
        Err::<Response<String>, BoxError>("transport gave up".into())
    })
}

/// The error of one call through `client`, made with 3 s left.
async fn error_with_3s_left<S>(client: S, headers: &[(&str, &str)]) -> BoxError
where
    S: Service<Request<String>, Error = BoxError>,
{
    Deadline::after(Duration::from_secs(3))
        .scope(client.oneshot(request(headers)))
        .await
        .err()
        .expect("the call fails")
}

#[tokio::test(start_paused = true)]
async fn an_error_once_the_sent_budget_is_spent_is_deadline_exceeded() {
    // 3 s left, a 100 ms margin: the next hop is told 2.9 s, and the transport gives up at 2.9 s.
    let layer = PropagateDeadlineLayer::builder()
        .margin(Duration::from_millis(100))
        .build()
        .unwrap();
    let error = error_with_3s_left(
        layer.layer(failing_after(Duration::from_millis(2_900))),
        &[],
    )
    .await;
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    let s = layer.handle().snapshot();
    assert_eq!((s.in_flight, s.dropped), (0, 1));

    // An error while budget is left is the transport's own, passed on as it is and not an overload signal.
    let error = error_with_3s_left(
        layer.layer(failing_after(Duration::from_millis(2_000))),
        &[],
    )
    .await;
    assert!(!error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(error.to_string(), "transport gave up");
    assert_eq!(layer.handle().snapshot().dropped, 1);

    // The caller already set a smaller grpc-timeout (1 s), which the layer keeps: the transport enforces that one,
    // so its error at 1 s is the expiry too.
    let error = error_with_3s_left(
        layer.layer(failing_after(Duration::from_secs(1))),
        &[("grpc-timeout", "1S")],
    )
    .await;
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(layer.handle().snapshot().dropped, 2);
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_propagation_with_nothing_left_answers_deadline_exceeded_without_calling() {
    let seen = Arc::new(Seen::default());
    let layer = PropagateDeadlineLayer::builder().grpc().build().unwrap();
    let client = layer.layer(recording(seen.clone(), Duration::ZERO));
    // 5 ms left, a 5 ms margin: nothing to pass on.
    let response = Deadline::after(Duration::from_millis(5))
        .scope(client.oneshot(request(&[])))
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "4");
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
}

/// With no timeout header written (`grpc_timeout(false)`, `no_timeout_header()`), no next hop or transport enforces a
/// budget of ours: an error from the inner service before the deadline, in the margin's last stretch too, is its
/// own failure and passes on as it is, as does one from the response body. Only the deadline itself cuts.
#[tokio::test(start_paused = true)]
async fn with_no_timeout_header_written_an_error_before_the_deadline_is_the_inner_services_own() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    let layer = PropagateDeadlineLayer::builder()
        .margin(Duration::from_millis(100))
        .grpc_timeout(false)
        .no_timeout_header()
        .build()
        .unwrap();
    // 3 s left, a 100 ms margin: the call fails at 2.95 s, after `deadline - margin` but before the deadline.
    let error = error_with_3s_left(
        layer.layer(failing_after(Duration::from_millis(2_950))),
        &[],
    )
    .await;
    assert!(!error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(error.to_string(), "transport gave up");
    let s = layer.handle().snapshot();
    assert_eq!((s.in_flight, s.dropped), (0, 0));

    // The same for the response body, in HTTP mode: a body error at 2.95 s is the body's own error.
    let layer = PropagateDeadlineLayer::builder()
        .margin(Duration::from_millis(100))
        .grpc_timeout(false)
        .no_timeout_header()
        .http()
        .build()
        .unwrap();
    let streaming = service_fn(|_req: Request<String>| async {
        let frames = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(2_950)).await;
            Err::<http_body::Frame<Bytes>, BoxError>("connection reset".into())
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(frames).boxed_unsync()))
    });
    let error = Deadline::after(Duration::from_secs(3))
        .scope(async {
            let response = layer.layer(streaming).oneshot(request(&[])).await.unwrap();
            response.into_body().collect().await.unwrap_err()
        })
        .await;
    assert!(!error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(error.to_string(), "connection reset");
    let s = layer.handle().snapshot();
    assert_eq!((s.in_flight, s.dropped), (0, 0));
}

/// A caller that hangs up once the deadline has passed, before the layer's timer has answered for it (timers fire at
/// the next millisecond tick, and a client giving up at the same deadline races them), leaves a request that missed
/// its deadline: outcome `Dropped`, as the permits of the layers inside record, not `Ignored` (a caller going away
/// in time). One that hangs up before the deadline is `Ignored`.
#[tokio::test(start_paused = true)]
async fn a_caller_hanging_up_after_the_deadline_leaves_a_dropped_request() {
    for server in [true, false] {
        for (hang_up_after, expected) in [(999, Outcome::Ignored), (1_000, Outcome::Dropped)] {
            let (log, observer) = events();
            let (mut svc, handle) = server_or_client(server, observer, leaving(Exit::Dropped));
            // No scope around the caller (hyper's connection task calls the server): the server finds its deadline
            // in the header, the client in the request's extensions.
            let mut req = request(&[("grpc-timeout", "1S")]);
            req.extensions_mut()
                .insert(Deadline::after(Duration::from_secs(1)));
            svc.ready().await.unwrap();
            let mut future = svc.call(req);
            assert!(futures::poll!(future.as_mut()).is_pending());
            tokio::time::advance(Duration::from_millis(hang_up_after)).await;
            drop(future);
            let what = format!("server {server}, hanging up after {hang_up_after} ms");
            assert_eq!(completed(&log), vec![expected], "{what}");
            let snapshot = handle.snapshot();
            assert_eq!(snapshot.in_flight, 0, "{what}");
            assert_eq!(
                snapshot.dropped,
                u64::from(expected == Outcome::Dropped),
                "{what}"
            );
        }
    }
}
