//! Run with: cargo run --example tonic --features full
//!
//! A tonic gRPC server and client protected by the crate's layers, over a loopback socket.
//!
//! - Server, added with `Server::builder().layer(..)`, outermost first: `DeadlineLayer` (reads `grpc-timeout`,
//!   answers DEADLINE_EXCEEDED, never CANCELLED) → `RateLimitLayer` (RESOURCE_EXHAUSTED) → `QueueLayer` bounded by
//!   the adaptive limit (UNAVAILABLE when full) → `AdaptiveConcurrencyLayer` → the service. Every layer is in gRPC
//!   mode: rejections are trailers-only responses, and outcomes are read from `grpc-status`.
//! - Client, around a tonic `Channel`: `PropagateDeadline` (sends what is left of the caller's `Deadline` as
//!   `grpc-timeout`) → `CircuitBreaker` → `AdaptiveConcurrency`.
//!
//! A tonic `Channel` enforces the `grpc-timeout` it sends on its own and fails the call when that runs out, usually
//! just before the server's DEADLINE_EXCEEDED could arrive; tonic would report that as CANCELLED, and
//! `PropagateDeadline` answers it as DEADLINE_EXCEEDED instead. The server side answers DEADLINE_EXCEEDED to any
//! caller (see `tests/tonic_example.rs`).
//!
//! The service is written by hand, so nothing but cargo is needed (no protoc): one unary method,
//! `/demo.Work/Do`, whose request and response messages are UTF-8 strings. The handler waits for one of a fixed
//! number of backend workers (a semaphore) and answers with the budget it was given.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tower::ServiceBuilder;
use tower_backpressure::adaptive::{
    AdaptiveConcurrency, AdaptiveConcurrencyLayer, AdaptiveHandle, NoBypass,
};
use tower_backpressure::breaker::{CircuitBreaker, CircuitBreakerLayer};
use tower_backpressure::core::{Deadline, GrpcClassifier, GrpcMode, RequestDeadline};
use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadline, PropagateDeadlineLayer};
use tower_backpressure::queue::{QueueHandle, QueueLayer};
use tower_backpressure::rate::{RateLimitHandle, RateLimitLayer};

/// The method's path: package `demo`, service `Work`, method `Do`.
pub(crate) const PATH: &str = "/demo.Work/Do";

/// Messages are UTF-8 strings, framed by tonic.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Utf8;

impl Codec for Utf8 {
    type Encode = String;
    type Decode = String;
    type Encoder = Utf8;
    type Decoder = Utf8;

    fn encoder(&mut self) -> Utf8 {
        Utf8
    }

    fn decoder(&mut self) -> Utf8 {
        Utf8
    }
}

impl Encoder for Utf8 {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for Utf8 {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.into())
            .map(Some)
            .map_err(|_| Status::invalid_argument("the message is not UTF-8"))
    }
}

/// How the server protects itself.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The adaptive limit's ceiling (and starting point when below 16).
    pub(crate) max_concurrency: usize,
    /// How many requests may wait for the limit.
    pub(crate) queue_depth: usize,
    /// Requests per period across all callers (also the burst), and the period.
    pub(crate) rate: (u32, Duration),
    /// The longest budget a request gets, whatever its caller asks for.
    pub(crate) max_timeout: Duration,
    /// How long the backend works on a request once a worker is free.
    pub(crate) service_time: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_concurrency: 64,
            queue_depth: 32,
            rate: (10_000, Duration::from_secs(1)),
            max_timeout: Duration::from_secs(10),
            service_time: Duration::from_millis(20),
        }
    }
}

/// Live figures of a running server's layers.
#[derive(Debug, Clone)]
pub(crate) struct ServerHandles {
    pub(crate) limiter: AdaptiveHandle,
    pub(crate) queue: QueueHandle,
    pub(crate) rate: RateLimitHandle,
}

/// The service: takes a backend worker, works, answers with the budget it saw (`budget_ms=N` or `budget_ms=none`).
#[derive(Debug, Clone)]
struct Work {
    workers: Arc<Semaphore>,
    service_time: Duration,
}

impl NamedService for Work {
    const NAME: &'static str = "demo.Work";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl UnaryService<String> for Work {
    type Response = String;
    type Future = BoxFuture<Result<Response<String>, Status>>;

