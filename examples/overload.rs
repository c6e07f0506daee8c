//! Run with: cargo run --release --example overload
//!
//! Runs overload scenarios in the deterministic simulator against each protection strategy and shows, phase by
//! phase, how much useful work each one gets out of the same backend: goodput as a share of capacity, the p99
//! latency of the good requests, the share rejected, the share of backend time wasted on requests whose client
//! had already given up, and the mean concurrency limit. Writes one SVG chart per scenario.
//!
//! ```text
//! cargo run --release --example overload                                   # the built-in scenarios
//! cargo run --release --example overload -- --scenario my.toml --strategy unprotected,static
//! cargo run --release --example overload -- --json > out.json              # rows for check_scenarios.py
//! cargo run --release --example overload -- --list
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use tower_backpressure::sim::{self, Report, Row, Scenario, Strategy, STRATEGIES};

/// Overload scenarios against protection strategies, in a deterministic simulator.
#[derive(Debug, Parser)]
struct Args {
    /// Scenario files (default: the built-in set).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    scenario: Vec<PathBuf>,
    /// Strategies to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    strategy: Vec<String>,
    /// Print the rows as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Directory for the SVG charts (default: target/overload; with --json, charts only when given).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Overrides every scenario's seed.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Lists the strategies and the built-in scenarios.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        list();
        return ExitCode::SUCCESS;
    }
    let (scenarios, strategies) = match inputs(&args) {
        Ok(inputs) => inputs,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };

    let started = Instant::now();
    let reports = run_all(&scenarios, &strategies);
    let wall = started.elapsed().as_secs_f64();
    let requests: u64 = reports.iter().map(|r| r.requests).sum();
    let footer = format!(
        "{} runs, {} simulated requests in {:.1} s wall: {:.0} simulated requests/s",
        reports.len(),
        requests,
        wall,
        requests as f64 / wall
    );

    let out = match (&args.out, args.json) {
        (Some(dir), _) => Some(dir.clone()),
        (None, false) => Some(PathBuf::from("target/overload")),
        (None, true) => None,
    };
    let mut charts = Vec::new();
    if let Some(dir) = &out {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("{}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        for (scenario, runs) in scenarios.iter().zip(reports.chunks(strategies.len())) {
            let path = dir.join(format!("{}.svg", scenario.name));
            match chart(&path, scenario, runs) {
                Ok(()) => charts.push(path),
                Err(e) => eprintln!("{}: {e}", path.display()),
            }
        }
    }

    if args.json {
        println!("{}", sim::to_json(&reports));
        for path in &charts {
            eprintln!("chart: {}", path.display());
        }
        eprintln!("{footer}");
    } else {
        for (scenario, runs) in scenarios.iter().zip(reports.chunks(strategies.len())) {
            table(scenario, runs);
        }
        for path in &charts {
            println!("chart: {}", path.display());
        }
        println!("{footer}");
    }
    ExitCode::SUCCESS
}

fn list() {
    println!("strategies:");
    for s in STRATEGIES {
        println!("  {:<12} {}", s.name, s.about);
    }
    println!("built-in scenarios:");
    for s in Scenario::builtin() {
        println!(
            "  {:<15} {}",
            s.name,
            s.description.as_deref().unwrap_or("")
        );
    }
}

