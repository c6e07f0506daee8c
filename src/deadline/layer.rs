//! The layers and their builders.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;

use super::codec::TIMEOUT_MS_HEADER;
use super::service::{DeadlineService, PropagateDeadline};
use super::shared::{DeadlineHandle, Shared};
use crate::core::{AnyOk, ConfigError, ErrorMode, Observer, Owner};

/// The default safety margin [`PropagateDeadlineLayer`] takes off a budget before passing it on.
pub const DEFAULT_MARGIN: Duration = Duration::from_millis(5);

/// The server layer's settings; in the builder the header name is not checked yet (`H` = the name as given).
#[derive(Debug, Clone)]
pub(super) struct ServerConfig<H = HeaderName> {
    pub(super) max_timeout: Option<Duration>,
    pub(super) min_budget: Duration,
    pub(super) read_grpc_timeout: bool,
    pub(super) timeout_header: Option<H>,
    pub(super) strict: bool,
    pub(super) extension: bool,
}

/// The client layer's settings, likewise.
#[derive(Debug, Clone)]
pub(super) struct ClientConfig<H = HeaderName> {
    pub(super) margin: Duration,
    pub(super) write_grpc_timeout: bool,
    pub(super) timeout_header: Option<H>,
    pub(super) extension: bool,
}

type Unchecked = Cow<'static, str>;

fn header_name(
    layer: &'static str,
    name: Option<Cow<'static, str>>,
) -> Result<Option<HeaderName>, ConfigError> {
    let Some(name) = name else { return Ok(None) };
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        ConfigError::new(
            layer,
            "timeout_header",
            format!("not a valid header name: {name:?}"),
        )
    })?;
    if parsed == super::codec::GRPC_TIMEOUT_HEADER {
        return Err(ConfigError::new(
            layer,
            "timeout_header",
            "must differ from grpc-timeout, which has its own setting",
        ));
    }
    Ok(Some(parsed))
}

/// Server side: reads a request's budget from `grpc-timeout` and/or the millisecond header, enforces the earliest
/// of that, the layer's maximum and any deadline already set, and hands it to the inner service.
///
/// See the [module docs](super) for the semantics. Built with [`DeadlineLayer::builder`].
pub struct DeadlineLayer<C = AnyOk, M = ErrorMode, O = ()> {
    shared: Owner<Shared<ServerConfig, O>>,
    classify: C,
    mode: M,
}

impl DeadlineLayer {
    /// A builder with the defaults: read both `grpc-timeout` and `x-request-timeout-ms`, no maximum, no minimum
    /// budget, lenient about malformed headers, [`AnyOk`] and [`ErrorMode`].
    pub fn builder() -> DeadlineLayerBuilder {
        DeadlineLayerBuilder {
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
            config: ServerConfig {
                max_timeout: None,
                min_budget: Duration::ZERO,
                read_grpc_timeout: true,
                timeout_header: Some(Cow::Borrowed(TIMEOUT_MS_HEADER)),
                strict: false,
                extension: false,
            },
        }
    }
}

impl<C, M, O: Observer> DeadlineLayer<C, M, O> {
    /// A handle on the figures shared by every service this layer makes.
    pub fn handle(&self) -> DeadlineHandle {
        DeadlineHandle::new(self.shared.arc().clone())
    }
}

impl<C: Clone, M: Clone, O> Clone for DeadlineLayer<C, M, O> {
    fn clone(&self) -> Self {
        DeadlineLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<C, M, O> fmt::Debug for DeadlineLayer<C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineLayer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, C: Clone, M: Clone, O> Layer<S> for DeadlineLayer<C, M, O> {
    type Service = DeadlineService<S, C, M, O>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService::new(
            inner,
            self.shared.instance(),
            self.classify.clone(),
            self.mode.clone(),
        )
    }
}

/// Builder of [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineLayerBuilder<C = AnyOk, M = ErrorMode, O = ()> {
    config: ServerConfig<Unchecked>,
    classify: C,
    mode: M,
    observer: O,
}

impl<C, M, O> DeadlineLayerBuilder<C, M, O> {
    /// The longest any request may run, whatever its header says; also the deadline of requests that bring none.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::deadline::DeadlineLayer;
    ///
    /// let layer = DeadlineLayer::builder().max_timeout(Duration::from_secs(10)).build().unwrap();
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn max_timeout(mut self, max: Duration) -> Self {
        self.config.max_timeout = Some(max);
        self
    }

