//! Layer tests for the adaptive concurrency limiter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use http::StatusCode;
use tokio::time::Instant;
use tower::util::BoxService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_backpressure::adaptive::{
    AdaptiveConcurrency, AdaptiveConcurrencyBuilder, AdaptiveConcurrencyLayer, AdaptiveHandle,
    Aimd, Gradient2, Knee, Vegas,
};
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::{
    error::{DeadlineExceeded, Overloaded},
    AnyOk, BoxError, CircuitState, Deadline, ErrorMode, Event, LimitSource, Observer, Outcome,
    Reason,
};
use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use tower_test::mock;

fn layer(limit: usize) -> AdaptiveConcurrencyLayer {
    AdaptiveConcurrencyLayer::builder()
        .initial_limit(limit)
        .max_limit(limit)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn limit_plus_first_request_is_rejected_at_once_with_overloaded() {
    let layer = layer(2);
    let handle = layer.handle();
    let (mock, mut backend) = mock::pair::<u32, u32>();
    let mut svc = layer.layer(mock);
    backend.allow(10);

    let a = svc.ready().await.unwrap().call(1);
    let b = svc.ready().await.unwrap().call(2);
    let c = svc.ready().await.unwrap().call(3);
    // The rejection is ready immediately, without the backend having answered anything.
    let err = c
        .now_or_never()
        .expect("rejection must be immediate")
        .unwrap_err();
    let overloaded = err
        .downcast_ref::<Overloaded>()
        .expect("an Overloaded error");
    assert_eq!(overloaded.to_string(), "service overloaded");
    assert_eq!(handle.in_flight(), 2);
    assert_eq!(handle.snapshot().rejected, 1);

    let (_, reply) = backend.next_request().await.unwrap();
    reply.send_response(10);
    assert_eq!(a.await.unwrap(), 10);
    let (_, reply) = backend.next_request().await.unwrap();
    reply.send_response(20);
    assert_eq!(b.await.unwrap(), 20);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_limit() {
    let layer = layer(2);
    let (mock, mut backend) = mock::pair::<u32, u32>();
    backend.allow(10);
    let mut one = layer.layer(mock);
    let mut two = one.clone();
    let mut three = layer.layer(one.get_ref().clone());

    let _a = one.ready().await.unwrap().call(1);
    let _b = two.ready().await.unwrap().call(2);
    let c = three.ready().await.unwrap().call(3);
    assert!(c.await.unwrap_err().is::<Overloaded>());
    assert_eq!(layer.handle().in_flight(), 2);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_on_idle_clones_holds_nothing() {
    let layer = layer(1);
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    let mut idle: Vec<_> = (0..5).map(|_| svc.clone()).collect();
    for s in &mut idle {
        s.ready().await.unwrap();
        s.ready().await.unwrap();
    }
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn dropped_response_future_releases_its_permit() {
    let layer = layer(1);
    let handle = layer.handle();
    let (mock, mut backend) = mock::pair::<u32, u32>();
    backend.allow(10);
    let mut svc = layer.layer(mock);
    let fut = svc.ready().await.unwrap().call(1);
    assert_eq!(handle.in_flight(), 1);
    drop(fut);
    assert_eq!(handle.in_flight(), 0);
    // The slot is usable again.
    let fut = svc.ready().await.unwrap().call(2);
    let (_, reply) = backend.next_request().await.unwrap();
    let (_, reply2) = backend.next_request().await.unwrap();
    drop(reply);
    reply2.send_response(5);
    assert_eq!(fut.await.unwrap(), 5);
}

/// Response futures made on one thread and finished or dropped on others, as a work-stealing runtime moves tasks:
/// the limiter's tokens go back into those threads' stripes, in flight returns to 0, and the whole limit is still
/// there for the taking.
#[test]
fn permits_released_on_other_threads_leave_the_whole_limit() {
    const LIMIT: usize = 300;
    let layer = layer(LIMIT);
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    let ready = |svc: &mut AdaptiveConcurrency<_>| {
        futures::executor::block_on(svc.ready()).unwrap();
    };
    for round in 0..5 {
        let mut svc = svc.clone();
        let futures: Vec<_> = (0..100)
            .map(|i| {
                ready(&mut svc);
                svc.call(i)
            })
            .collect();
        assert_eq!(handle.in_flight(), 100, "round {round}");
        std::thread::spawn(move || {
            for (i, f) in futures.into_iter().enumerate() {
                if i % 2 == 0 {
                    assert_eq!(futures::executor::block_on(f).unwrap(), i as u32);
                } else {
                    drop(f);
                }
            }
        })
        .join()
        .unwrap();
        assert_eq!(handle.in_flight(), 0, "round {round}");
    }
    let mut svc = svc.clone();
    let held: Vec<_> = (0..LIMIT as u32)
        .map(|i| {
            ready(&mut svc);
            svc.call(i)
        })
        .collect();
    assert_eq!(handle.in_flight(), LIMIT);
    ready(&mut svc);
    let refused = svc.call(0).now_or_never().expect("refused at once");
    assert!(refused.unwrap_err().is::<Overloaded>());
    drop(held);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn panicking_inner_service_releases_its_permit() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(1)
        .observer(move |e: &Event| {
            if let Event::Completed { outcome, .. } = e {
                log.lock().unwrap().push(*outcome);
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|fail: bool| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!fail, "inner service panicked");
        Ok::<_, BoxError>(())
    }));
    let fut = svc.ready().await.unwrap().call(true);
    assert_eq!(handle.in_flight(), 1);
    let joined = tokio::spawn(fut).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(*events.lock().unwrap(), vec![Outcome::Failure]);
    svc.ready().await.unwrap().call(false).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn bypassed_requests_take_no_permit() {
    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(1)
        .bypass(|path: &&str| *path == "/healthz")
        .build()
        .unwrap();
    let handle = layer.handle();
    let (mock, mut backend) = mock::pair::<&str, u32>();
    backend.allow(10);
    let mut svc = layer.layer(mock);
    let _held = svc.ready().await.unwrap().call("/work");
    let health = svc.ready().await.unwrap().call("/healthz");
    assert_eq!(handle.in_flight(), 1);
    let rejected = svc.ready().await.unwrap().call("/work");
    assert!(rejected.await.unwrap_err().is::<Overloaded>());
    let _ = backend.next_request().await.unwrap();
    let (req, reply) = backend.next_request().await.unwrap();
    assert_eq!(req, "/healthz");
    reply.send_response(200);
    assert_eq!(health.await.unwrap(), 200);
    assert_eq!(handle.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn windows_move_the_limit_and_report_it() {
    // Two at a time fill the limit of 2: AIMD adds one per window.
    let (told, handle) = limits_told(|_, _| {}).await;
    assert!(handle.limit() > 2, "limit {}", handle.limit());
    assert_eq!(*told.last().unwrap(), handle.limit());
    let snapshot = handle.snapshot();
    assert!(snapshot.windows >= 1);
    assert_eq!(snapshot.algorithm, "aimd");
    // Latency is measured from admission to completion: 20 ms of paused time.
    assert_eq!(handle.expected_latency(), Some(Duration::from_millis(20)));
    assert_eq!(
        LimitSource::expected_latency(&handle),
        Some(Duration::from_millis(20))
    );
    assert_eq!(LimitSource::limit(&handle), handle.limit());
}

/// Runs an AIMD limiter (initial limit 2, windows of 10 ms) through three rounds of two 20 ms calls, which raise the
/// limit to 3, with an observer that hands each event and the layer's handle to `react` (which may narrow the
/// bounds) and records the `LimitChanged` events. Returns the limits told and the handle.
async fn limits_told(
    react: impl Fn(&Event, &AdaptiveHandle) + Send + Sync + 'static,
) -> (Vec<usize>, AdaptiveHandle) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let handle_cell = Arc::new(std::sync::OnceLock::<AdaptiveHandle>::new());
    let cell = handle_cell.clone();
    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(2)
        .algorithm(Aimd::new())
        .min_samples(2)
        .window(Duration::from_millis(10))
        .observer(move |e: &Event| {
            if let Some(handle) = cell.get() {
                react(e, handle);
            }
            if let Event::LimitChanged { limit, .. } = e {
                log.lock().unwrap().push(*limit);
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    handle_cell.set(handle.clone()).ok().unwrap();
    let mut svc = layer.layer(service_fn(|(): ()| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, BoxError>(())
    }));
    for _ in 0..3 {
        let a = svc.ready().await.unwrap().call(());
        let b = svc.ready().await.unwrap().call(());
        let (a, b) = tokio::join!(a, b);
        a.unwrap();
        b.unwrap();
    }
    let told = events.lock().unwrap().clone();
    (told, handle)
}

/// The last `LimitChanged` an observer is told is the limit in force, even when a change made meanwhile (here by
/// the observer itself, through the handle, while it is told of the completion that moved the limit) is told first.
#[tokio::test(start_paused = true)]
async fn the_last_limit_told_is_the_limit_in_force() {
    let (told, handle) = limits_told(|e, handle| {
        // The window this completion closed raised the limit to 3: an operator narrows the bounds.
        if matches!(e, Event::Completed { .. }) && handle.limit() == 3 {
            handle.set_bounds(1, 2).unwrap();
        }
    })
    .await;
    assert_eq!(handle.limit(), 2);
    assert!(
        told.len() >= 2,
        "the raise and the narrowing are both told: {told:?}"
    );
    assert_eq!(*told.last().unwrap(), handle.limit(), "told {told:?}");
}

/// The same when the limit moves while its change is being told: here the observer narrows the bounds before it
/// records the raise it is told of, as a change on another thread may land between the limit's read and the event.
#[tokio::test(start_paused = true)]
async fn a_limit_moved_while_it_is_told_is_told_again() {
    let (told, handle) = limits_told(|e, handle| {
        if matches!(e, Event::LimitChanged { limit: 3, .. }) {
            handle.set_bounds(1, 2).unwrap();
        }
    })
    .await;
    assert_eq!(handle.limit(), 2);
    assert!(told.contains(&3), "the raise is told: {told:?}");
    assert_eq!(*told.last().unwrap(), handle.limit(), "told {told:?}");
}

#[tokio::test(start_paused = true)]
async fn drops_shrink_the_limit() {
    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(20)
        .algorithm(Aimd::new())
        .min_samples(2)
        .window(Duration::from_millis(1))
        .classifier(|r: Result<&(), &BoxError>| {
            if r.is_ok() {
                Outcome::Success
            } else {
                Outcome::Dropped
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|_: ()| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Err::<(), _>(BoxError::from("upstream 503"))
    }));
    for _ in 0..4 {
        let _ = svc.ready().await.unwrap().call(()).await;
    }
    assert_eq!(handle.limit(), 16, "two windows of drops: 20 -> 18 -> 16");
}

#[tokio::test(start_paused = true)]
async fn handle_retunes_live() {
    let layer = layer(10);
    let handle = layer.handle();
    handle.set_bounds(2, 4).unwrap();
    assert_eq!(handle.limit(), 4);
    let err = handle.set_bounds(5, 3).unwrap_err();
    assert!(err.to_string().contains("min_limit"), "{err}");
    assert!(handle.set_bounds(0, 3).is_err());
    let err = handle
        .set_algorithm(Aimd::new().backoff_ratio(2.0))
        .unwrap_err();
    assert!(err.to_string().contains("aimd.backoff_ratio"), "{err}");
    handle.set_algorithm(Vegas::new()).unwrap();
    let snapshot = handle.snapshot();
    assert_eq!(
        (snapshot.limit, snapshot.min_limit, snapshot.max_limit),
        (4, 2, 4)
    );
    assert_eq!(snapshot.algorithm, "vegas");
}

#[test]
fn bad_configuration_is_an_error_with_a_clear_message() {
    fn msg<C, M, O, B>(
        r: Result<AdaptiveConcurrencyLayer<C, M, O, B>, tower_backpressure::core::ConfigError>,
    ) -> String {
        match r {
            Ok(_) => panic!("accepted a bad configuration"),
            Err(e) => e.to_string(),
        }
    }
    let b = AdaptiveConcurrencyLayer::builder;
    assert_eq!(
        msg(b().min_limit(10).max_limit(5).build()),
        "invalid adaptive concurrency config: min_limit: must not exceed max_limit (10 > 5)"
    );
    assert!(msg(b().initial_limit(0).build()).contains("initial_limit: must be at least 1"));
    assert!(msg(b().min_limit(0).build()).contains("min_limit: must be at least 1"));
    assert!(
        msg(b().initial_limit(50).max_limit(10).build()).contains("initial_limit: must be within")
    );
    assert!(msg(b().window(Duration::ZERO).build()).contains("window: must be positive"));
    assert!(msg(b().min_samples(0).build()).contains("min_samples"));
    assert!(msg(b().algorithm(Knee::new().gain(10.0)).build())
        .contains("knee.gain: must be within [1, 4], got 10"));
    assert!(
        msg(b().algorithm(Gradient2::new().smoothing(0.0)).build()).contains("gradient2.smoothing")
    );
    assert!(msg(b().algorithm(Vegas::new().smoothing(2.0)).build()).contains("vegas.smoothing"));
}

#[cfg(feature = "http")]
mod http_mode {
    use super::*;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use http_body_util::BodyExt;

    /// A body of `n` one-byte chunks.
    #[derive(Default)]
    struct Chunks(u8);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }

        fn is_end_stream(&self) -> bool {
            self.0 == 0
        }
    }

    /// Sends a request through `svc` and waits for the response.
    async fn send<S>(svc: &mut S) -> S::Response
    where
        S: Service<http::Request<()>>,
        S::Error: std::fmt::Debug,
    {
        svc.ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap()
    }

    fn http_layer(
        limit: usize,
    ) -> AdaptiveConcurrencyLayer<
        tower_backpressure::core::HttpStatus,
        tower_backpressure::core::HttpMode,
        (),
        tower_backpressure::adaptive::NoBypass,
        tower_backpressure::core::RequestDeadline,
    > {
        AdaptiveConcurrencyLayer::builder()
            .initial_limit(limit)
            .http()
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn limit_plus_first_request_gets_503() {
        let layer = http_layer(1);
        let mut svc = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(Chunks(2)))
        }));
        let first = send(&mut svc).await;
        // The body holds the permit until it is read to the end.
        assert_eq!(layer.handle().in_flight(), 1);
        let second = send(&mut svc).await;
        assert_eq!(second.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let bytes = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"xx");
        assert_eq!(layer.handle().in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_half_read_body_releases_its_permit() {
        let layer = http_layer(4);
        let handle = layer.handle();
        let mut svc = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(Chunks(3)))
        }));
        let mut body = send(&mut svc).await.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"x"));
        assert_eq!(handle.in_flight(), 1);
        drop(body);
        assert_eq!(handle.in_flight(), 0);
    }

    #[cfg(feature = "grpc")]
    #[tokio::test(start_paused = true)]
    async fn limit_plus_first_grpc_request_gets_unavailable() {
        let layer = AdaptiveConcurrencyLayer::builder()
            .initial_limit(1)
            .grpc()
            .build()
            .unwrap();
        let mut svc = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(Chunks(1)))
        }));
        let _first = send(&mut svc).await;
        let second = send(&mut svc).await;
        assert_eq!(second.status(), http::StatusCode::OK);
        assert_eq!(second.headers()["grpc-status"], "14");
    }
}

