//! Response futures of the deadline layers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

use super::codec::InvalidTimeout;
use super::mode::RejectInvalid;
use crate::core::{Classify, Deadline, Outcome, Permit, Reason, RejectMode, Rejection};

pin_project! {
    /// Response future of [`DeadlineService`](super::DeadlineService).
    ///
    /// Under a deadline it races the inner future (run inside [`Deadline::scope`]) against a timer held inline, so
    /// no allocation happens; when the timer wins the inner future is dropped and the answer is
    /// deadline-exceeded, with outcome [`Outcome::Dropped`]. Without a deadline it only forwards the inner future.
    pub struct ResponseFuture<F, C, M> {
        #[pin]
        state: State<F, C>,
        mode: M,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Passthrough {
            #[pin]
            inner: F,
            classify: C,
        },
        Running {
            #[pin]
            inner: TaskLocalFuture<Deadline, F>,
            #[pin]
            sleep: Sleep,
            permit: Option<Permit>,
            classify: C,
        },
        Rejected {
            rejection: Option<Rejection>,
        },
        Invalid {
            error: Option<InvalidTimeout>,
        },
        Done,
    }
}

impl<F, C, M> ResponseFuture<F, C, M> {
    pub(super) fn passthrough(inner: F, classify: C, mode: M) -> Self {
        ResponseFuture {
            state: State::Passthrough { inner, classify },
            mode,
        }
    }

    pub(super) fn running(
        inner: TaskLocalFuture<Deadline, F>,
        sleep: Sleep,
        permit: Permit,
        classify: C,
        mode: M,
    ) -> Self {
        ResponseFuture {
            state: State::Running {
                inner,
                sleep,
                permit: Some(permit),
                classify,
            },
            mode,
        }
    }

    pub(super) fn rejected(mode: M) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejection: Some(Rejection::new(Reason::DeadlineExceeded)),
            },
            mode,
        }
    }

    pub(super) fn invalid(error: InvalidTimeout, mode: M) -> Self {
        ResponseFuture {
            state: State::Invalid { error: Some(error) },
            mode,
        }
    }
}

impl<F, Res, E, C, M> Future for ResponseFuture<F, C, M>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<Res, E>,
    M: RejectInvalid<C::Response, E>,
{
    type Output = Result<C::Response, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let output = match this.state.as_mut().project() {
            StateProj::Passthrough { inner, classify } => {
                let result = ready!(inner.poll(cx));
                classify
                    .finish(result, None)
                    .map_err(|e| this.mode.inner_error(e))
            }
            StateProj::Running {
                inner,
                sleep,
                permit,
                classify,
            } => ready!(race(inner, sleep, permit, classify, this.mode, cx)),
            StateProj::Rejected { rejection } => this.mode.reject(
                rejection
                    .take()
                    .expect("ResponseFuture polled after completion"),
            ),
            StateProj::Invalid { error } => this.mode.reject_invalid(
                error
                    .take()
                    .expect("ResponseFuture polled after completion"),
            ),
            StateProj::Done => panic!("ResponseFuture polled after completion"),
        };
        // Drop the inner future and the timer now rather than whenever the caller drops us.
        this.state.set(State::Done);
        Poll::Ready(output)
    }
}

/// Polls the inner future first, so work that finishes at the deadline instant is still delivered.
fn race<F, Res, E, C, M>(
    inner: Pin<&mut F>,
    sleep: Pin<&mut Sleep>,
    permit: &mut Option<Permit>,
    classify: &C,
    mode: &M,
    cx: &mut Context<'_>,
) -> Poll<Result<C::Response, M::Error>>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<Res, E>,
    M: RejectMode<C::Response, E>,
{
    if let Poll::Ready(result) = inner.poll(cx) {
        return Poll::Ready(
            classify
                .finish(result, permit.take())
                .map_err(|e| mode.inner_error(e)),
        );
    }
    ready!(sleep.poll(cx));
    Poll::Ready(expired(permit, mode))
}

