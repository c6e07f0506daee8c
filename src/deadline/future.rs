//! Response futures of the deadline layers: one state machine, shared by the server and the client future.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::codec::InvalidTimeout;
use super::mode::{BoundResponse, RejectInvalid};
use crate::core::{
    Classify, Deadline, DeadlineScope, Outcome, Permit, Reason, RejectMode, Rejection,
};

pin_project! {
    /// Response future of [`DeadlineService`](super::DeadlineService).
    ///
    /// Under a deadline it races the inner future (run inside [`Deadline::scope`](crate::core::Deadline::scope))
    /// against a timer held inline, so no allocation happens; when the timer wins the inner future is dropped and
    /// the answer is deadline-exceeded, with outcome [`Outcome::Dropped`]. The timer is armed only once the inner
    /// future has returned `Pending`: an answer ready at the first poll costs no timer at all. Arming it takes the
    /// Tokio runtime of the thread polling (as `tokio::time::sleep` does), so poll it inside a Tokio runtime with
    /// time enabled, as tower's `Timeout` and every tokio timer require. Without a deadline it only forwards the
    /// inner future.
    pub struct ResponseFuture<F, C, M> {
        #[pin]
        state: State<F, C, NotSent, InvalidTimeout>,
        mode: M,
    }

    impl<F, C, M> PinnedDrop for ResponseFuture<F, C, M> {
        fn drop(this: Pin<&mut Self>) {
            this.project().state.release_unfinished();
        }
    }
}

pin_project! {
    /// Response future of [`PropagateDeadline`](super::PropagateDeadline): like [`ResponseFuture`], without the
    /// malformed-header answer (the client writes headers, it does not read them), and answering for a transport
    /// that enforces the timeout it was sent: an error once that budget is spent is deadline-exceeded.
    pub struct PropagateFuture<F, C, M> {
        #[pin]
        state: State<F, C, Sent, Infallible>,
        mode: M,
    }

    impl<F, C, M> PinnedDrop for PropagateFuture<F, C, M> {
        fn drop(this: Pin<&mut Self>) {
            this.project().state.release_unfinished();
        }
    }
}

pin_project! {
    // `I`: why a request is refused before it starts, besides its deadline (the server's malformed timeout header;
    // nothing for the client). A variant rather than a field of the future beside the state, which would make the
    // future a word larger: past 256 bytes, every move of it (at least two before it is polled) is a slower copy.
    #[project = StateProj]
    enum State<F, C, T, I> {
        Passthrough {
            #[pin]
            inner: F,
            classify: C,
        },
        Running {
            #[pin]
            // Its deadline is when the inner future must have answered by (kept once, here: the future is moved
            // at least twice on its way to being polled, and every byte of it is copied each time).
            inner: DeadlineScope<F>,
            // The timer for that deadline, armed the first time the inner future is pending: creating a `Sleep` takes
            // the runtime's handle (a thread-local read and a reference count shared by every worker thread), which
            // an answer ready at once need not pay for.
            #[pin]
            sleep: Option<Sleep>,
            permit: Option<Permit>,
            classify: C,
            // Client side: when the budget written into the request runs out (the smallest timeout the outgoing
            // headers carry). Nothing on the server.
            sent: T,
        },
        Rejected,
        // A malformed timeout header, refused in strict mode.
        Invalid {
            error: I,
        },
        Done,
    }
}

/// When a budget sent to the next hop runs out, for a transport that enforces it: the client keeps an instant,
/// the server (which sends nothing) a zero-sized nothing.
trait SentBudget {
    /// Whether the budget sent has run out.
    fn spent(&self) -> bool;

    /// When it runs out, if one was sent.
    fn until(&self) -> Option<Instant>;
}

/// The server future's [`SentBudget`]: nothing was sent.
#[derive(Debug, Clone, Copy)]
struct NotSent;

impl SentBudget for NotSent {
    #[inline]
    fn spent(&self) -> bool {
        false
    }

    #[inline]
    fn until(&self) -> Option<Instant> {
        None
    }
}

/// The client future's [`SentBudget`]: when the smallest timeout the outgoing headers carry runs out (`None`: the
/// layer writes no timeout header, so nothing below enforces one).
#[derive(Debug, Clone, Copy)]
struct Sent(Option<Instant>);

