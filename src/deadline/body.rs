//! The response body of the deadline layers in HTTP and gRPC modes: the deadline bounds the whole exchange, not
//! only the response head.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::core::{BoxError, Deadline, Reason, Rejection};

/// How a body cut at its deadline ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// With an error ([`DeadlineExceeded`](crate::core::error::DeadlineExceeded)): the response head is sent
    /// already, so plain HTTP has no status left to say it with, and a body that just stopped would pass for a
    /// complete one. hyper resets the HTTP/2 stream or closes the HTTP/1.1 connection.
    Error,
    /// With trailers `grpc-status: 4` (DEADLINE_EXCEEDED) and a `grpc-message`: a complete gRPC response whose
    /// status says what happened.
    #[cfg(feature = "grpc")]
    Grpc,
}

// Frames a body with a deadline may yield ready, one after the other, before its timer is armed. A unary gRPC
// response (a message, then trailers) and a one-frame HTTP body finish within them and never pay for a timer; a
// stream that never waits (an iterator turned into a stream, read by a fast client) has its timer from its third
// frame on, so it too is cut at its deadline.
const FRAMES_BEFORE_TIMER: u8 = 2;

pin_project! {
    /// The response body passed on by a [`DeadlineLayer`](super::DeadlineLayer) or a
    /// [`PropagateDeadlineLayer`](super::PropagateDeadlineLayer) built with `.http()` or `.grpc()`: the request's
    /// deadline bounds the body too.
    ///
    /// - The deadline is [`Deadline::current`] while the body is polled and while it is dropped, as around the
    ///   response future: a streaming handler that makes outbound calls while it produces its body passes the
    ///   deadline on.
    /// - At the deadline the inner body is dropped (the work producing it stops) and the body ends: with an error
    ///   in HTTP mode ([`DeadlineExceeded`](crate::core::error::DeadlineExceeded), so the client sees a cut
    ///   stream rather than a short body), with trailers `grpc-status: 4` (DEADLINE_EXCEEDED) in gRPC mode. The
    ///   layer's outcome is then [`Outcome::Dropped`](crate::core::Outcome::Dropped).
    /// - A body that finishes in time passes through unchanged: frames, trailers and errors (as a
    ///   [`BoxError`]).
    /// - The timer is armed the first time the body waits, or at its third frame if it never waits, and is the
    ///   body's one allocation: a one-frame body or a unary gRPC answer (a message, then trailers) arms none. Once
    ///   the runtime has fired it, the body is cut at its next poll.
    /// - Without a deadline (no header, no maximum, none set) the body passes through.
    pub struct DeadlineBody<B> {
        // `None` once the body has ended, was cut, or was dropped.
        #[pin]
        inner: Option<B>,
        deadline: Option<Deadline>,
        // Client side: when the budget written into the request for the next hop runs out. That hop cuts its body
        // then, which reaches us as a transport error: an error after it is that cut, and ends the body as ours
        // would have.
        sent: Option<Instant>,
        // Boxed so that the body stays small for the many responses that never wait: armed at most once, the first
        // time the body waits or after `FRAMES_BEFORE_TIMER` ready frames.
        timer: Option<Pin<Box<Sleep>>>,
        frames: u8,
        end: End,
    }

    impl<B> PinnedDrop for DeadlineBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(deadline) = *this.deadline {
                if std::mem::needs_drop::<B>() && this.inner.is_some() {
                    crate::core::deadline::drop_in_scope(deadline, this.inner);
                }
            }
        }
    }
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Option<Deadline>, sent: Option<Instant>, end: End) -> Self {
        DeadlineBody {
            inner: Some(inner),
            deadline,
            sent: deadline.and(sent),
            timer: None,
            frames: 0,
            end,
        }
    }

    /// `inner` bounded by `deadline` (none: passed through), ending with a
    /// [`DeadlineExceeded`](crate::core::error::DeadlineExceeded) error when cut, as `HttpMode` does: for a
    /// [`BoundResponse`](super::BoundResponse) of your own. `sent`, on a client: when the budget written into
    /// the request runs out, after which an error from `inner` counts as the next hop's cut.
    pub fn http(inner: B, deadline: Option<Deadline>, sent: Option<Instant>) -> Self {
        DeadlineBody::new(inner, deadline, sent, End::Error)
    }

    /// Like [`DeadlineBody::http`], ending with trailers `grpc-status: 4` when cut, as `GrpcMode` does.
    #[cfg(feature = "grpc")]
    pub fn grpc(inner: B, deadline: Option<Deadline>, sent: Option<Instant>) -> Self {
        DeadlineBody::new(inner, deadline, sent, End::Grpc)
    }

    /// The deadline bounding this body, if it has one.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// The inner body, unless it has ended or was cut at the deadline.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }
}

