//! The hyper example's server over a real loopback socket: a streaming response keeps its permit until the body
//! ends, or until the client goes away with the body half read.
#![cfg(feature = "http")]

#[allow(dead_code)]
#[path = "../examples/hyper.rs"]
mod ex;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{Service, ServiceExt};

/// Waits until `done` holds, yielding to the runtime (which polls the sockets between yields).
async fn until(what: &str, done: impl Fn() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "not within 5 s: {what}");
}

async fn start() -> (
    std::net::SocketAddr,
    ex::ServerHandles,
    mpsc::UnboundedReceiver<ex::Feed>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (feeds, produced) = mpsc::unbounded_channel();
    (addr, ex::serve(listener, feeds), produced)
}

#[tokio::test]
async fn permits_are_held_until_the_streaming_body_ends() {
    let (addr, server, mut produced) = start().await;
    let (mut client, client_limiter) = ex::client();

    let request = Request::get(format!("http://{addr}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let feed = produced.recv().await.unwrap();
    let mut body = response.into_body();

    for i in 0..3 {
        feed.send(Bytes::from(format!("chunk {i}"))).await.unwrap();
        let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk, format!("chunk {i}"));
        // The head and some of the body are out, but the work is not done.
        assert_eq!(server.limiter.snapshot().in_flight, 1);
        assert_eq!(server.queue.snapshot().in_flight, 1);
        assert_eq!(client_limiter.snapshot().in_flight, 1);
    }

    drop(feed);
    assert!(body.frame().await.is_none(), "the body has ended");
    assert_eq!(
        client_limiter.snapshot().in_flight,
        0,
        "the client's permit goes with the body's end"
    );
    until("the server's permits are released", || {
        server.limiter.snapshot().in_flight == 0 && server.queue.snapshot().in_flight == 0
    })
    .await;
    assert_eq!(server.queue.snapshot().completed, 1);
}

#[tokio::test]
async fn permits_are_released_when_the_client_drops_a_half_read_body() {
    let (addr, server, mut produced) = start().await;

    // A bare connection, so that dropping it closes the socket for sure.
    let socket = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let feed = produced.recv().await.unwrap();
    let mut body = response.into_body();
    feed.send(Bytes::from_static(b"first")).await.unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(server.limiter.snapshot().in_flight, 1);

    drop(body);
    drop(sender);
    connection.abort();
    // The server learns of the closed socket through the socket itself; the handler's body goes with it.
    let noticed = tokio::time::timeout(Duration::from_secs(5), feed.closed()).await;
    assert!(noticed.is_ok(), "the server never dropped the body");
    until("the server's permits are released", || {
        server.limiter.snapshot().in_flight == 0 && server.queue.snapshot().in_flight == 0
    })
    .await;
}

/// The budget the handler reported in the example's response header.
fn budget_left(response: &http::Response<ex::ClientBody>) -> u64 {
    response
        .headers()
        .get(ex::BUDGET_LEFT)
        .expect("the handler runs under a deadline")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_clients_deadline_reaches_the_handler() {
    let (addr, _server, mut produced) = start().await;
    let (mut client, _) = ex::client();
    let uri = format!("http://{addr}/");

    // The client's 5 s budget, less the default 5 ms margin, replaces the server's 30 s maximum. (The margin
    // itself is checked exactly, in paused time, by the multi-hop tests.)
    let response = ex::fetch(&mut client, &uri, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let left = budget_left(&response);
    assert!(
        (1_000..=4_995).contains(&left),
        "the handler found {left} ms left"
    );
    drop(produced.recv().await.unwrap());
    assert!(response.into_body().collect().await.is_ok());

    // Without a deadline the client passes none on and the server's maximum applies: the figure above came from
    // the client. (The bound only fails if 25 s pass between the server's clock read and the handler's.)
    let request = Request::get(&uri).body(Empty::<Bytes>::new()).unwrap();
    let response = client.ready().await.unwrap().call(request).await.unwrap();
    let left = budget_left(&response);
    assert!(
        (5_000..=30_000).contains(&left),
        "the handler found {left} ms left"
    );
    drop(produced.recv().await.unwrap());
}
