//! Run with: cargo run --example hyper --features http
//!
//! A hyper 1.x server and client using the crate's layers directly, with a streaming response body.
//!
//! - Server: a plain tower stack (`DeadlineLayer` → `QueueLayer` bounded by the adaptive limit →
//!   `AdaptiveConcurrencyLayer` → handler), all in HTTP mode, served connection by connection with
//!   `hyper::server::conn::http1` through `hyper_util::service::TowerToHyperService`.
//! - The handler answers at once with a body streamed from a channel: the response head leaves long before the
//!   work is done. The layers hold their permit until the body has ended (or was dropped because the client
//!   went away), so the limit counts the requests really in progress, and latency is measured to the last byte.
//! - Client: hyper-util's pooled client under `PropagateDeadline` → `AdaptiveConcurrency`, also in HTTP mode. It
//!   calls under a 5 s deadline, which travels in the request's timeout headers; the handler finds it with
//!   `Deadline::current()` and reports what is left of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_backpressure::adaptive::{AdaptiveConcurrencyLayer, AdaptiveHandle};
use tower_backpressure::core::Deadline;
use tower_backpressure::deadline::codec::encode_timeout_ms;
use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use tower_backpressure::queue::{QueueHandle, QueueLayer};

/// The sending end of one response's body: whoever holds it writes the chunks, and dropping it ends the body.
pub(crate) type Feed = mpsc::Sender<Bytes>;

/// Response bodies, streamed or not.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Live figures of a running server's layers.
#[derive(Debug, Clone)]
pub(crate) struct ServerHandles {
    pub(crate) limiter: AdaptiveHandle,
    pub(crate) queue: QueueHandle,
}

/// The response header in which the handler reports the budget it found left (whole milliseconds): the client's
/// deadline, passed on by its `PropagateDeadline`, or else the server's own maximum.
pub(crate) const BUDGET_LEFT: &str = "x-budget-left-ms";

/// The handler: answers with a body fed through a channel whose sending end goes to `feeds`, the producer.
async fn stream(
    _request: Request<Incoming>,
    feeds: mpsc::UnboundedSender<Feed>,
) -> Result<Response<Body>, Infallible> {
    // No plumbing: the deadline layer makes the request's deadline current while the handler runs.
    let left = Deadline::current().map(|deadline| deadline.remaining());
    let (feed, chunks) = mpsc::channel::<Bytes>(1);
    if feeds.send(feed).is_err() {
        return Ok(Response::new(Empty::new().boxed_unsync()));
    }
    let frames = futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), chunks))
    });
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    if let Some(left) = left {
        response
            .headers_mut()
            .insert(BUDGET_LEFT, HeaderValue::from(encode_timeout_ms(left)));
    }
    Ok(response)
}

/// Starts the protected server on `listener`; each response's body is fed by whoever receives from `feeds`.
pub(crate) fn serve(listener: TcpListener, feeds: mpsc::UnboundedSender<Feed>) -> ServerHandles {
    let deadline = DeadlineLayer::builder()
        .http()
        .max_timeout(Duration::from_secs(30))
        .build()
        .expect("a positive max_timeout is valid");
    let limiter = AdaptiveConcurrencyLayer::builder()
        .max_limit(64)
        .initial_limit(16)
        .http()
        .build()
        .expect("the limiter's settings are valid");
    let queue = QueueLayer::builder()
        .limit(limiter.handle())
        .max_depth(32)
        .http()
        .build()
        .expect("the queue's settings are valid");
    let handles = ServerHandles {
        limiter: limiter.handle(),
        queue: queue.handle(),
    };
    let service = ServiceBuilder::new()
        .layer(deadline)
        .layer(queue)
        .layer(limiter)
        .service_fn(move |request| stream(request, feeds.clone()));

    tokio::spawn(async move {
        loop {
            let (socket, _peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most often: retrying at once would spin on the error while the
                    // connections that hold them finish. Wait a moment, as axum's and hyper-util's servers do.
                    eprintln!("accept failed: {error}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                // A client that goes away mid-body ends the connection with an error; the body, and with it the
                // permits, are dropped either way.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    handles
}

/// The client's response bodies. Bounded by the caller's deadline, a body fails with `DeadlineExceeded` when it is
/// still being read at the deadline; other errors are hyper's, boxed.
pub(crate) type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

/// The client's protected stack, boxed.
pub(crate) type HttpService =
    BoxCloneService<Request<Empty<Bytes>>, Response<ClientBody>, BoxError>;

/// A protected HTTP client: `PropagateDeadline → AdaptiveConcurrency → hyper-util's pooled client`.
pub(crate) fn client() -> (HttpService, AdaptiveHandle) {
    let http: HttpClient<HttpConnector, Empty<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build_http();
    let propagate = PropagateDeadlineLayer::builder()
        .http()
        .build()
        .expect("the default header names are valid");
    let limiter = AdaptiveConcurrencyLayer::builder()
        .http()
        .build()
        .expect("the limiter's defaults are valid");
    let handle = limiter.handle();
    let service = ServiceBuilder::new()
        .layer(propagate)
        .layer(limiter)
        // The limiter answers rejections with an empty body of the inner type, so that type needs a default.
        .map_response(|response: Response<Incoming>| response.map(BodyExt::boxed_unsync))
        .service(http)
        // One nameable body type for callers, instead of the layers' nested tracking bodies.
        .map_response(|response| response.map(BodyExt::boxed_unsync))
        .map_err(BoxError::from);
    (BoxCloneService::new(service), handle)
}

/// Sends a GET to `uri` through `client` under a deadline `budget` from now.
///
/// The call is made inside the deadline's scope: `PropagateDeadline` reads the deadline in `call`, so a call made
/// before the scoped future (as an argument to `scope`) would find none and pass no budget on.
pub(crate) async fn fetch(
    client: &mut HttpService,
    uri: &str,
    budget: Duration,
) -> Result<Response<ClientBody>, BoxError> {
    let request = Request::get(uri).body(Empty::new())?;
    Deadline::after(budget)
        .scope(async move { client.ready().await?.call(request).await })
        .await
}

/// Writes `count` chunks into `feed`, one every `every`, then ends the body.
async fn produce(feed: Feed, count: usize, every: Duration) {
    for i in 1..=count {
        if feed
            .send(Bytes::from(format!("chunk {i}\n")))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (feeds, mut produced) = mpsc::unbounded_channel();
    let server = serve(listener, feeds);
    tokio::spawn(async move {
        while let Some(feed) = produced.recv().await {
            tokio::spawn(produce(feed, 5, Duration::from_millis(100)));
        }
    });
    println!("serving on http://{addr}/");

    let (mut client, client_limiter) = client();
    let response = fetch(
        &mut client,
        &format!("http://{addr}/"),
        Duration::from_secs(5),
    )
    .await?;
    let left = response
        .headers()
        .get(BUDGET_LEFT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    println!(
        "status {}; the handler found {left} ms of the client's 5 s budget left (less the 5 ms margin and the trip); \
         the head has arrived, the body is streaming",
        response.status()
    );
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            println!(
                "{:>9} | server in flight {} (queue {}) | client in flight {}",
                String::from_utf8_lossy(&chunk).trim_end(),
                server.limiter.snapshot().in_flight,
                server.queue.snapshot().in_flight,
                client_limiter.snapshot().in_flight,
            );
        }
    }
    println!(
        "body ended | server in flight {} | client in flight {}",
        server.limiter.snapshot().in_flight,
        client_limiter.snapshot().in_flight,
    );
    Ok(())
}
