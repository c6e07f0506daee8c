//! The pressure state machine and the layer, fed synthetic samples in paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

use super::monitor::{Evaluator, Sample};
use super::*;
use crate::core::{error, BoxError, Classify, Event, Outcome, Permit, Release, Releaser};

const MS: Duration = Duration::from_millis(1);

fn lag(ms: u64) -> Sample {
    Sample {
        lag: MS * ms as u32,
        workers: 1,
        alive_tasks: 3,
        global_queue_depth: 0,
        probe: None,
    }
}

fn feed(monitor: &RuntimeMonitor, eval: &mut Evaluator, sample: Sample) {
    monitor.record(eval, &sample, Instant::now());
}

type Events = Arc<Mutex<Vec<Event>>>;

fn recorder() -> (Events, impl Fn(&Event) + Clone + Send + Sync + 'static) {
    let events: Events = Arc::default();
    let sink = events.clone();
    (events, move |e: &Event| sink.lock().unwrap().push(*e))
}

/// The `PressureChanged` events recorded, as (layer, under pressure, signal).
fn transitions(events: &Events) -> Vec<(&'static str, bool, &'static str)> {
    let events = events.lock().unwrap();
    let changes = events.iter().filter_map(|e| match *e {
        Event::PressureChanged {
            layer,
            under_pressure,
            signal,
        } => Some((layer, under_pressure, signal)),
        _ => None,
    });
    changes.collect()
}

#[tokio::test(start_paused = true)]
async fn layer_sheds_above_trip_and_recovers_below_recover_after_the_hold() {
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .min_recovery(100 * MS)
        .build()
        .unwrap();
    let mut eval = monitor.evaluator();
    let layer = PressureLayer::builder(&monitor)
        .retry_after(Duration::from_secs(3))
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
    let passes = |svc: &Pressure<_>| {
        let svc = svc.clone();
        async move {
            match svc.oneshot(7).await {
                Ok(7) => true,
                Ok(other) => panic!("unexpected response {other}"),
                Err(e) => {
                    let shed = e
                        .downcast_ref::<error::Overloaded>()
                        .expect("an Overloaded error");
                    assert_eq!(shed.retry_after(), Some(Duration::from_secs(3)));
                    false
                }
            }
        }
    };

    feed(&monitor, &mut eval, lag(50));
    assert!(passes(&svc).await, "at trip is not above it");
    feed(&monitor, &mut eval, lag(51));
    assert!(!passes(&svc).await, "above trip: shed");
    for _ in 0..5 {
        tokio::time::advance(40 * MS).await;
        feed(&monitor, &mut eval, lag(30));
        assert!(!passes(&svc).await, "between recover and trip: still shed");
    }
    feed(&monitor, &mut eval, lag(10));
    assert!(!passes(&svc).await, "calm, hold just started");
    tokio::time::advance(60 * MS).await;
    feed(&monitor, &mut eval, lag(10));
    assert!(!passes(&svc).await, "60 ms of calm");
    tokio::time::advance(40 * MS).await;
    feed(&monitor, &mut eval, lag(10));
    assert!(passes(&svc).await, "100 ms of calm: recovered");
    feed(&monitor, &mut eval, lag(40));
    assert!(
        passes(&svc).await,
        "between the thresholds from healthy: still admitted"
    );

    let snap = handle.snapshot();
    assert_eq!((snap.admitted, snap.rejected, snap.in_flight), (3, 8, 0));
    assert!(!snap.under_pressure);
    assert_eq!(monitor.snapshot().trips, 1);
}