    /// Requests with less than this left on arrival are refused at once (default zero: only expired ones): work
    /// that cannot finish in time is better not started.
    #[must_use]
    pub fn min_budget(mut self, min: Duration) -> Self {
        self.config.min_budget = min;
        self
    }

    /// Whether to read `grpc-timeout` (default `true`).
    #[must_use]
    pub fn grpc_timeout(mut self, read: bool) -> Self {
        self.config.read_grpc_timeout = read;
        self
    }

    /// The name of the millisecond timeout header to read (default `x-request-timeout-ms`); checked by `build`.
    #[must_use]
    pub fn timeout_header(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.config.timeout_header = Some(name.into());
        self
    }

    /// Read no millisecond timeout header.
    #[must_use]
    pub fn no_timeout_header(mut self) -> Self {
        self.config.timeout_header = None;
        self
    }

    /// Strict mode: refuse requests with a malformed timeout header (400 / INVALID_ARGUMENT /
    /// [`InvalidTimeout`](super::codec::InvalidTimeout)) instead of ignoring the header (the default, with a
    /// `tracing` event at DEBUG).
    #[must_use]
    pub fn strict(mut self, strict: bool) -> Self {
        self.config.strict = strict;
        self
    }

    /// Whether to also store the effective deadline in the request's extensions, where
    /// `req.extensions().get::<Deadline>()` and [`Deadline::of`](crate::core::Deadline::of) find it (default
    /// `false`).
    ///
    /// It is not needed to find the deadline on the task that runs the request: around the inner service's `call`
    /// and around its future the deadline is [`Deadline::current`](crate::core::Deadline::current), and
    /// [`Deadline::find`](crate::core::Deadline::find) looks there as well as in the extensions. Turn it on when
    /// something below this layer takes the request to another task before calling on it, where the task-local
    /// scope does not follow (a service behind tower's `Buffer`, a hand-off to a worker task), and the code there
    /// reads the request: `Deadline::of`, `Deadline::find`, the queue and the adaptive limiter with
    /// [`RequestDeadline`](crate::core::RequestDeadline) as their deadline source (what their `.http()` and
    /// `.grpc()` pick; the default, `CurrentDeadline`, reads only the current deadline), or a handler's
    /// `req.extensions().get::<Deadline>()` (axum: `Extension<Deadline>`). A `Buffer` *above* this layer needs
    /// nothing: its worker only makes the `call`, and the caller's task polls the future. It is off by default
    /// because the first extension of a request costs three allocations (http's map, its table, the entry): about
    /// 50 ns, as much as the rest of the layer (docs/PERFORMANCE.md), on every request, for a copy that code on
    /// the same task need not read.
    ///
    /// ```
    /// use tower_backpressure::deadline::DeadlineLayer;
    ///
    /// // The inner service is behind a `Buffer`: its worker task finds the deadline in the request.
    /// let layer = DeadlineLayer::builder().request_extension(true).build().unwrap();
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn request_extension(mut self, store: bool) -> Self {
        self.config.extension = store;
        self
    }

    /// How inner results become outcomes.
    #[must_use]
    pub fn classifier<C2>(self, classify: C2) -> DeadlineLayerBuilder<C2, M, O> {
        DeadlineLayerBuilder {
            classify,
            mode: self.mode,
            observer: self.observer,
            config: self.config,
        }
    }

    /// How refusals leave the layer.
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> DeadlineLayerBuilder<C, M2, O> {
        DeadlineLayerBuilder {
            classify: self.classify,
            mode,
            observer: self.observer,
            config: self.config,
        }
    }

    /// Who is told about admissions, refusals and completions (`layer: "deadline"`).
    #[must_use]
    pub fn observer<O2: Observer>(self, observer: O2) -> DeadlineLayerBuilder<C, M, O2> {
        DeadlineLayerBuilder {
            classify: self.classify,
            mode: self.mode,
            observer,
            config: self.config,
        }
    }

    /// HTTP: classify by status, answer 504 (expired) and 400 (strict, malformed header).
    #[must_use]
    pub fn http(self) -> DeadlineLayerBuilder<crate::core::HttpStatus, crate::core::HttpMode, O> {
        self.classifier(crate::core::HttpStatus::new())
            .reject_mode(crate::core::HttpMode)
    }

