//! Protection strategies: named stacks the simulator puts between clients and backend.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::{Scenario, SimBody, SimResponseBody, SimService};
use crate::adaptive::{AdaptiveConcurrencyLayer, Aimd, Algorithm, Gradient2, Knee, Vegas};
use crate::core::BoxError;

/// A function reading a live figure of a stack (its current limit, its queue depth).
pub type Probe = Arc<dyn Fn() -> usize + Send + Sync>;

/// Live figures a stack exposes to the simulator; they feed `mean_limit`, `max_queue_depth` and the time
/// series. A figure without a probe is reported as `null`.
#[derive(Clone, Default)]
pub struct Probes {
    /// The current concurrency limit.
    pub limit: Option<Probe>,
    /// The current depth of the stack's wait queue.
    pub queue_depth: Option<Probe>,
}

impl Probes {
    /// No probes.
    pub fn none() -> Self {
        Probes::default()
    }

    /// Reads the limit from `probe`.
    #[must_use]
    pub fn limit(mut self, probe: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.limit = Some(Arc::new(probe));
        self
    }

    /// Reads the queue depth from `probe`.
    #[must_use]
    pub fn queue_depth(mut self, probe: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.queue_depth = Some(Arc::new(probe));
        self
    }
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes")
            .field("limit", &self.limit.is_some())
            .field("queue_depth", &self.queue_depth.is_some())
            .finish()
    }
}

/// A stack under test: the service clients call (wrapping the backend) and its probes.
#[derive(Debug)]
pub struct Stack {
    /// What clients call.
    pub service: SimService,
    /// Live figures of the stack.
    pub probes: Probes,
    /// Whether the simulated clients call the stack in-process, as a handler calls an outbound stack: see
    /// [`Stack::client_side`].
    pub client_side: bool,
}

impl Stack {
    /// A stack without probes, served to the simulated clients as a server's stack.
    pub fn new(service: SimService) -> Self {
        Stack {
            service,
            probes: Probes::none(),
            client_side: false,
        }
    }

    /// Sets the probes.
    #[must_use]
    pub fn probes(mut self, probes: Probes) -> Self {
        self.probes = probes;
        self
    }

    /// Makes this a client-side stack (one for calling a dependency, with the backend as that dependency): the
    /// simulated clients call it in-process, as a handler would. With `send_deadline` a client's deadline is
    /// then [`Deadline::current`](crate::core::Deadline::current) around each attempt's call (a
    /// [`Deadline::scope`](crate::core::Deadline::scope), as a server's deadline layer sets around its handler),
    /// and no `grpc-timeout` header is written for it: writing the next hop's header is the stack's job (a
    /// `PropagateDeadlineLayer`).
    #[must_use]
    pub fn client_side(mut self) -> Self {
        self.client_side = true;
        self
    }
}

/// Builds a stack around the backend for a scenario. It runs inside the simulation's runtime, so layers may read
/// the (paused) clock and spawn tasks.
pub type BuildStack = fn(backend: SimService, scenario: &Scenario) -> Stack;

/// A named protection strategy.
///
/// A strategy is a name and a plain function building the stack from the backend and the scenario (the number
/// of workers, say). The crate's own strategies are listed in [`STRATEGIES`]; adding one there takes a function
/// and one line. Your own run the same way:
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_backpressure::sim::{self, Probes, Scenario, SimService, Stack, Strategy};
///
/// fn limit_per_worker(backend: SimService, scenario: &Scenario) -> Stack {
///     let limit = scenario.backend.workers;
///     let service = ServiceBuilder::new().load_shed().concurrency_limit(limit).service(backend);
///     Stack::new(sim::boxed(service)).probes(Probes::none().limit(move || limit))
/// }
///
/// let mine = Strategy { name: "limit-per-worker", about: "one request per worker", build: limit_per_worker };
/// let mut scenario = Scenario::builtin().remove(0);
/// for phase in &mut scenario.phases {
///     phase.duration_s = 1.0; // a quick look
/// }
/// let report = sim::run(&scenario, &mine)?;
/// assert_eq!(report.strategy, "limit-per-worker");
/// assert_eq!(report.row("2x", "all").unwrap().mean_limit, Some(2.0));
/// # Ok::<(), sim::ScenarioError>(())
/// ```
#[derive(Clone, Copy)]
pub struct Strategy {
    /// Name used on the command line and in reports.
    pub name: &'static str,
    /// One line on what sits between clients and backend.
    pub about: &'static str,
    /// Builds the stack.
    pub build: BuildStack,
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Strategy")
            .field("name", &self.name)
            .finish()
    }
}

/// Every strategy, in the order reports show them.
pub const STRATEGIES: &[Strategy] = &[
    Strategy {
        name: "unprotected",
        about: "nothing: every request reaches the backend's queue",
        build: unprotected,
    },
    Strategy {
        name: "static",
        about: "tower's LoadShed + ConcurrencyLimit, limit = 2 x workers",
        build: static_limit,
    },
    Strategy {
        name: "default",
        about: "recommended server stack: deadline -> queue shedder (CoDel, LIFO, priorities) -> adaptive limit",
        build: default_stack,
    },
    Strategy {
        name: "breaker",
        about: "recommended client stack: deadline propagation -> circuit breaker -> adaptive limit",
        build: breaker,
    },
    Strategy {
        name: "queue",
        about:
            "queue shedder (CoDel, adaptive LIFO, priorities), HTTP mode, fixed limit = 2 x workers",
        build: queue,
    },
    Strategy {
        name: "aimd",
        about: "adaptive concurrency limit alone, AIMD, default parameters",
        build: aimd,
    },
    Strategy {
        name: "vegas",
        about: "adaptive concurrency limit alone, Vegas, default parameters",
        build: vegas,
    },
    Strategy {
        name: "gradient2",
        about: "adaptive concurrency limit alone, Gradient2, default parameters",
        build: gradient2,
    },
    Strategy {
        name: "adaptive",
        about: "adaptive concurrency limit alone, its default algorithm (Knee)",
        build: adaptive,
    },
    Strategy {
        name: "deadline",
        about: "DeadlineLayer alone (HTTP mode): reads grpc-timeout, refuses expired requests, cancels at expiry",
        build: deadline,
    },
];

