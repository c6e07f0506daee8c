use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use super::algorithm::{Algorithm, Knee};
use super::handle::AdaptiveHandle;
use super::service::{AdaptiveConcurrency, NoBypass};
use super::state::{Config, Core, Shared};
use crate::core::{AnyOk, ConfigError, CurrentDeadline, ErrorMode, Observer, Owner};

/// Applies an adaptive concurrency limit to a service. All services made by one layer share one limit.
///
/// Build it with [`AdaptiveConcurrencyLayer::builder`].
pub struct AdaptiveConcurrencyLayer<
    C = AnyOk,
    M = ErrorMode,
    O = (),
    B = NoBypass,
    D = CurrentDeadline,
> {
    shared: Owner<Shared<O>>,
    classify: C,
    mode: M,
    bypass: B,
    deadline: D,
}

impl AdaptiveConcurrencyLayer {
    /// A builder with the defaults: initial limit 20, bounds `[1, 1000]`, the [`Knee`] algorithm, windows of at
    /// least 20 samples and 100 ms, generic classification ([`AnyOk`]) and rejections as errors
    /// ([`ErrorMode`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::adaptive::{AdaptiveConcurrencyLayer, Vegas};
    ///
    /// let layer = AdaptiveConcurrencyLayer::builder()
    ///     .initial_limit(16)
    ///     .min_limit(4)
    ///     .max_limit(256)
    ///     .algorithm(Vegas::new())
    ///     .window(Duration::from_millis(250))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.handle().limit(), 16);
    ///
    /// let err = AdaptiveConcurrencyLayer::builder().min_limit(10).max_limit(5).build().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid adaptive concurrency config: min_limit: must not exceed max_limit (10 > 5)"
    /// );
    /// ```
    pub fn builder() -> AdaptiveConcurrencyBuilder {
        AdaptiveConcurrencyBuilder {
            config: Config {
                initial: 20,
                min: 1,
                max: 1000,
                min_samples: 20,
                window: Duration::from_millis(100),
                algorithm: Box::new(Knee::new()),
            },
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
            bypass: NoBypass,
            deadline: CurrentDeadline,
        }
    }
}

impl<C, M, O, B, D> AdaptiveConcurrencyLayer<C, M, O, B, D>
where
    O: Observer,
{
    /// A handle on this layer's limiter, shared by every service it makes.
    pub fn handle(&self) -> AdaptiveHandle {
        AdaptiveHandle::new(self.shared.arc().clone())
    }
}

impl<S, C: Clone, M: Clone, O, B: Clone, D: Clone> Layer<S>
    for AdaptiveConcurrencyLayer<C, M, O, B, D>
{
    type Service = AdaptiveConcurrency<S, C, M, O, B, D>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveConcurrency::new(
            inner,
            self.shared.instance(),
            self.classify.clone(),
            self.mode.clone(),
            self.bypass.clone(),
            self.deadline.clone(),
        )
    }
}

impl<C: Clone, M: Clone, O, B: Clone, D: Clone> Clone for AdaptiveConcurrencyLayer<C, M, O, B, D> {
    fn clone(&self) -> Self {
        AdaptiveConcurrencyLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            bypass: self.bypass.clone(),
            deadline: self.deadline.clone(),
        }
    }
}

impl<C, M, O, B, D> fmt::Debug for AdaptiveConcurrencyLayer<C, M, O, B, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrencyLayer")
            .field("core", &self.shared.core)
            .finish()
    }
}

/// Builder for [`AdaptiveConcurrencyLayer`]; [`build`](Self::build) checks the configuration.
pub struct AdaptiveConcurrencyBuilder<
    C = AnyOk,
    M = ErrorMode,
    O = (),
    B = NoBypass,
    D = CurrentDeadline,
> {
    /// The limiter's own settings, checked by `Core::new`.
    config: Config,
    classify: C,
    mode: M,
    observer: O,
    bypass: B,
    deadline: D,
}

impl<C, M, O, B, D> AdaptiveConcurrencyBuilder<C, M, O, B, D> {
    /// The limit before the first window closes (default 20).
    #[must_use]
    pub fn initial_limit(mut self, limit: usize) -> Self {
        self.config.initial = limit;
        self
    }

    /// The lowest the limit may go, at least 1 (default 1).
    #[must_use]
    pub fn min_limit(mut self, limit: usize) -> Self {
        self.config.min = limit;
        self
    }

    /// The highest the limit may go (default 1000).
    #[must_use]
    pub fn max_limit(mut self, limit: usize) -> Self {
        self.config.max = limit;
        self
    }

    /// The algorithm that moves the limit (default [`Knee`]).
    #[must_use]
    pub fn algorithm(mut self, algorithm: impl Algorithm) -> Self {
        self.config.algorithm = Box::new(algorithm);
        self
    }

    /// A window closes once it holds at least this many finished requests (default 20)...
    #[must_use]
    pub fn min_samples(mut self, samples: u64) -> Self {
        self.config.min_samples = samples;
        self
    }

    /// ...and has lasted at least this long (default 100 ms).
    #[must_use]
    pub fn window(mut self, window: Duration) -> Self {
        self.config.window = window;
        self
    }