/// Many tasks on two worker threads hammer one limiter: the inner service never sees more than the limit at once,
/// and every permit comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_never_exceed_the_limit() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(4)
        .max_limit(4)
        .min_samples(1)
        .window(Duration::from_nanos(1))
        .build()
        .unwrap();
    let handle = layer.handle();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let svc = layer.layer(service_fn(move |_: u32| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(())
        }
    }));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let (mut ok, mut shed) = (0u32, 0u32);
                for i in 0..2_000 {
                    match svc.ready().await.unwrap().call(i).await {
                        Ok(()) => ok += 1,
                        Err(e) if e.is::<Overloaded>() => shed += 1,
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                (ok, shed)
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap().0;
    }
    assert!(admitted > 0);
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(handle.in_flight(), 0);
    assert!(handle.limit() <= 4 && handle.limit() >= 1);
}

/// Runs `n` requests of 20 ms of paused time at once through `svc`.
async fn burst<S>(svc: &mut S, n: usize)
where
    S: Service<bool, Response = (), Error = BoxError>,
{
    let mut calls = Vec::with_capacity(n);
    for _ in 0..n {
        calls.push(svc.ready().await.unwrap().call(true));
    }
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
}

/// A limiter of 10 000 with 10 ms windows from `builder`, over a service taking 20 ms of paused time.
fn busy<O: Observer>(
    builder: AdaptiveConcurrencyBuilder<AnyOk, ErrorMode, O>,
) -> (AdaptiveHandle, BoxService<bool, (), BoxError>) {
    let layer = builder
        .initial_limit(10_000)
        .max_limit(10_000)
        .algorithm(Aimd::new())
        .window(Duration::from_millis(10))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_: bool| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, BoxError>(())
    }));
    (layer.handle(), BoxService::new(svc))
}