/// The answer when the deadline has passed: the permit records an overload signal.
fn expired<Res, E, M: RejectMode<Res, E>>(
    permit: &mut Option<Permit>,
    mode: &M,
) -> Result<Res, M::Error> {
    if let Some(permit) = permit.take() {
        permit.complete(Outcome::Dropped);
    }
    mode.reject(Rejection::new(Reason::DeadlineExceeded))
}

impl<F, C, M> fmt::Debug for ResponseFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Passthrough { .. } => "passthrough",
            State::Running { .. } => "running",
            State::Rejected { .. } => "rejected",
            State::Invalid { .. } => "invalid",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

pin_project! {
    /// Response future of [`PropagateDeadline`](super::PropagateDeadline): like [`ResponseFuture`], without the
    /// malformed-header state (the client writes headers, it does not read them).
    pub struct PropagateFuture<F, C, M> {
        #[pin]
        state: PropagateState<F, C>,
        mode: M,
    }
}

pin_project! {
    #[project = PropagateStateProj]
    enum PropagateState<F, C> {
        Passthrough {
            #[pin]
            inner: F,
            classify: C,
        },
        Running {
            #[pin]
            inner: TaskLocalFuture<Deadline, F>,
            #[pin]
            sleep: Sleep,
            permit: Option<Permit>,
            classify: C,
            // When the budget written into the request runs out: the deadline minus the margin.
            sent: Instant,
        },
        Rejected,
        Done,
    }
}

impl<F, C, M> PropagateFuture<F, C, M> {
    pub(super) fn passthrough(inner: F, classify: C, mode: M) -> Self {
        PropagateFuture {
            state: PropagateState::Passthrough { inner, classify },
            mode,
        }
    }

    pub(super) fn running(
        inner: TaskLocalFuture<Deadline, F>,
        sleep: Sleep,
        permit: Permit,
        classify: C,
        mode: M,
        sent: Instant,
    ) -> Self {
        PropagateFuture {
            state: PropagateState::Running {
                inner,
                sleep,
                permit: Some(permit),
                classify,
                sent,
            },
            mode,
        }
    }

    pub(super) fn rejected(mode: M) -> Self {
        PropagateFuture {
            state: PropagateState::Rejected,
            mode,
        }
    }
}

impl<F, Res, E, C, M> Future for PropagateFuture<F, C, M>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<Res, E>,
    M: RejectMode<C::Response, E>,
{
    type Output = Result<C::Response, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let output = match this.state.as_mut().project() {
            PropagateStateProj::Passthrough { inner, classify } => {
                let result = ready!(inner.poll(cx));
                classify
                    .finish(result, None)
                    .map_err(|e| this.mode.inner_error(e))
            }
            PropagateStateProj::Running {
                mut inner,
                sleep,
                permit,
                classify,
                sent,
            } => match inner.as_mut().poll(cx) {
                // A transport that enforces the timeout it was sent (a tonic `Channel` does) fails the call
                // with its own error, which callers then see as CANCELLED or UNKNOWN. An error once the sent
                // budget is spent is that expiry: answer deadline-exceeded, as the local timer would have.
                Poll::Ready(Err(_)) if Instant::now() >= *sent => expired(permit, this.mode),
                Poll::Ready(result) => classify
                    .finish(result, permit.take())
                    .map_err(|e| this.mode.inner_error(e)),
                Poll::Pending => {
                    ready!(sleep.poll(cx));
                    expired(permit, this.mode)
                }
            },
            PropagateStateProj::Rejected => {
                this.mode.reject(Rejection::new(Reason::DeadlineExceeded))
            }
            PropagateStateProj::Done => panic!("PropagateFuture polled after completion"),
        };
        this.state.set(PropagateState::Done);
        Poll::Ready(output)
    }
}

impl<F, C, M> fmt::Debug for PropagateFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            PropagateState::Passthrough { .. } => "passthrough",
            PropagateState::Running { .. } => "running",
            PropagateState::Rejected => "rejected",
            PropagateState::Done => "done",
        };
        f.debug_struct("PropagateFuture")
            .field("state", &state)
            .finish()
    }
}
