//! The rate limit layer, in paused tokio time.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::noop_waker_ref;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_backpressure::core::error::RateLimited;
use tower_backpressure::core::{BoxError, Event, Reason};
use tower_backpressure::rate::{RateLimitHandle, RateLimitLayer};

fn echo() -> impl Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = impl Future<Output = Result<u32, Infallible>> + Send,
> + Clone
       + Send {
    service_fn(|n: u32| async move { Ok::<_, Infallible>(n) })
}

/// Calls `svc` once (after readiness) and says whether the request was admitted.
async fn admitted<S>(svc: &mut S, n: u32) -> bool
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    match svc.ready().await.unwrap().call(n).await {
        Ok(m) => {
            assert_eq!(m, n);
            true
        }
        Err(e) => {
            assert!(e.is::<RateLimited>(), "unexpected error {e}");
            false
        }
    }
}

async fn retry_after<S>(svc: &mut S) -> Duration
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
    err.downcast_ref::<RateLimited>()
        .expect("a RateLimited error")
        .retry_after()
        .expect("a retry hint")
}

#[tokio::test(start_paused = true)]
async fn burst_then_reject_with_governors_wait() {
    // One request every 1.2 s, bursts of 5.
    let layer = RateLimitLayer::builder()
        .rate(5, Duration::from_secs(6))
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    for n in 0..5 {
        assert!(
            admitted(&mut svc, n).await,
            "request {n} is within the burst"
        );
    }
    assert_eq!(retry_after(&mut svc).await, Duration::from_millis(1200));

    tokio::time::advance(Duration::from_millis(700)).await;
    assert_eq!(retry_after(&mut svc).await, Duration::from_millis(500));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(admitted(&mut svc, 6).await, "one cell has been replenished");
    assert!(!admitted(&mut svc, 7).await);

    let snapshot = layer.handle().snapshot();
    assert_eq!((snapshot.admitted, snapshot.rejected), (6, 3));
    assert_eq!((snapshot.tracked_keys, snapshot.max_keys), (0, None));
}

#[tokio::test(start_paused = true)]
async fn clones_and_layered_services_share_one_budget() {
    let layer = RateLimitLayer::builder()
        .rate(4, Duration::from_secs(1))
        .build()
        .unwrap();
    // What axum, hyper and tonic do: one service per route or connection from the same layer, then clones.
    let mut services = Vec::new();
    for _ in 0..3 {
        let svc = layer.clone().layer(echo());
        services.push(svc.clone());
        services.push(svc);
    }
    let mut total = 0;
    for round in 0..3 {
        for svc in &mut services {
            total += usize::from(admitted(svc, round).await);
        }
    }
    assert_eq!(total, 4, "six services, one budget of 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_callers_never_exceed_the_budget() {
    // Real parallel clones racing on one budget (global: one atomic cell; keyed: one shard lock). The period is
    // an hour, so nothing is replenished while the test runs: exactly the burst gets through.
    let global = RateLimitLayer::builder()
        .rate(100, Duration::from_secs(3600))
        .build()
        .unwrap();
    let keyed = RateLimitLayer::builder()
        .rate(100, Duration::from_secs(3600))
        .key(|_: &u32| Some("one client"))
        .build()
        .unwrap();
    let global_svc = global.layer(echo());
    let keyed_svc = keyed.layer(echo());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut g, mut k) = (global_svc.clone(), keyed_svc.clone());
        tasks.push(tokio::spawn(async move {
            let mut admitted_here = (0, 0);
            for n in 0..500 {
                admitted_here.0 += usize::from(admitted(&mut g, n).await);
                admitted_here.1 += usize::from(admitted(&mut k, n).await);
            }
            admitted_here
        }));
    }
    let (mut g, mut k) = (0, 0);
    for task in tasks {
        let (a, b) = task.await.unwrap();
        g += a;
        k += b;
    }
    assert_eq!((g, k), (100, 100));
    assert_eq!(global.handle().snapshot().rejected, 8 * 500 - 100);
}