#[tokio::test(start_paused = true)]
async fn a_busy_limiter_times_a_sample_of_requests_and_still_measures_latency() {
    let (handle, mut svc) = busy(AdaptiveConcurrencyLayer::builder());
    // The first completion at 20 ms closes a window of one sample; the next window holds 5 000.
    burst(&mut svc, 5000).await;
    assert_eq!(handle.snapshot().timed_one_in, 1);
    burst(&mut svc, 5000).await;
    assert_eq!(
        handle.snapshot().timed_one_in,
        2,
        "5 000 samples a window: one request in 2 timed"
    );
    // Thinned out, the windows still close and the latency is still the requests' 20 ms.
    let windows = handle.snapshot().windows;
    burst(&mut svc, 5000).await;
    burst(&mut svc, 100).await;
    assert_eq!(handle.snapshot().windows, windows + 2);
    assert_eq!(handle.expected_latency(), Some(Duration::from_millis(20)));
    // Quiet again: every request timed.
    burst(&mut svc, 100).await;
    assert_eq!(handle.snapshot().timed_one_in, 1);

    // With an observer, every request is timed and reported, however busy.
    let seen = Arc::new(Mutex::new(0usize));
    let counted = seen.clone();
    let (handle, mut svc) = busy(
        AdaptiveConcurrencyLayer::builder().observer(move |e: &Event| {
            if let Event::Completed { latency, .. } = e {
                assert_eq!(*latency, Duration::from_millis(20));
                *counted.lock().unwrap() += 1;
            }
        }),
    );
    for _ in 0..3 {
        burst(&mut svc, 5000).await;
    }
    assert_eq!(handle.snapshot().timed_one_in, 1);
    assert_eq!(*seen.lock().unwrap(), 15_000);
}

