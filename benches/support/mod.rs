//! The stacks every benchmark measures, built the same way for the criterion benches and the allocation count.
//!
//! One request is `ready().await` then `call(request).await` against an inner `service_fn` that answers at once,
//! so what is measured is the middleware, not the work behind it. Every stack is configured so that it admits
//! every request (limits far above what one or two tasks can hold in flight, breakers closed, no deadline
//! pressure): the figures are the cost of the admitted path, which is what every request pays.
// Each bench binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::limit::ConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_backpressure::adaptive::{AdaptiveConcurrencyLayer, Aimd, Algorithm, Knee};
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
use tower_backpressure::queue::QueueLayer;
use tower_backpressure::rate::RateLimitLayer;

/// The request every stack takes: an HTTP request with no body, so that header-reading layers (deadlines) take
/// part on the same terms as the generic ones.
pub(crate) type Req = http::Request<()>;
/// The response of the inner service.
pub(crate) type Res = http::Response<()>;

/// Names of the stacks the goals of docs/PERFORMANCE.md refer to. Criterion turns `:` and a few other characters
/// into `_` in its directory names, which `overhead`'s tables read back: keep names free of them.
pub(crate) mod name {
    pub(crate) const BARE: &str = "bare service_fn";
    pub(crate) const TOWER_LIMIT: &str = "tower ConcurrencyLimit";
    pub(crate) const TOWER_SHED_LIMIT: &str = "tower LoadShed+ConcurrencyLimit";
    pub(crate) const TOWER_TIMEOUT: &str = "tower Timeout";
    pub(crate) const TOWER_SHED_LIMIT_TIMEOUT: &str = "tower LoadShed+ConcurrencyLimit+Timeout";
    pub(crate) const FAILSAFE_BREAKER: &str = "failsafe breaker";
    pub(crate) const TR_BREAKER: &str = "tower-resilience breaker";
    pub(crate) const TR_ADAPTIVE: &str = "tower-resilience adaptive (AIMD)";
    pub(crate) const RATE: &str = "ours RateLimit (global)";
    pub(crate) const PRESSURE: &str = "ours Pressure (calm runtime)";
    pub(crate) const BREAKER: &str = "ours CircuitBreaker (closed)";
    pub(crate) const DEADLINE: &str = "ours Deadline (server, max 30 s)";
    /// The same, built to also store the deadline in the request's extensions (opt-in): measured to show what
    /// that costs, and held to no goal.
    pub(crate) const DEADLINE_EXTENSION: &str =
        "ours Deadline (server, max 30 s, extension stored)";
    pub(crate) const PROPAGATE: &str = "ours PropagateDeadline (no deadline set)";
    pub(crate) const SERVER: &str = "ours server stack (Deadline+Queue+Adaptive)";
    pub(crate) const CLIENT: &str = "ours client stack (PropagateDeadline+Breaker+Adaptive)";
    pub(crate) const ADAPTIVE: &str = "ours AdaptiveConcurrency (Knee, default)";
    pub(crate) const ADAPTIVE_AIMD: &str = "ours AdaptiveConcurrency (AIMD)";
    pub(crate) const QUEUE: &str = "ours Queue (empty, fixed limit)";
    pub(crate) const QUEUE_ADAPTIVE: &str = "ours Queue+AdaptiveConcurrency";

    /// Our layers, each alone: held to zero allocations and to tower's `ConcurrencyLimit` throughput.
    pub(crate) const OURS: &[&str] = &[
        ADAPTIVE,
        ADAPTIVE_AIMD,
        QUEUE,
        BREAKER,
        DEADLINE,
        PROPAGATE,
        RATE,
        PRESSURE,
    ];

    /// The cost goals, "ours ≤ ratio × theirs" on the added ns per request of a single task.
    pub(crate) const COST_GOALS: &[(&str, &str, f64)] = &[
        (ADAPTIVE, TOWER_SHED_LIMIT_TIMEOUT, 1.0),
        (ADAPTIVE, TR_ADAPTIVE, 0.3),
        (BREAKER, FAILSAFE_BREAKER, 0.5),
        (BREAKER, TR_BREAKER, 0.15),
        (DEADLINE, TOWER_TIMEOUT, 1.0),
        (SERVER, TOWER_SHED_LIMIT_TIMEOUT, 2.0),
    ];
}

/// A limit no benchmark reaches: the limiters admit every request and only their bookkeeping is measured.
pub(crate) const LIMIT: usize = 1_000;
/// A timeout no benchmark reaches.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn request() -> Req {
    http::Request::new(())
}

