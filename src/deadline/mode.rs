//! What the modes of the deadline layers do beyond refusing: bound the response by the deadline, and (server) refuse
//! a malformed timeout header in strict mode.

use tokio::time::Instant;

use crate::core::{BoxError, Deadline, ErrorMode, RejectMode};

use super::codec::InvalidTimeout;

/// A [`RejectMode`] that can also answer a request whose timeout header is malformed (strict mode of
/// [`DeadlineLayer`](super::DeadlineLayer)).
///
/// Implemented by the three core modes: [`ErrorMode`] returns the [`InvalidTimeout`] as a `BoxError`, `HttpMode`
/// answers 400 Bad Request, `GrpcMode` a trailers-only INVALID_ARGUMENT (3).
pub trait RejectInvalid<Res, E>: RejectMode<Res, E> {
    /// The answer to a request whose timeout header does not follow its grammar.
    fn reject_invalid(&self, error: InvalidTimeout) -> Result<Res, Self::Error>;
}

/// How the mode of a deadline layer bounds the response it passes on by the request's deadline.
///
/// Implemented by the three core modes:
/// - [`ErrorMode`] passes any response on as it is: the response future is all the deadline bounds.
/// - `HttpMode` and `GrpcMode` wrap an `http::Response`'s body in a
///   [`DeadlineBody`](super::DeadlineBody), so that the deadline bounds the whole exchange, a streamed body
///   included, and is current while the body is polled. A body cut at the deadline ends with an error (HTTP) or
///   with trailers `grpc-status: 4` (gRPC).
///
/// A mode of your own (given to `reject_mode`) implements it too: as `ErrorMode` does (`type Bounded = Res`,
/// `bound` returning the response), or, to bound an HTTP body, with
/// [`DeadlineBody::http`](super::DeadlineBody::http) or `DeadlineBody::grpc`, as the core modes do.
pub trait BoundResponse<Res> {
    /// The response passed on.
    type Bounded;

    /// `response`, bounded by `deadline` (`None`: the request had none, and the response passes as it is).
    /// `sent` (client side): when the budget written into the request for the next hop runs out; an error after it
    /// is that hop's cut (see [`DeadlineBody::http`](super::DeadlineBody::http)).
    fn bound(
        &self,
        response: Res,
        deadline: Option<Deadline>,
        sent: Option<Instant>,
    ) -> Self::Bounded;
}

impl<Res> BoundResponse<Res> for ErrorMode {
    type Bounded = Res;

    #[inline(always)]
    fn bound(&self, response: Res, _deadline: Option<Deadline>, _sent: Option<Instant>) -> Res {
        response
    }
}

#[cfg(feature = "http")]
impl<B> BoundResponse<http::Response<B>> for crate::core::HttpMode {
    type Bounded = http::Response<super::DeadlineBody<B>>;

    #[inline]
    fn bound(
        &self,
        response: http::Response<B>,
        deadline: Option<Deadline>,
        sent: Option<Instant>,
    ) -> Self::Bounded {
        response.map(|body| super::DeadlineBody::http(body, deadline, sent))
    }
}

#[cfg(feature = "grpc")]
impl<B> BoundResponse<http::Response<B>> for crate::core::GrpcMode {
    type Bounded = http::Response<super::DeadlineBody<B>>;

    #[inline]
    fn bound(
        &self,
        response: http::Response<B>,
        deadline: Option<Deadline>,
        sent: Option<Instant>,
    ) -> Self::Bounded {
        response.map(|body| super::DeadlineBody::grpc(body, deadline, sent))
    }
}

impl<Res, E: Into<BoxError>> RejectInvalid<Res, E> for ErrorMode {
    fn reject_invalid(&self, error: InvalidTimeout) -> Result<Res, BoxError> {
        Err(Box::new(error))
    }
}

#[cfg(feature = "http")]
impl<B: Default, E> RejectInvalid<http::Response<B>, E> for crate::core::HttpMode {
    fn reject_invalid(&self, _error: InvalidTimeout) -> Result<http::Response<B>, E> {
        let mut response = http::Response::new(B::default());
        *response.status_mut() = http::StatusCode::BAD_REQUEST;
        Ok(response)
    }
}

#[cfg(feature = "grpc")]
impl<B: Default, E> RejectInvalid<http::Response<B>, E> for crate::core::GrpcMode {
    fn reject_invalid(&self, _error: InvalidTimeout) -> Result<http::Response<B>, E> {
        use http::HeaderValue;

        let mut response = http::Response::new(B::default());
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from(crate::core::grpc::code::INVALID_ARGUMENT),
        );
        headers.insert(
            "grpc-message",
            // The header may be `grpc-timeout` or the millisecond header, whichever was malformed.
            HeaderValue::from_static("malformed timeout header"),
        );
        Ok(response)
    }
}