    /// gRPC: classify by `grpc-status`, answer trailers-only DEADLINE_EXCEEDED (4) and INVALID_ARGUMENT (3).
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(
        self,
    ) -> DeadlineLayerBuilder<crate::core::GrpcClassifier, crate::core::GrpcMode, O> {
        self.classifier(crate::core::GrpcClassifier::new())
            .reject_mode(crate::core::GrpcMode)
    }

    /// Checks the configuration: the maximum must be positive and larger than the minimum budget, and the header
    /// name valid.
    pub fn build(self) -> Result<DeadlineLayer<C, M, O>, ConfigError>
    where
        O: Observer,
    {
        const LAYER: &str = "deadline";
        let c = self.config;
        if let Some(max) = c.max_timeout {
            if max.is_zero() {
                return Err(ConfigError::new(
                    LAYER,
                    "max_timeout",
                    "must be greater than zero",
                ));
            }
            if c.min_budget >= max {
                return Err(ConfigError::new(
                    LAYER,
                    "min_budget",
                    format!(
                        "must be less than max_timeout ({:?} >= {:?})",
                        c.min_budget, max
                    ),
                ));
            }
        }
        let config = ServerConfig {
            max_timeout: c.max_timeout,
            min_budget: c.min_budget,
            read_grpc_timeout: c.read_grpc_timeout,
            timeout_header: header_name(LAYER, c.timeout_header)?,
            strict: c.strict,
            extension: c.extension,
        };
        Ok(DeadlineLayer {
            shared: Owner::new(Shared::new(LAYER, config, self.observer)),
            classify: self.classify,
            mode: self.mode,
        })
    }
}

/// Client side: passes the current deadline on to the next hop as `grpc-timeout` and/or the millisecond header,
/// minus a safety margin, and enforces it locally.
///
/// See the [module docs](super) for the semantics. Built with [`PropagateDeadlineLayer::builder`].
pub struct PropagateDeadlineLayer<C = AnyOk, M = ErrorMode, O = ()> {
    shared: Owner<Shared<ClientConfig, O>>,
    classify: C,
    mode: M,
}

impl PropagateDeadlineLayer {
    /// A builder with the defaults: a [`DEFAULT_MARGIN`] of 5 ms, write both `grpc-timeout` and
    /// `x-request-timeout-ms`, [`AnyOk`] and [`ErrorMode`].
    pub fn builder() -> PropagateDeadlineLayerBuilder {
        PropagateDeadlineLayerBuilder {
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
            config: ClientConfig {
                margin: DEFAULT_MARGIN,
                write_grpc_timeout: true,
                timeout_header: Some(Cow::Borrowed(TIMEOUT_MS_HEADER)),
                extension: false,
            },
        }
    }
}

impl<C, M, O: Observer> PropagateDeadlineLayer<C, M, O> {
    /// A handle on the figures shared by every service this layer makes.
    pub fn handle(&self) -> DeadlineHandle {
        DeadlineHandle::new(self.shared.arc().clone())
    }
}

impl<C: Clone, M: Clone, O> Clone for PropagateDeadlineLayer<C, M, O> {
    fn clone(&self) -> Self {
        PropagateDeadlineLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<C, M, O> fmt::Debug for PropagateDeadlineLayer<C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateDeadlineLayer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, C: Clone, M: Clone, O> Layer<S> for PropagateDeadlineLayer<C, M, O> {
    type Service = PropagateDeadline<S, C, M, O>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateDeadline::new(
            inner,
            self.shared.instance(),
            self.classify.clone(),
            self.mode.clone(),
        )
    }
}

/// Builder of [`PropagateDeadlineLayer`].
#[derive(Debug, Clone)]
pub struct PropagateDeadlineLayerBuilder<C = AnyOk, M = ErrorMode, O = ()> {
    config: ClientConfig<Unchecked>,
    classify: C,
    mode: M,
    observer: O,
}

impl<C, M, O> PropagateDeadlineLayerBuilder<C, M, O> {
    /// Time taken off the budget before it is passed on (default 5 ms), for the network and for the next hop's
    /// answer to travel back: the next hop gives up that much before we do, so we get its answer rather than
    /// cutting it off. The local deadline itself is not shortened.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::deadline::PropagateDeadlineLayer;
    ///
    /// let layer = PropagateDeadlineLayer::builder().margin(Duration::from_millis(20)).build().unwrap();
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn margin(mut self, margin: Duration) -> Self {
        self.config.margin = margin;
        self
    }

