//! Per-request cost of each layer next to tower's own layers and the peers, measured in the same run.
//!
//! Run with: `cargo bench --all-features --bench overhead` (docs/PERFORMANCE.md explains the tables).
//!
//! - `single/*`: one task on a current-thread runtime; one iteration = `ready().await` + `call(req).await`.
//! - `contention/*`: two OS threads, each driving one task on its own current-thread runtime, sharing one cloned
//!   service; the figure to read is the throughput (requests per second across both threads).

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use tower::Service;

mod support;

use support::{on_two_threads, one, stacks, Req, Visit};

struct Single<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
    rt: &'a tokio::runtime::Runtime,
}

impl Visit for Single<'_, '_> {
    fn stack<S>(&mut self, name: &'static str, mut svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let rt = self.rt;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        one(black_box(&mut svc)).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
}

struct Contention<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
}

impl Visit for Contention<'_, '_> {
    fn stack<S>(&mut self, name: &'static str, svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        // Both threads drive clones of one service, so they share its state (limit, counters, breaker window)
        // the way connections of one server do.
        self.group
            .bench_function(name, |b| b.iter_custom(|iters| on_two_threads(&svc, iters)));
    }
}

fn configure<'c>(c: &'c mut Criterion, name: &str) -> BenchmarkGroup<'c, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    group
}

fn single(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut group = configure(c, "single");
    stacks(&mut Single {
        group: &mut group,
        rt: &rt,
    });
    group.finish();
}

fn contention(c: &mut Criterion) {
    // The stacks are built in this runtime's context; each sample runs on two threads of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut group = configure(c, "contention");
    group.throughput(Throughput::Elements(1));
    stacks(&mut Contention { group: &mut group });
    group.finish();
}

criterion_group!(benches, single, contention);

fn main() {
    let started = SystemTime::now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    report::print(started);
}

/// The tables of docs/PERFORMANCE.md, computed from the estimates criterion saved in this run.
mod report {
    use std::path::PathBuf;
    use std::time::SystemTime;

    use tower::Service;

    use crate::support::{name, stacks, Req, Visit};

    struct Names(Vec<&'static str>);

    impl Visit for Names {
        fn stack<S>(&mut self, name: &'static str, _svc: S)
        where
            S: Service<Req> + Clone + Send + 'static,
            S::Future: Send + 'static,
        {
            self.0.push(name);
        }
    }

    fn criterion_home() -> PathBuf {
        if let Some(home) = std::env::var_os("CRITERION_HOME") {
            return home.into();
        }
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("criterion")
    }

    /// The median time per iteration in ns, if criterion measured `group/name` during this run. The median
    /// rather than the mean or slope: other processes on the machine show up as outlier samples.
    fn median(group: &str, name: &str, since: SystemTime) -> Option<f64> {
        let path = criterion_home()
            .join(group)
            .join(name)
            .join("new")
            .join("estimates.json");
        let fresh = std::fs::metadata(&path).ok()?.modified().ok()? >= since;
        if !fresh {
            return None;
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        json["median"]["point_estimate"].as_f64()
    }

    fn ratio(a: f64, b: f64) -> String {
        if b > 0.0 {
            format!("{:.2}x", a / b)
        } else {
            "n/a".to_owned()
        }
    }

    pub(crate) fn print(since: SystemTime) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let mut names = Names(Vec::new());
        stacks(&mut names);
        let names = names.0;

        let single: Vec<(&str, f64)> = names
            .iter()
            .filter_map(|&n| median("single", n, since).map(|t| (n, t)))
            .collect();
        let find = |rows: &[(&str, f64)], n: &str| rows.iter().find(|r| r.0 == n).map(|r| r.1);
        if let Some(bare) = find(&single, name::BARE) {
            let added = |t: f64| (t - bare).max(0.0);
            let limit = find(&single, name::TOWER_LIMIT).map(added);
            let full = find(&single, name::TOWER_SHED_LIMIT_TIMEOUT).map(added);
            println!("\n### Single task: ns per request (median), added ns over the bare service, ratios of added ns\n");
            println!("| stack | ns / request | added ns | ÷ tower ConcurrencyLimit | ÷ tower LoadShed+ConcurrencyLimit+Timeout |");
            println!("|---|---:|---:|---:|---:|");
            for &(n, t) in &single {
                let a = added(t);
                let vs = |base: Option<f64>| base.map_or("n/a".to_owned(), |b| ratio(a, b));
                println!("| {n} | {t:.1} | {a:.1} | {} | {} |", vs(limit), vs(full));
            }
            let goals: Vec<_> = name::COST_GOALS
                .iter()
                .filter_map(|&(ours, theirs, max)| {
                    let o = added(find(&single, ours)?);
                    let t = added(find(&single, theirs)?);
                    Some((ours, theirs, max, o, t))
                })
                .collect();
            if !goals.is_empty() {
                println!("\n### Cost goals (added ns, single task)\n");
                println!("| goal | figure | met |");
                println!("|---|---:|---|");
                for (ours, theirs, max, o, t) in goals {
                    let met = if o <= max * t { "met" } else { "not met" };
                    println!(
                        "| {ours} ≤ {max}x {theirs} | {} ({o:.1} ns vs {t:.1} ns) | {met} |",
                        ratio(o, t)
                    );
                }
            }
        }

        let contention: Vec<(&str, f64)> = names
            .iter()
            .filter_map(|&n| median("contention", n, since).map(|t| (n, 1e3 / t)))
            .collect();
        if !contention.is_empty() {
            let limit = find(&contention, name::TOWER_LIMIT);
            println!("\n### Contention: 2 threads, one task each, sharing one service (median)\n");
            println!(
                "| stack | million requests / s | ÷ tower ConcurrencyLimit | goal (≥ 1.00x) |"
            );
            println!("|---|---:|---:|---|");
            for &(n, mrps) in &contention {
                let vs = limit.map_or("n/a".to_owned(), |l| ratio(mrps, l));
                let goal = match limit {
                    Some(l) if name::OURS.contains(&n) => {
                        if mrps >= l {
                            "met"
                        } else {
                            "not met"
                        }
                    }
                    _ => "",
                };
                println!("| {n} | {mrps:.2} | {vs} | {goal} |");
            }
        }
    }
}
