//! Multi-hop deadline propagation over real loopback sockets with hyper (HTTP/1.1).
//!
//! A receives a 30 s budget, spends 7 s and calls B, which sees 23 s minus one margin; B spends 4 s and calls C,
//! which sees 19 s minus two margins (the example of Google's SRE book).
//!
//! Time is tokio's paused clock, moved only by the handlers' `tokio::time::advance`: a blocking task held open
//! for the whole test stops the runtime from auto-advancing while it waits on the sockets, so the figures are
//! exact and the test deterministic.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_backpressure::core::Deadline;
use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};

const MARGIN: Duration = Duration::from_millis(10);

/// What one hop saw on arrival.
#[derive(Debug, Clone, PartialEq)]
struct Arrival {
    hop: &'static str,
    grpc_timeout: Option<String>,
    timeout_ms: Option<String>,
    remaining: Option<Duration>,
}

type Log = Arc<Mutex<Vec<Arrival>>>;

/// Sends one request over a fresh HTTP/1.1 connection and reads the whole body.
async fn send(addr: SocketAddr, request: Request<String>) -> Result<Response<String>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = String::from_utf8(body.collect().await?.to_bytes().to_vec())?;
    Ok(Response::from_parts(parts, body))
}

/// Starts hop `hop`: a hyper server whose stack is `DeadlineLayer` → handler. The handler logs what it received,
/// spends `spend`, then calls `next` (if any) through `PropagateDeadlineLayer` with no explicit deadline: the
/// task-local one is found on its own.
async fn start_hop(
    hop: &'static str,
    spend: Duration,
    next: Option<SocketAddr>,
    log: Log,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = DeadlineLayer::builder().http().build().unwrap();
    let client = PropagateDeadlineLayer::builder()
        .margin(MARGIN)
        .http()
        .build()
        .unwrap();
    let handler = service_fn(move |req: Request<Incoming>| {
        let log = log.clone();
        let client = client.clone();
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            log.lock().unwrap().push(Arrival {
                hop,
                grpc_timeout: header("grpc-timeout"),
                timeout_ms: header("x-request-timeout-ms"),
                remaining: Deadline::current().map(Deadline::remaining),
            });
            tokio::time::advance(spend).await;
            let Some(next) = next else {
                return Ok::<_, Infallible>(Response::new(hop.to_owned()));
            };
            let request = Request::builder().uri("/").body(String::new()).unwrap();
            let Ok(response) = client
                .layer(service_fn(move |r| send(next, r)))
                .oneshot(request)
                .await
            else {
                let mut failed = Response::new(String::new());
                *failed.status_mut() = StatusCode::BAD_GATEWAY;
                return Ok(failed);
            };
            let status = response.status();
            // Read through the deadline's body, as a handler would.
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body = std::str::from_utf8(&body).unwrap();
            let mut response = Response::new(format!("{hop}>{body}"));
            *response.status_mut() = status;
            Ok(response)
        }
    });
    let service = server.layer(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service.clone();
            tokio::spawn(async move {
                let hyper_service =
                    hyper::service::service_fn(move |req| service.clone().oneshot(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper_service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn budget_shrinks_by_time_spent_and_margins_across_three_hops() {
    tokio::time::pause();
    // While a blocking task runs, paused time does not auto-advance: only the handlers move the clock.
    let (hold, held) = std::sync::mpsc::channel::<Infallible>();
    let inhibitor = tokio::task::spawn_blocking(move || held.recv());

    let log = Log::default();
    let c = start_hop("C", Duration::ZERO, None, log.clone()).await;
    let b = start_hop("B", Duration::from_secs(4), Some(c), log.clone()).await;
    let a = start_hop("A", Duration::from_secs(7), Some(b), log.clone()).await;

    let request = Request::builder()
        .uri("/")
        .header("grpc-timeout", "30S")
        .body(String::new())
        .unwrap();
    let response = send(a, request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.into_body(), "A>B>C");

    let arrivals = log.lock().unwrap().clone();
    let expected = [
        ("A", Some("30S"), None, 30_000),
        ("B", Some("22990000u"), Some("22990"), 22_990),
        ("C", Some("18980000u"), Some("18980"), 18_980),
    ];
    assert_eq!(arrivals.len(), 3);
    for (arrival, (hop, grpc, ms, remaining_ms)) in arrivals.iter().zip(expected) {
        assert_eq!(
            arrival,
            &Arrival {
                hop,
                grpc_timeout: grpc.map(str::to_owned),
                timeout_ms: ms.map(str::to_owned),
                remaining: Some(Duration::from_millis(remaining_ms)),
            }
        );
    }

    drop(hold);
    inhibitor.await.unwrap().unwrap_err();
}

#[tokio::test]
async fn a_hop_whose_budget_runs_out_answers_504_and_the_next_hop_is_never_called() {
    tokio::time::pause();
    let (hold, held) = std::sync::mpsc::channel::<Infallible>();
    let inhibitor = tokio::task::spawn_blocking(move || held.recv());

    let log = Log::default();
    let c = start_hop("C", Duration::ZERO, None, log.clone()).await;
    // B spends more than it was given: its own deadline layer answers 504 and C never hears of the request.
    let b = start_hop("B", Duration::from_secs(30), Some(c), log.clone()).await;
    let a = start_hop("A", Duration::from_secs(7), Some(b), log.clone()).await;

    let request = Request::builder()
        .uri("/")
        .header("x-request-timeout-ms", "30000")
        .body(String::new())
        .unwrap();
    let response = send(a, request).await.unwrap();
    // B's outbound call finds nothing left and fails at once with 504, which B and then A pass on.
    let hops: Vec<_> = log.lock().unwrap().iter().map(|a| a.hop).collect();
    assert_eq!(hops, ["A", "B"]);
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

    drop(hold);
    inhibitor.await.unwrap().unwrap_err();
}
