use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;
use tower_service::Service;

use super::state::{Admit, Shared};
use crate::core::{observer, Classify, Instance, Observer, Permit, RejectMode, ResponseFuture};

/// A circuit breaker in front of a service; made by [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// Admits or rejects in `call`. In readiness mode `poll_ready` also reports not-ready while the breaker is open.
pub struct CircuitBreaker<S, C = crate::core::AnyOk, M = crate::core::ErrorMode, O = ()> {
    inner: S,
    shared: Instance<Shared<O>>,
    classify: C,
    mode: M,
    readiness: bool,
    // Readiness mode only: the wake-up at the end of the open period, made the first time it is needed.
    wake: Option<Pin<Box<Sleep>>>,
    // Readiness mode only, while blocked: the wake-up at an operator's change (`force_closed`, `reset`, ...),
    // which may end the open state long before its period does.
    operator: Option<Pin<Box<OwnedNotified>>>,
}

impl<S, C, M, O> CircuitBreaker<S, C, M, O> {
    pub(crate) fn new(
        inner: S,
        shared: Instance<Shared<O>>,
        classify: C,
        mode: M,
        readiness: bool,
    ) -> Self {
        CircuitBreaker {
            inner,
            shared,
            classify,
            mode,
            readiness,
            wake: None,
            operator: None,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

// By hand: a clone gets its own wake-up timer; the timer belongs to the task polling this instance.
impl<S: Clone, C: Clone, M: Clone, O> Clone for CircuitBreaker<S, C, M, O> {
    fn clone(&self) -> Self {
        CircuitBreaker::new(
            self.inner.clone(),
            self.shared.clone(),
            self.classify.clone(),
            self.mode.clone(),
            self.readiness,
        )
    }
}

impl<S: fmt::Debug, C, M, O> fmt::Debug for CircuitBreaker<S, C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

impl<S, C, M, O, Req> Service<Req> for CircuitBreaker<S, C, M, O>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error>,
    M: RejectMode<C::Response, S::Error>,
    O: Observer,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.readiness && self.shared.blocked_until().is_some() {
            loop {
                // Registered before the state is read again, so that an operator's change after that read wakes
                // this task; the closed path never gets here, and takes no lock.
                let operator = self
                    .operator
                    .get_or_insert_with(|| Box::pin(self.shared.operator_change()));
                operator.as_mut().enable();
                let Some(until) = self.shared.blocked_until() else {
                    self.operator = None;
                    break;
                };
                if operator.as_mut().poll(cx).is_ready() {
                    // Changed by an operator: read the state again, with a fresh registration.
                    self.operator = None;
                    continue;
                }
                match &mut self.wake {
                    Some(sleep) => sleep.as_mut().reset(until),
                    None => self.wake = Some(Box::pin(tokio::time::sleep_until(until))),
                }
                let sleep = self.wake.as_mut().expect("timer set above");
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.mode.inner_error(e))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (shared, releaser) = self.shared.next();
        let permit = match shared.admit() {
            // Latency is needed by the slow-call rule and by an observer, by nothing else.
            Admit::Tag(tag) if shared.config.slow_call.is_none() && observer::is_noop::<O>() => {
                Some(Permit::untimed(releaser.clone(), tag))
            }
            Admit::Tag(tag) => {
                let permit = Permit::new(releaser.clone(), tag);
                shared.note_admitted(&permit);
                Some(permit)
            }
            Admit::Bypass => None,
            Admit::Reject(rejection) => {
                return ResponseFuture::rejected(rejection, self.mode.clone())
            }
        };
        // One construction for both admitted paths, with the inner call inside it, so the inner future is written
        // straight into the returned one (see `AdaptiveConcurrency::call`).
        ResponseFuture::admitted(
            self.inner.call(req),
            permit,
            self.classify.clone(),
            self.mode.clone(),
        )
    }
}