#[tokio::test(start_paused = true)]
async fn bypassed_requests_pass_under_pressure() {
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .build()
        .unwrap();
    let mut eval = monitor.evaluator();
    let layer = PressureLayer::builder(&monitor)
        .bypass(|path: &&'static str| *path == "/health")
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|p: &'static str| async move {
        Ok::<_, BoxError>(p.len())
    }));

    feed(&monitor, &mut eval, lag(80));
    assert_eq!(svc.clone().oneshot("/health").await.unwrap(), 7);
    assert!(svc.clone().oneshot("/work").await.is_err());
    let snap = handle.snapshot();
    assert_eq!((snap.admitted, snap.rejected, snap.bypassed), (0, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn every_signal_trips_and_events_name_it() {
    let (events, observer) = recorder();
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .max_alive_tasks(100, 50)
        .max_probe("memory", || 0, 1000, 500)
        .observer(observer)
        .build()
        .unwrap();
    let mut eval = monitor.evaluator();
    let calm = lag(1);

    feed(
        &monitor,
        &mut eval,
        Sample {
            alive_tasks: 101,
            ..calm
        },
    );
    assert!(monitor.is_under_pressure());
    assert!(!monitor.is_lagging(), "tasks, not lag");
    feed(
        &monitor,
        &mut eval,
        Sample {
            alive_tasks: 49,
            ..calm
        },
    );
    assert!(!monitor.is_under_pressure());

    feed(
        &monitor,
        &mut eval,
        Sample {
            probe: Some(1001),
            ..calm
        },
    );
    assert!(monitor.is_under_pressure());
    // Lag trips too; the pressure holds until both have recovered.
    feed(
        &monitor,
        &mut eval,
        Sample {
            probe: Some(499),
            ..lag(60)
        },
    );
    assert!(monitor.is_lagging() && monitor.is_under_pressure());
    feed(
        &monitor,
        &mut eval,
        Sample {
            probe: Some(499),
            ..lag(5)
        },
    );
    assert!(!monitor.is_under_pressure());

    assert_eq!(
        transitions(&events),
        [
            ("pressure", true, "alive_tasks"),
            ("pressure", false, "alive_tasks"),
            ("pressure", true, "memory"),
            ("pressure", false, "lag"),
        ]
    );
    let lags = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::RuntimeLag {
                    layer: "pressure",
                    ..
                }
            )
        })
        .count();
    assert_eq!(lags, 5, "one RuntimeLag per sample");
    let snap = monitor.snapshot();
    assert_eq!((snap.trips, snap.samples, snap.probe), (2, 5, Some(499)));
}

#[tokio::test(start_paused = true)]
async fn snapshot_reports_window_max_and_percentiles() {
    let monitor = RuntimeMonitor::builder().window(100).build().unwrap();
    let mut eval = monitor.evaluator();
    // 1..=100 ms in a shuffled order: the figures must not depend on it.
    for i in 0..100u64 {
        feed(&monitor, &mut eval, lag((i * 37) % 100 + 1));
    }
    let snap = monitor.snapshot();
    assert_eq!(snap.window, 100);
    assert_eq!(snap.max_lag, 100 * MS);
    assert_eq!(snap.p50_lag, 50 * MS);
    assert_eq!(snap.p99_lag, 99 * MS);
    assert_eq!(snap.last_lag, MS * ((99 * 37) % 100 + 1));

    // The window is bounded: older samples fall out.
    for _ in 0..100 {
        feed(&monitor, &mut eval, lag(2));
    }
    let snap = monitor.snapshot();
    assert_eq!(
        (snap.window, snap.max_lag, snap.p99_lag),
        (100, 2 * MS, 2 * MS)
    );
    assert!(!snap.under_pressure, "no thresholds: never pressured");
}

#[tokio::test(start_paused = true)]
async fn probe_samples_once_per_interval() {
    let monitor = RuntimeMonitor::builder().interval(10 * MS).build().unwrap();
    let guard = monitor.start().unwrap();
    tokio::time::sleep(105 * MS).await;
    let snap = monitor.snapshot();
    assert_eq!(snap.samples, 10);
    assert_eq!(snap.max_lag, Duration::ZERO, "paused time never runs late");
    assert!(snap.running && snap.workers == 1 && snap.alive_tasks >= 1);
    guard.stop().await;
    assert!(!monitor.is_running());
}

