use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use super::algorithm::{Algorithm, Knee};
use super::handle::AdaptiveHandle;
use super::service::{AdaptiveConcurrency, NoBypass};
use super::state::{Config, Core, Shared};
use crate::core::{AnyOk, ConfigError, ErrorMode, Observer, Owner};

/// Applies an adaptive concurrency limit to a service. All services made by one layer share one limit.
///
/// Build it with [`AdaptiveConcurrencyLayer::builder`].
pub struct AdaptiveConcurrencyLayer<C = AnyOk, M = ErrorMode, O = (), B = NoBypass> {
    shared: Owner<Shared<O>>,
    classify: C,
    mode: M,
    bypass: B,
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
        }
    }
}

impl<C, M, O, B> AdaptiveConcurrencyLayer<C, M, O, B>
where
    O: Observer,
{
    /// A handle on this layer's limiter, shared by every service it makes.
    pub fn handle(&self) -> AdaptiveHandle {
        AdaptiveHandle::new(self.shared.arc().clone())
    }
}

impl<S, C: Clone, M: Clone, O, B: Clone> Layer<S> for AdaptiveConcurrencyLayer<C, M, O, B> {
    type Service = AdaptiveConcurrency<S, C, M, O, B>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveConcurrency::new(
            inner,
            self.shared.instance(),
            self.classify.clone(),
            self.mode.clone(),
            self.bypass.clone(),
        )
    }
}

impl<C: Clone, M: Clone, O, B: Clone> Clone for AdaptiveConcurrencyLayer<C, M, O, B> {
    fn clone(&self) -> Self {
        AdaptiveConcurrencyLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            bypass: self.bypass.clone(),
        }
    }
}

impl<C, M, O, B> fmt::Debug for AdaptiveConcurrencyLayer<C, M, O, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrencyLayer")
            .field("core", &self.shared.core)
            .finish()
    }
}

/// Builder for [`AdaptiveConcurrencyLayer`]; [`build`](Self::build) checks the configuration.
pub struct AdaptiveConcurrencyBuilder<C = AnyOk, M = ErrorMode, O = (), B = NoBypass> {
    /// The limiter's own settings, checked by `Core::new`.
    config: Config,
    classify: C,
    mode: M,
    observer: O,
    bypass: B,
}

impl<C, M, O, B> AdaptiveConcurrencyBuilder<C, M, O, B> {
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
    pub fn classifier<C2>(self, classify: C2) -> AdaptiveConcurrencyBuilder<C2, M, O, B> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify,
            mode: self.mode,
            observer: self.observer,
            bypass: self.bypass,
        }
    }

    /// How rejections leave the layer (default [`ErrorMode`]).
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> AdaptiveConcurrencyBuilder<C, M2, O, B> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode,
            observer: self.observer,
            bypass: self.bypass,
        }
    }

    /// Receives the layer's events (default `()`: none).
    #[must_use]
    pub fn observer<O2: Observer>(self, observer: O2) -> AdaptiveConcurrencyBuilder<C, M, O2, B> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode: self.mode,
            observer,
            bypass: self.bypass,
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
    pub fn bypass<B2>(self, bypass: B2) -> AdaptiveConcurrencyBuilder<C, M, O, B2> {
        AdaptiveConcurrencyBuilder {
            config: self.config,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            bypass,
        }
    }

    /// HTTP: outcomes from the status code, the permit held until the body ends, rejections as 503.
    #[cfg(feature = "http")]
    #[must_use]
    pub fn http(
        self,
    ) -> AdaptiveConcurrencyBuilder<crate::core::HttpStatus, crate::core::HttpMode, O, B> {
        self.classifier(crate::core::HttpStatus::new())
            .reject_mode(crate::core::HttpMode)
    }

    /// gRPC: outcomes from `grpc-status` (headers or trailers), the permit held until the body ends,
    /// rejections as trailers-only UNAVAILABLE.
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(
        self,
    ) -> AdaptiveConcurrencyBuilder<crate::core::GrpcClassifier, crate::core::GrpcMode, O, B> {
        self.classifier(crate::core::GrpcClassifier::new())
            .reject_mode(crate::core::GrpcMode)
    }

    /// Checks the configuration and builds the layer.
    ///
    /// Errors: a zero initial or minimum limit, `min_limit > max_limit`, an initial limit outside the bounds, zero
    /// `min_samples` or `window`, or algorithm parameters out of range.
    pub fn build(self) -> Result<AdaptiveConcurrencyLayer<C, M, O, B>, ConfigError>
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
        })
    }
}

impl<C, M, O, B> fmt::Debug for AdaptiveConcurrencyBuilder<C, M, O, B> {
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
