//! gRPC: classification by `grpc-status` (in trailers-only headers or in trailers at the end of the body) and
//! rejections as trailers-only responses.

use std::fmt;

use http::{HeaderMap, HeaderValue};
use http_body::Body;

use super::rejection::retry_after_millis;
use super::{
    is_local_rejection, Classify, ClassifyEos, HttpStatus, Outcome, Permit, RejectMode, Rejection,
    TrackedBody,
};

/// gRPC status codes, as numbers (`grpc-status` values).
pub mod code {
    /// OK.
    pub const OK: u16 = 0;
    /// CANCELLED.
    pub const CANCELLED: u16 = 1;
    /// UNKNOWN.
    pub const UNKNOWN: u16 = 2;
    /// INVALID_ARGUMENT.
    pub const INVALID_ARGUMENT: u16 = 3;
    /// DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: u16 = 4;
    /// NOT_FOUND.
    pub const NOT_FOUND: u16 = 5;
    /// ALREADY_EXISTS.
    pub const ALREADY_EXISTS: u16 = 6;
    /// PERMISSION_DENIED.
    pub const PERMISSION_DENIED: u16 = 7;
    /// RESOURCE_EXHAUSTED.
    pub const RESOURCE_EXHAUSTED: u16 = 8;
    /// FAILED_PRECONDITION.
    pub const FAILED_PRECONDITION: u16 = 9;
    /// ABORTED.
    pub const ABORTED: u16 = 10;
    /// OUT_OF_RANGE.
    pub const OUT_OF_RANGE: u16 = 11;
    /// UNIMPLEMENTED.
    pub const UNIMPLEMENTED: u16 = 12;
    /// INTERNAL.
    pub const INTERNAL: u16 = 13;
    /// UNAVAILABLE.
    pub const UNAVAILABLE: u16 = 14;
    /// DATA_LOSS.
    pub const DATA_LOSS: u16 = 15;
    /// UNAUTHENTICATED.
    pub const UNAUTHENTICATED: u16 = 16;
}

/// Classifies gRPC responses by `grpc-status`, read from the response headers (trailers-only responses) or from
/// the trailers at the end of the body; the permit is held until then.
///
/// Defaults: OK is [`Outcome::Success`]; UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are
/// [`Outcome::Dropped`]; INTERNAL, UNKNOWN and DATA_LOSS are [`Outcome::Failure`]; CANCELLED is
/// [`Outcome::Ignored`]; caller errors (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...) are not failures
/// ([`Outcome::Success`]). An unknown or unparsable code, or a stream that ends without any `grpc-status`, is a
/// failure. A response whose HTTP status is not 200 (a proxy's 503, say) is classified by [`HttpStatus`].
///
/// ```
/// use tower_backpressure::core::{grpc::code, GrpcClassifier, Outcome};
///
/// let classify = GrpcClassifier::new().code(code::NOT_FOUND, Outcome::Ignored);
/// assert_eq!(classify.outcome_for_code(code::NOT_FOUND), Outcome::Ignored);
/// assert_eq!(classify.outcome_for_code(code::UNAVAILABLE), Outcome::Dropped);
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GrpcClassifier {
    table: [Outcome; 17],
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        let mut table = [Outcome::Success; 17];
        for c in [
            code::UNAVAILABLE,
            code::RESOURCE_EXHAUSTED,
            code::DEADLINE_EXCEEDED,
        ] {
            table[usize::from(c)] = Outcome::Dropped;
        }
        for c in [code::INTERNAL, code::UNKNOWN, code::DATA_LOSS] {
            table[usize::from(c)] = Outcome::Failure;
        }
        table[usize::from(code::CANCELLED)] = Outcome::Ignored;
        GrpcClassifier { table }
    }
}

impl GrpcClassifier {
    /// The default mapping.
    pub fn new() -> Self {
        GrpcClassifier::default()
    }

