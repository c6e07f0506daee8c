//! The simulator against answers known in advance, determinism, and bad scenario input.
#![cfg(feature = "sim")]

use tower_backpressure::sim::{self, Scenario};

fn scenario(text: &str) -> Scenario {
    Scenario::from_toml(text, "test.toml").expect("valid scenario")
}

fn strategy(name: &str) -> &'static sim::Strategy {
    sim::strategy(name).expect("strategy exists")
}

const ONE_WORKER: &str = r#"
name = "one-worker"
[backend]
workers = 1
service = { dist = "constant", ms = 10.0 }
[client]
timeout_ms = 1000
arrivals = "uniform"
[[phase]]
name = "steady"
duration_s = 20
rps = 50.0
"#;

/// 2x overload of a 10-worker backend with 1 s timeouts, after a calm phase.
const OVERLOAD: &str = r#"
name = "overload"
seed = 7
[backend]
workers = 10
service = { dist = "exponential", mean_ms = 50.0 }   # capacity 200 rps
[client]
timeout_ms = 1000
[[phase]]
name = "calm"
duration_s = 5
rps = 100.0
[[phase]]
name = "2x"
duration_s = 10
rps = 400.0
"#;

#[test]
fn same_seed_same_json_other_seed_differs() {
    let short = OVERLOAD
        .replace("duration_s = 5", "duration_s = 2")
        .replace("duration_s = 10", "duration_s = 3");
    let mut s = scenario(&short);
    let run = |s: &Scenario| {
        let reports: Vec<_> = ["unprotected", "static"]
            .iter()
            .map(|n| sim::run(s, strategy(n)).unwrap())
            .collect();
        sim::to_json(&reports)
    };
    let first = run(&s);
    assert_eq!(first, run(&s));
    s.seed += 1;
    assert_ne!(first, run(&s));
}

#[test]
fn one_worker_below_capacity_is_served_exactly() {
    let report = sim::run(&scenario(ONE_WORKER), strategy("unprotected")).unwrap();
    let row = report.row("steady", "all").unwrap();
    assert!(
        (row.goodput_rps - 50.0).abs() < 0.1,
        "goodput {}",
        row.goodput_rps
    );
    assert_eq!(row.goodput_rps, row.offered_rps);
    assert_eq!(row.availability, Some(1.0));
    assert_eq!(row.capacity_rps, 100.0);
    assert_eq!(row.rejected_rps, 0.0);
    assert_eq!(row.timeout_rps, 0.0);
    assert_eq!(row.error_rps, 0.0);
    assert_eq!(row.wasted_work, 0.0);
    let (p50, p99) = (row.p50_ms.unwrap(), row.p99_ms.unwrap());
    // Evenly spaced arrivals never queue: every request takes exactly the service time.
    assert!((p50 - 10.0).abs() <= 0.01, "p50 {p50}");
    assert!((p99 - 10.0).abs() <= 0.01, "p99 {p99}");
    assert_eq!(row.mean_limit, None);
    assert_eq!(row.max_queue_depth, None);
    assert_eq!(
        report.rows.len(),
        2,
        "one `all` row and one for the default class"
    );
}

#[test]
fn poisson_arrivals_queue_at_half_load() {
    let report = sim::run(
        &scenario(&ONE_WORKER.replace("arrivals = \"uniform\"", "")),
        strategy("unprotected"),
    )
    .unwrap();
    let row = report.row("steady", "all").unwrap();
    assert!(
        (row.goodput_rps - 50.0).abs() < 3.0,
        "goodput {}",
        row.goodput_rps
    );
    assert!(
        row.p99_ms.unwrap() > 20.0,
        "M/D/1 at 50 % load queues: p99 {:?}",
        row.p99_ms
    );
    assert_eq!(row.wasted_work, 0.0);
}

