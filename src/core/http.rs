//! HTTP: classification by status, body tracking, and rejections as status-code responses.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::error::DeadlineExceeded;
use super::rejection::retry_after_secs;
use super::{BoxError, Classify, Outcome, Permit, RejectMode, Rejection};

/// Decides the outcome of a streamed response at its end, from its trailers (`None` when the body ended without
/// any). Only consulted when the response head left the outcome open, as gRPC does.
pub trait ClassifyEos: Send + Sync + 'static {
    /// The outcome, given the trailers seen at the end of the body.
    fn classify_eos(&self, trailers: Option<&HeaderMap>) -> Outcome;
}

/// Plain HTTP: nothing is decided at end of stream.
impl ClassifyEos for () {
    fn classify_eos(&self, _trailers: Option<&HeaderMap>) -> Outcome {
        Outcome::Success
    }
}

pin_project! {
    /// A response body that holds its request's [`Permit`] until the body is really done.
    ///
    /// The permit is released exactly once: at the end of the stream, which a trailers frame is (with the outcome
    /// of the response head, or, for gRPC, of the trailers), on a body error ([`Outcome::Failure`];
    /// [`Outcome::Dropped`] for a body a deadline layer cut at its deadline), or when the body is dropped half-read
    /// ([`Outcome::Ignored`]: the client went away; but a head that said [`Outcome::Failure`] or
    /// [`Outcome::Dropped`], a 500 or a 503, keeps its outcome: a caller that reads the status and drops the body
    /// was still answered so). A body that is already at its end when the head arrives
    /// releases the permit at once, since servers may never poll it.
    pub struct TrackedBody<B, T = ()> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
        outcome: Option<Outcome>,
        eos: T,
    }

    // A body dropped before its end: the caller went away, unless the head had already said the service failed.
    impl<B, T> PinnedDrop for TrackedBody<B, T> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(permit) = this.permit.take() {
                match *this.outcome {
                    Some(answered) => permit.abandon(answered),
                    None => drop(permit),
                }
            }
        }
    }
}

impl<B: Body, T: ClassifyEos> TrackedBody<B, T> {
    /// Wraps `inner`. `outcome` is the outcome decided from the head, or `None` to let `eos` decide from the
    /// trailers.
    pub fn new(inner: B, permit: Option<Permit>, outcome: Option<Outcome>, eos: T) -> Self {
        let mut body = TrackedBody {
            inner,
            permit,
            outcome,
            eos,
        };
        if body.inner.is_end_stream() {
            if let Some(permit) = body.permit.take() {
                permit.complete(body.outcome.unwrap_or_else(|| body.eos.classify_eos(None)));
            }
        }
        body
    }
}

impl<B, T> TrackedBody<B, T> {
    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Whether this body still holds its request's permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: Default, T: Default> Default for TrackedBody<B, T> {
    fn default() -> Self {
        TrackedBody {
            inner: B::default(),
            permit: None,
            outcome: None,
            eos: T::default(),
        }
    }
}

/// The outcome of a body that failed with `error`: [`Outcome::Dropped`] for one cut at its deadline (by a
/// deadline layer's [`DeadlineBody`](crate::deadline::DeadlineBody)), as an expired deadline is anywhere;
/// [`Outcome::Failure`] for any other error.
fn body_error_outcome<E: 'static>(error: &E) -> Outcome {
    let cut = (error as &dyn Any)
        .downcast_ref::<BoxError>()
        .is_some_and(|error| error.is::<DeadlineExceeded>());
    if cut {
        Outcome::Dropped
    } else {
        Outcome::Failure
    }
}