/// The inner service: answers at once, never fails.
pub(crate) fn backend(
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Req| std::future::ready(Ok::<_, Infallible>(http::Response::new(()))))
}

/// Sends one request through `svc` and checks it was answered, not refused.
pub(crate) async fn one<S>(svc: &mut S)
where
    S: Service<Req>,
{
    let ready = svc.ready().await.is_ok();
    assert!(ready, "service failed in poll_ready");
    let answered = svc.call(request()).await.is_ok();
    assert!(
        answered,
        "request refused: the stack is misconfigured for a benchmark"
    );
}

/// Sends `n` requests through `svc`, one after another.
pub(crate) async fn drive<S: Service<Req>>(mut svc: S, n: u64) {
    for _ in 0..n {
        one(std::hint::black_box(&mut svc)).await;
    }
}

/// Sends `n` requests through clones of `svc` from two OS threads at once, each driving its half on its own
/// current-thread runtime, and returns the time from the first thread's start to the last one's end.
///
/// Two threads rather than two tasks on a two-worker tokio runtime: there, the task that completes a start
/// barrier wakes the other into its own worker's LIFO slot, which the idle worker cannot steal from, and the
/// tasks' loops never yield, so the two halves ran one after the other and the "contention" figure was a
/// single-thread one. The threads time themselves, because on two cores the spawning thread may not run again
/// until both are done.
pub(crate) fn on_two_threads<S>(svc: &S, n: u64) -> std::time::Duration
where
    S: Service<Req> + Clone + Send + 'static,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let run = |svc: S, n: u64| {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            barrier.wait();
            let start = std::time::Instant::now();
            rt.block_on(drive(svc, n));
            (start, std::time::Instant::now())
        })
    };
    let a = run(svc.clone(), n / 2);
    let b = run(svc.clone(), n - n / 2);
    let (start_a, end_a) = a.join().expect("thread a");
    let (start_b, end_b) = b.join().expect("thread b");
    end_a.max(end_b) - start_a.min(start_b)
}