/// The scenarios and strategies to run, or the one-line message to exit with.
fn inputs(args: &Args) -> Result<(Vec<Scenario>, Vec<&'static Strategy>), String> {
    let mut scenarios = if args.scenario.is_empty() {
        Scenario::builtin()
    } else {
        args.scenario
            .iter()
            .map(Scenario::load)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?
    };
    // Scenario names key the rows and name the charts.
    for (i, later) in scenarios.iter().enumerate() {
        if let Some(first) = scenarios[..i].iter().position(|s| s.name == later.name) {
            let file = |j: usize| {
                args.scenario
                    .get(j)
                    .map_or_else(|| later.name.clone(), |p| p.display().to_string())
            };
            return Err(format!(
                "{}: name: duplicate scenario `{}` (also in {})",
                file(i),
                later.name,
                file(first)
            ));
        }
    }
    if let Some(seed) = args.seed {
        for s in &mut scenarios {
            s.seed = seed;
        }
    }
    let strategies = if args.strategy.is_empty() {
        STRATEGIES.iter().collect()
    } else {
        args.strategy
            .iter()
            .map(|name| {
                sim::strategy(name.trim()).ok_or_else(|| {
                    let known: Vec<_> = STRATEGIES.iter().map(|s| s.name).collect();
                    format!(
                        "--strategy: unknown strategy `{name}` (known: {})",
                        known.join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    for (i, later) in strategies.iter().enumerate() {
        if strategies[..i].iter().any(|s| s.name == later.name) {
            return Err(format!("--strategy: `{}` given twice", later.name));
        }
    }
    Ok((scenarios, strategies))
}

/// Runs every (scenario, strategy) pair, one paused current-thread runtime per pair, on as many OS threads as
/// there are cores. Reports come back in input order whatever the thread timing.
fn run_all(scenarios: &[Scenario], strategies: &[&'static Strategy]) -> Vec<Report> {
    let pairs: Vec<(&Scenario, &Strategy)> = scenarios
        .iter()
        .flat_map(|sc| strategies.iter().map(move |st| (sc, *st)))
        .collect();
    let progress = ProgressBar::new(pairs.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    // Biggest runs first, so that no long run starts last while the other threads idle.
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&a, &b| offered(pairs[b].0).total_cmp(&offered(pairs[a].0)));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Report>>> = Mutex::new(vec![None; pairs.len()]);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(pairs.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let (scenario, strategy) = pairs[i];
                    progress.set_message(format!("{} / {}", scenario.name, strategy.name));
                    let report =
                        sim::run(scenario, strategy).expect("scenarios were validated when loaded");
                    results.lock().expect("no panics while holding the lock")[i] = Some(report);
                    progress.inc(1);
                }
            });
        }
    });
    progress.finish_and_clear();
    results
        .into_inner()
        .expect("no panics while holding the lock")
        .into_iter()
        .map(|r| r.expect("every pair ran"))
        .collect()
}

/// Requests a scenario offers, roughly: what a run costs.
fn offered(scenario: &Scenario) -> f64 {
    scenario
        .phases
        .iter()
        .map(|p| {
            let start = p
                .rps
                .unwrap_or_else(|| p.class_rps.iter().flat_map(|m| m.values()).sum());
            (start + p.rps_end.unwrap_or(start)) / 2.0 * p.duration_s
        })
        .sum()
}

fn table(scenario: &Scenario, runs: &[Report]) {
    println!();
    println!(
        "{} ({} workers){}",
        scenario.name,
        scenario.backend.workers,
        scenario
            .description
            .as_deref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default()
    );
    let cell = 32;
    let mut head = format!("{:<14} {:>8} {:>8} |", "phase", "cap rps", "offered");
    let mut sub = format!("{:<14} {:>8} {:>8} |", "", "", "");
    for run in runs {
        head.push_str(&format!(" {:^w$} |", run.strategy, w = cell));
        sub.push_str(&format!(
            " {:>5} {:>7} {:>5} {:>5} {:>5} |",
            "good%", "p99 ms", "rej%", "wst%", "limit"
        ));
    }
    println!("{head}");
    println!("{sub}");
    // Every report of a scenario has the same rows in the same order; class rows only when there are classes.
    let classes = scenario.classes.len();
    for (j, first) in runs[0].rows.iter().enumerate() {
        let label = if first.class == "all" {
            first.phase.clone()
        } else if classes > 1 {
            format!("  {}", first.class)
        } else {
            continue;
        };
        let mut line = format!(
            "{:<14} {:>8.0} {:>8.0} |",
            label, first.capacity_rps, first.offered_rps
        );
        for run in runs {
            let row: &Row = &run.rows[j];
            let pct = |v: f64, of: f64| if of > 0.0 { 100.0 * v / of } else { 0.0 };
            line.push_str(&format!(
                " {:>5.0} {:>7} {:>5.1} {:>5.1} {:>5} |",
                pct(row.goodput_rps, row.capacity_rps),
                row.p99_ms.map_or("-".into(), |p| format!("{p:.0}")),
                pct(row.rejected_rps, row.offered_rps),
                100.0 * row.wasted_work,
                row.mean_limit.map_or("-".into(), |l| format!("{l:.1}")),
            ));
        }
        println!("{line}");
    }
}

type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// Goodput, p99 and limit over time, one line per strategy.
fn chart(path: &Path, scenario: &Scenario, runs: &[Report]) -> ChartResult {
    let root = SVGBackend::new(path, (1100, 960)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&scenario.name, ("sans-serif", 24))?;
    let panels = root.split_evenly((3, 1));
    let end = scenario.duration().as_secs_f64();
    type Pick = fn(&sim::SeriesPoint) -> Option<f64>;
    let metrics: [(&str, Pick); 3] = [
        ("goodput (requests/s)", |p| Some(p.goodput_rps)),
        ("p99 latency of good requests (ms)", |p| p.p99_ms),
        ("concurrency limit", |p| p.limit),
    ];
    for (panel, (title, pick)) in panels.iter().zip(metrics) {
        let top = runs
            .iter()
            .flat_map(|r| r.series.iter().filter_map(pick))
            .fold(1.0_f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..end, 0.0..top)?;
        chart.configure_mesh().x_desc("s").draw()?;
        for (i, run) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = run
                .series
                .iter()
                .filter_map(|p| pick(p).map(|v| (p.t_s + sim::WINDOW.as_secs_f64() / 2.0, v)))
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(run.strategy.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