#[tokio::test(start_paused = true)]
async fn the_timer_tick_is_not_counted_as_lag() {
    // tokio fires a timer at the first millisecond tick at or after its deadline, paused or not: with a 1.5 ms
    // interval every other deadline falls between two ticks and fires half a millisecond late on a runtime doing
    // nothing else. That is the timer's granularity, not lag.
    let monitor = RuntimeMonitor::builder()
        .interval(MS + MS / 2)
        .build()
        .unwrap();
    let guard = monitor.start().unwrap();
    tokio::time::sleep(30 * MS).await;
    let snap = monitor.snapshot();
    assert!(snap.samples >= 10, "{} samples", snap.samples);
    assert_eq!(snap.max_lag, Duration::ZERO);
    guard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn lag_is_counted_past_the_timer_tick() {
    use super::monitor::lag_past;
    let due = Instant::now();
    assert_eq!(lag_past(due, due), Duration::ZERO);
    assert_eq!(lag_past(due, due + MS / 2), Duration::ZERO);
    assert_eq!(
        lag_past(due, due + MS),
        Duration::ZERO,
        "one tick late: the timer's doing"
    );
    assert_eq!(lag_past(due, due + MS + MS / 4), MS / 4);
    assert_eq!(lag_past(due, due + 100 * MS), 99 * MS);
    assert_eq!(
        lag_past(due + MS, due),
        Duration::ZERO,
        "woken early: no lag"
    );
}

#[tokio::test(start_paused = true)]
async fn the_largest_accepted_durations_keep_the_probe_running() {
    let max = Duration::from_nanos(u64::MAX);
    let monitor = RuntimeMonitor::builder()
        .interval(Duration::from_secs(3600))
        .max_lag(max, max - Duration::from_nanos(1))
        .min_recovery(Duration::MAX)
        .build()
        .unwrap();
    let guard = monitor.start().unwrap();
    tokio::time::sleep(Duration::from_secs(7201)).await;
    let snap = monitor.snapshot();
    assert!(snap.running, "the probe task died");
    assert_eq!(snap.samples, 2);
    guard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_a_pressured_monitor_clears_the_pressure_as_signal_stopped() {
    let (events, observer) = recorder();
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .observer(observer)
        .build()
        .unwrap();
    let guard = monitor.start().unwrap();
    feed(&monitor, &mut monitor.evaluator(), lag(80));
    assert!(monitor.is_under_pressure());
    guard.stop().await;
    assert!(!monitor.is_under_pressure());
    assert_eq!(
        transitions(&events),
        [("pressure", true, "lag"), ("pressure", false, "stopped")]
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_monitor_shows_none_of_the_last_runs_figures() {
    let monitor = RuntimeMonitor::builder()
        .max_probe("memory", || 7, 100, 50)
        .build()
        .unwrap();
    let guard = monitor.start().unwrap();
    monitor.next_sample().await;
    feed(
        &monitor,
        &mut monitor.evaluator(),
        Sample {
            global_queue_depth: 4,
            ..lag(30)
        },
    );
    guard.stop().await;

    let guard = monitor.start().unwrap();
    let snap = monitor.snapshot();
    assert_eq!(
        (snap.samples, snap.window, snap.last_lag, snap.max_lag),
        (0, 0, Duration::ZERO, Duration::ZERO)
    );
    assert_eq!(
        (
            snap.workers,
            snap.alive_tasks,
            snap.global_queue_depth,
            snap.probe
        ),
        (0, 0, 0, None),
        "figures from before the restart"
    );
    monitor.next_sample().await;
    let snap = monitor.snapshot();
    assert_eq!((snap.workers, snap.probe), (1, Some(7)));
    guard.stop().await;
}

/// A user probe is user code: one that panics on a reading (a `/proc` read that failed, unwrapped) must cost that
/// reading, not the monitor. Its task died with the panic, and the monitor failed open for good: no more lag or
/// probe samples, and no shedding however loaded the runtime became.
/// Starts `monitor` (sampling every 10 ms) and lets it run 55 ms: its task must still run, with a sample taken every
/// interval, whatever panicked (`whose` panic) on the way. Returns the guard and the snapshot then.
async fn five_samples(monitor: &RuntimeMonitor, whose: &str) -> (MonitorGuard, RuntimeSnapshot) {
    let guard = monitor.start().unwrap();
    tokio::time::sleep(55 * MS).await;
    let snap = monitor.snapshot();
    assert!(snap.running, "the probe task died with {whose} panic");
    assert_eq!(
        snap.samples, 5,
        "a sample every interval, {whose} panic's too"
    );
    (guard, snap)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_user_probe_costs_one_reading_not_the_monitor() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let counter = AtomicU64::new(0);
    let probe = move || match counter.fetch_add(1, SeqCst) + 1 {
        2 => panic!("the probe failed to read"),
        n if n >= 3 => 200,
        _ => 0,
    };
    let monitor = RuntimeMonitor::builder()
        .interval(10 * MS)
        .max_lag(50 * MS, 20 * MS)
        .max_probe("memory", probe, 100, 50)
        .build()
        .unwrap();
    let (guard, snap) = five_samples(&monitor, "the user probe's").await;
    assert_eq!(snap.probe, Some(200));
    assert!(snap.under_pressure, "the readings after the panic count");
    guard.stop().await;
}

/// A panicking reading leaves the probe's signal as it was, tripped included: it cleared the pressure the probe
/// had declared (with no `PressureChanged` event), and the next good reading set it again, unannounced and
/// uncounted.
#[tokio::test(start_paused = true)]
async fn a_panicking_user_probe_leaves_a_tripped_signal_tripped() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let reads = Arc::new(AtomicU64::new(0));
    let counter = reads.clone();
    let probe = move || match counter.fetch_add(1, SeqCst) + 1 {
        2 => panic!("the probe failed to read"),
        _ => 200,
    };
    let (events, record) = recorder();
    let monitor = RuntimeMonitor::builder()
        .interval(10 * MS)
        .max_probe("memory", probe, 100, 50)
        .observer(record)
        .build()
        .unwrap();
    let guard = monitor.start().unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        monitor.next_sample().await;
        seen.push(monitor.is_under_pressure());
    }
    assert_eq!(reads.load(SeqCst), 3);
    assert_eq!(
        seen,
        [true, true, true],
        "the failed reading cleared the pressure"
    );
    assert_eq!(transitions(&events), [("pressure", true, "memory")]);
    assert_eq!(monitor.snapshot().trips, 1);
    guard.stop().await;
}

/// An observer is user code too, and the monitor's task calls it on every sample: one that panics (a metrics
/// exporter's bug) must not end the task. It did, and the monitor failed open for good.
#[tokio::test(start_paused = true)]
async fn a_panicking_observer_does_not_stop_the_monitor() {
    let (events, record) = recorder();
    let observer = move |e: &Event| {
        record(e);
        if matches!(e, Event::RuntimeLag { .. }) {
            panic!("the exporter failed");
        }
    };
    let monitor = RuntimeMonitor::builder()
        .interval(10 * MS)
        .max_lag(50 * MS, 20 * MS)
        .observer(observer)
        .build()
        .unwrap();
    let (guard, _) = five_samples(&monitor, "the observer's").await;
    // The rest of a sample's work is done: the pressure is set, and the change told and counted.
    feed(&monitor, &mut monitor.evaluator(), lag(80));
    assert!(monitor.is_under_pressure());
    assert_eq!(transitions(&events), [("pressure", true, "lag")]);
    assert_eq!(monitor.snapshot().trips, 1);
    guard.stop().await;
}

/// An observer reading the monitor's snapshot when told of a sample (an exporter publishing every figure at once)
/// must see one consistent state: it saw the pressure on while the trip that turned it on was not counted yet.
#[tokio::test(start_paused = true)]
async fn an_observer_told_of_a_sample_sees_its_trip_counted() {
    let monitor_cell: Arc<std::sync::OnceLock<RuntimeMonitor>> = Arc::default();
    let seen: Arc<Mutex<Vec<(bool, u64, u64)>>> = Arc::default();
    let (cell, log) = (monitor_cell.clone(), seen.clone());
    let observer = move |e: &Event| {
        if let (Event::RuntimeLag { .. }, Some(monitor)) = (e, cell.get()) {
            let snap = monitor.snapshot();
            log.lock()
                .unwrap()
                .push((snap.under_pressure, snap.trips, snap.samples));
        }
    };
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .observer(observer)
        .build()
        .unwrap();
    monitor_cell.set(monitor.clone()).unwrap();
    let mut eval = monitor.evaluator();
    feed(&monitor, &mut eval, lag(10));
    feed(&monitor, &mut eval, lag(80));
    feed(&monitor, &mut eval, lag(5));
    feed(&monitor, &mut eval, lag(90));
    assert_eq!(
        *seen.lock().unwrap(),
        [(false, 0, 1), (true, 1, 2), (false, 1, 3), (true, 2, 4)]
    );
}

#[derive(Default)]
struct Outcomes(Mutex<Vec<Outcome>>);

impl Release for Outcomes {
    fn release(&self, outcome: Outcome, _latency: Duration, _tag: u64) {
        self.0.lock().unwrap().push(outcome);
    }
}

#[tokio::test(start_paused = true)]
async fn lag_aware_turns_outcomes_during_lag_into_drops() {
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .build()
        .unwrap();
    let mut eval = monitor.evaluator();
    let log = Arc::new(Outcomes::default());
    let classify = LagAware::new(crate::core::AnyOk, &monitor);
    let finish = |result: Result<u32, &'static str>| {
        classify.finish(result, Some(Permit::new(Releaser::new(log.clone()), 0)))
    };

    assert_eq!(finish(Ok(1)), Ok(1));
    assert_eq!(finish(Err("boom")), Err("boom"));
    feed(&monitor, &mut eval, lag(70));
    assert_eq!(finish(Ok(2)), Ok(2), "the response passes unchanged");
    assert_eq!(finish(Err("boom")), Err("boom"));
    feed(&monitor, &mut eval, lag(5));
    assert_eq!(finish(Ok(3)), Ok(3));
    assert_eq!(
        *log.0.lock().unwrap(),
        [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Dropped,
            Outcome::Dropped,
            Outcome::Success
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn pressure_is_lag_aware_only_for_lag() {
    let monitor = RuntimeMonitor::builder()
        .max_lag(50 * MS, 20 * MS)
        .max_alive_tasks(10, 5)
        .build()
        .unwrap();
    let mut eval = monitor.evaluator();
    feed(
        &monitor,
        &mut eval,
        Sample {
            alive_tasks: 20,
            ..lag(1)
        },
    );
    let log = Arc::new(Outcomes::default());
    let classify = LagAware::new(crate::core::AnyOk, &monitor);
    let _ = Classify::<u8, ()>::finish(
        &classify,
        Ok(1),
        Some(Permit::new(Releaser::new(log.clone()), 0)),
    );
    assert_eq!(*log.0.lock().unwrap(), [Outcome::Success]);
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_mode_answers_503_with_retry_after() {
    use http_body_util::Empty;

    // Whole seconds rounded up. `Duration::MAX` saturates: rounding it up overflowed, a panic in debug builds and
    // `Retry-After: 0` (retry at once) in release.
    let max = u64::MAX.to_string();
    for (retry_after, header) in [(1500 * MS, "2"), (Duration::MAX, max.as_str())] {
        let monitor = RuntimeMonitor::builder()
            .max_lag(50 * MS, 20 * MS)
            .build()
            .unwrap();
        let mut eval = monitor.evaluator();
        let layer = PressureLayer::builder(&monitor)
            .http()
            .retry_after(retry_after)
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
        }));
        let ok = svc.clone().oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(ok.status(), http::StatusCode::OK);
        feed(&monitor, &mut eval, lag(90));
        let shed = svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(shed.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[http::header::RETRY_AFTER], header);
    }
}