/// Receives every stack in turn. The visitor decides how to measure it.
pub(crate) trait Visit {
    fn stack<S>(&mut self, name: &'static str, svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static;
}

/// Hands every stack to `v`, in the order the tables list them. Must be called inside a tokio runtime context
/// (some layers create timers on construction).
pub(crate) fn stacks(v: &mut impl Visit) {
    v.stack(name::BARE, backend());

    v.stack(
        name::TOWER_LIMIT,
        ServiceBuilder::new()
            .layer(ConcurrencyLimitLayer::new(LIMIT))
            .service(backend()),
    );
    v.stack(
        name::TOWER_SHED_LIMIT,
        ServiceBuilder::new()
            .layer(LoadShedLayer::new())
            .layer(ConcurrencyLimitLayer::new(LIMIT))
            .service(backend()),
    );
    v.stack(
        name::TOWER_TIMEOUT,
        ServiceBuilder::new()
            .layer(TimeoutLayer::new(TIMEOUT))
            .service(backend()),
    );
    v.stack(
        name::TOWER_SHED_LIMIT_TIMEOUT,
        ServiceBuilder::new()
            .layer(LoadShedLayer::new())
            .layer(ConcurrencyLimitLayer::new(LIMIT))
            .layer(TimeoutLayer::new(TIMEOUT))
            .service(backend()),
    );

    v.stack(
        name::ADAPTIVE,
        ServiceBuilder::new()
            .layer(adaptive(Knee::new()))
            .service(backend()),
    );
    v.stack(
        name::ADAPTIVE_AIMD,
        ServiceBuilder::new()
            .layer(adaptive(Aimd::new()))
            .service(backend()),
    );
    v.stack(
        name::QUEUE,
        ServiceBuilder::new()
            .layer(
                QueueLayer::builder()
                    .limit(LIMIT)
                    .build()
                    .expect("queue config"),
            )
            .service(backend()),
    );
    // The server stack's core: the queue admits below the limit the adaptive limiter publishes.
    let limiter = adaptive(Knee::new());
    v.stack(
        name::QUEUE_ADAPTIVE,
        ServiceBuilder::new()
            .layer(
                QueueLayer::builder()
                    .limit(limiter.handle())
                    .build()
                    .expect("queue config"),
            )
            .layer(limiter)
            .service(backend()),
    );
    v.stack(
        name::BREAKER,
        ServiceBuilder::new()
            .layer(
                CircuitBreakerLayer::builder()
                    .build()
                    .expect("breaker config"),
            )
            .service(backend()),
    );
    #[cfg(feature = "http")]
    deadline_stacks(v);
    v.stack(
        name::RATE,
        ServiceBuilder::new()
            .layer(
                RateLimitLayer::builder()
                    .rate(1_000_000_000, Duration::from_secs(1))
                    .build()
                    .expect("rate config"),
            )
            .service(backend()),
    );
    // The hot path reads one atomic flag whether or not the monitor task runs; leaving it stopped keeps a
    // sampling task from competing with the measured one.
    let monitor = RuntimeMonitor::builder()
        .max_lag(Duration::from_millis(50), Duration::from_millis(10))
        .build()
        .expect("monitor config");
    v.stack(
        name::PRESSURE,
        ServiceBuilder::new()
            .layer(
                PressureLayer::builder(&monitor)
                    .build()
                    .expect("pressure config"),
            )
            .service(backend()),
    );

    v.stack(
        name::FAILSAFE_BREAKER,
        Failsafe {
            breaker: failsafe::Config::new().build(),
            inner: backend(),
        },
    );
    v.stack(
        name::TR_BREAKER,
        ServiceBuilder::new()
            .layer(
                tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
                    .build()
                    .expect("default breaker config"),
            )
            .service(backend()),
    );
    v.stack(
        name::TR_ADAPTIVE,
        ServiceBuilder::new()
            .layer(tower_resilience_adaptive::AdaptiveLimiterLayer::new(
                tower_resilience_adaptive::Aimd::builder()
                    .initial_limit(LIMIT)
                    .min_limit(1)
                    .max_limit(LIMIT)
                    .latency_threshold(Duration::from_millis(100))
                    .build()
                    .expect("aimd config"),
            ))
            .service(backend()),
    );
}

/// The stacks with deadlines, which read and write HTTP headers (feature `http`).
#[cfg(feature = "http")]
fn deadline_stacks(v: &mut impl Visit) {
    use tower_backpressure::deadline::{DeadlineLayer, PropagateDeadlineLayer};

    let server_deadline = || {
        DeadlineLayer::builder()
            .max_timeout(TIMEOUT)
            .build()
            .expect("deadline config")
    };
    v.stack(
        name::DEADLINE,
        ServiceBuilder::new()
            .layer(server_deadline())
            .service(backend()),
    );
    v.stack(
        name::DEADLINE_EXTENSION,
        ServiceBuilder::new()
            .layer(
                DeadlineLayer::builder()
                    .max_timeout(TIMEOUT)
                    .request_extension(true)
                    .build()
                    .expect("deadline config"),
            )
            .service(backend()),
    );
    v.stack(
        name::PROPAGATE,
        ServiceBuilder::new()
            .layer(
                PropagateDeadlineLayer::builder()
                    .build()
                    .expect("propagate config"),
            )
            .service(backend()),
    );

    let limiter = adaptive(Knee::new());
    v.stack(
        name::SERVER,
        ServiceBuilder::new()
            .layer(server_deadline())
            .layer(
                QueueLayer::builder()
                    .limit(limiter.handle())
                    .build()
                    .expect("queue config"),
            )
            .layer(limiter)
            .service(backend()),
    );
    v.stack(
        name::CLIENT,
        ServiceBuilder::new()
            .layer(
                PropagateDeadlineLayer::builder()
                    .build()
                    .expect("propagate config"),
            )
            .layer(
                CircuitBreakerLayer::builder()
                    .build()
                    .expect("breaker config"),
            )
            .layer(adaptive(Knee::new()))
            .service(backend()),
    );
}

/// Our adaptive limiter starting at the benchmark limit, so it never refuses; the algorithm still runs once per
/// window as in production.
fn adaptive(algorithm: impl Algorithm) -> AdaptiveConcurrencyLayer {
    AdaptiveConcurrencyLayer::builder()
        .initial_limit(LIMIT)
        .max_limit(LIMIT)
        .algorithm(algorithm)
        .build()
        .expect("adaptive config")
}

/// failsafe has no tower layer: this is the thinnest service that puts its futures-aware breaker around an inner
/// service, which is how a tower user would adopt it.
#[derive(Clone)]
pub(crate) struct Failsafe<B, S> {
    breaker: B,
    inner: S,
}

impl<B, S> Service<Req> for Failsafe<B, S>
where
    B: failsafe::futures::CircuitBreaker,
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        B::FailurePolicy,
        B::Instrument,
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.breaker.call(self.inner.call(req))
    }
}
