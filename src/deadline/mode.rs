//! How the server layer refuses a malformed timeout header in strict mode.

use crate::core::{BoxError, ErrorMode, RejectMode};

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
