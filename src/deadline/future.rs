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
use crate::core::deadline::poll_in_scope;
use crate::core::{Classify, Deadline, Outcome, Permit, Reason, RejectMode, Rejection};

pin_project! {
    /// Response future of [`DeadlineService`](super::DeadlineService).
    ///
    /// Under a deadline it races the inner future (run with the deadline current, as inside
    /// [`Deadline::scope`](crate::core::Deadline::scope)) against a timer held inline, so no allocation happens;
    /// when the timer wins the inner future is dropped and the answer is deadline-exceeded, with outcome
    /// [`Outcome::Dropped`]. The timer is armed only once the inner future has returned `Pending`: an answer ready
    /// at the first poll costs no timer at all. Arming it takes the Tokio runtime of the thread polling (as
    /// `tokio::time::sleep` does), so poll it inside a Tokio runtime with time enabled, as tower's `Timeout` and
    /// every tokio timer require. Without a deadline it only forwards the inner future.
    pub struct ResponseFuture<F, C, M> {
        #[pin]
        machine: Machine<F, C, NotSent, InvalidTimeout>,
        mode: M,
    }
}

pin_project! {
    /// Response future of [`PropagateDeadline`](super::PropagateDeadline): like [`ResponseFuture`], without the
    /// malformed-header answer (the client writes headers, it does not read them), and answering for a transport
    /// that enforces the timeout it was sent: an error once that budget is spent is deadline-exceeded.
    pub struct PropagateFuture<F, C, M> {
        #[pin]
        machine: Machine<F, C, Sent, Infallible>,
        mode: M,
    }
}

pin_project! {
    // The state machine of both response futures.
    //
    // The inner future, the timer and the permit are fields of their own beside the state rather than fields of
    // its variants, so that each has one place whatever the state. Held in the variants, the inner future sat at
    // one offset in the running state and at another in the passthrough one, and the timer's slot (unarmed: a
    // tag, the rest never written) overlapped the passthrough's inner future and the malformed-header error: the
    // compiler copied the new future through more temporaries on its way out of `call`, byte by byte in some
    // builds, the unwritten bytes included. With the permit out of the state too, the state needs no dropping
    // (for the core classifiers and modes). docs/PERFORMANCE.md, "Stop 31".
    #[project = MachineProj]
    struct Machine<F, C, T, I> {
        // `None` once it has answered (it is dropped at once, with the deadline current when there is one) and in
        // the states that never had one.
        #[pin]
        inner: Option<F>,
        // The timer for the running state's deadline, armed the first time the inner future is pending: creating a
        // `Sleep` takes the runtime's handle (a thread-local read and a reference count shared by every worker
        // thread), which an answer ready at once need not pay for.
        #[pin]
        sleep: Option<Sleep>,
        // The running state's permit, until the outcome is recorded.
        permit: Option<Permit>,
        state: State<C, T, I>,
    }

    impl<F, C, T, I> PinnedDrop for Machine<F, C, T, I> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let State::Running { deadline, .. } = this.state {
                release_unfinished(*deadline, this.permit, this.inner);
            }
        }
    }
}

