//! The response future shared by layers that decide in `call` (admit or reject at once).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::{Classify, Permit, RejectMode, Rejection};

pin_project! {
    /// Response future of a layer that admits or rejects in `call`.
    ///
    /// Admitted: polls the inner future, then hands its result and the permit to the classifier. Rejected:
    /// resolves at once with the reject mode's answer. Dropping it before completion drops the permit, which
    /// records [`Outcome::Ignored`](super::Outcome::Ignored).
    pub struct ResponseFuture<F, C, M> {
        #[pin]
        state: State<F, C>,
        mode: M,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Admitted {
            #[pin]
            inner: F,
            permit: Option<Permit>,
            classify: C,
        },
        Rejected {
            rejection: Option<Rejection>,
        },
    }
}

impl<F, C, M> ResponseFuture<F, C, M> {
    /// A future for an admitted request (`permit` is `None` for requests let through without one).
    pub fn admitted(inner: F, permit: Option<Permit>, classify: C, mode: M) -> Self {
        ResponseFuture {
            state: State::Admitted {
                inner,
                permit,
                classify,
            },
            mode,
        }
    }

    /// A future that resolves at once with the answer for `rejection`.
    pub fn rejected(rejection: Rejection, mode: M) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejection: Some(rejection),
            },
            mode,
        }
    }
}

impl<F, Res, E, C, M> Future for ResponseFuture<F, C, M>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<Res, E>,
    M: RejectMode<C::Response, E>,
{
    type Output = Result<C::Response, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Admitted {
                inner,
                permit,
                classify,
            } => {
                let result = ready!(inner.poll(cx));
                Poll::Ready(
                    classify
                        .finish(result, permit.take())
                        .map_err(|e| this.mode.inner_error(e)),
                )
            }
            StateProj::Rejected { rejection } => {
                let rejection = rejection
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(this.mode.reject(rejection))
            }
        }
    }
}

impl<F, C, M> fmt::Debug for ResponseFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Admitted { .. } => "admitted",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
