//! The stacks of `benches/overhead.rs` timed round-robin, for ratios that hold on a busy machine.
//!
//! Run with: `cargo bench --all-features --bench interleaved` (prints Markdown tables).
//!
//! Criterion measures one stack after another, so a compile that starts on a shared machine halfway through a
//! run slows some stacks and not others, and the ratios between them drift. Here every round times a batch of
//! requests through every stack in turn, and each stack keeps its fastest batch: interference only ever adds
//! time, so the minimum over many short rounds is the figure least disturbed by it, and all stacks had the same
//! chances at a quiet moment. One request = `ready().await` + `call(req).await`, as everywhere.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tower::Service;

mod support;

use support::{name, on_two_threads, one, stacks, Req, Visit};

const ROUNDS: usize = 60;
const BATCH: u64 = 2_000;
/// Requests per contention batch (both tasks together): long enough that spawning and the barrier are noise.
const CONTENTION_BATCH: u64 = 20_000;

type Runner = Box<dyn FnMut(&Runtime, u64) -> Duration>;

struct Single(Vec<(&'static str, Runner)>);

impl Visit for Single {
    fn stack<S>(&mut self, name: &'static str, mut svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        self.0.push((
            name,
            Box::new(move |rt: &Runtime, n: u64| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..n {
                        one(black_box(&mut svc)).await;
                    }
                    start.elapsed()
                })
            }),
        ));
    }
}

struct Contention(Vec<(&'static str, Runner)>);

impl Visit for Contention {
    fn stack<S>(&mut self, name: &'static str, svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        self.0.push((
            name,
            Box::new(move |_: &Runtime, n: u64| on_two_threads(&svc, n)),
        ));
    }
}

/// The fastest batch of each stack over all rounds, in ns per request.
fn fastest(
    rt: &Runtime,
    runners: &mut [(&'static str, Runner)],
    batch: u64,
) -> Vec<(&'static str, f64)> {
    let mut best = vec![f64::INFINITY; runners.len()];
    for (_, run) in runners.iter_mut() {
        run(rt, batch);
    }
    for _ in 0..ROUNDS {
        for (i, (_, run)) in runners.iter_mut().enumerate() {
            let ns = run(rt, batch).as_nanos() as f64 / batch as f64;
            best[i] = best[i].min(ns);
        }
    }
    runners.iter().map(|r| r.0).zip(best).collect()
}

fn find(rows: &[(&str, f64)], n: &str) -> Option<f64> {
    rows.iter().find(|r| r.0 == n).map(|r| r.1)
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".to_owned(),
    }
}

fn main() {
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let single = {
        let _guard = current.enter();
        let mut runners = Single(Vec::new());
        stacks(&mut runners);
        fastest(&current, &mut runners.0, BATCH)
    };
    let contention = {
        // Built in a runtime's context (some layers want one); each batch runs on two threads of its own.
        let _guard = current.enter();
        let mut runners = Contention(Vec::new());
        stacks(&mut runners);
        fastest(&current, &mut runners.0, CONTENTION_BATCH)
    };

    let bare = find(&single, name::BARE).unwrap_or(0.0);
    let added = |t: f64| (t - bare).max(0.0);
    let limit = find(&single, name::TOWER_LIMIT).map(added);
    let full = find(&single, name::TOWER_SHED_LIMIT_TIMEOUT).map(added);
    println!(
        "\n### Single task, interleaved ({ROUNDS} rounds of {BATCH} requests, fastest round)\n"
    );
    println!("| stack | ns / request | added ns | ÷ tower ConcurrencyLimit | ÷ tower LoadShed+ConcurrencyLimit+Timeout |");
    println!("|---|---:|---:|---:|---:|");
    for &(n, t) in &single {
        let a = added(t);
        println!(
            "| {n} | {t:.1} | {a:.1} | {} | {} |",
            ratio(a, limit),
            ratio(a, full)
        );
    }

    println!("\n### Cost goals (added ns, single task, interleaved)\n");
    println!("| goal | figure | met |");
    println!("|---|---:|---|");
    for &(ours, theirs, max) in name::COST_GOALS {
        let (Some(o), Some(t)) = (find(&single, ours), find(&single, theirs)) else {
            continue;
        };
        let (o, t) = (added(o), added(t));
        let met = if o <= max * t { "met" } else { "not met" };
        println!(
            "| {ours} ≤ {max}x {theirs} | {} ({o:.1} ns vs {t:.1} ns) | {met} |",
            ratio(o, Some(t))
        );
    }

    let limit = find(&contention, name::TOWER_LIMIT).map(|t| 1e3 / t);
    println!("\n### Contention, interleaved: 2 threads, one task each, sharing one service (fastest round)\n");
    println!("| stack | million requests / s | ÷ tower ConcurrencyLimit | goal (≥ 1.00x) |");
    println!("|---|---:|---:|---|");
    for &(n, t) in &contention {
        let mrps = 1e3 / t;
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
        println!("| {n} | {mrps:.2} | {} | {goal} |", ratio(mrps, limit));
    }
}