#[test]
fn unprotected_collapses_and_wastes_work_under_2x() {
    let report = sim::run(&scenario(OVERLOAD), strategy("unprotected")).unwrap();
    let calm = report.row("calm", "all").unwrap();
    assert!(calm.availability.unwrap() > 0.99);
    assert!(calm.wasted_work < 0.01);
    let row = report.row("2x", "all").unwrap();
    assert!(
        row.goodput_rps < 0.3 * row.capacity_rps,
        "goodput {}",
        row.goodput_rps
    );
    assert!(row.wasted_work > 0.5, "wasted {}", row.wasted_work);
    assert!(
        row.backend_rps > 0.95 * row.capacity_rps,
        "the backend stays busy: {}",
        row.backend_rps
    );
    assert_eq!(row.rejected_rps, 0.0);
}

/// tokio's timer rounds every sleep up to a whole millisecond; were service times slept as drawn, a 10 ms
/// exponential service would average about 10.5 ms and a saturated backend would fall 5 % short of its
/// declared capacity, making every goodput goal harder than the scenario says.
#[test]
fn a_saturated_backend_delivers_its_declared_capacity() {
    let text = r#"
        name = "saturated"
        seed = 3
        [backend]
        workers = 16
        service = { dist = "exponential", mean_ms = 10.0 }
        [client]
        timeout_ms = 1000
        [[phase]]
        name = "2x"
        duration_s = 20
        rps = 3200.0
    "#;
    let report = sim::run(&scenario(text), strategy("unprotected")).unwrap();
    let row = report.row("2x", "all").unwrap();
    assert_eq!(row.capacity_rps, 1600.0);
    // 32 000 exponential draws: the sampling error of their mean is about 0.6 %.
    assert!(
        (row.backend_rps / row.capacity_rps - 1.0).abs() < 0.02,
        "backend {} rps for a declared capacity of {}",
        row.backend_rps,
        row.capacity_rps
    );
}

#[test]
fn static_limit_keeps_goodput_near_capacity_under_2x() {
    let report = sim::run(&scenario(OVERLOAD), strategy("static")).unwrap();
    let row = report.row("2x", "all").unwrap();
    assert!(
        row.goodput_rps > 0.9 * row.capacity_rps,
        "goodput {}",
        row.goodput_rps
    );
    assert!(
        row.rejected_rps > 0.4 * row.offered_rps,
        "rejected {}",
        row.rejected_rps
    );
    assert!(row.wasted_work < 0.01, "wasted {}", row.wasted_work);
    assert_eq!(row.mean_limit, Some(20.0));
    assert!(row.p99_ms.unwrap() < 1000.0);
}

#[test]
fn cancel_on_timeout_frees_the_backend() {
    let text = OVERLOAD.replace(
        "timeout_ms = 1000",
        "timeout_ms = 1000\ncancel_on_timeout = true",
    );
    let report = sim::run(&scenario(&text), strategy("unprotected")).unwrap();
    let row = report.row("2x", "all").unwrap();
    assert_eq!(row.wasted_work, 0.0);
    assert!(
        row.goodput_rps > 0.3 * row.capacity_rps,
        "goodput {}",
        row.goodput_rps
    );
}

#[test]
fn retries_stay_within_the_timeout() {
    let text = r#"
name = "flaky"
[backend]
workers = 4
service = { dist = "constant", ms = 10.0 }
error_rate = 0.5
[client]
timeout_ms = 1000
retries = 3
[[phase]]
name = "p"
duration_s = 20
rps = 50.0
"#;
    let report = sim::run(&scenario(text), strategy("unprotected")).unwrap();
    let row = report.row("p", "all").unwrap();
    // Four attempts each failing half the time: 1/16 of requests fail.
    let failed = row.error_rps / row.offered_rps;
    assert!((0.03..0.10).contains(&failed), "failed share {failed}");
    assert!(report.attempts as f64 > 1.7 * report.requests as f64);
    assert!(
        (row.backend_rps / row.offered_rps - 1.875).abs() < 0.15,
        "backend {}",
        row.backend_rps
    );
}

