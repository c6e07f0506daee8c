use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use super::shared::{Config, Shared};
use super::{Queue, QueueHandle, Uniform};
use crate::core::{AnyOk, ConfigError, CurrentDeadline, ErrorMode, LimitSource, Observer, Owner};

const NAME: &str = "queue";

/// Puts a bounded, managed wait queue in front of a concurrency limit. See the [module docs](super).
///
/// Every service this layer builds shares the one limit and queue of the layer.
pub struct QueueLayer<L = usize, C = AnyOk, M = ErrorMode, O = (), P = Uniform, D = CurrentDeadline>
{
    shared: Owner<Shared<L, O>>,
    classify: C,
    mode: M,
    prioritize: P,
    deadline: D,
}

impl QueueLayer {
    /// A builder with the defaults: no limit yet (set one with [`QueueBuilder::limit`]), `max_depth` 128,
    /// CoDel on with target 5 ms and interval 100 ms, `max_wait` = the interval, adaptive LIFO on, no reserve.
    pub fn builder() -> QueueBuilder {
        QueueBuilder {
            limit: None,
            settings: Settings {
                max_depth: 128,
                max_wait: None,
                codel: true,
                target: Duration::from_millis(5),
                interval: Duration::from_millis(100),
                lifo: true,
                critical_reserve: 0.0,
            },
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
            prioritize: Uniform::default(),
            deadline: CurrentDeadline,
        }
    }
}

impl<L: LimitSource, C, M, O: Observer, P, D> QueueLayer<L, C, M, O, P, D> {
    /// A cheap, cloneable handle on the layer's shared state.
    pub fn handle(&self) -> QueueHandle {
        QueueHandle::new(self.shared.arc().clone())
    }
}

impl<S, L, C: Clone, M: Clone, O, P: Clone, D: Clone> Layer<S> for QueueLayer<L, C, M, O, P, D> {
    type Service = Queue<S, L, C, M, O, P, D>;

    fn layer(&self, inner: S) -> Self::Service {
        Queue::new(
            inner,
            self.shared.instance(),
            self.classify.clone(),
            self.mode.clone(),
            self.prioritize.clone(),
            self.deadline.clone(),
        )
    }
}

impl<L, C: Clone, M: Clone, O, P: Clone, D: Clone> Clone for QueueLayer<L, C, M, O, P, D> {
    fn clone(&self) -> Self {
        QueueLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            prioritize: self.prioritize.clone(),
            deadline: self.deadline.clone(),
        }
    }
}

impl<L, C, M, O, P, D> fmt::Debug for QueueLayer<L, C, M, O, P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueLayer").finish_non_exhaustive()
    }
}

/// Builds a [`QueueLayer`]; see [`QueueLayer::builder`] for the defaults.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::queue::QueueLayer;
///
/// let layer = QueueLayer::builder()
///     .limit(16)
///     .max_depth(64)
///     .max_wait(Duration::from_millis(200))
///     .build()
///     .unwrap();
/// # let _ = layer;
/// assert!(QueueLayer::builder().build().is_err()); // no limit
/// ```
#[must_use]
pub struct QueueBuilder<
    L = usize,
    C = AnyOk,
    M = ErrorMode,
    O = (),
    P = Uniform,
    D = CurrentDeadline,
> {
    limit: Option<L>,
    settings: Settings,
    classify: C,
    mode: M,
    observer: O,
    prioritize: P,
    deadline: D,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    max_depth: usize,
    max_wait: Option<Duration>,
    codel: bool,
    target: Duration,
    interval: Duration,
    lifo: bool,
    critical_reserve: f64,
}

impl<L, C, M, O, P, D> fmt::Debug for QueueBuilder<L, C, M, O, P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("limit_set", &self.limit.is_some())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<L, C, M, O, P, D> QueueBuilder<L, C, M, O, P, D> {
    /// The concurrency limit: a fixed number, or any [`LimitSource`] such as an adaptive limiter's handle, read
    /// live on every arrival and release and when a waiter's wait runs out (so a raised limit is used at the next of
    /// these). Required.
    pub fn limit<L2: LimitSource>(self, limit: L2) -> QueueBuilder<L2, C, M, O, P, D> {
        QueueBuilder {
            limit: Some(limit),
            settings: self.settings,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            prioritize: self.prioritize,
            deadline: self.deadline,
        }
    }

    /// How many requests may wait beyond the limit (default 128); a full queue rejects at once with reason
    /// queue-full. `0` means no queue: the layer then sheds like tower's `LoadShed` + `ConcurrencyLimit`.
    pub fn max_depth(mut self, max_depth: usize) -> Self {
        self.settings.max_depth = max_depth;
        self
    }

