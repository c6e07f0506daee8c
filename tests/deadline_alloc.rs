//! Proves the deadline layers' admitted path allocates nothing per request with their defaults: header scan, clock
//! read, scope, permit, poll, classify. Storing the deadline in the request's extensions (opt-in) is what would
//! allocate; the last test shows the counter sees it.
#![cfg(feature = "http")]
#![allow(unsafe_code)]

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{service_fn, Layer, Service};
use tower_backpressure::deadline::{Deadline, DeadlineLayer, PropagateDeadlineLayer};

/// Requests built before the count starts: building one allocates (its header map, its extensions).
fn requests(n: usize, header: bool, brought: bool) -> Vec<Request<()>> {
    (0..n)
        .map(|_| {
            let mut builder = Request::builder();
            if header {
                builder = builder.header("grpc-timeout", "3S");
            }
            let mut req = builder.body(()).unwrap();
            if brought {
                // Later than the layer's: overwritten in place.
                req.extensions_mut()
                    .insert(Deadline::after(Duration::from_secs(3600)));
            }
            req
        })
        .collect()
}

/// Allocations made by calling and polling `svc` once for each request (answered at once), after a warm-up.
fn allocations_of<S>(mut svc: S, header: bool, brought: bool) -> u64
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    counted(header, brought, |req| {
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let mut fut = std::pin::pin!(svc.call(req));
        assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    })
}

/// Allocations made by `cycle` over 10 000 requests, after a warm-up of 100: thread-locals are set up lazily on
/// first use, and a service instance makes its own permit releaser, once, at its 64th request.
fn counted(header: bool, brought: bool, mut cycle: impl FnMut(Request<()>)) -> u64 {
    for req in requests(100, header, brought) {
        cycle(req);
    }
    let batch = requests(10_000, header, brought);
    let (allocations, ()) = counting_alloc::allocations_in(|| {
        for req in batch {
            cycle(req);
        }
    });
    allocations
}

/// Allocations made by writing `grpc-timeout` and the millisecond header into 10 000 new requests' empty maps, as
/// the propagating layer writes them: each value a copy of its bytes (one allocation), the map's storage http's.
fn header_writes_alone(brought: bool) -> u64 {
    let (grpc, ms) = (
        HeaderName::from_static("grpc-timeout"),
        HeaderName::from_static("x-request-timeout-ms"),
    );
    let batch = requests(10_000, false, brought);
    let (allocations, ()) = counting_alloc::allocations_in(|| {
        for mut req in batch {
            let headers = req.headers_mut();
            headers.insert(grpc.clone(), HeaderValue::from_bytes(b"3599995m").unwrap());
            headers.insert(ms.clone(), HeaderValue::from_bytes(b"3599995").unwrap());
        }
    });
    allocations
}

fn backend() -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> {
    service_fn(|_req: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))))
}

#[test]
fn the_server_layer_allocates_nothing_per_request() {
    for (header, brought) in [(false, false), (true, false), (false, true)] {
        let layer = DeadlineLayer::builder()
            .max_timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let handle = layer.handle();
        let allocations = allocations_of(layer.layer(backend()), header, brought);
        assert_eq!(
            allocations, 0,
            "heap allocations in 10 000 requests (grpc-timeout: {header}, deadline brought: {brought})"
        );
        assert_eq!(
            handle.snapshot().admitted,
            10_100,
            "every request ran under a deadline"
        );
    }
}

#[test]
fn the_propagating_layer_allocates_only_the_headers_it_writes() {
    let layer = PropagateDeadlineLayer::builder().build().unwrap();
    let handle = layer.handle();
    // The deadline comes with the request. Writing `grpc-timeout` and the millisecond header into a request's
    // empty header map allocates the map's storage: that is http's, and is counted here by doing it alone.
    let with_layer = allocations_of(layer.layer(backend()), false, true);
    let writes_alone = header_writes_alone(true);
    assert_eq!(handle.snapshot().admitted, 10_100);
    assert!(
        writes_alone > 0,
        "the counter sees the header map's storage"
    );
    assert_eq!(
        with_layer, writes_alone,
        "allocations beyond writing the two headers into each request's map"
    );
}

