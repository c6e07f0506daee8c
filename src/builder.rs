//! [`ServiceBuilderExt`]: the crate's layers as methods on `tower::ServiceBuilder`.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::adaptive::AdaptiveConcurrencyLayer;
use crate::breaker::CircuitBreakerLayer;
#[cfg(feature = "http")]
use crate::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use crate::pressure::PressureLayer;
use crate::queue::QueueLayer;
use crate::rate::RateLimitLayer;

mod sealed {
    pub trait Sealed {}

    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// The crate's layers as `ServiceBuilder` methods. Sealed: implemented for `tower::ServiceBuilder` only.
///
/// Every layer here is configured by a builder whose `build()` returns a `Result` (configuration is checked, never
/// a panic), so the methods take a **built** layer: build each one, keep its handle if you need it, then stack.
/// Layers wrap in the order they are written, the first outermost, exactly as with `ServiceBuilder::layer`.
///
/// # Example
///
/// The recommended server stack, `Deadline → RateLimit → Queue(adaptive limit) → AdaptiveConcurrency → handler`,
/// in HTTP mode:
///
/// ```
/// # #[cfg(feature = "http")] {
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
/// use tower_backpressure::deadline::DeadlineLayer;
/// use tower_backpressure::queue::QueueLayer;
/// use tower_backpressure::rate::RateLimitLayer;
/// use tower_backpressure::ServiceBuilderExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let deadline = DeadlineLayer::builder().max_timeout(Duration::from_secs(10)).http().build()?;
/// let rate = RateLimitLayer::builder().rate(1_000, Duration::from_secs(1)).http().build()?;
/// let adaptive = AdaptiveConcurrencyLayer::builder().max_limit(200).http().build()?;
/// // The queue admits up to the limit the adaptive limiter has learned, and lets a few more wait.
/// let queue = QueueLayer::builder().limit(adaptive.handle()).max_depth(32).http().build()?;
///
/// let svc = ServiceBuilder::new()
///     .deadline(deadline)
///     .rate_limiter(rate)
///     .queue(queue)
///     .adaptive_concurrency(adaptive)
///     .service(service_fn(|_req: Request<String>| async {
///         Ok::<_, Infallible>(Response::new("hello".to_owned()))
///     }));
///
/// let response = svc.oneshot(Request::new(String::new())).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// # Ok(())
/// # }
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    #[cfg(feature = "http")]
    /// Adds a server-side [`DeadlineLayer`]: put it first, so time spent queued below counts against the budget.
    fn deadline<C, M, O>(
        self,
        layer: DeadlineLayer<C, M, O>,
    ) -> ServiceBuilder<Stack<DeadlineLayer<C, M, O>, L>>;

    #[cfg(feature = "http")]
    /// Adds a client-side [`PropagateDeadlineLayer`]: first on an outbound stack.
    fn propagate_deadline<C, M, O>(
        self,
        layer: PropagateDeadlineLayer<C, M, O>,
    ) -> ServiceBuilder<Stack<PropagateDeadlineLayer<C, M, O>, L>>;

    /// Adds a [`RateLimitLayer`]. (Not `rate_limit`: `ServiceBuilder` has an inherent method of that name, tower's
    /// per-clone limiter, which would win.)
    fn rate_limiter<K, C, M, O>(
        self,
        layer: RateLimitLayer<K, C, M, O>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<K, C, M, O>, L>>;

    /// Adds a [`QueueLayer`]; give it an [`AdaptiveHandle`](crate::adaptive::AdaptiveHandle) as its limit to
    /// queue in front of an adaptive limit.
    #[allow(clippy::type_complexity)]
    fn queue<S, C, M, O, P, D>(
        self,
        layer: QueueLayer<S, C, M, O, P, D>,
    ) -> ServiceBuilder<Stack<QueueLayer<S, C, M, O, P, D>, L>>;

    /// Adds an [`AdaptiveConcurrencyLayer`].
    #[allow(clippy::type_complexity)]
    fn adaptive_concurrency<C, M, O, B, D>(
        self,
        layer: AdaptiveConcurrencyLayer<C, M, O, B, D>,
    ) -> ServiceBuilder<Stack<AdaptiveConcurrencyLayer<C, M, O, B, D>, L>>;

    /// Adds a [`CircuitBreakerLayer`]: on outbound stacks, inside the deadline propagation.
    fn circuit_breaker<C, M, O>(
        self,
        layer: CircuitBreakerLayer<C, M, O>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer<C, M, O>, L>>;

    /// Adds a [`PressureLayer`], shedding while the runtime itself is stalled.
    fn runtime_pressure<C, M, O, B>(
        self,
        layer: PressureLayer<C, M, O, B>,
    ) -> ServiceBuilder<Stack<PressureLayer<C, M, O, B>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "http")]
    fn deadline<C, M, O>(
        self,
        layer: DeadlineLayer<C, M, O>,
    ) -> ServiceBuilder<Stack<DeadlineLayer<C, M, O>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "http")]
    fn propagate_deadline<C, M, O>(
        self,
        layer: PropagateDeadlineLayer<C, M, O>,
    ) -> ServiceBuilder<Stack<PropagateDeadlineLayer<C, M, O>, L>> {
        self.layer(layer)
    }

    fn rate_limiter<K, C, M, O>(
        self,
        layer: RateLimitLayer<K, C, M, O>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<K, C, M, O>, L>> {
        self.layer(layer)
    }

    #[allow(clippy::type_complexity)]
    fn queue<S, C, M, O, P, D>(
        self,
        layer: QueueLayer<S, C, M, O, P, D>,
    ) -> ServiceBuilder<Stack<QueueLayer<S, C, M, O, P, D>, L>> {
        self.layer(layer)
    }

    #[allow(clippy::type_complexity)]
    fn adaptive_concurrency<C, M, O, B, D>(
        self,
        layer: AdaptiveConcurrencyLayer<C, M, O, B, D>,
    ) -> ServiceBuilder<Stack<AdaptiveConcurrencyLayer<C, M, O, B, D>, L>> {
        self.layer(layer)
    }

    fn circuit_breaker<C, M, O>(
        self,
        layer: CircuitBreakerLayer<C, M, O>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer<C, M, O>, L>> {
        self.layer(layer)
    }

    fn runtime_pressure<C, M, O, B>(
        self,
        layer: PressureLayer<C, M, O, B>,
    ) -> ServiceBuilder<Stack<PressureLayer<C, M, O, B>, L>> {
        self.layer(layer)
    }
}
