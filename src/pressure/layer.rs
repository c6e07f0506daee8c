use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::core::stripe::Tally;
use crate::core::{AnyOk, ConfigError, ErrorMode, Observer, Owner};

use super::service::{State, LAYER};
use super::{Pressure, RuntimeMonitor};

/// Applies [`Pressure`]: sheds new requests while a [`RuntimeMonitor`] reports pressure. See the
/// [module docs](super).
///
/// Every service made by one layer shares its counters (and all read the same monitor).
pub struct PressureLayer<C = AnyOk, M = ErrorMode, O = (), B = ()> {
    state: Owner<State<O>>,
    classify: C,
    mode: M,
    bypass: B,
}

/// Builds a [`PressureLayer`]; see [`PressureLayer::builder`].
pub struct PressureLayerBuilder<C = AnyOk, M = ErrorMode, O = (), B = ()> {
    monitor: RuntimeMonitor,
    retry_after: Duration,
    classify: C,
    mode: M,
    observer: O,
    bypass: B,
}

/// A cheap, cloneable view of a [`PressureLayer`]'s figures.
#[derive(Clone)]
pub struct PressureHandle {
    state: Arc<dyn Figures>,
}

/// The figures of a [`PressureLayer`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PressureSnapshot {
    /// Whether the layer is shedding now.
    pub under_pressure: bool,
    /// Admitted requests not yet finished.
    pub in_flight: usize,
    /// Requests admitted so far.
    pub admitted: u64,
    /// Requests shed so far.
    pub rejected: u64,
    /// Requests let through under pressure by the bypass predicate.
    pub bypassed: u64,
}

trait Figures: Send + Sync + 'static {
    fn snapshot(&self) -> PressureSnapshot;
    fn monitor(&self) -> &RuntimeMonitor;
}

impl<O: Send + Sync + 'static> Figures for State<O> {
    fn snapshot(&self) -> PressureSnapshot {
        PressureSnapshot {
            under_pressure: self.monitor.is_under_pressure(),
            in_flight: self.requests.in_flight(),
            admitted: self.requests.admitted(),
            rejected: self.rejected.load(Relaxed),
            bypassed: self.bypassed.load(Relaxed),
        }
    }

    fn monitor(&self) -> &RuntimeMonitor {
        &self.monitor
    }
}

impl PressureLayer {
    /// A builder for a layer that sheds on `monitor`'s pressure, with a one-second `Retry-After`, errors as
    /// `BoxError` ([`ErrorMode`]), no observer and no bypass.
    ///
    /// The layer sheds only while the monitor runs ([`RuntimeMonitor::start`]) and has at least one threshold.
    pub fn builder(monitor: &RuntimeMonitor) -> PressureLayerBuilder {
        PressureLayerBuilder {
            monitor: monitor.clone(),
            retry_after: Duration::from_secs(1),
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
            bypass: (),
        }
    }
}

impl<C, M, O, B> PressureLayer<C, M, O, B> {
    /// A handle on this layer's figures.
    pub fn handle(&self) -> PressureHandle
    where
        O: Send + Sync + 'static,
    {
        PressureHandle {
            state: self.state.arc().clone(),
        }
    }
}

impl PressureHandle {
    /// The current figures.
    pub fn snapshot(&self) -> PressureSnapshot {
        self.state.snapshot()
    }

    /// The monitor the layer sheds on.
    pub fn monitor(&self) -> &RuntimeMonitor {
        self.state.monitor()
    }
}

