//! Rate limiting: a GCRA limit (governor) on requests, for everyone at once or per client.
//!
//! # Why
//!
//! Concurrency limits protect a service from its own slowness; a rate limit protects it, and its other
//! clients, from one caller sending too much. This layer refuses requests beyond `rate` per period (with a
//! `burst` allowance) at once, with a precise retry hint, instead of letting them queue.
//!
//! # How it differs from `tower::limit::RateLimit`
//!
//! - **One budget per layer, shared by every clone.** tower's limiter keeps its budget in each service the layer
//!   creates; axum, hyper and tonic make one per route or connection (and tower's is not `Clone`, so it ends up
//!   behind a `Buffer`), so the configured rate silently multiplies. Here the state lives in the layer: every
//!   service it creates, and every clone of those, draws from the same budget.
//! - **Refuses in `call`, never waits in `poll_ready`.** tower's limiter makes callers wait for the next slot,
//!   which under axum turns into an unbounded queue of held connections. This one answers at once: an error in
//!   [`ErrorMode`](crate::core::ErrorMode) (`core::error::RateLimited`), a 429 in `.http()`, RESOURCE_EXHAUSTED
//!   in `.grpc()`.
//! - **Keyed, with bounded memory.** Per peer IP ([`PeerIp`]), per header ([`HeaderKey`]) or per anything a
//!   closure returns. At most [`max_keys`](RateLimitLayerBuilder::max_keys) keys are tracked, and none is
//!   forgotten below that; at the cap, a flood of distinct keys replaces keys not seen lately (first those whose
//!   budget has refilled) instead of growing memory (governor's own keyed maps grow until someone calls
//!   `retain_recent`).
//! - **Honest retry hints.** `Retry-After` is governor's wait rounded *up* to whole seconds, never `0` when a
//!   wait is needed (1.2 s gives `2`); gRPC gets `grpc-retry-pushback-ms`, also rounded up.
//! - **Standard headers.** HTTP rejections carry `RateLimit` and `RateLimit-Policy` as defined by
//!   [draft-ietf-httpapi-ratelimit-headers-10](https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/)
//!   (the two-field form with a quoted policy name, unchanged in -11), e.g.
//!   `RateLimit-Policy: "default";q=100;w=1` and `RateLimit: "default";r=0;t=1`. See [`Policy`] for how a GCRA
//!   limit maps onto `q` and `w`. Admitted responses are passed on untouched.
//! - **Paused-time friendly.** The limiter reads tokio's clock, so tests with `start_paused` and the simulator
//!   drive it deterministically.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_backpressure::core::error::RateLimited;
//! use tower_backpressure::rate::RateLimitLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // 2 requests per second, bursts of 2.
//! let layer = RateLimitLayer::builder().rate(2, Duration::from_secs(1)).build().unwrap();
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|n: u32| async move { Ok::<_, std::convert::Infallible>(n) }));
//!
//! assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
//! // A clone draws from the same budget.
//! let mut clone = svc.clone();
//! assert_eq!(clone.ready().await.unwrap().call(2).await.unwrap(), 2);
//!
//! let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
//! let limited = err.downcast_ref::<RateLimited>().unwrap();
//! assert_eq!(limited.retry_after(), Some(Duration::from_millis(500)));
//!
//! tokio::time::advance(Duration::from_millis(500)).await;
//! assert_eq!(svc.ready().await.unwrap().call(4).await.unwrap(), 4);
//! # }
//! ```
//!
//! For an HTTP server keyed by client address (with axum, serve the router with
//! `into_make_service_with_connect_info::<SocketAddr>()` so [`PeerIp`] finds the address):
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::time::Duration;
//! use tower_backpressure::rate::{PeerIp, RateLimitLayer};
//!
//! let layer = RateLimitLayer::builder()
//!     .rate(100, Duration::from_secs(60))
//!     .burst(20)
//!     .key(PeerIp::new().ipv6_prefix(64))
//!     .policy_name("per-ip")
//!     .http()
//!     .build()
//!     .expect("valid rate limit");
//! # drop(layer);
//! # }
//! ```
//!
//! # Behind a reverse proxy
//!
//! Behind a load balancer every connection comes from the proxy, so [`PeerIp`] puts all clients in one budget.
//! The client's address is then in `X-Forwarded-For` (or `Forwarded`), but **anyone can send that header**: a
//! client talking to you directly, or through a proxy that appends rather than replaces, can write any address
//! it likes there and get a fresh budget per request. That is why nothing here reads it by default.
//!
//! Trust it only for connections that come from proxies you run, and only the entries those proxies added:
//! take the peer address; if it is one of your proxies, walk `X-Forwarded-For` from the right, skipping your
//! own proxies' addresses, and use the first address that is not one of them. Anything left of that was
//! written by the client. A closure does it:
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::net::{IpAddr, SocketAddr};
//! use std::time::Duration;
//! use tower_backpressure::rate::{KeyExtractor, RateLimitLayer};
//!
//! // The addresses of *your* load balancers: only their connections may speak for a client.
//! const PROXIES: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 5))];
//!
//! fn client_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
//!     let peer = request.extensions().get::<SocketAddr>()?.ip();
//!     if !PROXIES.contains(&peer) {
//!         return Some(peer); // a direct connection: its forwarding headers are the client's own words
//!     }
//!     let forwarded = request.headers().get_all("x-forwarded-for").iter();
//!     let hops: Vec<&str> = forwarded
//!         .filter_map(|v| v.to_str().ok())
//!         .flat_map(|v| v.split(','))
//!         .collect();
//!     hops.iter()
//!         .rev()
//!         .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
//!         .find(|ip| !PROXIES.contains(ip))
//!         .or(Some(peer))
//! }
//!
//! let layer = RateLimitLayer::builder()
//!     .rate(10, Duration::from_secs(1))
//!     .key(client_ip::<()>)
//!     .build()
//!     .unwrap();
//!
//! let mut request = http::Request::builder()
//!     .header("x-forwarded-for", "6.6.6.6, 198.51.100.7")
//!     .body(())
//!     .unwrap();
//! request.extensions_mut().insert("10.0.0.5:443".parse::<SocketAddr>().unwrap());
//! // The proxy saw 198.51.100.7; "6.6.6.6" was written by the client and is ignored.
//! assert_eq!(client_ip(&request), Some("198.51.100.7".parse().unwrap()));
//! # drop(layer);
//! # }
//! ```
//!
//! If the proxy terminates all traffic (nothing reaches you directly) and replaces the header rather than
//! appending to it, reading the single address it sets is enough; check your proxy's documentation, since
//! defaults differ.
//!
//! # Costs
//!
//! A global limit is one compare-and-swap on an `AtomicU64` per request plus one clock read, with no lock and
//! no allocation (`tests/rate_alloc.rs` counts). A keyed limit hashes the key (SipHash with a per-layer random
//! seed, so clients cannot aim collisions) and takes a short lock on one of up to 16 shards (a new key, while the
//! store fills, also a compare-and-swap on the count of keys the shards share). Observers see an
//! [`Event::Rejected`](crate::core::Event::Rejected) with layer `"rate"` per refusal; the limiter holds no
//! permits, so admitted requests are not reported.

pub mod future;

mod clock;
mod key;
mod layer;
mod reject;
mod service;
mod store;

pub use self::key::{Global, KeyExtractor};
#[cfg(feature = "http")]
pub use self::key::{HeaderKey, PeerIp};
pub use self::layer::{RateLimitHandle, RateLimitLayer, RateLimitLayerBuilder, RateLimitSnapshot};
pub use self::reject::{Policy, RateLimitReject};
pub use self::service::RateLimit;