    /// Whether to write `grpc-timeout` (default `true`).
    #[must_use]
    pub fn grpc_timeout(mut self, write: bool) -> Self {
        self.config.write_grpc_timeout = write;
        self
    }

    /// Whether to also store the deadline in the outgoing request's extensions (default `false`), for code below
    /// this layer that takes the request to another task before calling on it (a service behind tower's
    /// `Buffer`, a hand-off to a worker task).
    ///
    /// The layers and code on the calling task do not need it: around the inner service's `call` and its future
    /// the deadline is [`Deadline::current`](crate::core::Deadline::current), and
    /// [`Deadline::find`](crate::core::Deadline::find) reads both places. The first extension of a request costs
    /// three allocations (http's map, its table, the entry), about 50 ns (docs/PERFORMANCE.md).
    #[must_use]
    pub fn request_extension(mut self, store: bool) -> Self {
        self.config.extension = store;
        self
    }

    /// The name of the millisecond timeout header to write (default `x-request-timeout-ms`); checked by `build`.
    #[must_use]
    pub fn timeout_header(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.config.timeout_header = Some(name.into());
        self
    }

    /// Write no millisecond timeout header. With [`grpc_timeout(false)`](Self::grpc_timeout) as well, the layer
    /// passes no budget on and only enforces the deadline locally (for a backend that reads no timeout header):
    /// an error from the inner service or the response body before the deadline is then passed on as it is, since
    /// nothing below was given a budget to enforce.
    #[must_use]
    pub fn no_timeout_header(mut self) -> Self {
        self.config.timeout_header = None;
        self
    }

    /// How inner results become outcomes.
    #[must_use]
    pub fn classifier<C2>(self, classify: C2) -> PropagateDeadlineLayerBuilder<C2, M, O> {
        PropagateDeadlineLayerBuilder {
            classify,
            mode: self.mode,
            observer: self.observer,
            config: self.config,
        }
    }

    /// How refusals leave the layer.
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> PropagateDeadlineLayerBuilder<C, M2, O> {
        PropagateDeadlineLayerBuilder {
            classify: self.classify,
            mode,
            observer: self.observer,
            config: self.config,
        }
    }

    /// Who is told about admissions, refusals and completions (`layer: "propagate_deadline"`).
    #[must_use]
    pub fn observer<O2: Observer>(self, observer: O2) -> PropagateDeadlineLayerBuilder<C, M, O2> {
        PropagateDeadlineLayerBuilder {
            classify: self.classify,
            mode: self.mode,
            observer,
            config: self.config,
        }
    }

    /// HTTP: classify by status, answer 504 when the budget is spent.
    #[must_use]
    pub fn http(
        self,
    ) -> PropagateDeadlineLayerBuilder<crate::core::HttpStatus, crate::core::HttpMode, O> {
        self.classifier(crate::core::HttpStatus::new())
            .reject_mode(crate::core::HttpMode)
    }

    /// gRPC: classify by `grpc-status`, answer trailers-only DEADLINE_EXCEEDED when the budget is spent.
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(
        self,
    ) -> PropagateDeadlineLayerBuilder<crate::core::GrpcClassifier, crate::core::GrpcMode, O> {
        self.classifier(crate::core::GrpcClassifier::new())
            .reject_mode(crate::core::GrpcMode)
    }

    /// Checks the configuration (the header name). Any margin is valid; one at least as large as a request's
    /// remaining budget fails that request at once with deadline-exceeded.
    pub fn build(self) -> Result<PropagateDeadlineLayer<C, M, O>, ConfigError>
    where
        O: Observer,
    {
        const LAYER: &str = "propagate_deadline";
        let c = self.config;
        let config = ClientConfig {
            margin: c.margin,
            write_grpc_timeout: c.write_grpc_timeout,
            timeout_header: header_name(LAYER, c.timeout_header)?,
            extension: c.extension,
        };
        Ok(PropagateDeadlineLayer {
            shared: Owner::new(Shared::new(LAYER, config, self.observer)),
            classify: self.classify,
            mode: self.mode,
        })
    }
}