#[tokio::test(start_paused = true)]
async fn towers_rate_limit_multiplies_per_service() {
    // The failure our layer fixes: tower's budget lives in each service the layer creates, so three services
    // (three routes, three connections) let three times the configured rate through.
    let layer = tower::limit::RateLimitLayer::new(4, Duration::from_secs(1));
    let mut served = 0;
    for _ in 0..3 {
        let mut svc = layer.layer(echo());
        let mut cx = Context::from_waker(noop_waker_ref());
        while let Poll::Ready(Ok(())) = svc.poll_ready(&mut cx) {
            svc.call(0).await.unwrap();
            served += 1;
        }
    }
    assert_eq!(
        served, 12,
        "a budget of 4 per second, 12 served in the same instant"
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_are_independent() {
    let layer = RateLimitLayer::builder()
        .rate(2, Duration::from_secs(1))
        .key(|n: &u32| Some(*n % 10))
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    assert!(admitted(&mut svc, 1).await);
    assert!(admitted(&mut svc, 11).await);
    assert!(!admitted(&mut svc, 21).await, "key 1 has used its burst");
    assert!(admitted(&mut svc, 2).await, "key 2 has its own budget");
    assert!(admitted(&mut svc, 12).await);
    assert!(!admitted(&mut svc, 22).await);
    assert_eq!(layer.handle().snapshot().tracked_keys, 2);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_share_one_budget() {
    let layer = RateLimitLayer::builder()
        .rate(2, Duration::from_secs(1))
        .key(|n: &u32| (*n != 0).then_some(*n))
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    assert!(admitted(&mut svc, 0).await);
    assert!(admitted(&mut svc, 0).await);
    assert!(
        !admitted(&mut svc, 0).await,
        "leaving the key out is no way around the limit"
    );
    assert!(admitted(&mut svc, 5).await);
}

/// A limit of one request per `per` for each `u32` key, tracking at most `max_keys` keys, and its handle.
fn one_per_key(
    per: Duration,
    max_keys: usize,
) -> (
    RateLimitHandle,
    impl Service<u32, Response = u32, Error = BoxError>,
) {
    let layer = RateLimitLayer::builder()
        .rate(1, per)
        .key(|n: &u32| Some(*n))
        .max_keys(max_keys)
        .build()
        .unwrap();
    (layer.handle(), layer.layer(echo()))
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_distinct_keys_stays_at_the_cap() {
    let (handle, mut svc) = one_per_key(Duration::from_secs(60), 1_000);
    for n in 0..100_000 {
        assert!(
            admitted(&mut svc, n).await,
            "a new key starts with a full burst"
        );
    }
    let snapshot = handle.snapshot();
    assert_eq!(snapshot.tracked_keys, 1_000);
    assert_eq!(snapshot.max_keys, Some(1_000));
    // The most recent keys are still tracked and still limited.
    assert!(!admitted(&mut svc, 99_999).await);
}

#[tokio::test(start_paused = true)]
async fn active_clients_are_never_forgotten_below_the_cap() {
    // As many clients as max_keys, one request an hour each. However their keys spread over the store's shards,
    // none may be forgotten (and come back with a fresh burst) while the store has room for all of them.
    let (handle, mut svc) = one_per_key(Duration::from_secs(3600), 1_000);
    for n in 0..1_000 {
        assert!(admitted(&mut svc, n).await);
    }
    assert_eq!(handle.snapshot().tracked_keys, 1_000);
    for round in 0..3 {
        for n in 0..1_000 {
            assert!(
                !admitted(&mut svc, n).await,
                "client {n} admitted again in round {round}"
            );
        }
    }
    assert_eq!(handle.snapshot().tracked_keys, 1_000);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_never_zero_when_a_wait_is_needed() {
    // One request per second, no burst: after each admission, probe at many points of the wait, down to the
    // last nanosecond.
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(1))
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    assert!(admitted(&mut svc, 0).await);
    let mut elapsed = Duration::ZERO;
    for step in [1, 999, 999_000, 499_000_000, 499_999_000, 999] {
        tokio::time::advance(Duration::from_nanos(step)).await;
        elapsed += Duration::from_nanos(step);
        let wait = retry_after(&mut svc).await;
        assert!(!wait.is_zero(), "a zero hint {elapsed:?} into the wait");
        assert_eq!(wait, Duration::from_secs(1) - elapsed);
        assert_eq!(tower_backpressure::core::retry_after_secs(wait), Some(1));
    }
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(admitted(&mut svc, 1).await);
}

#[tokio::test(start_paused = true)]
async fn an_interval_between_whole_nanoseconds_is_rounded_up() {
    // Three a second is one every 333 333 333.3 ns. Truncated, a fourth request would fit in the first second
    // (at 999 999 999 ns); rounded up, the spacing is 333 333 334 ns.
    let layer = RateLimitLayer::builder()
        .rate(3, Duration::from_secs(1))
        .burst(1)
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    let mut admissions = 0;
    let mut now = 0;
    for at in [
        0,
        333_333_333,
        333_333_334,
        666_666_666,
        666_666_667,
        666_666_668,
        999_999_999,
    ] {
        tokio::time::advance(Duration::from_nanos(at - now)).await;
        now = at;
        admissions += usize::from(admitted(&mut svc, 0).await);
    }
    assert_eq!(admissions, 3, "never more than 3 within a second");
    tokio::time::advance(Duration::from_nanos(3)).await;
    assert!(
        admitted(&mut svc, 1).await,
        "the fourth at 1 000 000 002 ns"
    );

    // 600 million a second (1.67 ns apart) is enforced as one every 2 ns, not one every nanosecond.
    let layer = RateLimitLayer::builder()
        .rate(600_000_000, Duration::from_secs(1))
        .burst(1)
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    let mut admissions = 0;
    for _ in 0..1_000 {
        admissions += usize::from(admitted(&mut svc, 0).await);
        tokio::time::advance(Duration::from_nanos(1)).await;
    }
    assert_eq!(admissions, 500, "1 µs at one every 2 ns");
}

#[tokio::test(start_paused = true)]
async fn with_retry_after_keeps_the_limiters_own_wait() {
    use tower_backpressure::core::{ErrorMode, WithRetryAfter};
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(2))
        .reject_mode(WithRetryAfter::new(ErrorMode, Duration::from_secs(30)))
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    assert!(admitted(&mut svc, 0).await);
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(retry_after(&mut svc).await, Duration::from_millis(1500));
}

#[tokio::test(start_paused = true)]
async fn observer_sees_each_rejection() {
    let rejections = Arc::new(AtomicUsize::new(0));
    let seen = rejections.clone();
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(1))
        .observer(move |event: &Event| {
            if let Event::Rejected {
                layer,
                reason,
                retry_after,
            } = *event
            {
                assert_eq!((layer, reason), ("rate", Reason::RateLimited));
                assert_eq!(retry_after, Some(Duration::from_secs(1)));
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    assert!(admitted(&mut svc, 0).await);
    assert!(!admitted(&mut svc, 1).await);
    assert!(!admitted(&mut svc, 2).await);
    assert_eq!(rejections.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_forwards_inner_readiness_and_reserves_nothing() {
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(1))
        .build()
        .unwrap();
    let (inner, mut handle) = tower_test::mock::pair::<u32, u32>();
    let mut svc = layer.layer(inner);
    handle.allow(0);
    let mut cx = Context::from_waker(noop_waker_ref());
    assert!(svc.poll_ready(&mut cx).is_pending(), "inner not ready");
    // Polling readiness many times spends no budget.
    handle.allow(1);
    for _ in 0..10 {
        assert!(svc.poll_ready(&mut cx).is_ready());
    }
    let response = svc.call(5);
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request, 5);
    send.send_response(6);
    assert_eq!(response.await.unwrap(), 6);
}

#[test]
fn bad_configs_are_errors() {
    use tower_backpressure::rate::RateLimitLayerBuilder;
    let base = || RateLimitLayer::builder().rate(10, Duration::from_secs(1));
    let field = |b: RateLimitLayerBuilder| b.build().unwrap_err().field();
    assert_eq!(field(RateLimitLayer::builder()), "rate");
    assert_eq!(
        field(RateLimitLayer::builder().rate(0, Duration::from_secs(1))),
        "rate"
    );
    assert_eq!(
        field(RateLimitLayer::builder().rate(10, Duration::ZERO)),
        "rate"
    );
    assert_eq!(
        field(RateLimitLayer::builder().rate(10, Duration::from_nanos(5))),
        "rate"
    );
    assert_eq!(field(base().burst(0)), "burst");
    assert_eq!(
        field(
            RateLimitLayer::builder()
                .rate(1, Duration::from_secs(3600 * 24 * 365))
                .burst(200)
        ),
        "burst"
    );
    assert_eq!(field(base().policy_name("")), "policy_name");
    assert_eq!(field(base().policy_name("a\"b")), "policy_name");
    let keyed = base()
        .key(|n: &u32| Some(*n))
        .max_keys(0)
        .build()
        .unwrap_err();
    assert_eq!(keyed.field(), "max_keys");
    assert_eq!(keyed.layer(), "rate limit");
    assert!(base().build().is_ok());
    assert!(
        base().max_keys(0).build().is_ok(),
        "max_keys only matters for keyed limits"
    );
}

#[cfg(feature = "http")]
mod http_mode {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderValue, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use tower_backpressure::rate::{HeaderKey, PeerIp};

    fn ok_service(
    ) -> impl Service<Request<()>, Response = Response<Empty<Bytes>>, Error = Infallible> + Clone
    {
        service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn rejection_is_429_with_retry_after_rounded_up_and_ratelimit_headers() {
        let layer = RateLimitLayer::builder()
            .rate(5, Duration::from_secs(6))
            .policy_name("api")
            .http()
            .build()
            .unwrap();
        let mut svc = layer.layer(ok_service());
        for _ in 0..5 {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert!(
                response.headers().get("ratelimit").is_none(),
                "admitted responses pass untouched"
            );
        }
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = response.headers();
        // governor's wait is 1.2 s: rounded up, never truncated.
        assert_eq!(headers["retry-after"], "2");
        assert_eq!(headers["ratelimit"], "\"api\";r=0;t=2");
        assert_eq!(headers["ratelimit-policy"], "\"api\";q=5;w=6");
    }

    #[tokio::test(start_paused = true)]
    async fn with_retry_after_keeps_the_wait_and_the_ratelimit_headers() {
        use tower_backpressure::core::{HttpMode, HttpStatus, WithRetryAfter};
        let layer = RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .policy_name("api")
            .classifier(HttpStatus::new())
            .reject_mode(WithRetryAfter::new(HttpMode, Duration::from_secs(5)))
            .build()
            .unwrap();
        let mut svc = layer.layer(ok_service());
        let mut call = async || {
            svc.ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .unwrap()
        };
        assert_eq!(call().await.status(), StatusCode::OK);
        let response = call().await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = response.headers();
        assert_eq!(
            headers["retry-after"], "1",
            "the limiter's wait, not the default"
        );
        assert_eq!(headers["ratelimit"], "\"api\";r=0;t=1");
        assert_eq!(headers["ratelimit-policy"], "\"api\";q=1;w=1");
    }

    /// The shed-share query of docs/guide.md ("Metrics reference"), which this test evaluates.
    const SHED_SHARE: &str = "sum(rate(backpressure_rejections_total[1m])) / \
        (sum(rate(backpressure_requests_total{layer=\"deadline\"}[1m])) + \
        sum(rate(backpressure_rejections_total{layer=\"deadline\"}[1m])))";

    #[tokio::test(start_paused = true)]
    async fn the_guides_shed_share_counts_each_refusal_once() {
        use std::sync::Mutex;
        use tower_backpressure::deadline::DeadlineLayer;

        let guide = include_str!("../docs/guide.md");
        assert!(
            guide.contains(&format!("`{SHED_SHARE}`")),
            "the guide's query is the one evaluated here"
        );
        // What MetricsObserver records: rejections per layer, and finished requests per layer and outcome.
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = events.clone();
        let observer = move |event: &Event| match *event {
            Event::Rejected { layer, .. } => log.lock().unwrap().push((layer, "rejected")),
            Event::Completed { layer, outcome, .. } => {
                log.lock().unwrap().push((layer, outcome.as_str()))
            }
            _ => {}
        };
        // The recommended order: the deadline outermost, with a maximum so that it times every request.
        let deadline = DeadlineLayer::builder()
            .max_timeout(Duration::from_secs(10))
            .http()
            .observer(observer.clone())
            .build()
            .unwrap();
        let rate = RateLimitLayer::builder()
            .rate(1, Duration::from_secs(3600))
            .http()
            .observer(observer)
            .build()
            .unwrap();
        let mut svc = tower::ServiceBuilder::new()
            .layer(deadline)
            .layer(rate)
            .service(ok_service());
        let expired = || {
            Request::builder()
                .header("x-request-timeout-ms", "0")
                .body(())
                .unwrap()
        };
        // Served; refused by the rate limit; refused by the deadline layer (no budget left).
        for request in [Request::new(()), Request::new(()), expired()] {
            let response = svc.ready().await.unwrap().call(request).await.unwrap();
            drop(response.into_body().collect().await.unwrap());
        }
        let events = events.lock().unwrap();
        let count =
            |pred: &dyn Fn(&(&str, &str)) -> bool| events.iter().filter(|e| pred(e)).count() as f64;
        let rejections = count(&|(_, kind)| *kind == "rejected");
        let deadline_requests = count(&|(layer, kind)| *layer == "deadline" && *kind != "rejected");
        let deadline_rejections =
            count(&|(layer, kind)| *layer == "deadline" && *kind == "rejected");
        assert!(
            events.contains(&("deadline", "ignored")),
            "the deadline layer finished the request the rate limit refused: {events:?}"
        );
        let shed_share = rejections / (deadline_requests + deadline_rejections);
        assert_eq!(shed_share, 2.0 / 3.0, "2 of 3 requests refused: {events:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn peer_ip_keys_by_socket_addr_extension() {
        let layer = RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .key(PeerIp::new())
            .http()
            .build()
            .unwrap();
        let mut svc = layer.layer(ok_service());
        let from = |addr: &str| {
            let mut request = Request::new(());
            request
                .extensions_mut()
                .insert(addr.parse::<std::net::SocketAddr>().unwrap());
            request
        };
        let status = |r: Response<_>| r.status();
        assert_eq!(
            status(
                svc.ready()
                    .await
                    .unwrap()
                    .call(from("192.0.2.1:1000"))
                    .await
                    .unwrap()
            ),
            StatusCode::OK
        );
        assert_eq!(
            status(
                svc.ready()
                    .await
                    .unwrap()
                    .call(from("192.0.2.1:2000"))
                    .await
                    .unwrap()
            ),
            StatusCode::TOO_MANY_REQUESTS,
            "same client, new connection"
        );
        assert_eq!(
            status(
                svc.ready()
                    .await
                    .unwrap()
                    .call(from("192.0.2.2:1000"))
                    .await
                    .unwrap()
            ),
            StatusCode::OK
        );
    }

    #[tokio::test(start_paused = true)]
    async fn header_key_keys_by_header_value() {
        let layer = RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .key(HeaderKey::new(http::HeaderName::from_static("x-api-key")))
            .http()
            .build()
            .unwrap();
        let mut svc = layer.layer(ok_service());
        let with = |key: &'static str| {
            let mut request = Request::new(());
            request
                .headers_mut()
                .insert("x-api-key", HeaderValue::from_static(key));
            request
        };
        let mut status = async |r| svc.ready().await.unwrap().call(r).await.unwrap().status();
        assert_eq!(status(with("a")).await, StatusCode::OK);
        assert_eq!(status(with("b")).await, StatusCode::OK);
        assert_eq!(status(with("a")).await, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status(Request::new(())).await, StatusCode::OK);
        assert_eq!(
            status(Request::new(())).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_rejection_is_resource_exhausted() {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Empty;

    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_millis(1500))
        .grpc()
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        let mut response = Response::new(Empty::<Bytes>::new());
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        Ok::<_, Infallible>(response)
    }));
    let ok = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(ok.headers()["grpc-status"], "0");
    let refused = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::OK);
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert_eq!(refused.headers()["grpc-retry-pushback-ms"], "1500");
    assert_eq!(refused.headers()["content-type"], "application/grpc");
}
