//! The tonic example's server and client over real loopback sockets: each gRPC status arrives where it belongs.
//!
//! The expiry test runs on tokio's paused clock (a blocking task held open keeps it from auto-advancing while the
//! sockets are waited on): there the server's `DeadlineLayer` and tonic's own `grpc-timeout` timer share one
//! instant, so which one answers is decided by tonic polling its inner service first, not by a race. Its client
//! is `tonic::client::Grpc` over a plain HTTP/2 connection, because a tonic `Channel` enforces the `grpc-timeout`
//! it sends on its own and fails the call before the server's reply could arrive: this test is about the server.
//! (The client side of that, `PropagateDeadline` answering the channel's expiry as DEADLINE_EXCEEDED, is
//! `channel_expiry_reaches_the_caller_as_deadline_exceeded` in `tests/deadline_tonic.rs`.)
#![cfg(feature = "tonic")]

#[allow(dead_code)]
#[path = "../examples/tonic.rs"]
mod ex;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Code, Request};

/// Waits until `done` holds, yielding to the runtime (which polls the sockets between yields); bounded by a
/// count rather than the clock, so it also ends on a paused clock.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..2_000_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

fn budget_ms(answer: &str) -> u64 {
    answer
        .strip_prefix("budget_ms=")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no budget in {answer:?}"))
}

async fn start(workers: Arc<Semaphore>, settings: ex::Settings) -> (SocketAddr, ex::ServerHandles) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, ex::serve(listener, workers, &settings))
}

/// Keeps a paused clock from auto-advancing until the returned sender is dropped.
fn hold_the_clock() -> (
    std::sync::mpsc::Sender<Infallible>,
    tokio::task::JoinHandle<Result<Infallible, std::sync::mpsc::RecvError>>,
) {
    let (hold, held) = std::sync::mpsc::channel::<Infallible>();
    (hold, tokio::task::spawn_blocking(move || held.recv()))
}

/// A tonic client over a bare HTTP/2 connection, which sends `grpc-timeout` without enforcing it.
fn bare_client(
    addr: SocketAddr,
) -> tonic::client::Grpc<
    HttpClient<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>,
> {
    let http = HttpClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{addr}").parse().unwrap();
    tonic::client::Grpc::with_origin(http, origin)
}

async fn call_with_timeout(
    client: &mut tonic::client::Grpc<
        HttpClient<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>,
    >,
    timeout: Duration,
) -> Result<String, tonic::Status> {
    client.ready().await.unwrap();
    let mut request = Request::new("job".to_owned());
    request.set_timeout(timeout);
    let response = client
        .unary(request, PathAndQuery::from_static(ex::PATH), ex::Utf8)
        .await?;
    Ok(response.into_inner())
}

#[tokio::test]
async fn saturated_server_answers_unavailable() {
    let workers = Arc::new(Semaphore::new(0));
    let settings = ex::Settings {
        max_concurrency: 1,
        queue_depth: 0,
        service_time: Duration::ZERO,
        ..ex::Settings::default()
    };
    let (addr, server) = start(workers.clone(), settings).await;
    let mut client = ex::Client::connect(addr).await.unwrap();

    let first = tokio::spawn({
        let mut client = client.clone();
        async move { client.work("first").await }
    });
    until("the first call holds the only slot", || {
        server.queue.snapshot().in_flight == 1
    })
    .await;

    let status = client.work("second").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        server.queue.snapshot().rejected_queue_full,
        1,
        "the server refused it"
    );

    workers.add_permits(1);
    assert!(first.await.unwrap().is_ok());
    until("the slot is free again", || {
        server.queue.snapshot().in_flight == 0
    })
    .await;
    assert_eq!(server.limiter.snapshot().in_flight, 0);
}

#[tokio::test]
async fn rate_limited_server_answers_resource_exhausted() {
    let workers = Arc::new(Semaphore::new(4));
    let settings = ex::Settings {
        rate: (1, Duration::from_secs(3600)),
        service_time: Duration::ZERO,
        ..ex::Settings::default()
    };
    let (addr, server) = start(workers, settings).await;
    let mut client = ex::Client::connect(addr).await.unwrap();

    client.work("the hour's only call").await.unwrap();
    let status = client.work("one too many").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let rate = server.rate.snapshot();
    assert_eq!((rate.admitted, rate.rejected), (1, 1));
}

#[tokio::test]
async fn client_stack_sends_what_is_left_of_its_deadline_as_grpc_timeout() {
    let workers = Arc::new(Semaphore::new(4));
    let settings = ex::Settings {
        service_time: Duration::ZERO,
        ..ex::Settings::default()
    };
    let (addr, _server) = start(workers, settings).await;
    let mut client = ex::Client::connect(addr).await.unwrap();

    let answer = client
        .work_within("job", Duration::from_secs(5))
        .await
        .unwrap();
    // The server's own maximum is 10 s, so this is the caller's 5 s less the propagation margin and the trip.
    let budget_ms = budget_ms(&answer);
    assert!((2_500..5_000).contains(&budget_ms), "{budget_ms}");
}

#[tokio::test]
async fn handler_sees_the_callers_grpc_timeout_as_its_deadline() {
    let workers = Arc::new(Semaphore::new(4));
    let settings = ex::Settings {
        service_time: Duration::ZERO,
        ..ex::Settings::default()
    };
    let (addr, _server) = start(workers, settings).await;

    let mut client = bare_client(addr);
    let answer = call_with_timeout(&mut client, Duration::from_secs(2))
        .await
        .unwrap();
    let budget_ms = budget_ms(&answer);
    assert!((1_000..=2_000).contains(&budget_ms), "{budget_ms}");
}

#[tokio::test]
async fn spent_grpc_timeout_answers_deadline_exceeded_not_cancelled() {
    tokio::time::pause();
    let (hold, inhibitor) = hold_the_clock();
    // No backend worker ever frees up: the handler waits longer than any budget.
    let workers = Arc::new(Semaphore::new(0));
    let (addr, server) = start(workers, ex::Settings::default()).await;

    let mut client = bare_client(addr);
    let call =
        tokio::spawn(
            async move { call_with_timeout(&mut client, Duration::from_millis(200)).await },
        );
    until("the handler is waiting for a worker", || {
        server.limiter.snapshot().in_flight == 1
    })
    .await;
    tokio::time::advance(Duration::from_millis(201)).await;

    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    until("the abandoned handler let go of its slot", || {
        server.limiter.snapshot().in_flight == 0
    })
    .await;

    drop(hold);
    inhibitor.await.unwrap().unwrap_err();
}
