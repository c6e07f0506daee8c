use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use tower_layer::Layer;

use crate::core::{AnyOk, ConfigError, ErrorMode, Observer};
#[cfg(feature = "grpc")]
use crate::core::{GrpcClassifier, GrpcMode};
#[cfg(feature = "http")]
use crate::core::{HttpMode, HttpStatus};

use super::future::PolicyMode;
use super::reject::valid_policy_name;
use super::service::{Shared, Stats};
use super::{Global, Policy, RateLimit};

const LAYER: &str = "rate limit";
const DEFAULT_MAX_KEYS: usize = 100_000;

/// Builds a [`RateLimitLayer`]; start with [`RateLimitLayer::builder`].
pub struct RateLimitLayerBuilder<K = Global, C = AnyOk, M = ErrorMode, O = ()> {
    key: K,
    keyed: bool,
    classify: C,
    mode: M,
    observer: O,
    settings: Settings,
}

/// The builder's settings that no type parameter depends on, moved whole by the type-changing setters.
#[derive(Debug, Clone, Copy)]
struct Settings {
    rate: Option<(u32, Duration)>,
    burst: Option<u32>,
    max_keys: usize,
    policy_name: &'static str,
}

impl RateLimitLayerBuilder {
    fn new() -> Self {
        RateLimitLayerBuilder {
            key: Global,
            keyed: false,
            classify: AnyOk,
            mode: ErrorMode,
            observer: (),
            settings: Settings {
                rate: None,
                burst: None,
                max_keys: DEFAULT_MAX_KEYS,
                policy_name: "default",
            },
        }
    }
}

impl<K, C, M, O> RateLimitLayerBuilder<K, C, M, O> {
    /// Allows `requests` per `per` on average, spaced evenly (one every `per / requests`). Required.
    ///
    /// The spacing is kept in whole nanoseconds, rounded up: a limit never admits more than `requests` in any
    /// `per`, but one whose spacing is not a whole number of nanoseconds is enforced slightly below the rate
    /// asked for (`rate(3, Duration::from_secs(1))` spaces requests 333 333 334 ns apart; 600 million per second,
    /// 1.67 ns apart, becomes one every 2 ns: 500 million per second). More than one request per nanosecond is
    /// refused by [`build`](Self::build).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::rate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder().rate(100, Duration::from_secs(1)).build().unwrap();
    /// assert_eq!(layer.policy().quota(), 100);
    /// ```
    #[must_use]
    pub fn rate(mut self, requests: u32, per: Duration) -> Self {
        self.settings.rate = Some((requests, per));
        self
    }

