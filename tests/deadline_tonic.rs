//! Multi-hop deadline propagation over real loopback sockets with tonic (gRPC over HTTP/2).
//!
//! The same SRE-book example as the hyper test: A gets 30 s, spends 7 s, calls B (which sees 23 s minus one
//! margin); B spends 4 s, calls C (19 s minus two margins). The services are defined by hand (no protoc): one
//! unary method and one server-streaming method, whose messages are UTF-8 strings.
//!
//! Time is tokio's paused clock, moved only by the handlers' `tokio::time::advance`; a blocking task held open
//! for the whole test keeps the runtime from auto-advancing while it waits on the sockets.
#![cfg(feature = "grpc")]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut};
use futures::Stream;
use http::uri::PathAndQuery;
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tower::{Layer, Service};
use tower_backpressure::core::Deadline;
use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};

const MARGIN: Duration = Duration::from_millis(10);
const PATH: &str = "/deadline.Hop/Call";

#[derive(Debug, Clone, Copy, Default)]
struct StringCodec;

impl Codec for StringCodec {
    type Encode = String;
    type Decode = String;
    type Encoder = StringCodec;
    type Decoder = StringCodec;

    fn encoder(&mut self) -> Self::Encoder {
        StringCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        StringCodec
    }
}

impl Encoder for StringCodec {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for StringCodec {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| Status::invalid_argument("not utf-8"))
    }
}

type Log = Arc<Mutex<Vec<(&'static str, Option<Duration>)>>>;

/// One hop: logs the budget it finds, spends `spend`, calls `next` with no explicit deadline.
#[derive(Clone)]
struct Hop {
    name: &'static str,
    spend: Duration,
    next: Option<SocketAddr>,
    log: Log,
}

impl NamedService for Hop {
    const NAME: &'static str = "deadline.Hop";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl UnaryService<String> for Hop {
    type Response = String;
    type Future = BoxFuture<Result<Response<String>, Status>>;

    fn call(&mut self, _request: Request<String>) -> Self::Future {
        let hop = self.clone();
        Box::pin(async move {
            hop.log
                .lock()
                .unwrap()
                .push((hop.name, Deadline::current().map(Deadline::remaining)));
            tokio::time::advance(hop.spend).await;
            let Some(next) = hop.next else {
                return Ok(Response::new(hop.name.to_owned()));
            };
            let answer = call(next, Request::new(String::new())).await?;
            Ok(Response::new(format!("{}>{answer}", hop.name)))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Hop {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let hop = self.clone();
        Box::pin(async move {
            Ok(tonic::server::Grpc::new(StringCodec)
                .unary(hop, request)
                .await)
        })
    }
}

async fn connect(addr: SocketAddr) -> Result<Channel, Status> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))
}

async fn unary<S>(service: S, request: Request<String>) -> Result<String, Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<tower_backpressure::core::BoxError> + Send,
{
    let mut client = tonic::client::Grpc::new(service);
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.into().to_string()))?;
    let response = client
        .unary(request, PathAndQuery::from_static(PATH), StringCodec)
        .await?;
    Ok(response.into_inner())
}

/// A client call through `PropagateDeadlineLayer` over a tonic channel.
async fn call(addr: SocketAddr, request: Request<String>) -> Result<String, Status> {
    let propagate = PropagateDeadlineLayer::builder()
        .margin(MARGIN)
        .no_timeout_header()
        .build()
        .unwrap();
    unary(propagate.layer(connect(addr).await?), request).await
}

async fn start_hop(
    name: &'static str,
    spend: Duration,
    next: Option<SocketAddr>,
    log: Log,
    max_timeout: Option<Duration>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hop = Hop {
        name,
        spend,
        next,
        log,
    };
    let mut deadline = DeadlineLayer::builder().grpc();
    if let Some(max) = max_timeout {
        deadline = deadline.max_timeout(max);
    }
    let deadline = deadline.build().unwrap();
    tokio::spawn(async move {
        Server::builder()
            .layer(deadline)
            .add_service(hop)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    addr
}

#[tokio::test]
async fn tonic_budget_shrinks_by_time_spent_and_margins_across_three_hops() {
    tokio::time::pause();
    let (hold, held) = std::sync::mpsc::channel::<Infallible>();
    let inhibitor = tokio::task::spawn_blocking(move || held.recv());

    let log = Log::default();
    let c = start_hop("C", Duration::ZERO, None, log.clone(), None).await;
    let b = start_hop("B", Duration::from_secs(4), Some(c), log.clone(), None).await;
    let a = start_hop("A", Duration::from_secs(7), Some(b), log.clone(), None).await;

    let mut request = Request::new(String::new());
    request.set_timeout(Duration::from_secs(30));
    assert_eq!(call(a, request).await.unwrap(), "A>B>C");

    let seen = log.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("A", Some(Duration::from_secs(30))),
            ("B", Some(Duration::from_millis(22_990))),
            ("C", Some(Duration::from_millis(18_980))),
        ]
    );

    drop(hold);
    inhibitor.await.unwrap().unwrap_err();
}