impl<B: Body, T: ClassifyEos> Body for TrackedBody<B, T>
where
    B::Error: 'static,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let finished = match &frame {
            // Trailers are a body's last frame, whatever `is_end_stream` says yet: hyper sends them and drops
            // the body without polling it again, so waiting for the end would record the request as abandoned.
            Some(Ok(frame)) => match frame.trailers_ref() {
                Some(trailers) => Some(
                    this.outcome
                        .unwrap_or_else(|| this.eos.classify_eos(Some(trailers))),
                ),
                None => this
                    .inner
                    .is_end_stream()
                    .then(|| this.outcome.unwrap_or_else(|| this.eos.classify_eos(None))),
            },
            Some(Err(error)) => Some(body_error_outcome(error)),
            None => Some(this.outcome.unwrap_or_else(|| this.eos.classify_eos(None))),
        };
        if let Some(outcome) = finished {
            if let Some(permit) = this.permit.take() {
                permit.complete(outcome);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, T> fmt::Debug for TrackedBody<B, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("holds_permit", &self.permit.is_some())
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// Classifies HTTP responses by status code, and holds the permit until the body ends.
///
/// Defaults: 503, 429 and 504 are [`Outcome::Dropped`] (overload downstream), other 5xx are
/// [`Outcome::Failure`], everything else (2xx, 3xx, and 4xx: the caller's mistake, not the service's) is
/// [`Outcome::Success`]. An `Err` from the inner service is a failure. Any status `http` accepts (100 to 999,
/// including codes above 599 that no standard defines) can be remapped:
///
/// ```
/// use http::StatusCode;
/// use tower_backpressure::core::{HttpStatus, Outcome};
///
/// let classify = HttpStatus::new().status(StatusCode::NOT_FOUND, Outcome::Ignored);
/// assert_eq!(classify.outcome_for(StatusCode::NOT_FOUND), Outcome::Ignored);
/// assert_eq!(classify.outcome_for(StatusCode::SERVICE_UNAVAILABLE), Outcome::Dropped);
/// ```
#[derive(Clone, Default)]
pub struct HttpStatus {
    // Only a customised classifier pays for a table (and an atomic per request for cloning it). The table covers
    // every code a `StatusCode` can hold (100 to 999), one byte each.
    table: Option<Arc<[Outcome; STATUS_CODES]>>,
}

/// How many status codes `http::StatusCode` admits: 100 to 999.
const STATUS_CODES: usize = 900;

/// A status code's slot in the table.
fn slot(status: StatusCode) -> usize {
    usize::from(status.as_u16()).saturating_sub(100)
}

impl HttpStatus {
    /// The default mapping.
    pub fn new() -> Self {
        HttpStatus::default()
    }

    /// Maps `status` to `outcome`.
    #[must_use]
    pub fn status(mut self, status: StatusCode, outcome: Outcome) -> Self {
        let table = self.table.get_or_insert_with(|| {
            let mut t = [Outcome::Success; STATUS_CODES];
            for (code, entry) in (100..).zip(t.iter_mut()) {
                *entry = default_outcome(code);
            }
            Arc::new(t)
        });
        // `StatusCode` keeps its code within 100..=999, so the slot exists; were it ever not, the mapping would
        // be left out rather than panic.
        if let Some(entry) = Arc::make_mut(table).get_mut(slot(status)) {
            *entry = outcome;
        }
        self
    }

    /// The outcome for a response with `status`.
    pub fn outcome_for(&self, status: StatusCode) -> Outcome {
        match self
            .table
            .as_ref()
            .and_then(|table| table.get(slot(status)))
        {
            Some(outcome) => *outcome,
            None => default_outcome(status.as_u16()),
        }
    }
}

/// Whether `response` is a refusal made by one of this process's layers (an inner limiter, queue or breaker)
/// rather than an answer from the service behind them. Classifiers record such a response as
/// [`Outcome::Ignored`]: a local layer shedding load says nothing about the health of the dependency, so an outer
/// circuit breaker must not trip on it and an outer limiter must not learn from it.
pub fn is_local_rejection<B>(response: &http::Response<B>) -> bool {
    response.extensions().get::<Rejection>().is_some()
}

fn default_outcome(code: u16) -> Outcome {
    match code {
        429 | 503 | 504 => Outcome::Dropped,
        500..=599 => Outcome::Failure,
        _ => Outcome::Success,
    }
}

impl fmt::Debug for HttpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStatus")
            .field("customised", &self.table.is_some())
            .finish()
    }
}

impl<B, E> Classify<http::Response<B>, E> for HttpStatus
where
    B: Body,
{
    type Response = http::Response<TrackedBody<B>>;

    fn finish(
        &self,
        result: Result<http::Response<B>, E>,
        permit: Option<Permit>,
    ) -> Result<Self::Response, E> {
        match result {
            Ok(response) => {
                let outcome = if is_local_rejection(&response) {
                    Outcome::Ignored
                } else {
                    self.outcome_for(response.status())
                };
                Ok(response.map(|body| TrackedBody::new(body, permit, Some(outcome), ())))
            }
            Err(error) => {
                if let Some(permit) = permit {
                    permit.complete(Outcome::Failure);
                }
                Err(error)
            }
        }
    }
}

/// Rejections leave as HTTP responses: 503 Service Unavailable (overload, full queue, queue timeout, open
/// circuit), 429 Too Many Requests (rate limit) or 504 Gateway Timeout (deadline), with `Retry-After` in whole
/// seconds rounded up when the layer knows how long to wait (left out for a zero wait), and an empty body. The
/// inner service's error type passes through untouched, so axum's `Infallible` holds and no `HandleErrorLayer` is
/// needed.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpMode;

impl<B: Default, E> RejectMode<http::Response<B>, E> for HttpMode {
    type Error = E;

    fn inner_error(&self, error: E) -> E {
        error
    }

    fn reject(&self, rejection: Rejection) -> Result<http::Response<B>, E> {
        Ok(http_rejection(rejection))
    }
}

/// The response [`HttpMode`] answers a rejection with.
///
/// The response carries the [`Rejection`] in its extensions, so layers further out recognise a refusal made by
/// a layer of this process (see [`is_local_rejection`]).
pub fn http_rejection<B: Default>(rejection: Rejection) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    response.extensions_mut().insert(rejection);
    *response.status_mut() = rejection.reason().http_status();
    if let Some(secs) = rejection.retry_after().and_then(retry_after_secs) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