    /// How many requests may arrive at once after a quiet spell (default: the `requests` of [`rate`](Self::rate),
    /// a full period's worth). A burst of 1 spaces every request out.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::rate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .rate(10, Duration::from_secs(1))
    ///     .burst(50)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!((layer.policy().quota(), layer.policy().window_secs()), (50, 5));
    /// ```
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.settings.burst = Some(burst);
        self
    }

    /// Gives each key its own budget (see [`KeyExtractor`](super::KeyExtractor)). Without it, one budget is
    /// shared by every request.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::rate::RateLimitLayer;
    ///
    /// struct Job {
    ///     tenant: u32,
    /// }
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .rate(5, Duration::from_secs(1))
    ///     .key(|job: &Job| Some(job.tenant))
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    #[must_use]
    pub fn key<K2>(self, key: K2) -> RateLimitLayerBuilder<K2, C, M, O> {
        RateLimitLayerBuilder {
            key,
            keyed: true,
            classify: self.classify,
            mode: self.mode,
            observer: self.observer,
            settings: self.settings,
        }
    }

    /// The most keys tracked at once (default 100 000; about 95 bytes per key whatever its size, so under
    /// 10 MB). No key is forgotten while fewer are tracked. When full, a new key takes the place of one not seen
    /// lately, preferring one whose budget has refilled (forgetting it loses nothing); a key forgotten while
    /// still limited starts with a full burst if it comes back. Set it above the number of clients active within
    /// one window, so only idle clients are forgotten.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::rate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .rate(5, Duration::from_secs(1))
    ///     .key(|user: &u64| Some(*user))
    ///     .max_keys(10_000)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.handle().snapshot().max_keys, Some(10_000));
    /// ```
    #[must_use]
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.settings.max_keys = max_keys;
        self
    }

    /// The policy name in the `RateLimit` and `RateLimit-Policy` headers (default `"default"`): printable ASCII
    /// without `"` or `\`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::rate::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .rate(5, Duration::from_secs(1))
    ///     .policy_name("per-ip")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.policy().name(), "per-ip");
    /// ```
    #[must_use]
    pub fn policy_name(mut self, name: &'static str) -> Self {
        self.settings.policy_name = name;
        self
    }

    /// How admitted calls' results are classified (default [`AnyOk`]). The rate limiter holds no permits, so
    /// the classifier only shapes the response type (HTTP and gRPC classifiers wrap the body).
    #[must_use]
    pub fn classifier<C2>(self, classify: C2) -> RateLimitLayerBuilder<K, C2, M, O> {
        RateLimitLayerBuilder {
            key: self.key,
            keyed: self.keyed,
            classify,
            mode: self.mode,
            observer: self.observer,
            settings: self.settings,
        }
    }

    /// How rejections leave the layer (default [`ErrorMode`]). The mode must implement
    /// [`RateLimitReject`](super::RateLimitReject).
    #[must_use]
    pub fn reject_mode<M2>(self, mode: M2) -> RateLimitLayerBuilder<K, C, M2, O> {
        RateLimitLayerBuilder {
            key: self.key,
            keyed: self.keyed,
            classify: self.classify,
            mode,
            observer: self.observer,
            settings: self.settings,
        }
    }

    /// Receives an [`Event::Rejected`](crate::core::Event::Rejected) (layer `"rate"`) for each refused request.
    #[must_use]
    pub fn observer<O2>(self, observer: O2) -> RateLimitLayerBuilder<K, C, M, O2> {
        RateLimitLayerBuilder {
            key: self.key,
            keyed: self.keyed,
            classify: self.classify,
            mode: self.mode,
            observer,
            settings: self.settings,
        }
    }

    /// HTTP services: [`HttpStatus`] and [`HttpMode`] (429 with `Retry-After`, `RateLimit`, `RateLimit-Policy`).
    #[cfg(feature = "http")]
    #[must_use]
    pub fn http(self) -> RateLimitLayerBuilder<K, HttpStatus, HttpMode, O> {
        self.classifier(HttpStatus::new()).reject_mode(HttpMode)
    }

    /// gRPC services: [`GrpcClassifier`] and [`GrpcMode`] (RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`).
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(self) -> RateLimitLayerBuilder<K, GrpcClassifier, GrpcMode, O> {
        self.classifier(GrpcClassifier::new()).reject_mode(GrpcMode)
    }

    /// Checks the configuration and builds the layer.
    ///
    /// Errors: no [`rate`](Self::rate), zero requests or period, more than one request per nanosecond, a zero
    /// burst, a burst window beyond a century, a zero `max_keys` (keyed), an invalid policy name.
    pub fn build(self) -> Result<RateLimitLayer<K, C, M, O>, ConfigError>
    where
        O: Observer,
    {
        let (requests, per) = self.settings.rate.ok_or_else(|| {
            ConfigError::new(
                LAYER,
                "rate",
                "must be set, e.g. .rate(100, Duration::from_secs(1))",
            )
        })?;
        if requests == 0 {
            return Err(ConfigError::new(
                LAYER,
                "rate",
                "requests must be at least 1",
            ));
        }
        if per.is_zero() {
            return Err(ConfigError::new(
                LAYER,
                "rate",
                "period must be longer than zero",
            ));
        }
        if per.as_nanos() < u128::from(requests) {
            return Err(ConfigError::new(
                LAYER,
                "rate",
                "more than one request per nanosecond",
            ));
        }
        let interval = interval_rounded_up(per, requests);
        let burst = self.settings.burst.unwrap_or(requests);
        let burst = NonZeroU32::new(burst)
            .ok_or_else(|| ConfigError::new(LAYER, "burst", "must be at least 1"))?;
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        if interval
            .checked_mul(burst.get())
            .is_none_or(|w| w > CENTURY)
        {
            return Err(ConfigError::new(
                LAYER,
                "burst",
                "burst times interval must stay below a century",
            ));
        }
        if self.keyed
            && (self.settings.max_keys == 0 || u32::try_from(self.settings.max_keys).is_err())
        {
            return Err(ConfigError::new(
                LAYER,
                "max_keys",
                format!(
                    "must be between 1 and {} (got {})",
                    u32::MAX,
                    self.settings.max_keys
                ),
            ));
        }
        if !valid_policy_name(self.settings.policy_name) {
            return Err(ConfigError::new(
                LAYER,
                "policy_name",
                "must be non-empty printable ASCII without '\"' or '\\'",
            ));
        }
        let quota = Quota::with_period(interval)
            .ok_or_else(|| ConfigError::new(LAYER, "rate", "interval must be longer than zero"))?
            .allow_burst(burst);
        let policy = Policy::new(self.settings.policy_name, burst.get(), interval);
        let max_keys = self.keyed.then_some(self.settings.max_keys);
        Ok(RateLimitLayer {
            key: self.key,
            classify: self.classify,
            mode: PolicyMode::new(self.mode, policy),
            shared: Arc::new(Shared::new(quota, max_keys, self.observer)),
        })
    }
}

