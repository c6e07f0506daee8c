//! Simulator speed: simulated requests per wall-clock second, for every registered strategy.
//!
//! Run with: `cargo bench --features sim --bench sim`.
//!
//! One iteration is a whole run of the built-in `s1-step` scenario (phases at 0.5x, 0.9x, 2x and 0.9x of capacity,
//! about 23 000 requests over four simulated minutes) in paused tokio time. Criterion's throughput line is the
//! figure: simulated requests per second of wall time, with the stack under test included.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tower_backpressure::sim::{self, Scenario, STRATEGIES};

const SCENARIO: &str = "s1-step";

fn simulator(c: &mut Criterion) {
    let scenario = Scenario::builtin()
        .into_iter()
        .find(|s| s.name == SCENARIO)
        .expect("built-in scenario");
    let mut group = c.benchmark_group("sim");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    for strategy in STRATEGIES {
        // Deterministic: every run of a strategy simulates the same requests, so one dry run counts them.
        let attempts = sim::run(&scenario, strategy)
            .expect("scenario runs")
            .attempts;
        group.throughput(Throughput::Elements(attempts));
        group.bench_function(strategy.name, |b| {
            b.iter(|| black_box(sim::run(&scenario, strategy).expect("scenario runs")))
        });
    }
    group.finish();
}

criterion_group!(benches, simulator);
criterion_main!(benches);
