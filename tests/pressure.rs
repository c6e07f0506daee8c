//! Runtime pressure on real (not paused) runtimes: a task that blocks for a known time must show up as lag, an
//! idle runtime must not, the layer must shed during a real stall, and stopping the monitor must end its task.

use std::time::Duration;

use tower::{service_fn, Layer, ServiceExt};
use tower_backpressure::core::{error, BoxError};
use tower_backpressure::pressure::{PressureLayer, RuntimeMonitor};

const MS: Duration = Duration::from_millis(1);

/// Blocks the current worker thread, as a synchronous call inside a handler would.
async fn stall(for_: Duration) {
    tokio::spawn(async move { std::thread::sleep(for_) })
        .await
        .unwrap();
}

/// Waits for the monitor's next sample, failing the test rather than hanging if the probe has stopped.
async fn next_sample(monitor: &RuntimeMonitor) {
    tokio::time::timeout(Duration::from_secs(5), monitor.next_sample())
        .await
        .expect("the probe took no sample for 5 s");
}

#[tokio::test(flavor = "current_thread")]
async fn a_blocked_worker_shows_up_as_lag_at_least_as_long_as_the_block() {
    let interval = 5 * MS;
    let block = 100 * MS;
    let monitor = RuntimeMonitor::builder()
        .interval(interval)
        .build()
        .unwrap();
    let _guard = monitor.start().unwrap();

    // Right after a sample, the probe is due one interval later; the block starts now and holds the only worker,
    // so the probe runs at least `block - interval` late.
    next_sample(&monitor).await;
    let before = monitor.snapshot().samples;
    stall(block).await;
    while monitor.snapshot().samples == before {
        next_sample(&monitor).await;
    }
    let snap = monitor.snapshot();
    let tolerance = 2 * MS;
    assert!(
        snap.max_lag + tolerance >= block - interval,
        "max lag {:?} after a {block:?} block",
        snap.max_lag
    );
    assert!(
        snap.max_lag < block + Duration::from_millis(500),
        "max lag {:?}",
        snap.max_lag
    );
    assert!(snap.p99_lag >= snap.p50_lag);
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_runtime_shows_near_zero_lag() {
    let monitor = RuntimeMonitor::builder()
        .interval(5 * MS)
        .window(100)
        .build()
        .unwrap();
    let _guard = monitor.start().unwrap();
    while monitor.snapshot().samples < 100 {
        next_sample(&monitor).await;
    }
    let snap = monitor.snapshot();
    // Loose, for a noisy shared 2-core machine (the p99 of 100 samples forgives one sample the OS delayed), yet far
    // below the stall test above. Counted past the timer's 1 ms tick, an idle runtime reads a fraction of a ms.
    assert!(snap.p99_lag < 50 * MS, "idle p99 lag {:?}", snap.p99_lag);
    assert!(snap.p50_lag < 4 * MS, "idle median lag {:?}", snap.p50_lag);
    assert_eq!(snap.workers, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn the_layer_sheds_during_a_real_stall_and_recovers_after() {
    let monitor = RuntimeMonitor::builder()
        .interval(5 * MS)
        .max_lag(50 * MS, 10 * MS)
        .min_recovery(30 * MS)
        .build()
        .unwrap();
    let guard = monitor.start().unwrap();
    let layer = PressureLayer::builder(&monitor).build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));

    next_sample(&monitor).await;
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);

    stall(100 * MS).await;
    while !monitor.is_under_pressure() {
        assert!(monitor.snapshot().samples < 1000, "never tripped");
        next_sample(&monitor).await;
    }
    let err = svc.clone().oneshot(2).await.unwrap_err();
    assert!(err.is::<error::Overloaded>(), "{err}");
    assert!(monitor.is_lagging());

    let tripped_at = tokio::time::Instant::now();
    while monitor.is_under_pressure() {
        next_sample(&monitor).await;
    }
    // Without the 30 ms hold, the first calm sample (5 ms after the trip) would have cleared it.
    assert!(
        tripped_at.elapsed() >= 20 * MS,
        "recovered before the hold: {:?}",
        tripped_at.elapsed()
    );
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);

    let snap = handle.snapshot();
    assert_eq!((snap.admitted, snap.rejected), (2, 1));
    assert_eq!(monitor.snapshot().trips, 1);
    guard.stop().await;
}

/// The monitor's own work is not the runtime's lag: a user probe that takes 80 ms holds the worker (the next sample
/// comes later), but the next sample is due one interval after it returned, not after the probe task woke up.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_user_probe_is_not_counted_as_lag() {
    // Far beyond the lag an idle runtime shows on a busy machine, so that the test does not depend on its speed:
    // counted as lag, the probe alone would read at least 80 - 5 - 1 = 74 ms on every sample.
    let slow = 80 * MS;
    let monitor = RuntimeMonitor::builder()
        .interval(5 * MS)
        .max_lag(20 * MS, 10 * MS)
        .max_probe(
            "slow",
            move || {
                std::thread::sleep(slow);
                0
            },
            10,
            5,
        )
        .build()
        .unwrap();
    let _guard = monitor.start().unwrap();
    while monitor.snapshot().samples < 6 {
        next_sample(&monitor).await;
    }
    let snap = monitor.snapshot();
    assert!(
        snap.p50_lag < 40 * MS,
        "an otherwise idle runtime whose only slow work is the monitor's own probe: median lag {:?}",
        snap.p50_lag
    );
}

