use std::fmt;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::{ResponseFuture, Waiter};
use super::shared::{NotNow, Shared};
use super::{Prioritize, QueueHandle, Uniform};
use crate::core::{
    AnyOk, Classify, CurrentDeadline, DeadlineSource, ErrorMode, Instance, LimitSource, Observer,
    RejectMode, Rejection,
};

/// The queue-depth shedder around a service `S`; built by [`QueueLayer`](super::QueueLayer).
///
/// Clones share one limit and one queue. `S` must be `Clone`: a queued request carries the service instance that
/// was polled ready for it until it gets its slot (as tower's `Buffer` does), and a fresh clone serves the next
/// call.
pub struct Queue<S, L = usize, C = AnyOk, M = ErrorMode, O = (), P = Uniform, D = CurrentDeadline> {
    inner: S,
    shared: Instance<Shared<L, O>>,
    classify: C,
    mode: M,
    prioritize: P,
    deadline: D,
}

impl<S, L, C, M, O, P, D> Queue<S, L, C, M, O, P, D> {
    pub(crate) fn new(
        inner: S,
        shared: Instance<Shared<L, O>>,
        classify: C,
        mode: M,
        prioritize: P,
        deadline: D,
    ) -> Self {
        Queue {
            inner,
            shared,
            classify,
            mode,
            prioritize,
            deadline,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A handle on the shared state (snapshot).
    pub fn handle(&self) -> QueueHandle
    where
        L: LimitSource,
        O: Observer,
    {
        QueueHandle::new(self.shared.arc().clone())
    }
}

impl<S: Clone, L, C: Clone, M: Clone, O, P: Clone, D: Clone> Clone for Queue<S, L, C, M, O, P, D> {
    fn clone(&self) -> Self {
        Queue {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            prioritize: self.prioritize.clone(),
            deadline: self.deadline.clone(),
        }
    }
}

impl<S: fmt::Debug, L, C, M, O, P, D> fmt::Debug for Queue<S, L, C, M, O, P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, Req, L, C, M, O, P, D> Service<Req> for Queue<S, L, C, M, O, P, D>
where
    S: Service<Req> + Clone,
    L: LimitSource,
    C: Classify<S::Response, S::Error>,
    M: RejectMode<C::Response, S::Error>,
    O: Observer,
    P: Prioritize<Req>,
    D: DeadlineSource<Req>,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S, Req, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.mode.inner_error(e))
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let priority = self.prioritize.priority(&request);
        let deadline = self.deadline.deadline(&request);
        let (shared, releaser) = self.shared.next();
        match shared.admit(releaser, priority, deadline) {
            Ok(permit) => ResponseFuture::called(crate::core::ResponseFuture::admitted(
                self.inner.call(request),
                Some(permit),
                self.classify.clone(),
                self.mode.clone(),
            )),
            Err(not_now) => self.not_now(not_now, request),
        }
    }
}

impl<S, L, C, M, O, P, D> Queue<S, L, C, M, O, P, D>
where
    S: Clone,
    L: LimitSource,
    C: Clone,
    M: Clone,
    O: Observer,
{
    /// The rare outcomes of `call`, kept out of its inlined fast path: rejected at once, or queued.
    #[cold]
    #[inline(never)]
    fn not_now<Req>(&mut self, admission: NotNow, request: Req) -> ResponseFuture<S, Req, C, M>
    where
        S: Service<Req>,
    {
        match admission {
            NotNow::Rejected(reason) => ResponseFuture::called(
                crate::core::ResponseFuture::rejected(Rejection::new(reason), self.mode.clone()),
            ),
            NotNow::Queued { index, wake_at } => {
                // The waiter owns the queue node from here on: if cloning the service below panics, dropping it
                // gives the place (or a slot just handed to it) back.
                let waiter = Waiter::new(
                    self.shared.arc().clone(),
                    self.shared.releaser().clone(),
                    index,
                );
                // The service we polled ready goes with the request; a fresh clone stays for the next one.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::queued(
                    waiter,
                    ready,
                    request,
                    self.classify.clone(),
                    self.mode.clone(),
                    wake_at,
                )
            }
        }
    }
}