    /// Maps gRPC status `code` (0..=16; others are ignored) to `outcome`.
    #[must_use]
    pub fn code(mut self, code: u16, outcome: Outcome) -> Self {
        if let Some(slot) = self.table.get_mut(usize::from(code)) {
            *slot = outcome;
        }
        self
    }

    /// The outcome for gRPC status `code`; codes outside 0..=16 are failures.
    pub fn outcome_for_code(&self, code: u16) -> Outcome {
        self.table
            .get(usize::from(code))
            .copied()
            .unwrap_or(Outcome::Failure)
    }

    /// The outcome for a `grpc-status` value in `headers`, or `None` when there is none.
    pub fn outcome_for_headers(&self, headers: &HeaderMap) -> Option<Outcome> {
        let value = headers.get("grpc-status")?;
        Some(
            parse_code(value.as_bytes())
                .map(|c| self.outcome_for_code(c))
                .unwrap_or(Outcome::Failure),
        )
    }
}

fn parse_code(bytes: &[u8]) -> Option<u16> {
    if bytes.is_empty() || bytes.len() > 3 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(bytes.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0')))
}

impl fmt::Debug for GrpcClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcClassifier")
            .field("table", &self.table)
            .finish()
    }
}

impl ClassifyEos for GrpcClassifier {
    fn classify_eos(&self, trailers: Option<&HeaderMap>) -> Outcome {
        trailers
            .and_then(|t| self.outcome_for_headers(t))
            .unwrap_or(Outcome::Failure)
    }
}

impl<B, E> Classify<http::Response<B>, E> for GrpcClassifier
where
    B: Body,
{
    type Response = http::Response<TrackedBody<B, GrpcClassifier>>;

    fn finish(
        &self,
        result: Result<http::Response<B>, E>,
        permit: Option<Permit>,
    ) -> Result<Self::Response, E> {
        match result {
            Ok(response) => {
                let outcome = if is_local_rejection(&response) {
                    Some(Outcome::Ignored)
                } else if response.status() != http::StatusCode::OK {
                    Some(HttpStatus::new().outcome_for(response.status()))
                } else {
                    self.outcome_for_headers(response.headers())
                };
                Ok(response.map(|body| TrackedBody::new(body, permit, outcome, *self)))
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

/// Rejections leave as gRPC trailers-only responses: HTTP 200, `content-type: application/grpc`, `grpc-status`
/// 14 UNAVAILABLE (overload, full queue, queue timeout, open circuit), 8 RESOURCE_EXHAUSTED (rate limit) or
/// 4 DEADLINE_EXCEEDED (deadline), a `grpc-message`, and `grpc-retry-pushback-ms` (rounded up) when the layer knows
/// how long to wait. The inner error type passes through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMode;

impl<B: Default, E> RejectMode<http::Response<B>, E> for GrpcMode {
    type Error = E;

    fn inner_error(&self, error: E) -> E {
        error
    }

    fn reject(&self, rejection: Rejection) -> Result<http::Response<B>, E> {
        Ok(grpc_rejection(rejection))
    }
}

/// Writes the `grpc-status` and `grpc-message` that say `rejection`: into a trailers-only response's headers, or
/// into the trailers that end a stream cut at its deadline.
pub(crate) fn insert_status(headers: &mut HeaderMap, rejection: Rejection) {
    headers.insert(
        "grpc-status",
        HeaderValue::from(rejection.reason().grpc_code()),
    );
    // Messages are fixed lowercase ASCII with spaces only: valid grpc-message without percent-encoding.
    headers.insert(
        "grpc-message",
        HeaderValue::from_static(rejection.reason().message()),
    );
}

/// The trailers-only response [`GrpcMode`] answers a rejection with.
///
/// Like [`http_rejection`](super::http_rejection), it carries the [`Rejection`] in its extensions.
pub fn grpc_rejection<B: Default>(rejection: Rejection) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    response.extensions_mut().insert(rejection);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    insert_status(headers, rejection);
    if let Some(ms) = rejection.retry_after().and_then(retry_after_millis) {
        headers.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
    }
    response
}