#[tokio::test(flavor = "current_thread")]
async fn stopping_the_monitor_ends_its_task() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let monitor = RuntimeMonitor::builder().interval(MS).build().unwrap();
    let baseline = metrics.num_alive_tasks();

    let guard = monitor.start().unwrap();
    assert_eq!(metrics.num_alive_tasks(), baseline + 1);
    assert!(monitor.is_running());
    next_sample(&monitor).await;
    guard.stop().await;
    assert_eq!(metrics.num_alive_tasks(), baseline);
    assert!(!monitor.is_running());

    // Stopped, it can be started again.
    let guard = monitor.start().unwrap();
    next_sample(&monitor).await;
    assert_eq!(
        monitor.snapshot().samples,
        1,
        "a restart begins a fresh count"
    );
    drop(guard);
    // Dropping aborts; the runtime drops the task at its next turn.
    while monitor.is_running() {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), baseline);
}

#[tokio::test(flavor = "current_thread")]
async fn a_monitor_that_is_not_started_costs_nothing() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 10 * MS)
        .build()
        .unwrap();
    let layer = PressureLayer::builder(&monitor).build().unwrap();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));

    stall(60 * MS).await;
    assert_eq!(
        svc.oneshot(1).await.unwrap(),
        1,
        "a stopped monitor never sheds"
    );
    assert_eq!(metrics.num_alive_tasks(), baseline, "no task");
    let snap = monitor.snapshot();
    assert!(!snap.running && !snap.under_pressure);
    assert_eq!(
        (snap.samples, snap.window, snap.max_lag),
        (0, 0, Duration::ZERO)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_monitor_runs_once() {
    let monitor = RuntimeMonitor::builder().build().unwrap();
    let guard = monitor.start().unwrap();
    let err = monitor.clone().start().unwrap_err();
    assert!(err.is_already_running());
    assert_eq!(err.to_string(), "runtime monitor already running");
    guard.stop().await;
}

#[test]
fn starting_outside_a_runtime_is_an_error_and_start_on_works_from_outside() {
    let monitor = RuntimeMonitor::builder().interval(MS).build().unwrap();
    let err = monitor.start().unwrap_err();
    assert!(!err.is_already_running() && !err.is_timers_disabled());
    assert_eq!(
        err.to_string(),
        "runtime monitor must be started from within a tokio runtime"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let guard = monitor.start_on(rt.handle()).unwrap();
    rt.block_on(async {
        next_sample(&monitor).await;
    });
    assert!(monitor.snapshot().samples >= 1);
    drop(rt);
    assert!(
        !monitor.is_running(),
        "shutting the runtime down drops the task"
    );
    drop(guard);
}

#[test]
fn starting_on_a_runtime_without_timers_is_an_error() {
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 10 * MS)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The probe sleeps between samples: on this runtime its task would panic at once, and the monitor would
    // never report pressure.
    let err = rt.block_on(async { monitor.start().unwrap_err() });
    assert!(err.is_timers_disabled() && !err.is_already_running());
    assert_eq!(
        err.to_string(),
        "runtime monitor needs a tokio runtime with timers enabled (`enable_time` on its builder)"
    );
    assert!(monitor
        .start_on(rt.handle())
        .unwrap_err()
        .is_timers_disabled());
    assert!(
        !monitor.is_running(),
        "a failed start leaves the monitor stopped"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let guard = monitor.start_on(rt.handle()).unwrap();
    rt.block_on(next_sample(&monitor));
    drop(guard);
}

#[test]
fn bad_configuration_is_an_error_with_a_clear_message() {
    let msg =
        |b: tower_backpressure::pressure::RuntimeMonitorBuilder| b.build().unwrap_err().to_string();
    let b = RuntimeMonitor::builder;
    assert_eq!(
        msg(b().interval(Duration::ZERO)),
        "invalid runtime monitor config: interval: must be greater than zero"
    );
    assert_eq!(
        msg(b().interval(Duration::from_micros(100))),
        "invalid runtime monitor config: interval: must be at least 1ms, the tokio timer resolution (got 100µs)"
    );
    assert_eq!(
        msg(b().window(0)),
        "invalid runtime monitor config: window: must be between 1 and 10000 samples (got 0)"
    );
    assert!(msg(b().window(10_001)).contains("(got 10001)"));
    assert_eq!(
        msg(b().max_lag(50 * MS, 80 * MS)),
        "invalid runtime monitor config: max_lag: recover (80ms) must be below trip (50ms), or the state would flap"
    );
    assert!(msg(b().max_lag(50 * MS, 50 * MS)).contains("recover (50ms) must be below trip (50ms)"));
    assert!(
        msg(b().max_lag(50 * MS, Duration::ZERO)).contains("max_lag: recover must be at least 1ms")
    );
    assert!(msg(b().max_alive_tasks(100, 100))
        .starts_with("invalid runtime monitor config: max_alive_tasks:"));
    assert!(msg(b().max_probe("memory", || 0, 10, 20))
        .starts_with("invalid runtime monitor config: max_probe:"));
    assert!(msg(b().max_probe("", || 0, 20, 10)).contains("name must not be empty"));
    // The monitor's own signal names: a probe named so could not be told apart in PressureChanged events.
    assert_eq!(
        msg(b().max_probe("stopped", || 0, 20, 10)),
        "invalid runtime monitor config: max_probe: name \"stopped\" is reserved: PressureChanged events use \
         \"lag\", \"alive_tasks\" and \"stopped\" for the monitor's own signals"
    );
    for name in ["lag", "alive_tasks"] {
        assert!(msg(b().max_probe(name, || 0, 20, 10)).contains("is reserved"));
    }

    let unthresholded = b().build().unwrap();
    assert_eq!(
        PressureLayer::builder(&unthresholded).build().unwrap_err().to_string(),
        "invalid pressure config: monitor: has no threshold (max_lag, max_alive_tasks or max_probe), so the layer \
         would never shed"
    );
}

#[test]
fn recover_thresholds_that_can_never_be_undercut_are_an_error() {
    let msg =
        |b: tower_backpressure::pressure::RuntimeMonitorBuilder| b.build().unwrap_err().to_string();
    let b = RuntimeMonitor::builder;
    // A signal clears once it reads below `recover`: no probe reading is below 0, and the monitor's own task is
    // always alive, so these would latch the pressure on for ever once it tripped.
    assert_eq!(
        msg(b().max_probe("queue", || 0, 100, 0)),
        "invalid runtime monitor config: max_probe: recover must be above 0: the pressure clears once the probe \
         reads below recover, and no reading is below 0, so it would never clear"
    );
    assert_eq!(
        msg(b().max_alive_tasks(5, 1)),
        "invalid runtime monitor config: max_alive_tasks: recover must be at least 2: the pressure clears once \
         fewer than recover tasks are alive, and the monitor's own task always is, so it would never clear (got 1)"
    );
    assert!(msg(b().max_alive_tasks(5, 0)).contains("recover must be at least 2"));
    assert!(b().max_probe("queue", || 0, 100, 1).build().is_ok());
    assert!(b().max_alive_tasks(5, 2).build().is_ok());
}

#[test]
fn durations_the_probe_cannot_work_with_are_an_error() {
    let msg =
        |b: tower_backpressure::pressure::RuntimeMonitorBuilder| b.build().unwrap_err().to_string();
    let b = RuntimeMonitor::builder;
    // The next deadline (now + interval) would overflow, and the probe task would panic once started.
    assert_eq!(
        msg(b().interval(Duration::MAX)),
        format!(
            "invalid runtime monitor config: interval: must be at most 3600s: a rarer probe would notice a stall \
             that late (got {:?})",
            Duration::MAX
        )
    );
    assert!(msg(b().interval(Duration::from_secs(3601))).contains("must be at most 3600s"));
    assert!(b().interval(Duration::from_secs(3600)).build().is_ok());
    // Both thresholds would round to u64::MAX nanoseconds, recover no longer below trip: the probe task panicked.
    let max = Duration::from_nanos(u64::MAX);
    assert_eq!(
        msg(b().max_lag(Duration::MAX, Duration::MAX - Duration::from_secs(1))),
        format!(
            "invalid runtime monitor config: max_lag: trip must be at most {max:?}, the largest lag it is compared \
             in (got {:?})",
            Duration::MAX
        )
    );
    assert!(msg(b().max_lag(max + Duration::from_nanos(1), max)).contains("trip must be at most"));
    assert!(b()
        .max_lag(max, max - Duration::from_nanos(1))
        .build()
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_multi_thread_runtime_lag_shows_when_every_worker_is_blocked() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let monitor = RuntimeMonitor::builder().interval(5 * MS).build().unwrap();
    let _guard = monitor.start().unwrap();
    next_sample(&monitor).await;
    assert_eq!(monitor.snapshot().workers, 2);

    // Two tasks that each hold a worker for 100 ms, started together so that both workers are blocked at once.
    let started = Arc::new(AtomicUsize::new(0));
    let block = |started: Arc<AtomicUsize>| async move {
        started.fetch_add(1, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while started.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            std::hint::spin_loop();
        }
        std::thread::sleep(100 * MS);
    };
    let a = tokio::spawn(block(started.clone()));
    let b = tokio::spawn(block(started.clone()));
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(started.load(Ordering::SeqCst), 2);
    next_sample(&monitor).await;
    let snap = monitor.snapshot();
    assert!(
        snap.max_lag >= 50 * MS,
        "max lag {:?} with both workers blocked",
        snap.max_lag
    );
}
