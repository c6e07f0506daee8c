//! The axum example's own router and server, over a real loopback socket.
//!
//! The fake backend's work is gated: a request reports that it is in the backend, then waits until the test
//! releases it. So "N requests in flight" is a fact the test waits for, never a guess about timing.
#![cfg(all(feature = "axum", feature = "metrics"))]

#[path = "../examples/axum.rs"]
#[allow(dead_code, unreachable_pub)]
mod axum_example;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum_example::{app, install_metrics, serve, Backend, Config, Stopped};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tower::BoxError;

/// The recorder is process-wide: installed once for every test of this file.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install_metrics).clone()
}

/// A response, read to its end.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: String,
}

/// One GET over a fresh HTTP/1.1 connection.
async fn get(addr: SocketAddr, path: &str) -> Result<Answer, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?;
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

/// A backend whose requests announce themselves on `entered` and then wait for a permit on `release`.
struct Gate {
    entered: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
}

impl Gate {
    /// Waits until `n` more requests are inside the backend.
    async fn wait_entered(&mut self, n: usize) {
        for _ in 0..n {
            self.entered.recv().await.expect("the backend is alive");
        }
    }
}

fn gated(workers: usize) -> (Backend, Gate) {
    let (tx, entered) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let gate = release.clone();
    let backend = Backend::with_work(workers, move || {
        let tx = tx.clone();
        let gate = gate.clone();
        async move {
            let _ = tx.send(());
            gate.acquire().await.expect("never closed").forget();
        }
    });
    (backend, Gate { entered, release })
}

struct Server {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<io::Result<Stopped>>,
}

/// The example's router and server on 127.0.0.1:0.
async fn start(config: Config, backend: Backend) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(&config, backend, prometheus()).unwrap();
    let (shutdown, signal) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        router,
        async move {
            let _ = signal.await;
        },
        config.drain,
    ));
    Server {
        addr,
        shutdown,
        task,
    }
}

/// Two requests at a time, none waiting: the third concurrent request is over capacity.
fn small() -> Config {
    Config {
        initial_limit: 2,
        max_limit: 2,
        queue_depth: 0,
        ..Config::default()
    }
}

#[tokio::test]
async fn idle_server_answers_200() {
    let server = start(small(), Backend::sleeping(2, Duration::ZERO)).await;
    let work = get(server.addr, "/work").await.unwrap();
    assert_eq!(
        (work.status, work.body.as_str()),
        (StatusCode::OK, "done\n")
    );
    assert_eq!(work.retry_after, None);
    let health = get(server.addr, "/health").await.unwrap();
    assert_eq!(health.status, StatusCode::OK);
}

/// Fills the limit with two requests held in the backend and returns them; the caller releases them.
async fn saturate(addr: SocketAddr, gate: &mut Gate) -> Vec<JoinHandle<Answer>> {
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "/work").await.unwrap() }))
        .collect();
    gate.wait_entered(2).await;
    held
}

#[tokio::test]
async fn saturated_server_answers_503_with_retry_after_and_health_still_passes() {
    let (backend, mut gate) = gated(2);
    let server = start(small(), backend).await;
    let held = saturate(server.addr, &mut gate).await;

    let refused = get(server.addr, "/work").await.unwrap();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    // Outside the stack: answered while /work sheds.
    assert_eq!(
        get(server.addr, "/health").await.unwrap().status,
        StatusCode::OK
    );

    gate.release.add_permits(2);
    for request in held {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
    // Capacity is back.
    gate.release.add_permits(1);
    assert_eq!(
        get(server.addr, "/work").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn metrics_serves_the_documented_names() {
    let (backend, mut gate) = gated(2);
    let server = start(small(), backend).await;
    let held = saturate(server.addr, &mut gate).await;
    assert_eq!(
        get(server.addr, "/work").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    gate.release.add_permits(2);
    for request in held {
        request.await.unwrap();
    }

    let scrape = get(server.addr, "/metrics").await.unwrap();
    assert_eq!(scrape.status, StatusCode::OK);
    for name in [
        "backpressure_requests_total",
        "backpressure_request_duration_seconds",
        "backpressure_in_flight",
        "backpressure_limit",
        "backpressure_rejections_total",
    ] {
        assert!(
            scrape.body.contains(name),
            "{name} missing from:\n{}",
            scrape.body
        );
    }
    assert!(
        scrape
            .body
            .contains(r#"backpressure_rejections_total{layer="adaptive",reason="overloaded"}"#)
            || scrape
                .body
                .contains(r#"backpressure_rejections_total{layer="queue",reason="queue_full"}"#),
        "the 503 is not counted:\n{}",
        scrape.body
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight_and_refuses_new_ones() {
    let (backend, mut gate) = gated(2);
    let server = start(small(), backend).await;
    let addr = server.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/work").await.unwrap() });
    gate.wait_entered(1).await;

    server.shutdown.send(()).unwrap();
    // The listener closes once the server has seen the signal; until then a probe may still be answered. The
    // bound only turns a server that never stops accepting into a failure instead of a hang.
    tokio::time::timeout(Duration::from_secs(10), async {
        while get(addr, "/health").await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the server kept accepting connections after shutdown");
    assert!(
        !server.task.is_finished(),
        "the server stopped before its request in flight finished"
    );

    gate.release.add_permits(1);
    let answer = in_flight.await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "done\n")
    );
    assert_eq!(server.task.await.unwrap().unwrap(), Stopped::Drained);
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_in_flight_after_the_drain_period() {
    let (backend, mut gate) = gated(2);
    let config = Config {
        drain: Duration::from_millis(100),
        ..small()
    };
    let server = start(config, backend).await;
    let addr = server.addr;
    let stuck = tokio::spawn(async move { get(addr, "/work").await });
    gate.wait_entered(1).await;

    server.shutdown.send(()).unwrap();
    assert_eq!(server.task.await.unwrap().unwrap(), Stopped::DrainTimedOut);
    stuck.abort();
}