    /// How responses and errors are classified into outcomes (default [`AnyOk`]).
    #[must_use]
    pub fn classifier<C2>(self, classify: C2) -> AdaptiveConcurrencyBuilder<C2, M, O, B, D> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify,
            mode: self.mode,
            observer: self.observer,
            bypass: self.bypass,
            deadline: self.deadline,
        }
    }

    /// How rejections leave the layer (default [`ErrorMode`]).
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> AdaptiveConcurrencyBuilder<C, M2, O, B, D> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode,
            observer: self.observer,
            bypass: self.bypass,
            deadline: self.deadline,
        }
    }

    /// Receives the layer's events (default `()`: none).
    #[must_use]
    pub fn observer<O2: Observer>(
        self,
        observer: O2,
    ) -> AdaptiveConcurrencyBuilder<C, M, O2, B, D> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode: self.mode,
            observer,
            bypass: self.bypass,
            deadline: self.deadline,
        }
    }

    /// Requests for which `bypass` returns `true` skip the limiter: no permit, never rejected, not sampled.
    /// For health checks.
    ///
    /// ```
    /// use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
    ///
    /// let layer = AdaptiveConcurrencyLayer::builder()
    ///     .bypass(|path: &&str| *path == "/healthz")
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn bypass<B2>(self, bypass: B2) -> AdaptiveConcurrencyBuilder<C, M, O, B2, D> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            bypass,
            deadline: self.deadline,
        }
    }

    /// Where the limiter finds a request's deadline, to refuse a request that cannot finish before it (see
    /// "Deadlines" in the [module docs](super)). The default, [`CurrentDeadline`], reads
    /// [`Deadline::current`](crate::core::Deadline::current) and works for any request type;
    /// [`RequestDeadline`](crate::core::RequestDeadline) (which [`http`](Self::http) and [`grpc`](Self::grpc)
    /// pick) also reads one stored in an HTTP request's extensions; a closure `Fn(&Req) -> Option<Deadline>`
    /// reads it instead from wherever else it is (what it returns replaces the current deadline). Call it after
    /// `http` or `grpc` to keep another source.
    ///
    /// ```
    /// use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
    /// use tower_backpressure::core::Deadline;
    ///
    /// // A request type that carries its own deadline.
    /// struct Job {
    ///     deadline: Option<Deadline>,
    /// }
    ///
    /// let layer = AdaptiveConcurrencyLayer::builder()
    ///     // The job's deadline, or the current one if that is earlier.
    ///     .deadline_source(|job: &Job| job.deadline.into_iter().chain(Deadline::current()).min())
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn deadline_source<D2>(self, deadline: D2) -> AdaptiveConcurrencyBuilder<C, M, O, B, D2> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            bypass: self.bypass,
            deadline,
        }
    }

    /// HTTP: outcomes from the status code, the permit held until the body ends, rejections as 503 (504 for a
    /// request that cannot finish in time), deadlines also from the request's extensions
    /// ([`RequestDeadline`](crate::core::RequestDeadline), which reads `http::Request`s only: for another request
    /// type, call `.deadline_source(CurrentDeadline)` after this).
    #[cfg(feature = "http")]
    #[must_use]
    pub fn http(
        self,
    ) -> AdaptiveConcurrencyBuilder<
        crate::core::HttpStatus,
        crate::core::HttpMode,
        O,
        B,
        crate::core::RequestDeadline,
    > {
        self.classifier(crate::core::HttpStatus::new())
            .reject_mode(crate::core::HttpMode)
            .deadline_source(crate::core::RequestDeadline)
    }

    /// gRPC: outcomes from `grpc-status` (headers or trailers), the permit held until the body ends,
    /// rejections as trailers-only UNAVAILABLE (DEADLINE_EXCEEDED for a request that cannot finish in time),
    /// deadlines also from the request's extensions ([`RequestDeadline`](crate::core::RequestDeadline)).
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(
        self,
    ) -> AdaptiveConcurrencyBuilder<
        crate::core::GrpcClassifier,
        crate::core::GrpcMode,
        O,
        B,
        crate::core::RequestDeadline,
    > {
        self.classifier(crate::core::GrpcClassifier::new())
            .reject_mode(crate::core::GrpcMode)
            .deadline_source(crate::core::RequestDeadline)
    }

    /// Checks the configuration and builds the layer.
    ///
    /// Errors: a zero initial or minimum limit, `min_limit > max_limit`, an initial limit outside the bounds, zero
    /// `min_samples` or `window`, or algorithm parameters out of range.
    pub fn build(self) -> Result<AdaptiveConcurrencyLayer<C, M, O, B, D>, ConfigError>
    where
        O: Observer,
    {
        let mut core = Core::new(self.config)?;
        if !crate::core::observer::is_noop::<O>() {
            core.time_every_request();
        }
        Ok(AdaptiveConcurrencyLayer {
            shared: Owner::new(Shared {
                core,
                observer: self.observer,
            }),
            classify: self.classify,
            mode: self.mode,
            bypass: self.bypass,
            deadline: self.deadline,
        })
    }
}

impl<C, M, O, B, D> fmt::Debug for AdaptiveConcurrencyBuilder<C, M, O, B, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrencyBuilder")
            .field("initial_limit", &self.config.initial)
            .field("min_limit", &self.config.min)
            .field("max_limit", &self.config.max)
            .field("min_samples", &self.config.min_samples)
            .field("window", &self.config.window)
            .field("algorithm", &self.config.algorithm)
            .finish()
    }
}