    /// The longest a request may wait while its level's queue is not standing (default: the CoDel interval); one that
    /// waited this long is rejected with reason queue-timeout.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.settings.max_wait = Some(max_wait);
        self
    }

    /// CoDel's target (default 5 ms): once a queue has not been empty for a whole interval (a standing queue), its
    /// queued requests may wait at most this long. With a limit source that knows the expected latency (an
    /// adaptive limiter's handle), the target in force is at least half that latency, and never above `max_wait`.
    pub fn codel_target(mut self, target: Duration) -> Self {
        self.settings.target = target;
        self
    }

    /// CoDel's interval (default 100 ms): how long a queue must stay non-empty (90 % of the time) to count as
    /// standing. Adaptive LIFO uses the same test.
    pub fn codel_interval(mut self, interval: Duration) -> Self {
        self.settings.interval = interval;
        self
    }

    /// Switches CoDel on or off (default on). Off, every queued request may wait `max_wait`; the standing test
    /// still drives adaptive LIFO.
    pub fn codel(mut self, on: bool) -> Self {
        self.settings.codel = on;
        self
    }

    /// Switches adaptive LIFO on or off (default on): while a level's queue stands, serve its newest request first.
    pub fn adaptive_lifo(mut self, on: bool) -> Self {
        self.settings.lifo = on;
        self
    }

    /// Reserves `share` (in `[0, 1)`, default 0) of the limit for the critical levels. It binds only at
    /// saturation: below the limit every level borrows freely; at the limit a critical request is still admitted
    /// while critical traffic holds less than `ceil(limit × share)` slots, so in-flight may exceed the limit by
    /// at most that many, all critical.
    pub fn critical_reserve(mut self, share: f64) -> Self {
        self.settings.critical_reserve = share;
        self
    }

    /// How results are classified into outcomes (default [`AnyOk`]).
    pub fn classifier<C2>(self, classify: C2) -> QueueBuilder<L, C2, M, O, P, D> {
        QueueBuilder {
            limit: self.limit,
            settings: self.settings,
            classify,
            mode: self.mode,
            observer: self.observer,
            prioritize: self.prioritize,
            deadline: self.deadline,
        }
    }

    /// How rejections leave the layer (default [`ErrorMode`]).
    pub fn reject_mode<M2>(self, mode: M2) -> QueueBuilder<L, C, M2, O, P, D> {
        QueueBuilder {
            limit: self.limit,
            settings: self.settings,
            classify: self.classify,
            mode,
            observer: self.observer,
            prioritize: self.prioritize,
            deadline: self.deadline,
        }
    }

    /// Who hears the layer's events (default `()`, nothing).
    pub fn observer<O2: Observer>(self, observer: O2) -> QueueBuilder<L, C, M, O2, P, D> {
        QueueBuilder {
            limit: self.limit,
            settings: self.settings,
            classify: self.classify,
            mode: self.mode,
            observer,
            prioritize: self.prioritize,
            deadline: self.deadline,
        }
    }

    /// How a request's priority is read (default [`Uniform`]: all critical). A closure `Fn(&Req) -> Priority`
    /// works. Where its deadline is found is [`QueueBuilder::deadline_source`]'s.
    pub fn prioritize<P2>(self, prioritize: P2) -> QueueBuilder<L, C, M, O, P2, D> {
        QueueBuilder {
            limit: self.limit,
            settings: self.settings,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            prioritize,
            deadline: self.deadline,
        }
    }

    /// Reads priorities from the HTTP header `header` (see [`HeaderPriority`](super::HeaderPriority)).
    #[cfg(feature = "http")]
    pub fn priority_header(
        self,
        header: http::HeaderName,
    ) -> QueueBuilder<L, C, M, O, super::HeaderPriority, D> {
        self.prioritize(super::HeaderPriority::new(header))
    }

    /// Where the queue finds a request's deadline, to refuse a request that cannot finish before it on arrival,
    /// while it waits and at dequeue. The default, [`CurrentDeadline`], reads
    /// [`Deadline::current`](crate::core::Deadline::current) and works for any request type;
    /// [`RequestDeadline`](crate::core::RequestDeadline) (which [`http`](Self::http) and [`grpc`](Self::grpc)
    /// pick) also reads one stored in an HTTP request's extensions; a closure `Fn(&Req) -> Option<Deadline>`
    /// reads it from wherever else it is (what it returns replaces the current deadline). The adaptive limiter
    /// takes the same sources. Call it after `http` or `grpc` to keep another source.
    ///
    /// ```
    /// use tower_backpressure::core::Deadline;
    /// use tower_backpressure::queue::{Priority, QueueLayer};
    ///
    /// // A request type that carries its own priority and deadline.
    /// struct Job {
    ///     priority: Priority,
    ///     deadline: Option<Deadline>,
    /// }
    ///
    /// let layer = QueueLayer::builder()
    ///     .limit(8)
    ///     .prioritize(|job: &Job| job.priority)
    ///     // The job's deadline, or the current one if that is earlier.
    ///     .deadline_source(|job: &Job| job.deadline.into_iter().chain(Deadline::current()).min())
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn deadline_source<D2>(self, deadline: D2) -> QueueBuilder<L, C, M, O, P, D2> {
        QueueBuilder {
            limit: self.limit,
            settings: self.settings,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            prioritize: self.prioritize,
            deadline,
        }
    }

    /// HTTP services: [`HttpStatus`](crate::core::HttpStatus) classification (permit held until the body ends),
    /// [`HttpMode`](crate::core::HttpMode) rejections (503/504 responses), priorities from the `x-priority`
    /// header ([`HeaderPriority::default`](super::HeaderPriority)) and deadlines from
    /// [`RequestDeadline`](crate::core::RequestDeadline): the current one, or one stored in the request's
    /// extensions. Call it before [`QueueBuilder::prioritize`] or [`QueueBuilder::deadline_source`] to read
    /// priorities or deadlines another way.
    #[cfg(feature = "http")]
    #[allow(clippy::type_complexity)]
    pub fn http(
        self,
    ) -> QueueBuilder<
        L,
        crate::core::HttpStatus,
        crate::core::HttpMode,
        O,
        super::HeaderPriority,
        crate::core::RequestDeadline,
    > {
        self.classifier(crate::core::HttpStatus::default())
            .reject_mode(crate::core::HttpMode)
            .prioritize(super::HeaderPriority::default())
            .deadline_source(crate::core::RequestDeadline)
    }

    /// gRPC services: [`GrpcClassifier`](crate::core::GrpcClassifier), [`GrpcMode`](crate::core::GrpcMode)
    /// trailers-only rejections, priorities and deadlines as for [`QueueBuilder::http`].
    #[cfg(feature = "grpc")]
    #[allow(clippy::type_complexity)]
    pub fn grpc(
        self,
    ) -> QueueBuilder<
        L,
        crate::core::GrpcClassifier,
        crate::core::GrpcMode,
        O,
        super::HeaderPriority,
        crate::core::RequestDeadline,
    > {
        self.classifier(crate::core::GrpcClassifier::default())
            .reject_mode(crate::core::GrpcMode)
            .prioritize(super::HeaderPriority::default())
            .deadline_source(crate::core::RequestDeadline)
    }
}