#[test]
fn classes_split_load_and_carry_their_priority() {
    let text = r#"
name = "classes"
[backend]
workers = 4
service = { dist = "constant", ms = 10.0 }
[client]
timeout_ms = 1000
[[class]]
name = "gold"
priority = "critical_plus"
[[class]]
name = "bulk"
priority = "sheddable"
timeout_ms = 5
[[phase]]
name = "p"
duration_s = 20
class_rps = { gold = 30.0, bulk = 60.0 }
"#;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let report = sim::run_stack(&scenario(text), "spy", move |backend, _| {
        use tower::ServiceExt;
        let spy = backend.map_request(move |req: http::Request<sim::SimBody>| {
            log.lock().unwrap().push(
                req.headers()[sim::PRIORITY_HEADER]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
            req
        });
        sim::Stack::new(sim::boxed(spy))
    })
    .unwrap();
    let gold = report.row("p", "gold").unwrap();
    let bulk = report.row("p", "bulk").unwrap();
    assert!((gold.offered_rps - 30.0).abs() < 5.0);
    assert!((bulk.offered_rps - 60.0).abs() < 8.0);
    assert!(gold.availability.unwrap() > 0.99);
    // A 5 ms timeout cannot fit a 10 ms service time.
    assert_eq!(bulk.goodput_rps, 0.0);
    assert!(bulk.wasted_work > 0.4);
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|p| p == "critical_plus") && seen.iter().any(|p| p == "sheddable"));
}

#[test]
fn send_deadline_sends_grpc_timeout_within_the_budget() {
    let text = ONE_WORKER.replace(
        "timeout_ms = 1000",
        "timeout_ms = 250\nsend_deadline = true",
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    sim::run_stack(&scenario(&text), "spy", move |backend, _| {
        use tower::ServiceExt;
        let spy = backend.map_request(move |req: http::Request<sim::SimBody>| {
            log.lock()
                .unwrap()
                .push(req.headers()["grpc-timeout"].to_str().unwrap().to_owned());
            req
        });
        sim::Stack::new(sim::boxed(spy))
    })
    .unwrap();
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|v| v == "250m"), "{:?}", &seen[..3]);
}

#[test]
fn ramps_and_series_cover_the_run() {
    let text = r#"
name = "ramp"
[backend]
workers = 8
service = { dist = "lognormal", median_ms = 10.0, sigma = 0.5 }
[client]
timeout_ms = 1000
[[phase]]
name = "ramp"
duration_s = 10
rps = 0.0
rps_end = 200.0
[[phase]]
name = "tail"
duration_s = 2.5
rps = 10.0
"#;
    let report = sim::run(&scenario(text), strategy("static")).unwrap();
    let ramp = report.row("ramp", "all").unwrap();
    assert!(
        (ramp.offered_rps - 100.0).abs() < 8.0,
        "mean of a 0..200 ramp: {}",
        ramp.offered_rps
    );
    assert_eq!(report.series.len(), 13);
    let early: f64 = report.series[..3].iter().map(|p| p.goodput_rps).sum();
    let late: f64 = report.series[7..10].iter().map(|p| p.goodput_rps).sum();
    assert!(late > 3.0 * early, "{early} {late}");
    assert!(report.series.iter().all(|p| p.limit == Some(16.0)));
}

fn error_of(text: &str) -> sim::ScenarioError {
    Scenario::from_toml(text, "bad.toml").expect_err("invalid scenario")
}

