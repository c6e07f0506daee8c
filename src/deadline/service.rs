//! The services.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use tokio::time::Instant;
use tower_service::Service;

use super::codec::{
    decode_grpc_timeout, decode_timeout_ms, encode_grpc_timeout, encode_timeout_ms, Digits,
    InvalidTimeout, GRPC_TIMEOUT_HEADER,
};
use super::future::{PropagateFuture, ResponseFuture};
use super::layer::{ClientConfig, ServerConfig};
use super::mode::{BoundResponse, RejectInvalid};
use super::shared::Shared;
use crate::core::{Classify, Deadline, Instance, Observer, Permit, RejectMode};

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static(GRPC_TIMEOUT_HEADER);

/// The service made by [`DeadlineLayer`](super::DeadlineLayer).
pub struct DeadlineService<S, C, M, O> {
    inner: S,
    shared: Instance<Shared<ServerConfig, O>>,
    classify: C,
    mode: M,
}

impl<S, C, M, O> DeadlineService<S, C, M, O> {
    pub(super) fn new(
        inner: S,
        shared: Instance<Shared<ServerConfig, O>>,
        classify: C,
        mode: M,
    ) -> Self {
        DeadlineService {
            inner,
            shared,
            classify,
            mode,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, C: Clone, M: Clone, O> Clone for DeadlineService<S, C, M, O> {
    fn clone(&self) -> Self {
        DeadlineService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<S: fmt::Debug, C, M, O> fmt::Debug for DeadlineService<S, C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineService")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

/// Puts `deadline` in the request's extensions: over one the request brought, always (in place, no allocation;
/// that one is never earlier), so that `Deadline::of` finds no later deadline than the one in force; as a new
/// entry only if `insert`, since the first extension of a request allocates the map, its table and the entry.
///
/// Inline: for a request without extensions (the common case) it is a test or two, and the compiler had taken it
/// out of line, at a call and about 20 instructions a request.
#[inline]
fn store<B>(request: &mut Request<B>, deadline: Deadline, insert: bool) {
    match request.extensions_mut().get_mut::<Deadline>() {
        Some(slot) => *slot = deadline,
        None if insert => {
            request.extensions_mut().insert(deadline);
        }
        None => {}
    }
}

/// Counts a request admitted under a deadline and makes its permit (timed only for an observer that wants
/// latencies).
#[inline(always)]
fn admit<K, O>(shared: &mut Instance<Shared<K, O>>, now: Instant) -> Permit
where
    K: Send + Sync + 'static,
    O: Observer,
{
    let (shared, releaser) = shared.next();
    let permit = shared.permit(releaser, now);
    shared.admitted(&permit);
    permit
}

/// Up to this many distinct header names, [`carried`] compares each with ours instead of looking ours up.
const SCAN_UP_TO: usize = 16;

/// Whether the request may carry `grpc-timeout` (looked for if `grpc`) and the millisecond header `ms`.
///
/// A look-up in the map hashes the name it looks for a byte at a time (FNV) before it probes: for our two custom
/// names (12 and 20 bytes) about 280 instructions a request, whether the request carries a timeout or not. A
/// request's few header names are mostly standard ones, which compare unequal to a custom name on their
/// representation alone, and custom ones, which compare unequal by length unless they are ours; so for up to
/// [`SCAN_UP_TO`] names one pass over them tells which look-ups are worth making. Larger maps are looked up.
#[inline(always)]
fn carried(headers: &HeaderMap, grpc: bool, ms: Option<&HeaderName>) -> (bool, bool) {
    if headers.keys_len() > SCAN_UP_TO {
        return (grpc, ms.is_some());
    }
    let (mut has_grpc, mut has_ms) = (false, false);
    for name in headers.keys() {
        // Compared whether or not it is read: a test per name costs the default (it is read) more than the
        // comparison saves the rare layer that does not read it.
        has_grpc |= *name == GRPC_TIMEOUT;
        has_ms |= ms == Some(name);
    }
    (grpc && has_grpc, has_ms)
}

/// How a timeout header's value is read.
type Decode = fn(&[u8]) -> Result<Duration, InvalidTimeout>;

/// The smallest valid timeout among the configured headers, and the first malformed one.
#[inline(always)]
fn read_timeout(
    headers: &HeaderMap,
    config: &ServerConfig,
) -> (Option<Duration>, Option<InvalidTimeout>) {
    let (grpc, ms) = carried(
        headers,
        config.read_grpc_timeout,
        config.timeout_header.as_ref(),
    );
    let mut timeout = None;
    let mut invalid = None;
    if grpc {
        read_values(
            headers,
            &GRPC_TIMEOUT,
            decode_grpc_timeout,
            config.strict,
            (&mut timeout, &mut invalid),
        );
    }
    if let (true, Some(name)) = (ms, &config.timeout_header) {
        read_values(
            headers,
            name,
            decode_timeout_ms,
            config.strict,
            (&mut timeout, &mut invalid),
        );
    }
    (timeout, invalid)
}

/// Reads every value of the header `name` into the smallest valid timeout so far and the first malformed value.
///
/// Every value, not the first: a proxy may append its own shorter timeout after the caller's, and implementations
/// disagree on which of several values they read (tonic the first, grpc-go the last), so the budget in force is the
/// smallest of them. A malformed value among them is reported (skipped, or refused in strict mode) as a malformed
/// header is.
#[inline(always)]
fn read_values(
    headers: &HeaderMap,
    name: &HeaderName,
    decode: Decode,
    strict: bool,
    (timeout, invalid): (&mut Option<Duration>, &mut Option<InvalidTimeout>),
) {
    for value in headers.get_all(name) {
        match decode(value.as_bytes()) {
            Ok(t) => *timeout = Some(timeout.map_or(t, |old: Duration| old.min(t))),
            Err(e) => {
                let e = malformed(name, e, strict);
                invalid.get_or_insert(e);
            }
        }
    }
}

/// Reports a malformed timeout header with a `tracing` event, and hands the error back.
#[cold]
fn malformed(name: &HeaderName, error: InvalidTimeout, strict: bool) -> InvalidTimeout {
    tracing::debug!(
        target: "tower_backpressure",
        layer = "deadline",
        header = name.as_str(),
        error = %error,
        strict,
        "malformed timeout header"
    );
    error
}

impl<S, B, C, M, O> Service<Request<B>> for DeadlineService<S, C, M, O>
where
    S: Service<Request<B>>,
    C: Classify<M::Bounded, S::Error>,
    M: BoundResponse<S::Response> + RejectInvalid<C::Response, S::Error>,
    O: Observer,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.mode.inner_error(e))
    }

    // Inline: out of line, whether the compiler copies the request (224 bytes in the benchmark) on its way to the
    // inner service depends on how the crate is split into codegen units, not on this code (docs/PERFORMANCE.md,
    // "Stop 30"); inlined into the caller, it is not copied.
    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let config = &self.shared.config;
        let (header, invalid) = read_timeout(request.headers(), config);
        if let Some(error) = invalid {
            self.shared.invalid();
            if config.strict {
                return ResponseFuture::invalid(error, self.mode.clone());
            }
        }
        // The deadline already set (in the extensions, or current), and the smaller of the header's budget and
        // the layer's maximum. With neither, the clock is not read.
        let found = Deadline::find(&request);
        let budget = match (header, config.max_timeout) {
            (Some(header), Some(max)) => Some(header.min(max)),
            (header, max) => header.or(max),
        };
        let timed = (budget.is_some() || found.is_some()).then(|| {
            let now = Instant::now();
            // A budget too large to add to the clock is no constraint at all, not an error.
            let from_budget = budget.and_then(|b| now.checked_add(b)).map(Deadline::at);
            (Deadline::earlier(found, from_budget), now)
        });
        let admitted = match timed {
            Some((Some(deadline), now)) => {
                // With no minimum budget (the default) only an expired deadline is refused, which one comparison
                // tells.
                let doomed = deadline.instant() <= now
                    || (!config.min_budget.is_zero()
                        && deadline.remaining_at(now) < config.min_budget);
                if doomed {
                    self.shared.rejected();
                    return ResponseFuture::rejected(self.mode.clone());
                }
                // `deadline` already takes the current one into account.
                store(&mut request, deadline, config.extension);
                let permit = admit(&mut self.shared, now);
                Some((deadline, permit, deadline.enter_call(now)))
            }
            _ => None,
        };
        // One call site, with or without a deadline, and no helper taking the request as a parameter: each such
        // hand-over may copy its few hundred bytes. The compiler may still copy it once on its way in; whether it
        // does depends on the build, not on this code (docs/PERFORMANCE.md, "Stop 21").
        let inner = self.inner.call(request);
        match admitted {
            None => ResponseFuture::passthrough(inner, self.classify.clone(), self.mode.clone()),
            Some((deadline, permit, call)) => {
                // The inner `call` is over: the deadline and the clock reading stop being current.
                drop(call);
                ResponseFuture::running(
                    inner,
                    deadline,
                    permit,
                    self.classify.clone(),
                    self.mode.clone(),
                )
            }
        }
    }
}

/// The service made by [`PropagateDeadlineLayer`](super::PropagateDeadlineLayer).
pub struct PropagateDeadline<S, C, M, O> {
    inner: S,
    shared: Instance<Shared<ClientConfig, O>>,
    classify: C,
    mode: M,
}

impl<S, C, M, O> PropagateDeadline<S, C, M, O> {
    pub(super) fn new(
        inner: S,
        shared: Instance<Shared<ClientConfig, O>>,
        classify: C,
        mode: M,
    ) -> Self {
        PropagateDeadline {
            inner,
            shared,
            classify,
            mode,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, C: Clone, M: Clone, O> Clone for PropagateDeadline<S, C, M, O> {
    fn clone(&self) -> Self {
        PropagateDeadline {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<S: fmt::Debug, C, M, O> fmt::Debug for PropagateDeadline<S, C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateDeadline")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

/// The smallest valid value the caller set in the header `name`, if it is no more than `budget`; the header is then
/// left carrying that value alone. Other values, larger or malformed, go: a next hop may read any one of them (tonic
/// reads the first, grpc-go the last), and none may give it more than the budget.
fn keep_smaller(
    headers: &mut HeaderMap,
    name: &HeaderName,
    decode: Decode,
    budget: Duration,
) -> Option<Duration> {
    let mut values = 0;
    let mut smallest: Option<(Duration, &HeaderValue)> = None;
    for value in headers.get_all(name) {
        values += 1;
        if let Ok(t) = decode(value.as_bytes()) {
            if smallest.is_none_or(|(least, _)| t < least) {
                smallest = Some((t, value));
            }
        }
    }
    let (timeout, value) = smallest.filter(|&(t, _)| t <= budget)?;
    if values > 1 {
        let value = value.clone();
        headers.insert(name.clone(), value);
    }
    Some(timeout)
}

/// Writes `budget` into the outgoing headers, keeping a valid value the caller set that is already smaller (and only
/// that one).
///
/// Returns the smallest timeout the written headers now carry, which is what a transport enforcing them (a tonic
/// `Channel`) will time out after: the encoding may round the budget down, and a caller's value may be smaller.
/// `None` when the layer writes no header: then no next hop or transport has been given a budget to enforce.
fn write_timeout(
    headers: &mut HeaderMap,
    config: &ClientConfig,
    budget: Duration,
) -> Option<Duration> {
    if !config.write_grpc_timeout && config.timeout_header.is_none() {
        return None;
    }
    let mut sent = budget;
    if config.write_grpc_timeout {
        let smaller_set = keep_smaller(headers, &GRPC_TIMEOUT, decode_grpc_timeout, budget);
        match smaller_set {
            Some(t) => sent = sent.min(t),
            None => {
                let encoded = encode_grpc_timeout(budget);
                // Digits and a unit letter always make a valid header value.
                if let Ok(value) = HeaderValue::from_bytes(encoded.as_bytes()) {
                    headers.insert(GRPC_TIMEOUT.clone(), value);
                    sent = sent.min(encoded.duration());
                }
            }
        }
    }
    if let Some(name) = &config.timeout_header {
        let smaller_set = keep_smaller(headers, name, decode_timeout_ms, budget);
        match smaller_set {
            Some(t) => sent = sent.min(t),
            None => {
                let millis = encode_timeout_ms(budget);
                // Digits always make a valid header value.
                if let Ok(value) = HeaderValue::from_bytes(Digits::new(millis).as_bytes()) {
                    headers.insert(name.clone(), value);
                    sent = sent.min(Duration::from_millis(millis));
                }
            }
        }
    }
    Some(sent)
}

impl<S, B, C, M, O> Service<Request<B>> for PropagateDeadline<S, C, M, O>
where
    S: Service<Request<B>>,
    C: Classify<M::Bounded, S::Error>,
    M: BoundResponse<S::Response> + RejectMode<C::Response, S::Error>,
    O: Observer,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = PropagateFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.mode.inner_error(e))
    }

    // Inline: out of line, whether the compiler copies the request (224 bytes in the benchmark) on its way to the
    // inner service depends on how the crate is split into codegen units, not on this code (docs/PERFORMANCE.md,
    // "Stop 30"); inlined into the caller, it is not copied.
    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(deadline) = Deadline::find(&request) else {
            return PropagateFuture::passthrough(
                self.inner.call(request),
                self.classify.clone(),
                self.mode.clone(),
            );
        };
        let now = Instant::now();
        let budget = deadline
            .remaining_at(now)
            .saturating_sub(self.shared.config.margin);
        let config = &self.shared.config;
        let sent = write_timeout(request.headers_mut(), config, budget);
        if sent.unwrap_or(budget).is_zero() {
            // Nothing left after the margin, or the headers would tell the next hop that its budget is spent (the
            // millisecond header truncates a budget under a millisecond to 0; a caller may have set 0): fail here
            // and send nothing, rather than have the next hop refuse it on arrival. (`sent` is never more than
            // `budget`.)
            self.shared.rejected();
            return PropagateFuture::rejected(self.mode.clone());
        }
        // A queue below sheds a request that cannot finish in time: it finds the deadline as the current one
        // during its `call` (and in the extensions, if stored there). `find` took the earlier of the two.
        store(&mut request, deadline, config.extension);
        let permit = admit(&mut self.shared, now);
        let inner = {
            let _call = deadline.enter_call(now);
            self.inner.call(request)
        };
        PropagateFuture::running(
            inner,
            deadline,
            permit,
            self.classify.clone(),
            self.mode.clone(),
            // With no header written nobody below enforces a budget of ours: an error before the deadline is the
            // inner service's own, not an expiry.
            sent.map(|sent| now + sent),
        )
    }
}
