use std::fmt;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower_service::Service;

use super::state::{Shared, UNTIMED};
use crate::core::{
    observer, AnyOk, Classify, CurrentDeadline, Deadline, DeadlineSource, ErrorMode, Event,
    Instance, Observer, Permit, Reason, RejectMode, Rejection, ResponseFuture,
};

/// Decides which requests skip the limiter (health checks, metrics scrapes). Implemented by [`NoBypass`] and
/// by closures `Fn(&Req) -> bool`.
pub trait Bypass<Req>: Clone + Send + Sync + 'static {
    /// `true` lets `request` through without a permit.
    fn bypass(&self, request: &Req) -> bool;
}

/// Every request is limited.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBypass;

impl<Req> Bypass<Req> for NoBypass {
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

/// A service under an adaptive concurrency limit; built by
/// [`AdaptiveConcurrencyLayer`](super::AdaptiveConcurrencyLayer).
///
/// Clones share one limit and one in-flight count.
pub struct AdaptiveConcurrency<
    S,
    C = AnyOk,
    M = ErrorMode,
    O = (),
    B = NoBypass,
    D = CurrentDeadline,
> {
    inner: S,
    shared: Instance<Shared<O>>,
    classify: C,
    mode: M,
    bypass: B,
    deadline: D,
}

impl<S, C, M, O, B, D> AdaptiveConcurrency<S, C, M, O, B, D> {
    pub(crate) fn new(
        inner: S,
        shared: Instance<Shared<O>>,
        classify: C,
        mode: M,
        bypass: B,
        deadline: D,
    ) -> Self {
        AdaptiveConcurrency {
            inner,
            shared,
            classify,
            mode,
            bypass,
            deadline,
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

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone, M: Clone, O, B: Clone, D: Clone> Clone
    for AdaptiveConcurrency<S, C, M, O, B, D>
{
    fn clone(&self) -> Self {
        AdaptiveConcurrency {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            bypass: self.bypass.clone(),
            deadline: self.deadline.clone(),
        }
    }
}

impl<S, C, M: Clone, O: Observer, B, D> AdaptiveConcurrency<S, C, M, O, B, D> {
    /// Takes a permit, or `None` when the limit is reached.
    #[inline]
    fn admit(&mut self) -> Option<Permit> {
        let (shared, releaser) = self.shared.next();
        let core = &shared.core;
        let (in_flight, stripe) = core.try_acquire()?;
        // The tag is the admission instant (nanoseconds since the core's epoch), from which the release works out
        // the latency; an untimed request reads no clock at all.
        let tag = if observer::is_noop::<O>() && !core.timed_on(stripe) {
            UNTIMED
        } else {
            core.tag(Instant::now())
        };
        let permit = Permit::untimed(releaser.clone(), tag);
        observer::admitted(&shared.observer, "adaptive", &permit, || in_flight);
        Some(permit)
    }

    /// Whether a request under `deadline` would still be running when it passes, by the service time the
    /// limiter expects: the remaining budget is no more than that (zero until a window has closed, so then only
    /// an expired deadline). The clock is that of a deadline layer whose inner `call` this is, if any.
    #[inline]
    fn doomed(&self, deadline: Deadline) -> bool {
        let core = &self.shared.core;
        let expected = Duration::from_nanos(core.expected_latency.load(Ordering::Relaxed));
        !deadline.can_finish(crate::core::deadline::now_in_call(), expected)
    }

    /// The answer to a refused request. Out of line: it keeps the admitted path's code small, and the future it
    /// returns is written in place by the caller's return.
    #[cold]
    #[inline(never)]
    fn rejected<F, Cl>(&self, reason: Reason) -> ResponseFuture<F, Cl, M> {
        // A refusal at the limit was counted when the limit was found reached.
        if reason == Reason::DeadlineExceeded {
            let core = &self.shared.core;
            core.rejected_deadline.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.observer.on_event(&Event::Rejected {
            layer: "adaptive",
            reason,
            retry_after: None,
        });
        ResponseFuture::rejected(Rejection::new(reason), self.mode.clone())
    }
}

impl<S, C, M, O, B, D, Req> Service<Req> for AdaptiveConcurrency<S, C, M, O, B, D>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error>,
    M: RejectMode<C::Response, S::Error>,
    O: Observer,
    B: Bypass<Req>,
    D: DeadlineSource<Req>,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness only: the decision is taken in `call`, so an idle connection never holds a permit.
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.mode.inner_error(e))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let permit = if self.bypass.bypass(&request) {
            None
        } else {
            // A request that cannot finish before its deadline takes no permit: it would only hold one, and the
            // backend's time, for an answer nobody waits for. Without a deadline this is one thread-local read
            // (and, for an HTTP request, a look at its extensions).
            if self
                .deadline
                .deadline(&request)
                .is_some_and(|deadline| self.doomed(deadline))
            {
                return self.rejected(Reason::DeadlineExceeded);
            }
            match self.admit() {
                Some(permit) => Some(permit),
                None => return self.rejected(Reason::Overloaded),
            }
        };
        // One construction for both admitted paths, with the inner call inside it: the inner future is then
        // written straight into the returned one instead of being assembled on the stack and copied out.
        // The permit exists before the inner call, so a panic inside `call` still releases it.
        ResponseFuture::admitted(
            self.inner.call(request),
            permit,
            self.classify.clone(),
            self.mode.clone(),
        )
    }
}

impl<S: fmt::Debug, C, M, O, B, D> fmt::Debug for AdaptiveConcurrency<S, C, M, O, B, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrency")
            .field("inner", &self.inner)
            .field("limit", &self.shared.core.limit)
            .field("in_flight", &self.shared.core.in_flight())
            .finish()
    }
}
