//! Per-request cost of each layer next to tower's own layers and the peers, measured in the same run.
//!
//! Run with: `cargo bench --all-features --bench overhead` (docs/PERFORMANCE.md explains the tables).
//!
//! - `single/*`: one task on a current-thread runtime; one iteration = `ready().await` + `call(req).await`.
//! - `contention/*`: two tasks on a two-worker multi-thread runtime sharing one cloned service; the figure to read
//!   is the throughput (requests per second across both tasks).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use tower::Service;

mod support;

use support::{one, stacks, Req, Visit};

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
    rt: &'a tokio::runtime::Runtime,
}

async fn drive<S>(mut svc: S, n: u64)
where
    S: Service<Req>,
{
    for _ in 0..n {
        one(black_box(&mut svc)).await;
    }
}

impl Visit for Contention<'_, '_> {
    fn stack<S>(&mut self, name: &'static str, svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let rt = self.rt;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Both tasks start from clones of one service, so they share its state (limit, counters,
                // breaker window) the way connections of one server do.
                let first = iters / 2;
                let a = svc.clone();
                let b = svc.clone();
                rt.block_on(async move {
                    let start = Instant::now();
                    let ta = tokio::spawn(drive(a, first));
                    let tb = tokio::spawn(drive(b, iters - first));
                    ta.await.expect("task a");
                    tb.await.expect("task b");
                    start.elapsed()
                })
            })
        });
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut group = configure(c, "contention");
    group.throughput(Throughput::Elements(1));
    stacks(&mut Contention {
        group: &mut group,
        rt: &rt,
    });
    group.finish();
}

criterion_group!(benches, single, contention);
criterion_main!(benches);