// `I`: why a request is refused before it starts, besides its deadline (the server's malformed timeout header;
// nothing for the client). A variant rather than a field of the future beside the state, which would make the
// future a word larger: past 256 bytes, every move of it (at least two before it is polled) is a slower copy.
enum State<C, T, I> {
    Passthrough {
        classify: C,
    },
    Running {
        // When the inner future must have answered by; current (unless an earlier one is) while the inner future
        // is polled or dropped, as in `Deadline::scope`.
        deadline: Deadline,
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

impl<F, C, T, I> Machine<F, C, T, I> {
    fn new(inner: Option<F>, permit: Option<Permit>, state: State<C, T, I>) -> Self {
        Machine {
            inner,
            sleep: None,
            permit,
            state,
        }
    }

    /// A request without any deadline: the inner future is only forwarded.
    fn passthrough(inner: F, classify: C) -> Self {
        Self::new(Some(inner), None, State::Passthrough { classify })
    }

    /// A request refused before it starts: its deadline has passed, or too little of it is left.
    fn rejected() -> Self {
        Self::new(None, None, State::Rejected)
    }

    fn running(inner: F, deadline: Deadline, permit: Permit, classify: C, sent: T) -> Self {
        // The caller made the deadline no later than the current one, which `Deadline::scope` would have taken.
        debug_assert!(Deadline::current().is_none_or(|outer| deadline <= outer));
        Self::new(
            Some(inner),
            Some(permit),
            State::Running {
                deadline,
                classify,
                sent,
            },
        )
    }

    fn name(&self) -> &'static str {
        match &self.state {
            // An answer leaves these two states as they are (see `poll_state`), with the inner future gone.
            State::Passthrough { .. } | State::Running { .. } if self.inner.is_none() => "done",
            State::Passthrough { .. } => "passthrough",
            State::Running { .. } => "running",
            State::Rejected => "rejected",
            State::Invalid { .. } => "invalid",
            State::Done => "done",
        }
    }
}

/// Lets go of the permit of a request dropped before it was answered, and of its inner future, with its deadline
/// current (unless an earlier one is): a caller that hangs up once the deadline has passed, before the timer has
/// answered for it, leaves a request that missed its deadline, `Dropped` as the permits of the layers inside
/// record it, not `Ignored`. Nothing to do for a request answered (the common case, one test inline).
#[inline]
fn release_unfinished<F>(
    deadline: Deadline,
    permit: &mut Option<Permit>,
    inner: Pin<&mut Option<F>>,
) {
    if permit.is_some() || (std::mem::needs_drop::<F>() && inner.is_some()) {
        drop_unfinished(deadline, permit.take(), inner);
    }
}

/// Drops the permit (if any), then the inner future (if any), with `deadline` current, as [`DeadlineScope`]'s own
/// drop does for a future.
///
/// [`DeadlineScope`]: crate::core::DeadlineScope
#[cold]
fn drop_unfinished<F>(deadline: Deadline, permit: Option<Permit>, mut inner: Pin<&mut Option<F>>) {
    let _scope = deadline.enter_poll();
    drop(permit);
    inner.set(None);
}

/// Polls the state to its answer, dropping the inner future and the timer at once rather than whenever the caller
/// drops the future. `invalid` answers the `Invalid` state.
///
/// The running state (a request under a deadline, the layer's common case) is polled here, the others by
/// [`poll_other`], both inline in the caller. `poll_other` was out of line while the inner future was held in the
/// state's variants (inline, the server stack then ran 39 instructions a request more); with the inner future in
/// one place, inline is the cheaper of the two for every deadline stack of the benchmark (docs/PERFORMANCE.md,
/// "Stop 30" and "Stop 31").
#[inline]
fn poll_state<F, Res, E, C, M, T, I>(
    machine: Pin<&mut Machine<F, C, T, I>>,
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
    let MachineProj {
        mut inner,
        mut sleep,
        permit,
        state,
    } = machine.project();
    let State::Running {
        deadline,
        classify,
        sent,
    } = state
    else {
        return poll_other(inner, state, mode, cx, invalid);
    };
    let deadline = *deadline;
    // The inner future is polled first, so work that finishes at the deadline instant is still delivered.
    let polled = poll_in_scope(deadline, inner.as_mut(), cx)
        .expect("deadline response future polled after completion");
    let output = match polled {
        // A transport that enforces the timeout it was sent (a tonic `Channel` does) fails the call with its
        // own error, which callers would see as CANCELLED or UNKNOWN. An error once the sent budget is spent
        // is that expiry: answer deadline-exceeded, as the local timer would have.
        Poll::Ready(Err(_)) if sent.spent() => expired(permit, mode),
        Poll::Ready(result) => {
            // The inner future is gone already, and a timer armed goes now too; the permit is taken below. The
            // state otherwise stays as it is, which spares the common path (an answer before the deadline)
            // rewriting it: the classifier lives on until the future is dropped, and a second poll finds no inner
            // future and panics.
            if sleep.is_some() {
                sleep.set(None);
            }
            // In HTTP and gRPC modes the deadline goes on bounding the body.
            let result = result.map(|response| mode.bound(response, Some(deadline), sent.until()));
            return Poll::Ready(
                classify
                    .finish(result, permit.take())
                    .map_err(|e| mode.inner_error(e)),
            );
        }
        Poll::Pending => {
            if sleep.is_none() {
                sleep.set(Some(tokio::time::sleep_until(deadline.instant())));
            }
            ready!(sleep
                .as_mut()
                .as_pin_mut()
                .expect("timer armed above")
                .poll(cx));
            let output = expired(permit, mode);
            // The inner future that lost the race goes now, with its deadline current (the permit is gone).
            release_unfinished(deadline, permit, inner);
            output
        }
    };
    sleep.set(None);
    *state = State::Done;
    Poll::Ready(output)
}

/// [`poll_state`] for every state but the running one (see there).
#[inline]
fn poll_other<F, Res, E, C, M, T, I>(
    mut inner: Pin<&mut Option<F>>,
    state: &mut State<C, T, I>,
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
    let output = match state {
        State::Passthrough { classify } => {
            let Some(future) = inner.as_mut().as_pin_mut() else {
                panic!("deadline response future polled after completion");
            };
            let result = ready!(future.poll(cx)).map(|response| mode.bound(response, None, None));
            let output = classify
                .finish(result, None)
                .map_err(|e| mode.inner_error(e));
            // As in the running state, the inner future goes and the state stays as it is: a second poll finds no
            // inner future.
            inner.set(None);
            return Poll::Ready(output);
        }
        State::Running { .. } => unreachable!("the running state is polled by `poll_state`"),
        State::Rejected => mode.reject(Rejection::new(Reason::DeadlineExceeded)),
        State::Invalid { error } => invalid(mode, *error),
        State::Done => panic!("deadline response future polled after completion"),
    };
    *state = State::Done;
    Poll::Ready(output)
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
    fn new(machine: Machine<F, C, NotSent, InvalidTimeout>, mode: M) -> Self {
        ResponseFuture { machine, mode }
    }

    pub(super) fn passthrough(inner: F, classify: C, mode: M) -> Self {
        Self::new(Machine::passthrough(inner, classify), mode)
    }

    pub(super) fn running(
        inner: F,
        deadline: Deadline,
        permit: Permit,
        classify: C,
        mode: M,
    ) -> Self {
        Self::new(
            Machine::running(inner, deadline, permit, classify, NotSent),
            mode,
        )
    }

    pub(super) fn rejected(mode: M) -> Self {
        Self::new(Machine::rejected(), mode)
    }

    pub(super) fn invalid(error: InvalidTimeout, mode: M) -> Self {
        Self::new(Machine::new(None, None, State::Invalid { error }), mode)
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
        poll_state(this.machine, this.mode, cx, M::reject_invalid)
    }
}

impl<F, C, M> fmt::Debug for ResponseFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.machine.name())
            .finish()
    }
}

impl<F, C, M> PropagateFuture<F, C, M> {
    pub(super) fn passthrough(inner: F, classify: C, mode: M) -> Self {
        PropagateFuture {
            machine: Machine::passthrough(inner, classify),
            mode,
        }
    }

    pub(super) fn running(
        inner: F,
        deadline: Deadline,
        permit: Permit,
        classify: C,
        mode: M,
        sent: Option<Instant>,
    ) -> Self {
        PropagateFuture {
            machine: Machine::running(inner, deadline, permit, classify, Sent(sent)),
            mode,
        }
    }

    pub(super) fn rejected(mode: M) -> Self {
        PropagateFuture {
            machine: Machine::rejected(),
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
            this.machine,
            this.mode,
            cx,
            |_, never: Infallible| match never {},
        )
    }
}

impl<F, C, M> fmt::Debug for PropagateFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateFuture")
            .field("state", &self.machine.name())
            .finish()
    }
}
