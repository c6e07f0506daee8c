//! `MetricsObserver` through a real exporter: what the series look like, and how two layers of one kind are told
//! apart.
#![cfg(feature = "metrics")]

use metrics_exporter_prometheus::PrometheusBuilder;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::MetricsObserver;

/// Two breakers (one per dependency) with unnamed observers write one `backpressure_breaker_state` series, the last
/// change winning; named, each has its own.
#[test]
fn named_observers_keep_two_breakers_apart() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let breaker = |observer| {
            CircuitBreakerLayer::builder()
                .observer(observer)
                .build()
                .unwrap()
                .handle()
        };
        let payments = breaker(MetricsObserver::named("payments"));
        let search = breaker(MetricsObserver::named("search"));
        let unnamed = breaker(MetricsObserver::new());
        let other_unnamed = breaker(MetricsObserver::new());
        payments.force_open();
        search.force_open();
        search.force_closed();
        other_unnamed.force_open();
        unnamed.disable();
    });
    let text = prometheus.render();
    let mut series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("backpressure_breaker_state{"))
        .collect();
    // The two unnamed breakers share one series: the last change (disabled, 4) overwrote the other's (forced
    // open, 3).
    let mut expected = vec![
        r#"backpressure_breaker_state{layer="breaker",name="payments"} 3"#,
        r#"backpressure_breaker_state{layer="breaker",name="search"} 0"#,
        r#"backpressure_breaker_state{layer="breaker"} 4"#,
    ];
    series.sort_unstable();
    expected.sort_unstable();
    assert_eq!(series, expected, "{text}");
}
