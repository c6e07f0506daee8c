//! Request priority: the four criticality levels and how a request's level is read.

use std::fmt;
use std::str::FromStr;

/// How important a request is, from most to least (the criticality levels of Google's SRE book).
///
/// Under pressure the queue sheds from the bottom up: lower levels get a smaller share of the queue, are served
/// after higher ones, and are displaced from a full queue by higher arrivals. A missing or malformed priority is
/// [`Priority::DEFAULT`] ([`Priority::Critical`]), never an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Must not fail: reserved for the few requests whose loss is user-visible and unrecoverable.
    CriticalPlus = 3,
    /// The default for user-facing traffic.
    #[default]
    Critical = 2,
    /// Traffic that tolerates some loss (batch work that will retry).
    SheddablePlus = 1,
    /// Traffic that tolerates loss and delay (prefetches, analytics).
    Sheddable = 0,
}

impl Priority {
    /// The level of requests that carry no (valid) priority.
    pub const DEFAULT: Priority = Priority::Critical;

    /// Every level, most important first.
    pub const ALL: [Priority; 4] = [
        Priority::CriticalPlus,
        Priority::Critical,
        Priority::SheddablePlus,
        Priority::Sheddable,
    ];

    /// The lowercase name carried in the priority header: `critical_plus`, `critical`, `sheddable_plus`,
    /// `sheddable`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::CriticalPlus => "critical_plus",
            Priority::Critical => "critical",
            Priority::SheddablePlus => "sheddable_plus",
            Priority::Sheddable => "sheddable",
        }
    }

    /// Parses a header value; `None` for anything but the four lowercase names (surrounding spaces allowed).
    pub fn parse(value: &[u8]) -> Option<Priority> {
        match value.trim_ascii() {
            b"critical_plus" => Some(Priority::CriticalPlus),
            b"critical" => Some(Priority::Critical),
            b"sheddable_plus" => Some(Priority::SheddablePlus),
            b"sheddable" => Some(Priority::Sheddable),
            _ => None,
        }
    }

    /// Whether the level counts as critical for the reserved share of the limit.
    pub const fn is_critical(self) -> bool {
        matches!(self, Priority::CriticalPlus | Priority::Critical)
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    pub(crate) const fn from_index(index: usize) -> Priority {
        match index {
            3 => Priority::CriticalPlus,
            2 => Priority::Critical,
            1 => Priority::SheddablePlus,
            _ => Priority::Sheddable,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of [`Priority::from_str`]: the text is not one of the four level names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsePriorityError(());

impl fmt::Display for ParsePriorityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected critical_plus, critical, sheddable_plus or sheddable")
    }
}

impl std::error::Error for ParsePriorityError {}

impl FromStr for Priority {
    type Err = ParsePriorityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::parse(s.as_bytes()).ok_or(ParsePriorityError(()))
    }
}

/// Reads a request's priority for the queue.
///
/// - [`Uniform`] (the default): every request is [`Priority::DEFAULT`]. For generic requests.
/// - [`HeaderPriority`] (feature `http`, set by the builder's `.http()`/`.grpc()`/`.priority_header(..)`): a
///   [`Priority`] request extension, else an optional user extractor over the request's extensions, else the
///   priority header (`x-priority` by default).
/// - A closure `Fn(&Req) -> Priority`.
///
/// Where the queue finds a request's deadline is a [`DeadlineSource`](crate::core::DeadlineSource) of its own
/// ([`QueueBuilder::deadline_source`](super::QueueBuilder::deadline_source)), so any way of reading priorities
/// goes with any way of finding deadlines.
pub trait Prioritize<Req>: Clone + Send + Sync + 'static {
    /// The request's priority; never fails (fall back to [`Priority::DEFAULT`]).
    fn priority(&self, request: &Req) -> Priority;
}

/// Every request has the same priority ([`Priority::DEFAULT`] unless built with another).
#[derive(Debug, Clone, Copy, Default)]
pub struct Uniform(pub Priority);

impl<Req> Prioritize<Req> for Uniform {
    #[inline]
    fn priority(&self, _request: &Req) -> Priority {
        self.0
    }
}

impl<F, Req> Prioritize<Req> for F
where
    F: Fn(&Req) -> Priority + Clone + Send + Sync + 'static,
{
    fn priority(&self, request: &Req) -> Priority {
        self(request)
    }
}

#[cfg(feature = "http")]
pub use self::http_impl::{HeaderPriority, PRIORITY_HEADER};

#[cfg(feature = "http")]
mod http_impl {
    use std::fmt;
    use std::sync::Arc;

    use http::header::HeaderName;

    use super::{Prioritize, Priority};

    /// The default priority header, the same the simulator sends: `x-priority: critical_plus | critical |
    /// sheddable_plus | sheddable`.
    pub const PRIORITY_HEADER: &str = "x-priority";

    type Extract = Arc<dyn Fn(&http::Extensions) -> Option<Priority> + Send + Sync>;

    /// Reads an HTTP request's priority from, in order: a [`Priority`] request extension, the user's extractor
    /// (see [`HeaderPriority::extractor`]), the priority header; absent or malformed gives the default level.
    #[derive(Clone)]
    pub struct HeaderPriority {
        header: HeaderName,
        extract: Option<Extract>,
        default: Priority,
    }

    impl HeaderPriority {
        /// Reads `header` (e.g. `"x-priority"`).
        pub fn new(header: HeaderName) -> Self {
            HeaderPriority {
                header,
                extract: None,
                default: Priority::DEFAULT,
            }
        }

        /// Also asks `extract` (e.g. reading an authenticated user's tier from an extension an earlier layer
        /// inserted); `None` from it falls through to the header.
        #[must_use]
        pub fn extractor<F>(mut self, extract: F) -> Self
        where
            F: Fn(&http::Extensions) -> Option<Priority> + Send + Sync + 'static,
        {
            self.extract = Some(Arc::new(extract));
            self
        }

        /// The level of requests with no valid priority (default [`Priority::Critical`]).
        #[must_use]
        pub fn default_priority(mut self, priority: Priority) -> Self {
            self.default = priority;
            self
        }
    }

    impl Default for HeaderPriority {
        fn default() -> Self {
            HeaderPriority::new(HeaderName::from_static(PRIORITY_HEADER))
        }
    }

    impl fmt::Debug for HeaderPriority {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("HeaderPriority")
                .field("header", &self.header)
                .field("extractor", &self.extract.is_some())
                .field("default", &self.default)
                .finish()
        }
    }

    impl<B> Prioritize<http::Request<B>> for HeaderPriority {
        fn priority(&self, request: &http::Request<B>) -> Priority {
            let extensions = request.extensions();
            if let Some(p) = extensions.get::<Priority>() {
                return *p;
            }
            if let Some(p) = self.extract.as_ref().and_then(|f| f(extensions)) {
                return p;
            }
            request
                .headers()
                .get(&self.header)
                .and_then(|v| Priority::parse(v.as_bytes()))
                .unwrap_or(self.default)
        }
    }
}