#[test]
fn the_propagating_layer_under_a_scope_allocates_only_the_headers_it_writes() {
    // The common case: the deadline is the current one (a handler's outbound call), the request brings none.
    let layer = PropagateDeadlineLayer::builder().build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut cx = Context::from_waker(Waker::noop());
    let scope = Deadline::after(Duration::from_secs(3600));
    let mut run = |batch: Vec<Request<()>>| {
        let mut calls = std::pin::pin!(scope.scope(async {
            for req in batch {
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
                svc.call(req).await.unwrap();
            }
        }));
        assert!(calls.as_mut().poll(&mut cx).is_ready());
    };
    run(requests(100, false, false));
    let batch = requests(10_000, false, false);
    let (with_layer, ()) = counting_alloc::allocations_in(|| run(batch));
    let writes_alone = header_writes_alone(false);
    assert_eq!(handle.snapshot().admitted, 10_100);
    assert_eq!(
        with_layer, writes_alone,
        "allocations beyond writing the two headers into each request's map"
    );
}

#[test]
fn storing_the_deadline_in_the_extensions_is_what_allocates() {
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(30))
        .request_extension(true)
        .build()
        .unwrap();
    let allocations = allocations_of(layer.layer(backend()), false, false);
    // http's extension map, its table and the boxed entry (three in http 1.x), for each of the 10 000 requests.
    assert!(allocations >= 10_000, "{allocations} allocations");
}

/// A unary answer's body as gRPC sends it: one message, then trailers (made when polled, as an encoder makes them).
#[derive(Default)]
struct Unary {
    sent: u8,
}

impl http_body::Body for Unary {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        self.sent += 1;
        Poll::Ready(match self.sent {
            1 => Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                b"answer",
            )))),
            2 => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                Some(Ok(http_body::Frame::trailers(trailers)))
            }
            _ => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= 2
    }
}

/// Allocations made by calling `svc` for 10 000 requests with a deadline and reading each response body to its
/// end, after a warm-up.
fn allocations_with_bodies<S, B>(mut svc: S) -> u64
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    counted(true, false, |req| {
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let mut fut = std::pin::pin!(svc.call(req));
        let Poll::Ready(Ok(response)) = fut.as_mut().poll(&mut cx) else {
            panic!("the answer is ready at once")
        };
        let mut body = response.into_body();
        // Read to the end: without a runtime, arming a timer would panic, so none is armed either.
        while let Poll::Ready(Some(frame)) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
            frame.unwrap();
        }
        assert!(body.is_end_stream());
    })
}

/// In HTTP and gRPC modes the deadline also bounds the response body. A body that ends without waiting (a one-frame
/// HTTP body, a unary gRPC answer: a message and its trailers) costs no allocation and no timer for it: the layers
/// allocate exactly what the bodies themselves do.
#[test]
fn bounding_a_body_that_never_waits_allocates_nothing() {
    let full = || {
        service_fn(|_req: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(
                http_body_util::Full::new(bytes::Bytes::from_static(b"answer")),
            )))
        })
    };
    let unary = || {
        service_fn(|_req: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(Unary::default())))
        })
    };
    let server = || DeadlineLayer::builder().max_timeout(Duration::from_secs(30));

    assert_eq!(
        allocations_with_bodies(full()),
        0,
        "the bare body allocates nothing"
    );
    assert_eq!(
        allocations_with_bodies(server().http().build().unwrap().layer(full())),
        0
    );
    // The propagating layer under a deadline, as a handler's outbound call is: in HTTP mode exactly what it
    // allocates in error mode, where the body is not bounded (the header values it writes).
    let scoped = |http: bool| {
        let builder = PropagateDeadlineLayer::builder();
        let (plain, bounded) = (
            builder.clone().build().unwrap(),
            builder.http().build().unwrap(),
        );
        tower::service_fn(move |req: Request<()>| {
            let (mut plain, mut bounded) = (plain.layer(full()), bounded.layer(full()));
            Deadline::after(Duration::from_secs(30)).scope(async move {
                if http {
                    let answer = bounded.call(req).await.map_err(tower::BoxError::from);
                    answer.map(|r| r.map(http_body_util::Either::Left))
                } else {
                    let answer = plain.call(req).await;
                    answer.map(|r| r.map(http_body_util::Either::Right))
                }
            })
        })
    };
    let plain = allocations_with_bodies(scoped(false));
    assert!(plain > 0, "the counter sees the header values written");
    assert_eq!(allocations_with_bodies(scoped(true)), plain);

    #[cfg(feature = "grpc")]
    {
        let bare = allocations_with_bodies(unary());
        assert!(
            bare >= 10_000,
            "the counter sees the trailers' maps: {bare}"
        );
        assert_eq!(
            allocations_with_bodies(server().grpc().build().unwrap().layer(unary())),
            bare
        );
    }
    #[cfg(not(feature = "grpc"))]
    let _ = unary;
}