#[test]
fn bad_input_names_file_key_and_problem() {
    let cases: [(&str, &str, &str, &str); 7] = [
        (
            "unknown key",
            "timeout_ms = 1000",
            "timeout_ms = 1000\ntimeout = 3",
            "client.timeout",
        ),
        (
            "missing key",
            "timeout_ms = 1000",
            "send_deadline = true",
            "client.timeout_ms",
        ),
        (
            "no workers",
            "workers = 1",
            "workers = 0",
            "backend.workers",
        ),
        ("negative rate", "rps = 50.0", "rps = -5.0", "phase[0].rps"),
        (
            "unknown dist",
            "dist = \"constant\", ms",
            "dist = \"gamma\", ms",
            "backend.service.dist",
        ),
        (
            "bad error rate",
            "workers = 1",
            "workers = 1\nerror_rate = 1.5",
            "backend.error_rate",
        ),
        (
            "unknown priority",
            "[[phase]]",
            "[[class]]\nname = \"a\"\npriority = \"urgent\"\n[[phase]]",
            "class[0].priority",
        ),
    ];
    for (what, from, to, key) in cases {
        let text = ONE_WORKER.replacen(from, to, 1);
        assert_ne!(text, ONE_WORKER, "{what}: the case must change the file");
        let error = error_of(&text);
        assert_eq!(error.file(), "bad.toml", "{what}");
        assert_eq!(error.key(), key, "{what}: {error}");
        assert!(!error.problem().is_empty(), "{what}");
        let line = error.to_string();
        assert!(!line.contains('\n'), "{what}: one line: {line}");
        assert!(
            line.starts_with(&format!("bad.toml: {key}: ")),
            "{what}: {line}"
        );
    }
    assert!(
        error_of(&ONE_WORKER.replace("dist = \"constant\", ms", "dist = \"gamma\", ms"))
            .problem()
            .contains("gamma")
    );
    assert!(error_of(&ONE_WORKER.replace("rps = 50.0", "rps = -5.0"))
        .problem()
        .contains("-5"));
}

#[test]
fn builtin_scenarios_parse() {
    let all = Scenario::builtin();
    assert_eq!(all.len(), 10);
    assert_eq!(all[1].name, "s2-sustained");
    assert_eq!(all[5].phases.len(), 4);
}

/// `cargo test` builds the examples next to the test binaries; a focused `--test sim` run may not have.
fn overload_example() -> Option<std::path::PathBuf> {
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let exe = deps
        .parent()?
        .join("examples")
        .join(format!("overload{}", std::env::consts::EXE_SUFFIX));
    exe.exists().then_some(exe)
}

