//! Run with: cargo run --example axum --features axum,metrics
//!
//! An axum 0.8 server with the recommended stack in front of its handler:
//!
//! `Deadline → RateLimit (per client IP) → Queue (limit = the adaptive limiter's) → AdaptiveConcurrency → /work`
//!
//! - every layer in HTTP mode: refusals are 503 / 429 / 504 responses with `Retry-After`, the router's error type
//!   stays `Infallible`, and no `HandleErrorLayer` is needed;
//! - `/work` really waits: it takes one of a fixed number of backend workers (a semaphore) and holds it for the
//!   service time, the way a database pool or a downstream call would;
//! - `/metrics` serves Prometheus text (`metrics-exporter-prometheus`) fed by the layers' `MetricsObserver`;
//! - `/health` and `/metrics` are outside the stack: a probe is answered even while `/work` sheds;
//! - Ctrl-C or SIGTERM stops accepting connections, lets requests in flight finish for up to 10 s, and exits.
//!
//! Try it: `curl -i localhost:3000/work`, then load it (see `demo_server` and the README's `wrk` section) and
//! watch `curl localhost:3000/metrics`.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_backpressure::adaptive::{AdaptiveConcurrencyLayer, AdaptiveHandle};
use tower_backpressure::core::{
    ConfigError, HttpMode, HttpStatus, MetricsObserver, WithRetryAfter,
};
use tower_backpressure::deadline::DeadlineLayer;
use tower_backpressure::queue::QueueLayer;
use tower_backpressure::rate::{PeerIp, RateLimitLayer};
use tower_backpressure::ServiceBuilderExt;

/// What the server is made of. [`Config::default`] is a reasonable start for a service whose requests take
/// tens of milliseconds.
#[derive(Debug, Clone)]
pub struct Config {
    /// The longest a request may take, whatever its `grpc-timeout` / `x-request-timeout-ms` header asks.
    pub max_timeout: Duration,
    /// Requests per second each client IP may send...
    pub rate_per_ip: u32,
    /// ...and how many it may send at once above that pace.
    pub rate_burst: u32,
    /// The adaptive limiter's limit before it has measured anything.
    pub initial_limit: usize,
    /// The highest the adaptive limit may go.
    pub max_limit: usize,
    /// How many requests may wait for a slot beyond the limit (0: none, refuse at once).
    pub queue_depth: usize,
    /// The hint sent with 503s from the queue and the limiter, which cannot know when a slot frees.
    pub retry_after: Duration,
    /// How long graceful shutdown waits for requests in flight before giving up on them.
    pub drain: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_timeout: Duration::from_secs(5),
            rate_per_ip: 1_000,
            rate_burst: 200,
            initial_limit: 20,
            max_limit: 500,
            queue_depth: 32,
            retry_after: Duration::from_secs(1),
            drain: Duration::from_secs(10),
        }
    }
}

type Work = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A fake backend: `workers` requests are served at once, each doing `work`; the others wait for a worker.
#[derive(Clone)]
pub struct Backend {
    workers: Arc<Semaphore>,
    work: Work,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("idle_workers", &self.workers.available_permits())
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// `workers` workers, each request taking `service_time`: capacity `workers / service_time` per second.
    pub fn sleeping(workers: usize, service_time: Duration) -> Self {
        Backend::with_work(workers, move || tokio::time::sleep(service_time))
    }

    /// `workers` workers, each request running `work`.
    pub fn with_work<F>(workers: usize, work: impl Fn() -> F + Send + Sync + 'static) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Backend {
            workers: Arc::new(Semaphore::new(workers)),
            work: Arc::new(move || Box::pin(work())),
        }
    }

    /// Waits for a worker, then works.
    pub async fn serve(&self) {
        let _worker = self
            .workers
            .acquire()
            .await
            .expect("the semaphore is never closed");
        (self.work)().await;
    }
}