impl<L: LimitSource, C, M, O: Observer, P, D> QueueBuilder<L, C, M, O, P, D> {
    /// Validates and builds the layer.
    ///
    /// Errors: no limit set, or a limit of 0 (nothing could ever be admitted); a zero `max_wait`; a zero CoDel
    /// target or interval, or a target not below the interval; a reserve outside `[0, 1)`.
    pub fn build(self) -> Result<QueueLayer<L, C, M, O, P, D>, ConfigError> {
        let s = self.settings;
        let limit = match self.limit {
            Some(limit) => limit,
            None if s.max_depth == 0 => {
                return Err(ConfigError::new(
                    NAME,
                    "max_depth",
                    "is 0 and no limit is set: give a limit (a number or a LimitSource) with .limit(..)",
                ))
            }
            None => {
                return Err(ConfigError::new(
                    NAME,
                    "limit",
                    "not set: give a fixed number or a LimitSource with .limit(..)",
                ))
            }
        };
        if limit.limit() == 0 {
            return Err(ConfigError::new(
                NAME,
                "limit",
                "must be at least 1 (0 would admit nothing)",
            ));
        }
        if s.max_wait == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                NAME,
                "max_wait",
                "must be greater than zero (for no queue, set max_depth(0))",
            ));
        }
        if s.interval.is_zero() {
            return Err(ConfigError::new(
                NAME,
                "codel_interval",
                "must be greater than zero",
            ));
        }
        if s.target.is_zero() {
            return Err(ConfigError::new(
                NAME,
                "codel_target",
                "must be greater than zero",
            ));
        }
        if s.target >= s.interval {
            return Err(ConfigError::new(
                NAME,
                "codel_target",
                format!(
                    "must be below the interval ({:?} >= {:?})",
                    s.target, s.interval
                ),
            ));
        }
        if !(0.0..1.0).contains(&s.critical_reserve) {
            return Err(ConfigError::new(
                NAME,
                "critical_reserve",
                format!("must be in [0, 1), got {}", s.critical_reserve),
            ));
        }
        let config = Config {
            max_depth: s.max_depth,
            max_wait: s.max_wait.unwrap_or(s.interval),
            codel: s.codel,
            target: s.target,
            interval: s.interval,
            lifo: s.lifo,
            critical_reserve: s.critical_reserve,
        };
        Ok(QueueLayer {
            shared: Owner::new(Shared::new(limit, self.observer, config)),
            classify: self.classify,
            mode: self.mode,
            prioritize: self.prioritize,
            deadline: self.deadline,
        })
    }
}