    fn call(&mut self, _request: Request<String>) -> Self::Future {
        let work = self.clone();
        Box::pin(async move {
            // The deadline layer put the budget in scope: outbound calls made here would inherit it.
            let budget = Deadline::current().map(Deadline::remaining);
            let _worker = work
                .workers
                .acquire()
                .await
                .map_err(|_| Status::unavailable("backend closed"))?;
            tokio::time::sleep(work.service_time).await;
            let answer = match budget {
                Some(budget) => format!("budget_ms={}", budget.as_millis()),
                None => "budget_ms=none".to_owned(),
            };
            Ok(Response::new(answer))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Work {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let work = self.clone();
        Box::pin(async move {
            if request.uri().path() != PATH {
                return Ok(Status::unimplemented(request.uri().path().to_owned()).into_http());
            }
            Ok(tonic::server::Grpc::new(Utf8).unary(work, request).await)
        })
    }
}

/// Starts the protected server on `listener`; `workers` is the backend's capacity.
pub(crate) fn serve(
    listener: TcpListener,
    workers: Arc<Semaphore>,
    settings: &Settings,
) -> ServerHandles {
    let deadline = DeadlineLayer::builder()
        .grpc()
        .max_timeout(settings.max_timeout)
        .build()
        .expect("a positive max_timeout is valid");
    let rate = RateLimitLayer::builder()
        .rate(settings.rate.0, settings.rate.1)
        .grpc()
        .build()
        .expect("a positive rate is valid");
    let limiter = AdaptiveConcurrencyLayer::builder()
        .max_limit(settings.max_concurrency)
        .initial_limit(settings.max_concurrency.min(16))
        .grpc()
        .build()
        .expect("a positive max_concurrency is valid");
    // The queue admits up to the adaptive limit, read live, and holds the overflow for a short while.
    let queue = QueueLayer::builder()
        .limit(limiter.handle())
        .max_depth(settings.queue_depth)
        .grpc()
        .build()
        .expect("the queue's settings are valid");
    let handles = ServerHandles {
        limiter: limiter.handle(),
        queue: queue.handle(),
        rate: rate.handle(),
    };

    let stack = ServiceBuilder::new()
        .layer(deadline)
        .layer(rate)
        .layer(queue)
        .layer(limiter);
    let work = Work {
        workers,
        service_time: settings.service_time,
    };
    tokio::spawn(async move {
        let served = Server::builder()
            .layer(stack)
            .add_service(work)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await;
        if let Err(error) = served {
            eprintln!("server stopped: {error}");
        }
    });
    handles
}

/// The client stack around a tonic channel.
type ClientStack = PropagateDeadline<
    CircuitBreaker<
        AdaptiveConcurrency<Channel, GrpcClassifier, GrpcMode, (), NoBypass, RequestDeadline>,
        GrpcClassifier,
        GrpcMode,
    >,
    GrpcClassifier,
    GrpcMode,
    (),
>;

/// A protected client of the `Work` service.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    grpc: tonic::client::Grpc<ClientStack>,
    pub(crate) limiter: AdaptiveHandle,
}

impl Client {
    /// Connects to `addr` and wraps the channel: `PropagateDeadline → CircuitBreaker → AdaptiveConcurrency`.
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Client, tonic::transport::Error> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI")
            .connect()
            .await?;
        let propagate = PropagateDeadlineLayer::builder()
            .grpc()
            .no_timeout_header()
            .build()
            .expect("with no millisecond header there is no header name to reject");
        let breaker = CircuitBreakerLayer::builder()
            .grpc()
            .build()
            .expect("the breaker's defaults are valid");
        let limiter = AdaptiveConcurrencyLayer::builder()
            .grpc()
            .build()
            .expect("the limiter's defaults are valid");
        let handle = limiter.handle();
        let stack = ServiceBuilder::new()
            .layer(propagate)
            .layer(breaker)
            .layer(limiter)
            .service(channel);
        Ok(Client {
            grpc: tonic::client::Grpc::new(stack),
            limiter: handle,
        })
    }

    /// Calls `Do`; the `Deadline` in scope, if any, travels along as `grpc-timeout`.
    pub(crate) async fn work(&mut self, job: &str) -> Result<String, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let response = self
            .grpc
            .unary(
                Request::new(job.to_owned()),
                PathAndQuery::from_static(PATH),
                Utf8,
            )
            .await?;
        Ok(response.into_inner())
    }

    /// Calls `Do` with `budget` to finish.
    pub(crate) async fn work_within(
        &mut self,
        job: &str,
        budget: Duration,
    ) -> Result<String, Status> {
        Deadline::after(budget).scope(self.work(job)).await
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings {
        max_concurrency: 8,
        queue_depth: 8,
        ..Settings::default()
    };
    // Two backend workers behind a limit of 8 and a queue of 8: a burst of 40 calls overloads it.
    let workers = Arc::new(Semaphore::new(2));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = serve(listener, workers, &settings);
    println!("serving /demo.Work/Do on {addr}");

    let mut client = Client::connect(addr).await?;
    println!(
        "one call, 1 s budget: {:?}",
        client.work_within("hello", Duration::from_secs(1)).await
    );

    let calls = (0..40).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .work_within(&format!("job {i}"), Duration::from_millis(300))
                .await
        })
    });
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    for call in calls.collect::<Vec<_>>() {
        let code = match call.await? {
            Ok(_) => "Ok".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        *by_code.entry(code).or_default() += 1;
    }
    println!("a burst of 40 calls, 300 ms budget each: {by_code:?}");
    println!("server limiter: {:?}", server.limiter.snapshot());
    println!("server queue: {:?}", server.queue.snapshot());
    println!("server rate limit: {:?}", server.rate.snapshot());
    println!("client limiter: {:?}", client.limiter.snapshot());
    Ok(())
}