/// Installs the process-wide Prometheus recorder the layers' `MetricsObserver` records into.
pub fn install_metrics() -> PrometheusHandle {
    PrometheusBuilder::new()
        .install_recorder()
        .expect("no other metrics recorder is installed")
}

#[derive(Clone)]
struct Scrape {
    prometheus: PrometheusHandle,
    limit: AdaptiveHandle,
}

/// The router: `/work` behind the stack; `/health` and `/metrics` beside it.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` (as [`serve`] does) so the rate limit
/// can key on the client's address.
pub fn app(
    config: &Config,
    backend: Backend,
    prometheus: PrometheusHandle,
) -> Result<Router, ConfigError> {
    let deadline = DeadlineLayer::builder()
        .max_timeout(config.max_timeout)
        .http()
        .observer(MetricsObserver::new())
        .build()?;
    let rate = RateLimitLayer::builder()
        .rate(config.rate_per_ip, Duration::from_secs(1))
        .burst(config.rate_burst)
        .key(PeerIp::new().ipv6_prefix(64))
        .policy_name("per-ip")
        .http()
        .observer(MetricsObserver::new())
        .build()?;
    // The queue and the limiter refuse without knowing when a slot will free: give their 503s a hint, so
    // well-behaved clients back off instead of retrying at once.
    let mode = WithRetryAfter::new(HttpMode, config.retry_after);
    let adaptive = AdaptiveConcurrencyLayer::builder()
        .initial_limit(config.initial_limit)
        .max_limit(config.max_limit)
        .classifier(HttpStatus::new())
        .reject_mode(mode)
        .observer(MetricsObserver::new())
        .build()?;
    let limit = adaptive.handle();
    let queue = QueueLayer::builder()
        .limit(limit.clone())
        .max_depth(config.queue_depth)
        .classifier(HttpStatus::new())
        .reject_mode(mode)
        .observer(MetricsObserver::new())
        .build()?;

    let protected = Router::new()
        .route("/work", get(work))
        .with_state(backend)
        .layer(
            ServiceBuilder::new()
                .deadline(deadline)
                .rate_limiter(rate)
                .queue(queue)
                .adaptive_concurrency(adaptive),
        );
    let open = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(Scrape { prometheus, limit });
    Ok(open.merge(protected))
}

async fn work(State(backend): State<Backend>) -> &'static str {
    backend.serve().await;
    "done\n"
}

async fn metrics(State(scrape): State<Scrape>) -> String {
    // The observer sets the limit gauge when the limit moves; setting it at scrape time too means a server that
    // has not moved it yet still exports it.
    metrics::gauge!("backpressure_limit", "layer" => "adaptive").set(scrape.limit.limit() as f64);
    scrape.prometheus.render()
}

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every request in flight at shutdown finished.
    Drained,
    /// Some were still running when the drain period ended; they are abandoned.
    DrainTimedOut,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting connections (the listener is
/// closed), lets requests in flight finish for at most `drain`, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> io::Result<Stopped> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stopped.await;
    })
    .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map(|()| Stopped::Drained),
        () = shutdown => {}
    }
    let _ = stop.send(());
    match tokio::time::timeout(drain, server).await {
        Ok(result) => result.map(|()| Stopped::Drained),
        Err(_) => Ok(Stopped::DrainTimedOut),
    }
}

/// Completes on Ctrl-C, or on SIGTERM (what orchestrators send) on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::default();
    let backend = Backend::sleeping(16, Duration::from_millis(20));
    let app = app(&config, backend, install_metrics())?;
    let listener = TcpListener::bind("127.0.0.1:3000").await?;
    eprintln!(
        "listening on http://{}  (GET /work, /metrics, /health; Ctrl-C to stop)",
        listener.local_addr()?
    );
    match serve(listener, app, shutdown_signal(), config.drain).await? {
        Stopped::Drained => eprintln!("shut down: every request in flight finished"),
        Stopped::DrainTimedOut => eprintln!(
            "shut down: requests still in flight after {:?} were abandoned",
            config.drain
        ),
    }
    Ok(())
}