impl SentBudget for Sent {
    fn spent(&self) -> bool {
        self.0.is_some_and(|sent| Instant::now() >= sent)
    }

    fn until(&self) -> Option<Instant> {
        self.0
    }
}

impl<F, C, T, I> State<F, C, T, I> {
    fn running(inner: DeadlineScope<F>, permit: Permit, classify: C, sent: T) -> Self {
        State::Running {
            inner,
            sleep: None,
            permit: Some(permit),
            classify,
            sent,
        }
    }

    /// Lets go of the permit of a request dropped before it was answered, with its deadline current (unless an
    /// earlier one is), as the inner future is dropped: a caller that hangs up once the deadline has passed, before
    /// the timer has answered for it, leaves a request that missed its deadline, `Dropped` as the permits of the
    /// layers inside record it, not `Ignored`. Nothing to do for a request answered or never admitted.
    #[inline]
    fn release_unfinished(self: Pin<&mut Self>) {
        if let StateProj::Running { inner, permit, .. } = self.project() {
            // Tested before it is taken: an answered request's permit is gone already, and taking it would write
            // the empty slot again.
            if permit.is_some() {
                release_in_scope(inner.deadline(), permit);
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            State::Passthrough { .. } => "passthrough",
            // An answer leaves the state as it is (see `poll_state`), with the scope empty.
            State::Running { inner, .. } if inner.is_done() => "done",
            State::Running { .. } => "running",
            State::Rejected => "rejected",
            State::Invalid { .. } => "invalid",
            State::Done => "done",
        }
    }
}

/// Polls the state to its answer, dropping the inner future and the timer at once rather than whenever the caller
/// drops the future. `invalid` answers the `Invalid` state.
///
/// Only the running state (a request under a deadline, the layer's common case) is polled here, inline in the
/// caller; the others, the passthrough of a request without any deadline included, are answered out of line by
/// [`poll_other`]. With all of them inline, the caller's poll carried every state's code and the compiler made
/// costlier choices around it: the benchmark's server stack ran 39 instructions a request more (docs/PERFORMANCE.md,
/// "Stop 30").
#[inline]
fn poll_state<F, Res, E, C, M, T, I>(
    mut state: Pin<&mut State<F, C, T, I>>,
    mode: &M,
    cx: &mut Context<'_>,
    invalid: impl FnOnce(&M, I) -> Result<C::Response, M::Error>,
) -> Poll<Result<C::Response, M::Error>>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<M::Bounded, E>,
    M: BoundResponse<Res> + RejectMode<C::Response, E>,
    T: SentBudget,
    I: Copy,
{
    let StateProj::Running {
        mut inner,
        mut sleep,
        permit,
        classify,
        sent,
    } = state.as_mut().project()
    else {
        return poll_other(state, mode, cx, invalid);
    };
    // The inner future is polled first, so work that finishes at the deadline instant is still delivered.
    let output = match inner.as_mut().poll(cx) {
        // A transport that enforces the timeout it was sent (a tonic `Channel` does) fails the call with its
        // own error, which callers would see as CANCELLED or UNKNOWN. An error once the sent budget is spent
        // is that expiry: answer deadline-exceeded, as the local timer would have.
        Poll::Ready(Err(_)) if sent.spent() => expired(permit, mode),
        Poll::Ready(result) => {
            // The scope has dropped the inner future already, and a timer armed goes now too; the permit is
            // taken below. The state otherwise stays as it is, which spares the common path (an answer
            // before the deadline) rewriting the whole state: the classifier lives on until the future is
            // dropped, and a second poll finds the scope empty and panics.
            if sleep.is_some() {
                sleep.set(None);
            }
            // In HTTP and gRPC modes the deadline goes on bounding the body.
            let deadline = inner.deadline();
            let result = result.map(|response| mode.bound(response, Some(deadline), sent.until()));
            return Poll::Ready(
                classify
                    .finish(result, permit.take())
                    .map_err(|e| mode.inner_error(e)),
            );
        }
        Poll::Pending => {
            if sleep.is_none() {
                sleep.set(Some(tokio::time::sleep_until(inner.deadline().instant())));
            }
            ready!(sleep.as_pin_mut().expect("timer armed above").poll(cx));
            expired(permit, mode)
        }
    };
    state.set(State::Done);
    Poll::Ready(output)
}

/// [`poll_state`] for every state but the running one: out of line (see there).
#[inline(never)]
fn poll_other<F, Res, E, C, M, T, I>(
    mut state: Pin<&mut State<F, C, T, I>>,
    mode: &M,
    cx: &mut Context<'_>,
    invalid: impl FnOnce(&M, I) -> Result<C::Response, M::Error>,
) -> Poll<Result<C::Response, M::Error>>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<M::Bounded, E>,
    M: BoundResponse<Res> + RejectMode<C::Response, E>,
    I: Copy,
{
    let output = match state.as_mut().project() {
        StateProj::Passthrough { inner, classify } => {
            let result = ready!(inner.poll(cx)).map(|response| mode.bound(response, None, None));
            classify
                .finish(result, None)
                .map_err(|e| mode.inner_error(e))
        }
        StateProj::Running { .. } => unreachable!("the running state is polled by `poll_state`"),
        StateProj::Rejected => mode.reject(Rejection::new(Reason::DeadlineExceeded)),
        StateProj::Invalid { error } => invalid(mode, *error),
        StateProj::Done => panic!("deadline response future polled after completion"),
    };
    state.set(State::Done);
    Poll::Ready(output)
}

/// Drops an unfinished `permit` with `deadline` current: see [`State::release_unfinished`].
#[cold]
fn release_in_scope(deadline: Deadline, permit: &mut Option<Permit>) {
    let _scope = deadline.enter_poll();
    drop(permit.take());
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

impl<F, C, M> ResponseFuture<F, C, M> {
    fn new(state: State<F, C, NotSent, InvalidTimeout>, mode: M) -> Self {
        ResponseFuture { state, mode }
    }

    pub(super) fn passthrough(inner: F, classify: C, mode: M) -> Self {
        Self::new(State::Passthrough { inner, classify }, mode)
    }

    pub(super) fn running(inner: DeadlineScope<F>, permit: Permit, classify: C, mode: M) -> Self {
        Self::new(State::running(inner, permit, classify, NotSent), mode)
    }

    pub(super) fn rejected(mode: M) -> Self {
        Self::new(State::Rejected, mode)
    }

    pub(super) fn invalid(error: InvalidTimeout, mode: M) -> Self {
        Self::new(State::Invalid { error }, mode)
    }
}

impl<F, Res, E, C, M> Future for ResponseFuture<F, C, M>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<M::Bounded, E>,
    M: BoundResponse<Res> + RejectInvalid<C::Response, E>,
{
    type Output = Result<C::Response, M::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        poll_state(this.state, this.mode, cx, M::reject_invalid)
    }
}

impl<F, C, M> fmt::Debug for ResponseFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.state.name())
            .finish()
    }
}