/// The strategy called `name`.
pub fn strategy(name: &str) -> Option<&'static Strategy> {
    STRATEGIES.iter().find(|s| s.name == name)
}

fn unprotected(backend: SimService, _scenario: &Scenario) -> Stack {
    Stack::new(backend)
}

fn static_limit(backend: SimService, scenario: &Scenario) -> Stack {
    let limit = 2 * scenario.backend.workers;
    let service = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(limit)
        .service(backend);
    Stack::new(BoxCloneService::new(service)).probes(Probes::none().limit(move || limit))
}

/// The recommended client stack for calling a dependency: deadline propagation, then the circuit breaker, then
/// the adaptive limiter, all in HTTP mode with their defaults. A client-side stack: with `send_deadline` the
/// clients' deadlines are current around their calls, for the propagation layer to pass on and enforce and the
/// limiter to judge.
fn breaker(backend: SimService, _scenario: &Scenario) -> Stack {
    let propagate = crate::deadline::PropagateDeadlineLayer::builder()
        .http()
        .build()
        .expect("the default propagation configuration is valid");
    let breaker = crate::breaker::CircuitBreakerLayer::builder()
        .http()
        .build()
        .expect("the breaker's defaults are valid");
    let limiter = AdaptiveConcurrencyLayer::builder()
        .http()
        .build()
        .expect("the limiter's defaults are valid");
    let limit = limiter.handle();
    let service = ServiceBuilder::new()
        .layer(propagate)
        .layer(breaker)
        .layer(limiter)
        .service(backend);
    Stack::new(boxed(service))
        .probes(Probes::none().limit(move || limit.limit()))
        .client_side()
}

/// The recommended server stack: the deadline layer outermost (so queueing time counts), then the queue shedder
/// (CoDel, adaptive LIFO, priorities from the simulator's `x-priority` header) in front of the adaptive limiter's
/// live limit, then the limiter itself; all in HTTP mode with their defaults.
fn default_stack(backend: SimService, _scenario: &Scenario) -> Stack {
    let deadline = crate::deadline::DeadlineLayer::builder()
        .http()
        .build()
        .expect("the default deadline configuration is valid");
    let limiter = AdaptiveConcurrencyLayer::builder()
        .http()
        .build()
        .expect("the limiter's defaults are valid");
    let limit = limiter.handle();
    let queue = crate::queue::QueueLayer::builder()
        .limit(limit.clone())
        .http()
        .build()
        .expect("the queue's defaults are valid");
    let depth = queue.handle();
    let service = ServiceBuilder::new()
        .layer(deadline)
        .layer(queue)
        .layer(limiter)
        .service(backend);
    Stack::new(boxed(service)).probes(
        Probes::none()
            .limit(move || limit.limit())
            .queue_depth(move || depth.snapshot().depth),
    )
}

fn queue(backend: SimService, scenario: &Scenario) -> Stack {
    let limit = 2 * scenario.backend.workers;
    let layer = crate::queue::QueueLayer::builder()
        .limit(limit)
        .http()
        .build()
        .expect("the queue strategy's configuration is valid");
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(backend);
    Stack::new(boxed(service)).probes(
        Probes::none()
            .limit(move || limit)
            .queue_depth(move || handle.snapshot().depth),
    )
}

/// The adaptive limiter alone in HTTP mode, its bounds and windows at their defaults.
fn limiter_alone(backend: SimService, algorithm: impl Algorithm) -> Stack {
    let layer = AdaptiveConcurrencyLayer::builder()
        .algorithm(algorithm)
        .http()
        .build()
        .expect("default parameters are valid");
    let handle = layer.handle();
    Stack::new(boxed(layer.layer(backend))).probes(Probes::none().limit(move || handle.limit()))
}

fn aimd(backend: SimService, _scenario: &Scenario) -> Stack {
    limiter_alone(backend, Aimd::new())
}

fn vegas(backend: SimService, _scenario: &Scenario) -> Stack {
    limiter_alone(backend, Vegas::new())
}

fn gradient2(backend: SimService, _scenario: &Scenario) -> Stack {
    limiter_alone(backend, Gradient2::new())
}

fn adaptive(backend: SimService, _scenario: &Scenario) -> Stack {
    limiter_alone(backend, Knee::new())
}

fn deadline(backend: SimService, _scenario: &Scenario) -> Stack {
    let layer = crate::deadline::DeadlineLayer::builder()
        .http()
        .build()
        .expect("the default deadline configuration is valid");
    Stack::new(boxed(ServiceBuilder::new().layer(layer).service(backend)))
}

/// Boxes any HTTP stack over the simulator's request type into a [`SimService`], boxing its response body.
pub fn boxed<S, B>(service: S) -> SimService
where
    S: Service<Request<SimBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneService::new(
        service
            .map_response(|response: Response<B>| response.map(box_body))
            .map_err(Into::into),
    )
}

fn box_body<B>(body: B) -> SimResponseBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
