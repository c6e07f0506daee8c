use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use crate::core::observer::{self, is_noop};
use crate::core::stripe::Tally;
use crate::core::{
    AnyOk, Classify, ErrorMode, Event, Instance, Observer, Outcome, Permit, Reason, RejectMode,
    Rejection, Release, ResponseFuture,
};

use super::RuntimeMonitor;

pub(crate) const LAYER: &str = "pressure";

/// Decides which requests pass a [`Pressure`] layer even while it sheds, such as health checks (a load balancer
/// that sees its health check refused takes the instance out, which is rarely what runtime pressure calls for).
///
/// `()` lets nothing through; any `Fn(&Req) -> bool` works. Only consulted while the runtime is under pressure.
pub trait Bypass<Req>: Clone + Send + Sync + 'static {
    /// Whether `request` passes regardless of pressure.
    fn bypass(&self, request: &Req) -> bool;
}

impl<Req> Bypass<Req> for () {
    #[inline(always)]
    fn bypass(&self, _request: &Req) -> bool {
        false
    }
}

impl<F, Req> Bypass<Req> for F
where
    F: Fn(&Req) -> bool + Clone + Send + Sync + 'static,
{
    #[inline]
    fn bypass(&self, request: &Req) -> bool {
        self(request)
    }
}

/// Sheds new requests while a [`RuntimeMonitor`] reports pressure; see the [module docs](super).
///
/// Built by [`PressureLayer`](super::PressureLayer). Clones share their counters.
pub struct Pressure<S, C = AnyOk, M = ErrorMode, O = (), B = ()> {
    inner: S,
    state: Instance<State<O>>,
    classify: C,
    mode: M,
    bypass: B,
}

pub(crate) struct State<O> {
    pub(crate) monitor: RuntimeMonitor,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) observer: O,
    // Statistics only (the decision is the monitor's flag): striped, so that two threads admitting requests do
    // not write one cache line.
    pub(crate) requests: Tally,
    pub(crate) rejected: AtomicU64,
    pub(crate) bypassed: AtomicU64,
}

impl<O: Observer> Release for State<O> {
    fn release(&self, outcome: Outcome, latency: Duration, _tag: u64) {
        self.requests.finish();
        observer::completed(&self.observer, LAYER, outcome, latency, || {
            self.requests.in_flight()
        });
    }
}

impl<S, C, M, O, B> Pressure<S, C, M, O, B> {
    pub(crate) fn new(
        inner: S,
        state: Instance<State<O>>,
        classify: C,
        mode: M,
        bypass: B,
    ) -> Self {
        Pressure {
            inner,
            state,
            classify,
            mode,
            bypass,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, C, M, O, B, Req> Service<Req> for Pressure<S, C, M, O, B>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error>,
    M: RejectMode<C::Response, S::Error>,
    O: Observer,
    B: Bypass<Req>,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.mode.inner_error(e))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let state = &self.state;
        if state.monitor.is_under_pressure() {
            if self.bypass.bypass(&request) {
                state.bypassed.fetch_add(1, Relaxed);
                return ResponseFuture::admitted(
                    self.inner.call(request),
                    None,
                    self.classify.clone(),
                    self.mode.clone(),
                );
            }
            state.rejected.fetch_add(1, Relaxed);
            state.observer.on_event(&Event::Rejected {
                layer: LAYER,
                reason: Reason::Overloaded,
                retry_after: state.retry_after,
            });
            let rejection = Rejection::new(Reason::Overloaded).with_retry_after(state.retry_after);
            return ResponseFuture::rejected(rejection, self.mode.clone());
        }
        let (state, releaser) = self.state.next();
        state.requests.admit();
        // In-flight and latency are only ever seen by the observer: `()` needs neither the sum nor a clock read.
        let permit = if is_noop::<O>() {
            Permit::untimed(releaser.clone(), 0)
        } else {
            let permit = Permit::new(releaser.clone(), 0);
            observer::admitted(&state.observer, LAYER, &permit, || {
                state.requests.in_flight()
            });
            permit
        };
        ResponseFuture::admitted(
            self.inner.call(request),
            Some(permit),
            self.classify.clone(),
            self.mode.clone(),
        )
    }
}

impl<S: Clone, C: Clone, M: Clone, O, B: Clone> Clone for Pressure<S, C, M, O, B> {
    fn clone(&self) -> Self {
        Pressure {
            inner: self.inner.clone(),
            state: self.state.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            bypass: self.bypass.clone(),
        }
    }
}

impl<S: fmt::Debug, C, M, O, B> fmt::Debug for Pressure<S, C, M, O, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pressure")
            .field("inner", &self.inner)
            .field("monitor", &self.state.monitor)
            .finish_non_exhaustive()
    }
}