impl<F, C, M> PropagateFuture<F, C, M> {
    pub(super) fn passthrough(inner: F, classify: C, mode: M) -> Self {
        PropagateFuture {
            state: State::Passthrough { inner, classify },
            mode,
        }
    }

    pub(super) fn running(
        inner: DeadlineScope<F>,
        permit: Permit,
        classify: C,
        mode: M,
        sent: Option<Instant>,
    ) -> Self {
        PropagateFuture {
            state: State::running(inner, permit, classify, Sent(sent)),
            mode,
        }
    }

    pub(super) fn rejected(mode: M) -> Self {
        PropagateFuture {
            state: State::Rejected,
            mode,
        }
    }
}

impl<F, Res, E, C, M> Future for PropagateFuture<F, C, M>
where
    F: Future<Output = Result<Res, E>>,
    C: Classify<M::Bounded, E>,
    M: BoundResponse<Res> + RejectMode<C::Response, E>,
{
    type Output = Result<C::Response, M::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The client refuses nothing as malformed: its state is never `Invalid`.
        poll_state(
            this.state,
            this.mode,
            cx,
            |_, never: Infallible| match never {},
        )
    }
}

impl<F, C, M> fmt::Debug for PropagateFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateFuture")
            .field("state", &self.state.name())
            .finish()
    }
}