#[test]
fn overload_example_exits_2_on_bad_input() {
    let Some(exe) = overload_example() else {
        eprintln!("examples not built; skipped");
        return;
    };
    let dir = std::env::temp_dir().join(format!("sim-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, ONE_WORKER.replace("workers = 1", "workers = 0")).unwrap();
    let output = std::process::Command::new(exe)
        .arg("--scenario")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr
            .trim_end()
            .ends_with("bad.toml: backend.workers: must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn dropping_the_backend_future_frees_the_worker() {
    // A 10 ms timeout layer in front of 30 ms work: every attempt is cut off, and each cut must free the only
    // worker at once, or requests would queue behind abandoned work.
    let text = ONE_WORKER.replace("ms = 10.0", "ms = 30.0");
    let report = sim::run_stack(&scenario(&text), "timeout", |backend, _| {
        let service = tower::ServiceBuilder::new()
            .timeout(std::time::Duration::from_millis(10))
            .service(backend);
        sim::Stack::new(sim::boxed(service))
    })
    .unwrap();
    let row = report.row("steady", "all").unwrap();
    assert_eq!(row.rejected_rps, row.offered_rps);
    assert_eq!(
        row.backend_rps, row.offered_rps,
        "every attempt found the worker free"
    );
    assert_eq!(row.wasted_work, 0.0);
    assert!(report.series.iter().all(|p| p.backend_queue == 0));
}

#[test]
fn backend_changes_at_phase_boundaries() {
    let text = r#"
name = "outage"
[backend]
workers = 4
service = { dist = "exponential", mean_ms = 20.0 }
[client]
timeout_ms = 500
[[phase]]
name = "healthy"
duration_s = 5
rps = 50.0
[[phase]]
name = "outage"
duration_s = 5
rps = 50.0
backend = { service = { dist = "constant", ms = 5.0 }, error_rate = 1.0 }
[[phase]]
name = "healed"
duration_s = 5
rps = 50.0
backend = { error_rate = 0.0 }
"#;
    let report = sim::run(&scenario(text), strategy("unprotected")).unwrap();
    let healthy = report.row("healthy", "all").unwrap();
    let outage = report.row("outage", "all").unwrap();
    let healed = report.row("healed", "all").unwrap();
    assert_eq!(healthy.capacity_rps, 200.0);
    assert_eq!(outage.capacity_rps, 800.0);
    assert_eq!(healed.capacity_rps, 800.0, "the service time stays changed");
    assert_eq!(healthy.error_rps, 0.0);
    assert!(outage.error_rps > 0.98 * outage.offered_rps);
    assert_eq!(healed.availability, Some(1.0));
    assert!(healed.p99_ms.unwrap() <= 5.01);
}

#[test]
fn probes_are_time_averaged_and_maxed_per_phase() {
    // The probes read the paused clock: limit 10 in the first half of the run and 30 in the second, queue depth
    // growing by one per second.
    let report = sim::run_stack(&scenario(ONE_WORKER), "probed", |backend, _| {
        let start = tokio::time::Instant::now();
        let elapsed = move || start.elapsed().as_secs_f64();
        sim::Stack::new(backend).probes(
            sim::Probes::none()
                .limit(move || if elapsed() < 10.0 { 10 } else { 30 })
                .queue_depth(move || elapsed() as usize),
        )
    })
    .unwrap();
    let row = report.row("steady", "all").unwrap();
    let mean = row.mean_limit.unwrap();
    assert!((mean - 20.0).abs() < 0.05, "mean limit {mean}");
    assert_eq!(row.max_queue_depth, Some(19));
    assert_eq!(report.series[2].limit, Some(10.0));
    assert_eq!(report.series[15].limit, Some(30.0));
    assert_eq!(report.series[4].queue_depth, Some(4));
}

#[test]
#[should_panic(expected = "the stack under test panicked")]
fn a_panicking_stack_fails_the_run() {
    let few = ONE_WORKER.replace("duration_s = 20", "duration_s = 0.1");
    let _ = sim::run_stack(&scenario(&few), "panics", |backend, _| {
        use tower::ServiceExt;
        let service = backend.map_request(
            |_: http::Request<sim::SimBody>| -> http::Request<sim::SimBody> { panic!("boom") },
        );
        sim::Stack::new(sim::boxed(service))
    });
}

/// Backend work still going on when the run ends is part of the last phase's busy time up to its end: a worker
/// busy for nobody until the very end must show as wasted, not vanish from the figures.
#[test]
fn work_still_running_when_the_run_ends_is_counted() {
    // One request at 0.5 s, 5 s of work on the only worker, a client that gives up after 100 ms, a run of 1 s:
    // the worker is busy from 0.5 s to the end, and for nobody from 0.6 s.
    let text = r#"
name = "long-work"
[backend]
workers = 1
service = { dist = "constant", ms = 5000.0 }
[client]
timeout_ms = 100
arrivals = "uniform"
[[phase]]
name = "only"
duration_s = 1
rps = 2.0
"#;
    let report = sim::run(&scenario(text), strategy("unprotected")).unwrap();
    let row = report.row("only", "all").unwrap();
    assert_eq!(row.offered_rps, 1.0);
    assert_eq!(row.backend_rps, 1.0);
    assert_eq!(row.timeout_rps, 1.0);
    assert!(
        (row.wasted_work - 0.8).abs() < 1e-9,
        "0.4 s of 0.5 s busy were for nobody: {}",
        row.wasted_work
    );
}

/// `max_queue_depth` is the deepest queue seen: the depth right after a request joins the queue counts, even
/// when the next thing to happen is a request leaving it.
#[test]
fn the_deepest_queue_counts_the_request_that_made_it() {
    // One worker and the `queue` strategy (a fixed limit of 2): five requests 2 ms apart, each 100 ms of work.
    // Two are admitted; the other three wait in the queue, three deep from 10 ms until the first answer at
    // 102 ms lets one in.
    let text = r#"
name = "queue-depth"
[backend]
workers = 1
service = { dist = "constant", ms = 100.0 }
[client]
timeout_ms = 1000
arrivals = "uniform"
[[phase]]
name = "burst"
duration_s = 0.011
rps = 500.0
[[phase]]
name = "quiet"
duration_s = 1
rps = 0.0
"#;
    let report = sim::run(&scenario(text), strategy("queue")).unwrap();
    let burst = report.row("burst", "all").unwrap();
    assert_eq!((burst.offered_rps * burst.duration_s).round(), 5.0);
    assert_eq!(burst.max_queue_depth, Some(3));
    assert_eq!(report.series[0].queue_depth, Some(3));
}

/// Report rows are keyed by phase and class name (`Report::row`, the JSON that check_scenarios.py reads): a
/// second phase of the same name, or a class called `all` like the rows that sum the classes, would make two
/// rows answer to one key.
#[test]
fn names_that_would_make_two_rows_alike_are_refused() {
    let twice = format!("{ONE_WORKER}[[phase]]\nname = \"steady\"\nduration_s = 1\nrps = 5.0\n");
    let error = error_of(&twice);
    assert_eq!(error.key(), "phase[1].name", "{error}");
    assert!(error.problem().contains("steady"), "{error}");
    let all = ONE_WORKER.replace(
        "[[phase]]",
        "[[class]]\nname = \"all\"\npriority = \"critical\"\n[[phase]]",
    );
    let error = error_of(&all);
    assert_eq!(error.key(), "class[0].name", "{error}");
}

/// A timeout beyond what a run can measure is refused with a message, not a panic (an overflowing instant) or
/// latencies silently capped at the histograms' hour.
#[test]
fn timeouts_beyond_an_hour_are_refused() {
    let huge = ONE_WORKER.replace("timeout_ms = 1000", "timeout_ms = 18446744073709551615");
    let error = error_of(&huge);
    assert_eq!(error.key(), "client.timeout_ms", "{error}");
    let class = ONE_WORKER.replace(
        "[[phase]]",
        "[[class]]\nname = \"slow\"\npriority = \"critical\"\ntimeout_ms = 3600001\n[[phase]]",
    );
    let error = error_of(&class);
    assert_eq!(error.key(), "class[0].timeout_ms", "{error}");
    let hour = ONE_WORKER.replace("timeout_ms = 1000", "timeout_ms = 3600000");
    assert!(Scenario::from_toml(&hour, "ok.toml").is_ok());
}

#[test]
fn phases_beyond_a_day_are_refused() {
    for duration in ["1e20", "86400.5", "inf", "nan", "0", "-1"] {
        let text = ONE_WORKER.replace("duration_s = 20", &format!("duration_s = {duration}"));
        let error = error_of(&text);
        assert_eq!(error.key(), "phase[0].duration_s", "{duration}: {error}");
    }
    let day = ONE_WORKER.replace("duration_s = 20", "duration_s = 86400");
    assert!(Scenario::from_toml(&day, "ok.toml").is_ok());
}

#[test]
fn overload_example_refuses_two_scenarios_of_one_name() {
    let Some(exe) = overload_example() else {
        eprintln!("examples not built; skipped");
        return;
    };
    // Scenario names key the rows and the charts: two files naming the same scenario would give rows that
    // check_scenarios.py cannot tell apart, and one chart overwriting the other.
    let dir = std::env::temp_dir().join(format!("sim-twice-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
    let short = ONE_WORKER.replace("duration_s = 20", "duration_s = 0.1");
    std::fs::write(&a, &short).unwrap();
    std::fs::write(&b, short.replace("rps = 50.0", "rps = 20.0")).unwrap();
    // Refused: exit code 2 and one line on stderr, which is returned.
    let refused = |args: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new(&exe)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        stderr
    };
    let stderr = refused(&[
        "--json".as_ref(),
        "--scenario".as_ref(),
        a.as_ref(),
        b.as_ref(),
    ]);
    assert!(
        stderr.contains("b.toml") && stderr.contains("one-worker"),
        "{stderr}"
    );
    // The same goes for a strategy named twice.
    let stderr = refused(&[
        "--json".as_ref(),
        "--strategy".as_ref(),
        "unprotected,unprotected".as_ref(),
        "--scenario".as_ref(),
        a.as_ref(),
    ]);
    assert!(stderr.contains("unprotected"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