#[tokio::test]
async fn tonic_expiry_is_deadline_exceeded_not_cancelled() {
    tokio::time::pause();
    let (hold, held) = std::sync::mpsc::channel::<Infallible>();
    let inhibitor = tokio::task::spawn_blocking(move || held.recv());

    let log = Log::default();
    let c = start_hop("C", Duration::ZERO, None, log.clone(), None).await;
    // B allows itself 5 s and spends 60: its deadline layer answers at 5 s. (The caller sends no grpc-timeout, so
    // that B's server layer is what answers; the channel's own expiry is the last test of this file.)
    let b = start_hop(
        "B",
        Duration::from_secs(60),
        Some(c),
        log.clone(),
        Some(Duration::from_secs(5)),
    )
    .await;

    let request = Request::new(String::new());
    let status = call(b, request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(log.lock().unwrap().len(), 1, "C is never called");

    drop(hold);
    inhibitor.await.unwrap().unwrap_err();
}

/// A tonic `Channel` enforces the `grpc-timeout` it sends and, when that runs out, fails the call itself, which
/// tonic reports as CANCELLED. The propagating layer (in gRPC mode) answers that expiry as DEADLINE_EXCEEDED.
#[tokio::test]
async fn channel_expiry_reaches_the_caller_as_deadline_exceeded() {
    tokio::time::pause();
    let (hold, held) = std::sync::mpsc::channel::<Infallible>();
    let inhibitor = tokio::task::spawn_blocking(move || held.recv());

    let log = Log::default();
    // B spends 60 s of the 5 s it is given.
    let b = start_hop("B", Duration::from_secs(60), None, log.clone(), None).await;
    let propagate = PropagateDeadlineLayer::builder()
        .margin(MARGIN)
        .no_timeout_header()
        .grpc()
        .build()
        .unwrap();
    let handle = propagate.handle();
    let channel = connect(b).await.unwrap();
    let status = Deadline::after(Duration::from_secs(5))
        .scope(unary(propagate.layer(channel), Request::new(String::new())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(log.lock().unwrap().len(), 1, "B was called");
    let snapshot = handle.snapshot();
    assert_eq!((snapshot.in_flight, snapshot.dropped), (0, 1));

    drop(hold);
    inhibitor.await.unwrap().unwrap_err();
}

const FEED_PATH: &str = "/deadline.Feed/Items";

/// A server-streaming method: one item a second, for ever. `dropped` is set when the stream is dropped.
#[derive(Clone, Default)]
struct Feed {
    dropped: Arc<AtomicBool>,
}

impl NamedService for Feed {
    const NAME: &'static str = "deadline.Feed";
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Items = Pin<Box<dyn Stream<Item = Result<String, Status>> + Send>>;

impl ServerStreamingService<String> for Feed {
    type Response = String;
    type ResponseStream = Items;
    type Future = BoxFuture<Result<Response<Items>, Status>>;

    fn call(&mut self, _request: Request<String>) -> Self::Future {
        let guard = SetOnDrop(self.dropped.clone());
        let items = futures::stream::unfold((0u32, guard), |(n, guard)| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((Ok(n.to_string()), (n + 1, guard)))
        });
        Box::pin(async move { Ok(Response::new(Box::pin(items) as Items)) })
    }
}

impl Service<http::Request<tonic::body::Body>> for Feed {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let feed = self.clone();
        Box::pin(async move {
            Ok(tonic::server::Grpc::new(StringCodec)
                .server_streaming(feed, request)
                .await)
        })
    }
}

/// The deadline bounds a whole server-streaming call, not only its response head (which tonic's own timeout does):
/// a stream that would go on for ever under a 2.5 s `grpc-timeout` sends its items of the first two seconds, and
/// then the client reads DEADLINE_EXCEEDED from the trailers. The server drops the stream at the deadline, so it
/// stops working for a caller that has given up, and records the call as `Dropped`.
///
/// Unlike the tests above, time here moves on its own (the paused clock jumps to the next timer whenever every task
/// waits): the stream waits on timers, as real producers wait on something, rather than moving the clock itself.
/// The clock may jump while bytes are on their way through the sockets, but the server's timers fire in their order
/// (items at 1 s and 2 s, the deadline at 2.5 s, the next item at 3 s), so what is sent does not depend on it.
#[tokio::test(start_paused = true)]
async fn a_server_stream_ends_with_deadline_exceeded_at_its_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let feed = Feed::default();
    let dropped = feed.dropped.clone();
    let deadline = DeadlineLayer::builder().grpc().build().unwrap();
    let handle = deadline.handle();
    tokio::spawn(async move {
        Server::builder()
            .layer(deadline)
            .add_service(feed)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });

    let mut client = tonic::client::Grpc::new(connect(addr).await.unwrap());
    client.ready().await.unwrap();
    let mut request = Request::new(String::new());
    request
        .metadata_mut()
        .insert("grpc-timeout", "2500m".parse().unwrap());
    let mut items = client
        .server_streaming(request, PathAndQuery::from_static(FEED_PATH), StringCodec)
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    let status = loop {
        match items.message().await {
            Ok(Some(_)) if received.len() == 10 => panic!("the stream was not cut at its deadline"),
            Ok(Some(item)) => received.push(item),
            Ok(None) => panic!("the stream ended without a status after {received:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(received, ["0", "1"]);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the server dropped the stream"
    );
    let snapshot = handle.snapshot();
    assert_eq!((snapshot.dropped, snapshot.in_flight), (1, 0));
}