/// Counts the inner service's `call`s (not its futures' polls, which a layer could skip by dropping the future),
/// each answering `Res::default()` after `work`.
fn counted<Req: Send + 'static, Res: Default + Send + 'static>(
    calls: Arc<AtomicUsize>,
    work: Duration,
) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone {
    service_fn(move |_: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(work).await;
            Ok::<_, BoxError>(Res::default())
        }
    })
}

/// A limiter that learns fast: a limit of 4, AIMD, 10 ms windows of 2 samples.
fn quick() -> AdaptiveConcurrencyBuilder {
    AdaptiveConcurrencyLayer::builder()
        .initial_limit(4)
        .algorithm(Aimd::new())
        .min_samples(2)
        .window(Duration::from_millis(10))
}

/// Runs pairs of requests made by `request` through `svc` until the limiter behind `handle` expects `latency`.
async fn learn<Req, S>(
    svc: &mut S,
    handle: &AdaptiveHandle,
    latency: Duration,
    request: impl Fn() -> Req,
) where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..10 {
        if handle.expected_latency() == Some(latency) {
            return;
        }
        let a = svc.ready().await.unwrap().call(request());
        let b = svc.ready().await.unwrap().call(request());
        let (a, b) = tokio::join!(a, b);
        a.unwrap();
        b.unwrap();
    }
    assert_eq!(handle.expected_latency(), Some(latency));
}