/// An unbounded body around `B`'s default: the body of a refusal.
impl<B: Default> Default for DeadlineBody<B> {
    fn default() -> Self {
        DeadlineBody::new(B::default(), None, None, End::Error)
    }
}

type PollFrame<D> = Poll<Option<Result<Frame<D>, BoxError>>>;

impl<B> Body for DeadlineBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame<B::Data> {
        let mut this = self.project();
        let Some(deadline) = *this.deadline else {
            return match this.inner.as_pin_mut() {
                Some(inner) => inner.poll_frame(cx).map_err(Into::into),
                None => Poll::Ready(None),
            };
        };
        let _scope = deadline.enter_poll();
        if let Some(timer) = this.timer.as_mut() {
            // A body that says it has ended is not cut: it owes nothing more than the end, and is asked for it.
            let ended = this
                .inner
                .as_ref()
                .as_pin_ref()
                .is_some_and(|b| b.is_end_stream());
            if !ended && timer.as_mut().poll(cx).is_ready() {
                return cut(this.inner, this.timer, *this.end);
            }
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are the last frame, whatever the inner body's `is_end_stream` says.
                let ended = frame.is_trailers()
                    || this
                        .inner
                        .as_ref()
                        .as_pin_ref()
                        .is_none_or(|b| b.is_end_stream());
                if ended {
                    // Done in time: the inner body and the timer go now.
                    this.inner.set(None);
                    *this.timer = None;
                } else if this.timer.is_none() {
                    *this.frames += 1;
                    if *this.frames > FRAMES_BEFORE_TIMER {
                        // Polled once to register it; a deadline passed already cuts the body at its next poll,
                        // this frame being delivered as the inner body's others were.
                        let _ = arm(this.timer, deadline).poll(cx);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.inner.set(None);
                *this.timer = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(_))) if this.sent.is_some_and(|sent| Instant::now() >= sent) => {
                cut(this.inner, this.timer, *this.end)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Pending => match arm(this.timer, deadline).poll(cx) {
                Poll::Ready(()) => cut(this.inner, this.timer, *this.end),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        // The inner body's, unchanged (a length the head announces stays announced): a body cut at its deadline
        // ends with an error, or with trailers, which carry no data.
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The body's timer, armed now if it is not yet.
fn arm(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Deadline) -> Pin<&mut Sleep> {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.instant())))
        .as_mut()
}

/// Drops the inner body (its caller holds the deadline's scope) and the timer, and ends the body as `end` says.
#[cold]
fn cut<B: Body>(
    mut inner: Pin<&mut Option<B>>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    end: End,
) -> PollFrame<B::Data> {
    inner.set(None);
    *timer = None;
    let rejection = Rejection::new(Reason::DeadlineExceeded);
    Poll::Ready(Some(match end {
        End::Error => Err(rejection.into_error()),
        #[cfg(feature = "grpc")]
        End::Grpc => {
            let mut trailers = http::HeaderMap::with_capacity(2);
            crate::core::grpc::insert_status(&mut trailers, rejection);
            Ok(Frame::trailers(trailers))
        }
    }))
}

impl<B> fmt::Debug for DeadlineBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineBody")
            .field("deadline", &self.deadline)
            .field("done", &self.inner.is_none())
            .field("timer_armed", &self.timer.is_some())
            .finish()
    }
}