/// `per / requests` rounded up to whole nanoseconds (`Duration`'s division truncates, which would admit more than
/// `requests` per `per`).
fn interval_rounded_up(per: Duration, requests: u32) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let nanos = per.as_nanos().div_ceil(u128::from(requests));
    // At most `per`'s nanoseconds, so the seconds fit in a `u64` as `per`'s do.
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
}

impl<K, C, M, O> fmt::Debug for RateLimitLayerBuilder<K, C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("rate", &self.settings.rate)
            .field("burst", &self.settings.burst)
            .field("keyed", &self.keyed)
            .field("max_keys", &self.settings.max_keys)
            .field("policy_name", &self.settings.policy_name)
            .finish_non_exhaustive()
    }
}

/// Applies a GCRA rate limit, global or keyed, shared by every service this layer (and its clones) creates.
///
/// See the [module docs](super) for the why and an example.
pub struct RateLimitLayer<K = Global, C = AnyOk, M = ErrorMode, O = ()> {
    key: K,
    classify: C,
    mode: PolicyMode<M>,
    shared: Arc<Shared<O>>,
}

impl RateLimitLayer {
    /// A builder with one global budget, [`AnyOk`], [`ErrorMode`] and no observer; set at least
    /// [`rate`](RateLimitLayerBuilder::rate).
    pub fn builder() -> RateLimitLayerBuilder {
        RateLimitLayerBuilder::new()
    }
}

impl<K, C, M, O: Observer> RateLimitLayer<K, C, M, O> {
    /// A handle on the shared state, for snapshots.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            stats: self.shared.clone(),
        }
    }
}

impl<K, C, M, O> RateLimitLayer<K, C, M, O> {
    /// The advertised policy.
    pub fn policy(&self) -> &Policy {
        self.mode.policy()
    }
}

impl<K: Clone, C: Clone, M: Clone, O> Clone for RateLimitLayer<K, C, M, O> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            key: self.key.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, K: Clone, C: Clone, M: Clone, O> Layer<S> for RateLimitLayer<K, C, M, O> {
    type Service = RateLimit<S, K, C, M, O>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(
            inner,
            self.key.clone(),
            self.classify.clone(),
            self.mode.clone(),
            self.shared.clone(),
        )
    }
}

impl<K, C, M, O> fmt::Debug for RateLimitLayer<K, C, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("policy", self.mode.policy())
            .field("keyed", &self.shared.is_keyed())
            .finish_non_exhaustive()
    }
}

/// A cheap cloneable handle on a rate limit's shared state.
#[derive(Clone)]
pub struct RateLimitHandle {
    stats: Arc<dyn Stats>,
}

impl RateLimitHandle {
    /// The current figures.
    pub fn snapshot(&self) -> RateLimitSnapshot {
        let (admitted, rejected) = self.stats.counts();
        RateLimitSnapshot {
            admitted,
            rejected,
            tracked_keys: self.stats.tracked_keys(),
            max_keys: self.stats.max_keys(),
        }
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// A rate limit's figures at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitSnapshot {
    /// Requests let through so far.
    pub admitted: u64,
    /// Requests refused so far.
    pub rejected: u64,
    /// Keys tracked now (0 for a global limit).
    pub tracked_keys: usize,
    /// The cap on tracked keys (`None` for a global limit).
    pub max_keys: Option<usize>,
}