#[tokio::test(start_paused = true)]
async fn doomed_requests_are_rejected_before_they_take_a_permit() {
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let log = reasons.clone();
    let layer = quick()
        .observer(move |e: &Event| {
            if let Event::Rejected { reason, .. } = e {
                log.lock().unwrap().push(*reason);
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(counted::<bool, ()>(
        calls.clone(),
        Duration::from_millis(100),
    ));
    let doomed = |e: BoxError| e.is::<DeadlineExceeded>();

    // Before any window has closed the service time is unknown: only an expired deadline is refused.
    let expired = Deadline::at(Instant::now());
    let call = expired.scope(async { svc.ready().await.unwrap().call(true).await });
    assert!(call.await.is_err_and(doomed));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let short = Deadline::after(Duration::from_millis(1));
    let call = short.scope(async { svc.ready().await.unwrap().call(true).await });
    assert!(call.await.is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    learn(&mut svc, &handle, Duration::from_millis(100), || true).await;
    let before = calls.load(Ordering::SeqCst);
    let limit = handle.limit();
    // A budget of exactly the expected service time cannot finish in time; a nanosecond more can.
    let exact = Deadline::after(Duration::from_millis(100));
    let call = exact.scope(async { svc.ready().await.unwrap().call(true).await });
    assert!(call.await.is_err_and(doomed));
    assert_eq!(calls.load(Ordering::SeqCst), before);
    assert_eq!(handle.in_flight(), 0);
    let enough = Deadline::after(Duration::from_millis(100) + Duration::from_nanos(1));
    let call = enough.scope(async { svc.ready().await.unwrap().call(true).await });
    assert!(call.await.is_ok());
    // Without a deadline, nothing is judged.
    svc.ready().await.unwrap().call(true).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), before + 2);

    let snapshot = handle.snapshot();
    assert_eq!((snapshot.rejected, snapshot.rejected_deadline), (2, 2));
    assert_eq!(handle.in_flight(), 0);
    // The doomed requests were never admitted: the limit learned nothing from them.
    assert!(handle.limit() >= limit);
    assert_eq!(
        *reasons.lock().unwrap(),
        [Reason::DeadlineExceeded, Reason::DeadlineExceeded]
    );
}

#[tokio::test(start_paused = true)]
async fn bypassed_requests_are_not_judged_by_their_deadline() {
    let layer = AdaptiveConcurrencyLayer::builder()
        .bypass(|health: &bool| *health)
        .build()
        .unwrap();
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(counted::<bool, ()>(calls.clone(), Duration::ZERO));
    let expired = Deadline::at(Instant::now());
    let call = expired.scope(async { svc.ready().await.unwrap().call(true).await });
    assert!(call.await.is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.snapshot().rejected_deadline, 0);
}

/// An HTTP request, carrying `grpc-timeout: value` if given.
fn request(grpc_timeout: Option<&'static str>) -> http::Request<String> {
    let mut request = http::Request::new(String::new());
    if let Some(value) = grpc_timeout {
        let value = http::HeaderValue::from_static(value);
        request.headers_mut().insert("grpc-timeout", value);
    }
    request
}

/// Teaches the limiter behind `handle` a service time of 100 ms through `svc`, then checks that a request arriving
/// with 50 ms left is answered 504 by the limiter without running (the inner service counts its `calls`; a
/// request timed out by the deadline layer would have run), and one with 150 ms left is served.
async fn sheds_the_doomed_and_serves_the_rest<S, B>(
    mut svc: S,
    handle: &AdaptiveHandle,
    calls: &AtomicUsize,
) where
    S: Service<http::Request<String>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    learn(&mut svc, handle, Duration::from_millis(100), || {
        request(Some("1S"))
    })
    .await;
    let before = calls.load(Ordering::SeqCst);
    let call = svc.ready().await.unwrap().call(request(Some("50m")));
    assert_eq!(call.await.unwrap().status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(calls.load(Ordering::SeqCst), before);
    assert_eq!(handle.snapshot().rejected_deadline, 1);
    let call = svc.ready().await.unwrap().call(request(Some("150m")));
    assert_eq!(call.await.unwrap().status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(start_paused = true)]
async fn behind_the_server_deadline_layer_a_doomed_request_answers_504_without_running() {
    let limiter = quick().http().build().unwrap();
    let handle = limiter.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::builder().http().build().unwrap())
        .layer(limiter)
        .service(counted::<_, http::Response<String>>(
            calls.clone(),
            Duration::from_millis(100),
        ));
    sheds_the_doomed_and_serves_the_rest(svc, &handle, &calls).await;
}

#[tokio::test(start_paused = true)]
async fn behind_a_buffer_the_limiter_finds_the_deadline_in_the_request() {
    let limiter = quick().http().build().unwrap();
    let handle = limiter.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    // The limiter is called on the buffer's worker task, where the deadline layer's scope is not current: it
    // finds the deadline only in the request's extensions, where the layer is built to store it.
    let limited = limiter.layer(counted::<_, http::Response<String>>(
        calls.clone(),
        Duration::from_millis(100),
    ));
    let svc = DeadlineLayer::builder()
        .http()
        .request_extension(true)
        .build()
        .unwrap()
        .layer(tower::buffer::Buffer::new(limited, 8));
    sheds_the_doomed_and_serves_the_rest(svc, &handle, &calls).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_type_can_carry_its_own_deadline() {
    #[derive(Clone, Copy)]
    struct Job {
        deadline: Option<Deadline>,
    }
    let layer = AdaptiveConcurrencyLayer::builder()
        .deadline_source(|job: &Job| job.deadline)
        .build()
        .unwrap();
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(counted::<Job, ()>(calls.clone(), Duration::ZERO));
    let expired = Job {
        deadline: Some(Deadline::at(Instant::now())),
    };
    let call = svc.ready().await.unwrap().call(expired);
    assert!(call.await.unwrap_err().is::<DeadlineExceeded>());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // The source replaces the current deadline: an expired scope around the call is not read.
    let call = Deadline::at(Instant::now()).scope(async {
        let later = Job {
            deadline: Some(Deadline::after(Duration::from_secs(1))),
        };
        svc.ready().await.unwrap().call(later).await
    });
    call.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.snapshot().rejected_deadline, 1);
}

#[tokio::test(start_paused = true)]
async fn in_error_mode_too_refusals_below_a_breaker_do_not_count_against_the_dependency() {
    // A generic client stack: breaker over limiter, both in error mode. The limiter's refusals are errors here,
    // which the breaker's `AnyOk` must tell from the dependency's own.
    let limiter = AdaptiveConcurrencyLayer::builder().build().unwrap();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .build()
        .unwrap();
    let circuit = breaker.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let mut svc = breaker.layer(limiter.layer(service_fn(move |fail: bool| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            match fail {
                true => Err::<(), BoxError>("dependency failed".into()),
                false => Ok(()),
            }
        }
    })));
    for _ in 0..5 {
        let expired = Deadline::at(Instant::now());
        let call = expired.scope(async { svc.ready().await.unwrap().call(false).await });
        assert!(call.await.unwrap_err().is::<DeadlineExceeded>());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let snapshot = circuit.snapshot();
    assert_eq!(snapshot.state, CircuitState::Closed);
    assert_eq!((snapshot.failures, snapshot.consecutive_failures), (0, 0));
    // The dependency's own errors still count, and open the circuit.
    for _ in 0..3 {
        let error = svc.ready().await.unwrap().call(true).await.unwrap_err();
        assert_eq!(error.to_string(), "dependency failed");
    }
    assert_eq!(circuit.snapshot().state, CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn doomed_requests_shed_below_a_breaker_do_not_count_against_the_dependency() {
    // The recommended client stack: propagation, breaker, limiter.
    let limiter = quick().http().build().unwrap();
    let handle = limiter.handle();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .http()
        .build()
        .unwrap();
    let circuit = breaker.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(PropagateDeadlineLayer::builder().http().build().unwrap())
        .layer(breaker)
        .layer(limiter)
        .service(counted::<_, http::Response<String>>(
            calls.clone(),
            Duration::from_millis(100),
        ));
    learn(&mut svc, &handle, Duration::from_millis(100), || {
        request(None)
    })
    .await;
    let before = calls.load(Ordering::SeqCst);
    // The caller has 60 ms left: more than the propagation margin, less than the dependency takes.
    for _ in 0..5 {
        let deadline = Deadline::after(Duration::from_millis(60));
        let call = deadline.scope(async { svc.ready().await.unwrap().call(request(None)).await });
        assert_eq!(call.await.unwrap().status(), StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(calls.load(Ordering::SeqCst), before);
    assert_eq!(handle.snapshot().rejected_deadline, 5);
    let snapshot = circuit.snapshot();
    assert_eq!(snapshot.state, CircuitState::Closed);
    assert_eq!((snapshot.failures, snapshot.consecutive_failures), (0, 0));
}
