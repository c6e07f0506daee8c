//! Heap allocations per request for every stack of `benches/overhead.rs`, counted by a global allocator.
//!
//! Run with: `cargo bench --all-features --bench allocs` (prints a Markdown table).
//!
//! Each stack is built on a current-thread runtime, warmed up (thread-locals, timer wheel levels and lazily
//! grown buffers are set up on first use), then driven for a fixed number of requests while every `alloc` and
//! `realloc` is counted. One request = `ready().await` + `call(req).await`, as in the criterion benches; the
//! request and response themselves allocate nothing (`http::Request<()>` with empty headers and extensions).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use tower::Service;

mod support;

use support::{name, one, stacks, Req, Visit};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARM_UP: u64 = 1_000;
const REQUESTS: u64 = 10_000;

struct Table<'a> {
    rt: &'a tokio::runtime::Runtime,
    rows: Vec<(&'static str, f64, f64)>,
}

impl Visit for Table<'_> {
    fn stack<S>(&mut self, name: &'static str, mut svc: S)
    where
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let (allocations, bytes) = self.rt.block_on(async {
            for _ in 0..WARM_UP {
                one(&mut svc).await;
            }
            let (a0, b0) = (
                ALLOCATIONS.load(Ordering::Relaxed),
                BYTES.load(Ordering::Relaxed),
            );
            for _ in 0..REQUESTS {
                one(&mut svc).await;
            }
            (
                ALLOCATIONS.load(Ordering::Relaxed) - a0,
                BYTES.load(Ordering::Relaxed) - b0,
            )
        });
        self.rows.push((
            name,
            allocations as f64 / REQUESTS as f64,
            bytes as f64 / REQUESTS as f64,
        ));
    }
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter) to every bench binary; this one has nothing to filter.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut table = Table {
        rt: &rt,
        rows: Vec::new(),
    };
    stacks(&mut table);

    println!("\nheap allocations per request ({REQUESTS} requests after {WARM_UP} warm-up)\n");
    println!("| stack | allocations / request | bytes / request | goal (0) |");
    println!("|---|---:|---:|---|");
    for &(stack, allocations, bytes) in &table.rows {
        let goal = match (name::OURS.contains(&stack), allocations == 0.0) {
            (false, _) => "",
            (true, true) => "met",
            (true, false) => "not met",
        };
        println!("| {stack} | {allocations:.2} | {bytes:.0} | {goal} |");
    }
}
