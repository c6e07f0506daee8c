//! The queue's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::shared::{WaitSlot, Waiting};
use crate::core::{Classify, Permit, RejectMode, Rejection, Releaser};

/// A queued request's place. Dropping it before the answer was collected gives the place (or a slot already
/// handed to it) back, so a cancelled waiter can neither leak capacity nor swallow a wake-up.
pub(crate) struct Waiter {
    queue: Arc<dyn WaitSlot>,
    owner: Releaser,
    index: usize,
    done: bool,
}

impl Waiter {
    pub(crate) fn new(queue: Arc<dyn WaitSlot>, owner: Releaser, index: usize) -> Self {
        Waiter {
            queue,
            owner,
            index,
            done: false,
        }
    }

    /// Polls for the answer, `sleep` being the request's wait (or deadline) timer.
    fn poll(
        &mut self,
        mut sleep: Pin<&mut Sleep>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Permit, Rejection>> {
        let answer = loop {
            let timed_out = sleep.as_mut().poll(cx).is_ready();
            match self.queue.poll_waiter(self.index, timed_out, cx) {
                Waiting::Answer(answer) => break answer,
                Waiting::Queued => return Poll::Pending,
                // Polled again once reset, so that it wakes this task; the instant is later than now, so it is
                // pending unless the clock has moved past it meanwhile, and then the queue judges again.
                Waiting::Until(at) => sleep.as_mut().reset(at),
            }
        };
        self.done = true;
        Poll::Ready(match answer {
            Ok(granted) => {
                let permit = Permit::admitted_at(self.owner.clone(), granted.tag, granted.at);
                self.queue.admitted(&permit);
                Ok(permit)
            }
            Err(reason) => Err(Rejection::new(reason)),
        })
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.done {
            self.queue.cancel_waiter(self.index);
        }
    }
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("index", &self.index)
            .finish()
    }
}

pin_project! {
    /// Response future of [`Queue`](super::Queue): waits for a slot when the request was queued, then runs the
    /// inner service and classifies its result like [`core::ResponseFuture`](crate::core::ResponseFuture).
    ///
    /// A queued request's state (the request, the service polled ready for it, its timer) is kept in a box: only
    /// a request that has to wait pays for it, and the future every admitted request moves around stays small.
    pub struct ResponseFuture<S, Req, C, M>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, C, M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, C, M>
    where
        S: Service<Req>,
    {
        Queued {
            queued: Pin<Box<Queued<S, Req, C, M>>>,
        },
        Called {
            #[pin]
            inner: crate::core::ResponseFuture<S::Future, C, M>,
        },
    }
}

pin_project! {
    /// What a queued request holds while it waits.
    struct Queued<S, Req, C, M> {
        waiter: Waiter,
        call: Option<(S, Req, C, M)>,
        #[pin]
        sleep: Sleep,
    }
}

impl<S: Service<Req>, Req, C, M> ResponseFuture<S, Req, C, M> {
    pub(crate) fn called(inner: crate::core::ResponseFuture<S::Future, C, M>) -> Self {
        ResponseFuture {
            state: State::Called { inner },
        }
    }

    pub(crate) fn queued(
        waiter: Waiter,
        service: S,
        request: Req,
        classify: C,
        mode: M,
        wake_at: Instant,
    ) -> Self {
        ResponseFuture {
            state: State::Queued {
                queued: Box::pin(Queued {
                    waiter,
                    call: Some((service, request, classify, mode)),
                    sleep: tokio::time::sleep_until(wake_at),
                }),
            },
        }
    }
}

impl<S, Req, Res, C, M> Future for ResponseFuture<S, Req, C, M>
where
    S: Service<Req, Response = Res>,
    C: Classify<Res, S::Error>,
    M: RejectMode<C::Response, S::Error>,
{
    type Output = Result<C::Response, M::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            let next = match state.as_mut().project() {
                StateProj::Called { inner } => return inner.poll(cx),
                StateProj::Queued { queued } => {
                    let queued = queued.as_mut().project();
                    let answer = std::task::ready!(queued.waiter.poll(queued.sleep, cx));
                    let (mut service, request, classify, mode) = queued
                        .call
                        .take()
                        .expect("queue ResponseFuture polled after completion");
                    match answer {
                        Ok(permit) => crate::core::ResponseFuture::admitted(
                            service.call(request),
                            Some(permit),
                            classify,
                            mode,
                        ),
                        Err(rejection) => crate::core::ResponseFuture::rejected(rejection, mode),
                    }
                }
            };
            state.set(State::Called { inner: next });
        }
    }
}

impl<S: Service<Req>, Req, C, M> fmt::Debug for ResponseFuture<S, Req, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Queued { .. } => "queued",
            State::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