impl<C, M, O, B> PressureLayerBuilder<C, M, O, B> {
    /// The `Retry-After` given with every shed request (default 1 s; zero leaves the hint out). A few times the
    /// monitor's [`min_recovery`](super::RuntimeMonitorBuilder::min_recovery) is a fair value.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor).retry_after(Duration::from_secs(2)).build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Requests for which `bypass` returns `true` pass even under pressure (health checks, admin endpoints).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor)
    ///     .bypass(|path: &&str| *path == "/health")
    ///     .build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn bypass<B2>(self, bypass: B2) -> PressureLayerBuilder<C, M, O, B2> {
        PressureLayerBuilder {
            monitor: self.monitor,
            retry_after: self.retry_after,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            bypass,
        }
    }

    /// How responses are classified for the observer's `Completed` events (default [`AnyOk`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::core::Outcome;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor)
    ///     .classifier(|r: Result<&u32, &std::io::Error>| if r.is_ok() { Outcome::Success } else { Outcome::Failure })
    ///     .build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn classifier<C2>(self, classify: C2) -> PressureLayerBuilder<C2, M, O, B> {
        PressureLayerBuilder {
            monitor: self.monitor,
            retry_after: self.retry_after,
            classify,
            mode: self.mode,
            observer: self.observer,
            bypass: self.bypass,
        }
    }

    /// How shed requests are answered (default [`ErrorMode`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::core::ErrorMode;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor).reject_mode(ErrorMode).build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> PressureLayerBuilder<C, M2, O, B> {
        PressureLayerBuilder {
            monitor: self.monitor,
            retry_after: self.retry_after,
            classify: self.classify,
            mode,
            observer: self.observer,
            bypass: self.bypass,
        }
    }

    /// Receives the layer's `Admitted`, `Rejected` and `Completed` events (layer `"pressure"`). The monitor has
    /// its own observer for lag samples.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::core::TracingObserver;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor).observer(TracingObserver).build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[must_use]
    pub fn observer<O2>(self, observer: O2) -> PressureLayerBuilder<C, M, O2, B> {
        PressureLayerBuilder {
            monitor: self.monitor,
            retry_after: self.retry_after,
            classify: self.classify,
            mode: self.mode,
            observer,
            bypass: self.bypass,
        }
    }

    /// HTTP services: responses classified by status ([`HttpStatus`](crate::core::HttpStatus)) and shed requests
    /// answered `503 Service Unavailable` with `Retry-After` ([`HttpMode`](crate::core::HttpMode)).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor)
    ///     .http()
    ///     .bypass(|req: &http::Request<String>| req.uri().path() == "/health")
    ///     .build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[cfg(feature = "http")]
    #[must_use]
    pub fn http(
        self,
    ) -> PressureLayerBuilder<crate::core::HttpStatus, crate::core::HttpMode, O, B> {
        self.classifier(crate::core::HttpStatus::new())
            .reject_mode(crate::core::HttpMode)
    }

    /// gRPC services: responses classified by `grpc-status` ([`GrpcClassifier`](crate::core::GrpcClassifier)) and
    /// shed requests answered trailers-only UNAVAILABLE ([`GrpcMode`](crate::core::GrpcMode)).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};
    /// # let monitor = RuntimeMonitor::builder().max_lag(Duration::from_millis(100), Duration::from_millis(20)).build()?;
    /// let layer = PressureLayer::builder(&monitor).grpc().build()?;
    /// # Ok::<_, tower_backpressure::core::ConfigError>(())
    /// ```
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(
        self,
    ) -> PressureLayerBuilder<crate::core::GrpcClassifier, crate::core::GrpcMode, O, B> {
        self.classifier(crate::core::GrpcClassifier::new())
            .reject_mode(crate::core::GrpcMode)
    }

    /// Checks the configuration and builds the layer. Fails if the monitor has no threshold, since the layer
    /// would then never shed.
    pub fn build(self) -> Result<PressureLayer<C, M, O, B>, ConfigError>
    where
        O: Observer,
    {
        if !self.monitor.has_thresholds() {
            return Err(ConfigError::new(
                LAYER,
                "monitor",
                "has no threshold (max_lag, max_alive_tasks or max_probe), so the layer would never shed",
            ));
        }
        let state = Owner::new(State {
            monitor: self.monitor,
            retry_after: (!self.retry_after.is_zero()).then_some(self.retry_after),
            observer: self.observer,
            requests: Tally::default(),
            rejected: AtomicU64::new(0),
            bypassed: AtomicU64::new(0),
        });
        Ok(PressureLayer {
            state,
            classify: self.classify,
            mode: self.mode,
            bypass: self.bypass,
        })
    }
}

impl<S, C: Clone, M: Clone, O, B: Clone> Layer<S> for PressureLayer<C, M, O, B> {
    type Service = Pressure<S, C, M, O, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Pressure::new(
            inner,
            self.state.instance(),
            self.classify.clone(),
            self.mode.clone(),
            self.bypass.clone(),
        )
    }
}

impl<C: Clone, M: Clone, O, B: Clone> Clone for PressureLayer<C, M, O, B> {
    fn clone(&self) -> Self {
        PressureLayer {
            state: self.state.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            bypass: self.bypass.clone(),
        }
    }
}

impl<C, M, O, B> fmt::Debug for PressureLayer<C, M, O, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PressureLayer")
            .field("monitor", &self.state.monitor)
            .field("retry_after", &self.state.retry_after)
            .finish_non_exhaustive()
    }
}

impl<C, M, O, B> fmt::Debug for PressureLayerBuilder<C, M, O, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PressureLayerBuilder")
            .field("monitor", &self.monitor)
            .field("retry_after", &self.retry_after)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PressureHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PressureHandle")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}
