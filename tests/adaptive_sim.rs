//! The adaptive limiter's strategies in the simulator, on shortened scenarios: the properties the scenario goals
//! check, kept as regression tests.
#![cfg(feature = "sim")]

use tower_backpressure::sim::{self, strategy, Scenario};

fn scenario(name: &str, phase_s: f64) -> Scenario {
    let mut s = Scenario::builtin()
        .into_iter()
        .find(|s| s.name == name)
        .expect("built-in scenario");
    for phase in &mut s.phases {
        phase.duration_s = phase_s;
    }
    s
}

fn mean_limit(report: &sim::Report, phase: &str) -> f64 {
    report.row(phase, "all").unwrap().mean_limit.unwrap()
}

/// s5a: every request outlives the client's timeout. The default algorithm stays near the backend's real
/// concurrency; Gradient2, which sees a constant latency, keeps growing.
#[test]
fn hung_backend_does_not_grow_the_default_limit() {
    let s = scenario("s5a-hang", 60.0);
    let knee = sim::run(&s, strategy("adaptive").unwrap()).unwrap();
    let gradient2 = sim::run(&s, strategy("gradient2").unwrap()).unwrap();
    let workers = s.backend.workers as f64;
    assert!(
        mean_limit(&knee, "late") <= 4.0 * workers,
        "{}",
        mean_limit(&knee, "late")
    );
    assert!(mean_limit(&gradient2, "late") > mean_limit(&knee, "late"));
}

/// s5b: a modest sustained overload must not make the limit creep, and goodput stays near capacity.
#[test]
fn modest_overload_does_not_creep() {
    let s = scenario("s5b-creep", 30.0);
    let report = sim::run(&s, strategy("adaptive").unwrap()).unwrap();
    let (early, late) = (mean_limit(&report, "early"), mean_limit(&report, "late"));
    assert!(late <= 1.25 * early, "early {early}, late {late}");
    let row = report.row("late", "all").unwrap();
    assert!(row.goodput_rps >= 0.9 * row.capacity_rps, "{row:?}");
}

/// A quiet minute is not a loss of capacity. Knee (the default) measures throughput as completions over window
/// duration, and a window runs from the previous one's close, so the first window of the next burst spans the
/// quiet minute too. It once read that as a throughput of a few requests a minute and cut its learnt limit to a
/// couple of requests, refusing most of the burst though the backend was as fast as before.
#[test]
fn the_default_limit_survives_a_quiet_minute() {
    let s = Scenario::from_toml(
        r#"
name = "quiet-minute"
description = "2x load, a minute without a request, then the same load again."
seed = 7
[backend]
workers = 10
service = { dist = "constant", ms = 50.0 }
[client]
timeout_ms = 1000
[[phase]]
name = "load"
duration_s = 20
rps = 400.0
[[phase]]
name = "quiet"
duration_s = 60
rps = 0.0
[[phase]]
name = "again"
duration_s = 1
rps = 400.0
"#,
        "quiet-minute.toml",
    )
    .unwrap();
    let report = sim::run(&s, strategy("adaptive").unwrap()).unwrap();
    let load = report.row("load", "all").unwrap();
    assert!(load.goodput_rps >= 0.9 * load.capacity_rps, "{load:?}");
    // The same load after the quiet minute is served as well (63 of a capacity of 200 before the fix).
    let again = report.row("again", "all").unwrap();
    assert!(again.goodput_rps >= 0.9 * again.capacity_rps, "{again:?}");
}
