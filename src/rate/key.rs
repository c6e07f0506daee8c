//! Which budget a request draws from.

use std::hash::Hash;
#[cfg(feature = "http")]
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Picks the budget a request draws from: the key of a keyed rate limit.
///
/// Requests with equal keys share one budget. `None` means the request carries no key (no peer address, no
/// such header): all such requests share one extra budget of their own, so leaving the key out is never a way
/// around the limit.
///
/// Implemented by [`Global`] (one budget for everything), [`PeerIp`] and [`HeaderKey`] (feature `http`), and by
/// any closure `Fn(&Req) -> Option<T>` with `T: Hash`:
///
/// ```
/// use tower_backpressure::rate::KeyExtractor;
///
/// struct Job {
///     tenant: u32,
/// }
///
/// let by_tenant = |job: &Job| Some(job.tenant);
/// assert_eq!(by_tenant.extract(&Job { tenant: 7 }), Some(7));
/// ```
///
/// Keys are not stored: the limiter keeps a keyed 64-bit SipHash of each, so every tracked key costs the same
/// few bytes however long it is, and clients cannot aim collisions at one another.
pub trait KeyExtractor<Req>: Clone + Send + Sync + 'static {
    /// The key.
    type Key: Hash;

    /// The key of `request`, or `None` when it has none.
    fn extract(&self, request: &Req) -> Option<Self::Key>;
}

impl<F, Req, T> KeyExtractor<Req> for F
where
    F: Fn(&Req) -> Option<T> + Clone + Send + Sync + 'static,
    T: Hash,
{
    type Key = T;

    fn extract(&self, request: &Req) -> Option<T> {
        self(request)
    }
}

/// One budget shared by every request: the default. Served by a single lock-free GCRA cell.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl<Req> KeyExtractor<Req> for Global {
    type Key = ();

    fn extract(&self, _request: &Req) -> Option<()> {
        Some(())
    }
}

/// One budget per client IP address, from the connection's peer address.
///
/// The address is read from the request extensions: a [`SocketAddr`] (insert it yourself in a hyper service),
/// or, with feature `axum`, axum's `ConnectInfo<SocketAddr>` (serve the router with
/// `into_make_service_with_connect_info::<SocketAddr>()`). The port is ignored, and IPv4-mapped IPv6 addresses
/// count as their IPv4 address. Requests without either extension share one budget.
///
/// This is the address of whoever opened the TCP connection: behind a reverse proxy or load balancer that is
/// the proxy, and every client shares its budget. See the [module docs](super#behind-a-reverse-proxy) before
/// reaching for `X-Forwarded-For`.
///
/// ```
/// use std::net::SocketAddr;
/// use tower_backpressure::rate::{KeyExtractor, PeerIp};
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert("[2001:db8::1:2]:4000".parse::<SocketAddr>().unwrap());
///
/// // One IPv6 client usually owns a whole /64: limit the prefix, not each address in it.
/// let key = PeerIp::new().ipv6_prefix(64);
/// assert_eq!(key.extract(&request), Some("2001:db8::".parse().unwrap()));
/// ```
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy)]
pub struct PeerIp {
    ipv6_prefix: u8,
}

#[cfg(feature = "http")]
impl Default for PeerIp {
    fn default() -> Self {
        PeerIp { ipv6_prefix: 128 }
    }
}

#[cfg(feature = "http")]
impl PeerIp {
    /// Keys by the full peer address.
    pub fn new() -> Self {
        PeerIp::default()
    }

    /// Keys IPv6 peers by their first `bits` bits (values above 128 mean 128). Providers hand a customer a /64
    /// or more, so per-address keys let one client spread over billions of budgets; `64` is the usual choice.
    #[must_use]
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.min(128);
        self
    }

    fn key(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) if self.ipv6_prefix < 128 => {
                let mask = u128::MAX
                    .checked_shl(u32::from(128 - self.ipv6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            other => other,
        }
    }
}

#[cfg(feature = "http")]
impl<B> KeyExtractor<http::Request<B>> for PeerIp {
    type Key = IpAddr;

    fn extract(&self, request: &http::Request<B>) -> Option<IpAddr> {
        let extensions = request.extensions();
        #[cfg(feature = "axum")]
        if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
            return Some(self.key(info.0.ip()));
        }
        extensions
            .get::<SocketAddr>()
            .map(|addr| self.key(addr.ip()))
    }
}

/// One budget per value of a request header, such as an API key. Requests without the header share one budget.
///
/// Only use a header your own infrastructure sets or verifies: a client choosing its own key gets as many
/// budgets as it likes (the cap on tracked keys keeps that from costing memory, not from costing the limit).
///
/// ```
/// use tower_backpressure::rate::{HeaderKey, KeyExtractor};
///
/// let key = HeaderKey::new(http::HeaderName::from_static("x-api-key"));
/// let request = http::Request::builder().header("x-api-key", "k-123").body(()).unwrap();
/// assert_eq!(key.extract(&request), Some(http::HeaderValue::from_static("k-123")));
/// ```
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: http::HeaderName,
}

#[cfg(feature = "http")]
impl HeaderKey {
    /// Keys by the value of header `name`.
    pub fn new(name: http::HeaderName) -> Self {
        HeaderKey { name }
    }
}

#[cfg(feature = "http")]
impl<B> KeyExtractor<http::Request<B>> for HeaderKey {
    type Key = http::HeaderValue;

    fn extract(&self, request: &http::Request<B>) -> Option<http::HeaderValue> {
        request.headers().get(&self.name).cloned()
    }
}

#[cfg(all(test, feature = "http"))]
mod tests {
    use super::*;

    fn with_peer(addr: &str) -> http::Request<()> {
        let mut request = http::Request::new(());
        request
            .extensions_mut()
            .insert(addr.parse::<SocketAddr>().unwrap());
        request
    }

    #[test]
    fn peer_ip_ignores_the_port_and_unmaps_ipv4() {
        let key = PeerIp::new();
        let a = key.extract(&with_peer("10.0.0.1:1000"));
        assert_eq!(a, key.extract(&with_peer("10.0.0.1:2000")));
        assert_eq!(a, key.extract(&with_peer("[::ffff:10.0.0.1]:3000")));
        assert_ne!(a, key.extract(&with_peer("10.0.0.2:1000")));
        assert_eq!(key.extract(&http::Request::new(())), None);
    }

    #[test]
    fn ipv6_prefix_groups_a_subnet() {
        let key = PeerIp::new().ipv6_prefix(64);
        let a = key.extract(&with_peer("[2001:db8:0:1::1]:1"));
        assert_eq!(a, key.extract(&with_peer("[2001:db8:0:1:ffff::9]:1")));
        assert_ne!(a, key.extract(&with_peer("[2001:db8:0:2::1]:1")));
        assert_eq!(
            PeerIp::new()
                .ipv6_prefix(0)
                .extract(&with_peer("[2001:db8::1]:1")),
            Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        );
    }

    #[cfg(feature = "axum")]
    #[test]
    fn peer_ip_reads_axum_connect_info() {
        let mut request = http::Request::new(());
        let addr: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(addr));
        assert_eq!(PeerIp::new().extract(&request), Some(addr.ip()));
    }
}
