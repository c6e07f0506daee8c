//! Tests of the circuit breaker: Resilience4j's defaults as a truth table, the sliding and time windows, slow
//! calls, half-open probes (verdicts, cancellation, maximum wait, stale generations), backoff, retry hints in
//! every reject mode, readiness mode, the handle's controls, races, and configuration errors.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_backpressure::breaker::{CircuitBreaker, CircuitBreakerLayer};
use tower_backpressure::core::{error::CircuitOpen, AnyOk, CircuitState, ErrorMode, Event};
use tower_layer::Layer;

/// What the inner service does with a request.
#[derive(Debug, Clone, Copy)]
enum Call {
    Ok,
    Fail,
    /// Succeeds after this long.
    Slow(Duration),
    /// Never answers.
    Hang,
}

type Inner = tower::util::ServiceFn<
    fn(Call) -> Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>>,
>;

fn inner() -> Inner {
    fn run(call: Call) -> Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>> {
        Box::pin(async move {
            match call {
                Call::Ok => Ok("ok"),
                Call::Fail => Err("boom".into()),
                Call::Slow(d) => {
                    tokio::time::sleep(d).await;
                    Ok("slow")
                }
                Call::Hang => std::future::pending().await,
            }
        })
    }
    service_fn(run as fn(Call) -> _)
}

/// Every state change the observer saw.
#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Vec<(CircuitState, CircuitState)>>>);

impl Transitions {
    fn observer(&self) -> impl Fn(&Event) + Send + Sync + 'static {
        let log = self.0.clone();
        move |e: &Event| {
            if let Event::BreakerState { from, to, .. } = *e {
                log.lock().unwrap().push((from, to));
            }
        }
    }
    fn list(&self) -> Vec<(CircuitState, CircuitState)> {
        self.0.lock().unwrap().clone()
    }
}

type Svc<O> = CircuitBreaker<Inner, AnyOk, ErrorMode, O>;

async fn send<O: tower_backpressure::core::Observer>(
    svc: &mut Svc<O>,
    call: Call,
) -> Result<&'static str, BoxError> {
    svc.ready().await?.call(call).await
}

fn is_open_rejection(r: &Result<&'static str, BoxError>) -> bool {
    matches!(r, Err(e) if e.is::<CircuitOpen>())
}

/// Resilience4j's defaults (window 100, minimum 100, 50 %), no jitter so open periods are exact.
fn r4j() -> tower_backpressure::breaker::CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(100)
        .failure_rate_threshold(50.0)
        .wait_in_open(Duration::from_secs(5))
        .jitter(0.0)
}

// ---------------------------------------------------------------- truth table

#[tokio::test(start_paused = true)]
async fn r4j_fifty_failures_in_a_hundred_open_it() {
    let layer = r4j().build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for i in 0..100 {
        let _ = send(&mut svc, if i % 2 == 0 { Call::Fail } else { Call::Ok }).await;
        if i < 99 {
            assert_eq!(
                handle.state(),
                CircuitState::Closed,
                "opened early, at call {i}"
            );
        }
    }
    assert_eq!(handle.state(), CircuitState::Open);
    assert!(is_open_rejection(&send(&mut svc, Call::Ok).await));
}

#[tokio::test(start_paused = true)]
async fn r4j_forty_nine_failures_do_not() {
    let layer = r4j().build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..49 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    for _ in 0..51 {
        send(&mut svc, Call::Ok).await.unwrap();
    }
    let snap = handle.snapshot();
    assert_eq!(snap.state, CircuitState::Closed);
    assert_eq!((snap.calls, snap.failures), (100, 49));
    assert!((snap.failure_rate - 49.0).abs() < 1e-9);
}

#[tokio::test(start_paused = true)]
async fn r4j_ninety_nine_calls_never_open_it() {
    let layer = r4j().build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..99 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    assert_eq!(
        handle.state(),
        CircuitState::Closed,
        "99 failures are below minimum_calls"
    );
    let _ = send(&mut svc, Call::Fail).await;
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "the 100th call reaches minimum_calls"
    );
}

/// Opens a breaker built from `builder` with 100 failures and waits out the open period.
async fn open_then_half_open<O: tower_backpressure::core::Observer>(
    svc: &mut Svc<O>,
    handle: &tower_backpressure::breaker::CircuitBreakerHandle<O>,
) {
    for _ in 0..100 {
        let _ = send(svc, Call::Fail).await;
    }
    assert_eq!(handle.state(), CircuitState::Open);
    tokio::time::sleep(handle.snapshot().open_remaining.unwrap()).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
}

/// Ten probes, sent in `order`; the state must stay half-open until probe `decided_at` (1-based) and then be
/// `verdict`.
async fn probe_verdict(order: &[Call], decided_at: usize, verdict: CircuitState) {
    let layer = r4j().permitted_calls_in_half_open(10).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    for (i, call) in order.iter().take(decided_at).enumerate() {
        assert_eq!(
            handle.state(),
            CircuitState::HalfOpen,
            "decided before probe {}",
            i + 1
        );
        let r = send(&mut svc, *call).await;
        assert!(!is_open_rejection(&r), "probe {} was rejected", i + 1);
    }
    assert_eq!(handle.state(), verdict, "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn r4j_half_open_reopens_at_half_the_probes_failed() {
    use Call::{Fail as F, Ok as S};
    // 5 of 10 failed is 50 %: open, as soon as the fifth failure makes it certain.
    probe_verdict(&[F, F, F, F, F, S, S, S, S, S], 5, CircuitState::Open).await;
    probe_verdict(&[S, S, S, S, S, F, F, F, F, F], 10, CircuitState::Open).await;
    probe_verdict(&[S, F, S, F, S, F, S, F, S, F], 10, CircuitState::Open).await;
    // 4 of 10 failed: closed, once six successes make it certain.
    probe_verdict(&[F, F, F, F, S, S, S, S, S, S], 10, CircuitState::Closed).await;
    probe_verdict(&[S, S, S, S, S, S, F, F, F, F], 6, CircuitState::Closed).await;
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_probes_per_cycle() {
    let layer = r4j().permitted_calls_in_half_open(3).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    let probes: Vec<_> = (0..3).map(|_| svc.call(Call::Hang)).collect();
    assert!(
        is_open_rejection(&send(&mut svc, Call::Ok).await),
        "a fourth probe was admitted"
    );
    assert_eq!(handle.snapshot().probes_admitted, 3);
    drop(probes);
}

// ---------------------------------------------------------------- windows

#[tokio::test(start_paused = true)]
async fn sliding_window_counts_only_the_last_n_calls() {
    let layer = r4j().build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..1000 {
        send(&mut svc, Call::Ok).await.unwrap();
    }
    // 50 failures among the last 100 calls: 5 % of all calls, 50 % of the window.
    for i in 0..100 {
        let _ = send(&mut svc, if i % 2 == 0 { Call::Ok } else { Call::Fail }).await;
    }
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn time_window_buckets_expire() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(10, Duration::from_secs(1))
        .minimum_calls(10)
        .failure_rate_threshold(50.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..9 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    assert_eq!(handle.snapshot().failures, 9);
    tokio::time::sleep(Duration::from_millis(9_500)).await;
    assert_eq!(
        handle.snapshot().failures,
        9,
        "still inside the 10 s window"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let snap = handle.snapshot();
    assert_eq!(
        (snap.calls, snap.failures),
        (0, 0),
        "the bucket expired whole"
    );
    // Had the old failures stayed, these ten calls (one failed) would make 10 of 19.
    for i in 0..10 {
        let _ = send(&mut svc, if i == 0 { Call::Fail } else { Call::Ok }).await;
    }
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.calls, snap.failures),
        (CircuitState::Closed, 10, 1)
    );
}

/// A time window of 1 ms buckets, 49.7 days (2^32 widths) on: the calls of then are long out of the window and
/// stay out. (Epochs once had 32 bits, and came round to old counts again.)
#[tokio::test(start_paused = true)]
async fn time_window_epochs_do_not_come_round_to_old_counts() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(10, Duration::from_millis(1))
        .minimum_calls(100)
        .failure_rate_threshold(50.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..99 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    assert_eq!(handle.snapshot().calls, 99);
    tokio::time::advance(Duration::from_millis(1 << 32)).await;
    assert_eq!(handle.snapshot().calls, 0);
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.snapshot().calls, 1);
}

/// After a long idle spell (here 2^31 + 100 widths, about 25 days with 1 ms buckets), every bucket's tag is far
/// behind, however far: calls count again from the first. (A tag more than 2^31 epochs behind was once taken for
/// one ahead, and every write to its bucket dropped.)
#[tokio::test(start_paused = true)]
async fn time_window_counts_after_a_long_idle_spell() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(10, Duration::from_millis(1))
        .minimum_calls(10)
        .failure_rate_threshold(50.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..10 {
        send(&mut svc, Call::Ok).await.unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    for idle in [(1 << 31) + 100, (1 << 33) + 7] {
        tokio::time::advance(Duration::from_millis(idle)).await;
        assert_eq!(handle.snapshot().calls, 0);
        for i in 0..10 {
            let _ = send(&mut svc, Call::Fail).await;
            assert_eq!(handle.snapshot().calls, (i + 1).min(10));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(handle.state(), CircuitState::Open, "ten failures in a row");
        handle.reset();
    }
}

#[tokio::test(start_paused = true)]
async fn time_window_trips_within_its_span() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(10, Duration::from_secs(1))
        .minimum_calls(10)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..10 {
        let _ = send(&mut svc, Call::Fail).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    assert_eq!(handle.state(), CircuitState::Open);
}

/// A time window reads its counts back after a success only while it holds a failure or a slow call: a success
/// that brings the calls up to the minimum trips on the failures before it, unless they have left the window.
#[tokio::test(start_paused = true)]
async fn time_window_trips_on_the_success_that_reaches_the_minimum() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(2, Duration::from_secs(1))
        .minimum_calls(4)
        .failure_rate_threshold(50.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..2 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    // The failures leave the window of two 1 s buckets.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..4 {
        send(&mut svc, Call::Ok).await.unwrap();
    }
    assert_eq!(handle.state(), CircuitState::Closed);

    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..2 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(
        handle.state(),
        CircuitState::Closed,
        "3 calls, under the minimum"
    );
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Open, "2 of 4 calls failed");
}

/// The slow-call rule is off by default (no clock read on the closed path), and either of its setters turns it
/// on with Resilience4j's values for the other (60 s, 100 %).
#[tokio::test(start_paused = true)]
async fn the_slow_call_rule_is_off_until_configured() {
    let hang = Duration::from_secs(61);
    let default = CircuitBreakerLayer::builder()
        .count_window(2)
        .minimum_calls(2)
        .build()
        .unwrap();
    let handle = default.handle();
    let mut svc = default.layer(inner());
    for _ in 0..2 {
        send(&mut svc, Call::Slow(hang)).await.unwrap();
    }
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.calls, snap.slow_calls),
        (CircuitState::Closed, 2, 0)
    );

    let by_rate = CircuitBreakerLayer::builder()
        .count_window(2)
        .minimum_calls(2)
        .slow_call_rate_threshold(100.0)
        .build()
        .unwrap();
    let handle = by_rate.handle();
    let mut svc = by_rate.layer(inner());
    send(&mut svc, Call::Slow(Duration::from_secs(59)))
        .await
        .unwrap();
    send(&mut svc, Call::Slow(hang)).await.unwrap();
    assert_eq!(handle.snapshot().slow_calls, 1, "slow from 60 s by default");
    send(&mut svc, Call::Slow(hang)).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Open, "100 % slow by default");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_slow_call_rule() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(10)
        .slow_call_duration(Duration::from_millis(200))
        .slow_call_rate_threshold(60.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    send(&mut svc, Call::Ok).await.unwrap();
    for _ in 0..5 {
        send(&mut svc, Call::Slow(Duration::from_millis(200)))
            .await
            .unwrap();
    }
    for _ in 0..4 {
        send(&mut svc, Call::Slow(Duration::from_millis(199)))
            .await
            .unwrap();
    }
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.slow_calls, snap.failures),
        (CircuitState::Closed, 5, 0)
    );
    send(&mut svc, Call::Slow(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "6 slow of the last 10 reach 60 %"
    );
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip_before_the_window_fills() {
    let layer = r4j().consecutive_failures(5).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..4 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    send(&mut svc, Call::Ok).await.unwrap();
    for _ in 0..4 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    assert_eq!(handle.snapshot().consecutive_failures, 4);
    assert_eq!(handle.state(), CircuitState::Closed);
    let _ = send(&mut svc, Call::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_are_not_counted() {
    let layer = r4j()
        .count_window(10)
        .minimum_calls(10)
        .classifier(|r: Result<&&'static str, &BoxError>| match r {
            Ok(_) => tower_backpressure::core::Outcome::Success,
            Err(_) => tower_backpressure::core::Outcome::Ignored,
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    for _ in 0..20 {
        let _ = svc.ready().await.unwrap().call(Call::Fail).await;
    }
    // A cancelled call is ignored too.
    drop(svc.ready().await.unwrap().call(Call::Hang));
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.calls, snap.in_flight),
        (CircuitState::Closed, 0, 0)
    );
}

// ---------------------------------------------------------------- half-open: no stuck state

#[tokio::test(start_paused = true)]
async fn cancelled_probes_return_their_permits() {
    let layer = r4j().permitted_calls_in_half_open(2).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    for _ in 0..3 {
        let a = svc.call(Call::Hang);
        let b = svc.call(Call::Hang);
        assert!(
            is_open_rejection(&send(&mut svc, Call::Ok).await),
            "both probe slots are taken"
        );
        drop((a, b));
        assert_eq!(
            handle.snapshot().probes_admitted,
            0,
            "dropped probes returned their slots"
        );
    }
    send(&mut svc, Call::Ok).await.unwrap();
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_past_max_wait_reopens_when_no_probe_answered() {
    let transitions = Transitions::default();
    let layer = r4j()
        .permitted_calls_in_half_open(2)
        .max_wait_in_half_open(Duration::from_secs(3))
        .observer(transitions.observer())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    let hung = (svc.call(Call::Hang), svc.call(Call::Hang));
    tokio::time::sleep(Duration::from_millis(2_999)).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let snap = handle.snapshot();
    assert_eq!(
        snap.state,
        CircuitState::Open,
        "no probe answered: open again"
    );
    assert_eq!(
        snap.open_remaining,
        Some(Duration::from_secs(10)),
        "with backoff"
    );
    assert_eq!(
        transitions.list(),
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Open),
        ]
    );
    // The hung probes belong to a finished cycle; dropping them now changes nothing.
    drop(hung);
    assert_eq!(handle.state(), CircuitState::Open);
}

/// Half-open entered by a look at the handle (a metrics poller, say), then no call for the whole half-open wait:
/// no probe was sent, so nothing speaks against the dependency. Half-open waits on, for as long again, without a
/// trip or its backoff, and the next call is the probe.
#[tokio::test(start_paused = true)]
async fn half_open_with_no_probe_sent_waits_on_without_a_trip() {
    let transitions = Transitions::default();
    let layer = r4j()
        .permitted_calls_in_half_open(1)
        .max_wait_in_half_open(Duration::from_secs(3))
        .observer(transitions.observer())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    // A poller looks every second, for three waits' worth.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(handle.snapshot().state, CircuitState::HalfOpen);
    }
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed, "the probe closed it");
    assert_eq!(
        transitions.list(),
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
    // A probe that went away untold gives its slot back, and leaves nothing to judge either.
    open_then_half_open(&mut svc, &handle).await;
    drop(svc.call(Call::Hang));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    // A probe sent and never answered is the dependency's silence: open again, with backoff.
    let hung = svc.call(Call::Hang);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(handle.state(), CircuitState::Open);
    drop(hung);
}

/// The shortest periods accepted, 1 ms each, make a breaker that trips, probes and closes (sub-millisecond ones
/// are refused by `build`: the breaker counts whole milliseconds).
#[tokio::test(start_paused = true)]
async fn one_millisecond_periods_trip_probe_and_close() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(1)
        .minimum_calls(1)
        .permitted_calls_in_half_open(1)
        .wait_in_open(Duration::from_millis(1))
        .max_wait_in_open(Duration::from_millis(1))
        .max_wait_in_half_open(Duration::from_millis(1))
        .jitter(0.5)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert!(is_open_rejection(&send(&mut svc, Call::Ok).await));
    tokio::time::sleep(Duration::from_millis(1)).await;
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_past_max_wait_closes_when_the_answered_probes_were_healthy() {
    let layer = r4j()
        .permitted_calls_in_half_open(3)
        .max_wait_in_half_open(Duration::from_secs(3))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    send(&mut svc, Call::Ok).await.unwrap();
    let _hung = (svc.call(Call::Hang), svc.call(Call::Hang));
    assert_eq!(
        handle.state(),
        CircuitState::HalfOpen,
        "one success of three decides nothing yet"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn late_probes_of_an_old_cycle_do_not_count() {
    let layer = r4j()
        .permitted_calls_in_half_open(2)
        .max_wait_in_half_open(Duration::from_secs(1))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    open_then_half_open(&mut svc, &handle).await;
    // Cycle 1: two slow probes outlive the half-open wait; the breaker re-opens (10 s) meanwhile.
    let late = tokio::spawn(svc.call(Call::Slow(Duration::from_millis(11_500))));
    let late2 = tokio::spawn(svc.call(Call::Slow(Duration::from_millis(11_500))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    // Cycle 2: one probe fails; the late successes of cycle 1 land now and must not close the breaker.
    let failing = svc.call(Call::Fail);
    late.await.unwrap().unwrap();
    late2.await.unwrap().unwrap();
    assert_eq!(
        handle.state(),
        CircuitState::HalfOpen,
        "old-cycle probes counted"
    );
    let _ = failing.await;
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "one failed of two probes is 50 %"
    );
}

// ---------------------------------------------------------------- backoff and retry hints

#[tokio::test(start_paused = true)]
async fn open_period_backs_off_and_is_capped() {
    let layer = r4j()
        .count_window(1)
        .minimum_calls(1)
        .permitted_calls_in_half_open(1)
        .max_wait_in_open(Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    let mut periods = Vec::new();
    for _ in 0..5 {
        let snap = handle.snapshot();
        assert_eq!(snap.state, CircuitState::Open);
        let period = snap.open_remaining.unwrap();
        periods.push(period.as_secs());
        tokio::time::sleep(period).await;
        let _ = send(&mut svc, Call::Fail).await; // the probe fails: open again
    }
    assert_eq!(periods, [5, 10, 20, 30, 30]);
    assert_eq!(handle.snapshot().consecutive_trips, 6);
    tokio::time::sleep(Duration::from_secs(30)).await;
    send(&mut svc, Call::Ok).await.unwrap();
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.consecutive_trips),
        (CircuitState::Closed, 0),
        "recovery forgets the backoff"
    );
}

async fn jittered_periods(seed: u64) -> Vec<Duration> {
    let layer = r4j()
        .count_window(1)
        .minimum_calls(1)
        .permitted_calls_in_half_open(1)
        .backoff_multiplier(1.0)
        .jitter(0.5)
        .seed(seed)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    let mut periods = Vec::new();
    for _ in 0..8 {
        let period = handle.snapshot().open_remaining.unwrap();
        periods.push(period);
        tokio::time::sleep(period).await;
        let _ = send(&mut svc, Call::Fail).await;
    }
    periods
}

#[tokio::test(start_paused = true)]
async fn jitter_is_bounded_and_repeats_with_its_seed() {
    let a = jittered_periods(7).await;
    assert_eq!(a, jittered_periods(7).await, "same seed, same open periods");
    assert_ne!(a, jittered_periods(8).await);
    assert!(a
        .iter()
        .all(|p| *p >= Duration::from_millis(2_500) && *p <= Duration::from_millis(7_500)));
    assert!(
        a.windows(2).any(|w| w[0] != w[1]),
        "jitter varies the periods: {a:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn rejections_carry_the_remaining_open_time() {
    let layer = r4j().count_window(1).minimum_calls(1).build().unwrap();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let err = send(&mut svc, Call::Ok).await.unwrap_err();
    let open = err
        .downcast_ref::<CircuitOpen>()
        .expect("a CircuitOpen error");
    assert_eq!(open.retry_after(), Some(Duration::from_millis(3_800)));
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_mode_answers_503_with_retry_after() {
    use http::{Response, StatusCode};
    use http_body_util::Empty;

    let layer = CircuitBreakerLayer::builder()
        .count_window(1)
        .minimum_calls(1)
        .jitter(0.0)
        .http()
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|status: u16| async move {
        let mut res = Response::new(Empty::<bytes::Bytes>::new());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok::<_, std::convert::Infallible>(res)
    }));
    let res = svc.ready().await.unwrap().call(500).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    drop(res);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let res = svc.ready().await.unwrap().call(200).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "4", "3.5 s rounded up");
}

/// The typical client stack, `PropagateDeadline → CircuitBreaker → AdaptiveConcurrency → transport`, over a
/// dependency that hangs: each call ends at its deadline, where the propagating layer drops the call. The breaker
/// and the limiter inside count that as `Dropped` (a timeout), so the breaker opens, and the limiter is told of
/// every drop; once it is open, calls are refused before the dependency is asked. (Each permit was once recorded
/// `Ignored`, as for a caller that went away, and the breaker never opened.)
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn the_client_stack_breaker_opens_on_a_dependency_that_hangs() {
    use http::{Request, Response, StatusCode};
    use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
    use tower_backpressure::core::{Deadline, Outcome};
    use tower_backpressure::deadline::PropagateDeadlineLayer;

    let breaker = CircuitBreakerLayer::builder()
        .count_window(5)
        .minimum_calls(5)
        .jitter(0.0)
        .http()
        .build()
        .unwrap();
    let handle = breaker.handle();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    let limiter = AdaptiveConcurrencyLayer::builder()
        .http()
        .observer(move |e: &Event| {
            if let Event::Completed { outcome, .. } = *e {
                seen.lock().unwrap().push(outcome);
            }
        })
        .build()
        .unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    let hang = service_fn(move |_req: Request<String>| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(Response::new(String::new()))
        }
    });
    let propagate = PropagateDeadlineLayer::builder().http().build().unwrap();
    let svc = propagate.layer(breaker.layer(limiter.layer(hang)));
    for call in 0..7 {
        let res = Deadline::after(Duration::from_secs(1))
            .scope(svc.clone().oneshot(Request::new(String::new())))
            .await
            .unwrap();
        let expected = if call < 5 {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        assert_eq!(res.status(), expected, "call {call}");
    }
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "{:?}",
        handle.snapshot()
    );
    assert_eq!(asked.load(Ordering::SeqCst), 5, "refused once open");
    assert_eq!(*outcomes.lock().unwrap(), [Outcome::Dropped; 5]);
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_mode_answers_unavailable_with_pushback() {
    use http::Response;
    use http_body_util::Empty;

    let layer = CircuitBreakerLayer::builder()
        .count_window(1)
        .minimum_calls(1)
        .jitter(0.0)
        .grpc()
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|code: u16| async move {
        let mut res = Response::new(Empty::<bytes::Bytes>::new());
        res.headers_mut().insert("grpc-status", code.into());
        Ok::<_, std::convert::Infallible>(res)
    }));
    let _ = svc.ready().await.unwrap().call(13).await.unwrap(); // INTERNAL
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let res = svc.ready().await.unwrap().call(0).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()["grpc-retry-pushback-ms"], "3500");
}

// ---------------------------------------------------------------- readiness mode

#[tokio::test(start_paused = true)]
async fn readiness_mode_blocks_until_the_open_period_ends() {
    let layer = r4j()
        .count_window(1)
        .minimum_calls(1)
        .permitted_calls_in_half_open(1)
        .readiness_mode(true)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_pending(), "ready while open");
    let started = tokio::time::Instant::now();
    svc.ready().await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "woken exactly at the end of the open period"
    );
    send(&mut svc, Call::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_mode_stays_ready_while_open() {
    let layer = r4j().count_window(1).minimum_calls(1).build().unwrap();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    assert!(is_open_rejection(&svc.call(Call::Ok).await));
}

// ---------------------------------------------------------------- handle

#[tokio::test(start_paused = true)]
async fn handle_controls_every_state() {
    let transitions = Transitions::default();
    let layer = r4j()
        .count_window(2)
        .minimum_calls(2)
        .observer(transitions.observer())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());

    handle.force_open();
    let err = send(&mut svc, Call::Ok).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().retry_after(),
        None
    );
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        handle.state(),
        CircuitState::ForcedOpen,
        "forced open does not time out"
    );

    handle.disable();
    for _ in 0..10 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.calls),
        (CircuitState::Disabled, 0),
        "disabled counts nothing"
    );

    handle.metrics_only();
    for _ in 0..10 {
        let _ = send(&mut svc, Call::Fail).await;
    }
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.calls, snap.failures),
        (CircuitState::MetricsOnly, 2, 2),
        "counts, never trips"
    );

    handle.force_closed();
    assert_eq!(handle.snapshot().calls, 0, "closing starts a fresh window");
    let _ = send(&mut svc, Call::Fail).await;
    let _ = send(&mut svc, Call::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);

    handle.reset();
    let snap = handle.snapshot();
    assert_eq!(
        (snap.state, snap.calls, snap.consecutive_trips),
        (CircuitState::Closed, 0, 0)
    );

    use CircuitState::*;
    assert_eq!(
        transitions.list(),
        [
            (Closed, ForcedOpen),
            (ForcedOpen, Disabled),
            (Disabled, MetricsOnly),
            (MetricsOnly, Closed),
            (Closed, Open),
            (Open, Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let layer = r4j().count_window(2).minimum_calls(2).build().unwrap();
    let handle = layer.handle();
    let mut a = layer.layer(inner());
    let mut b = a.clone();
    let _ = send(&mut a, Call::Fail).await;
    let _ = send(&mut b, Call::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert!(is_open_rejection(&send(&mut a, Call::Ok).await));
}

// ---------------------------------------------------------------- races

/// Many tasks on two worker threads fail at once through one breaker. Exactly one Closed → Open transition may
/// be reported however the tasks interleave, and every call is either rejected or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_tasks_trip_exactly_once_and_lose_no_counts() {
    const TASKS: usize = 64;
    const CALLS: usize = 200;
    for round in 0..20 {
        let transitions = Transitions::default();
        let rejected = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let count_completed = {
            let completed = completed.clone();
            move |e: &Event| {
                if matches!(e, Event::Completed { .. }) {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let layer = CircuitBreakerLayer::builder()
            .count_window(1000)
            .minimum_calls(1000)
            .wait_in_open(Duration::from_secs(3600))
            .max_wait_in_open(Duration::from_secs(3600))
            .observer((transitions.observer(), count_completed))
            .build()
            .unwrap();
        let svc = layer.layer(inner());
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let mut svc = svc.clone();
                let barrier = barrier.clone();
                let rejected = rejected.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    for _ in 0..CALLS {
                        if is_open_rejection(&send(&mut svc, Call::Fail).await) {
                            rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            transitions.list(),
            [(CircuitState::Closed, CircuitState::Open)],
            "round {round}: one trip, one transition"
        );
        let completed = completed.load(Ordering::Relaxed);
        assert_eq!(
            completed + rejected.load(Ordering::Relaxed),
            TASKS * CALLS,
            "round {round}"
        );
        assert!(
            completed >= 1000,
            "round {round}: tripped before the window was full"
        );
    }
}

/// Metrics-only never trips, so every one of the racing calls must land in the window's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_tasks_lose_no_window_counts() {
    const TASKS: usize = 8;
    const CALLS: usize = 40_000;
    let layer = CircuitBreakerLayer::builder()
        .count_window(TASKS * CALLS)
        .minimum_calls(1)
        .build()
        .unwrap();
    let handle = layer.handle();
    handle.metrics_only();
    let svc = layer.layer(inner());
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..CALLS {
                    let call = if (t + i) % 4 == 0 {
                        Call::Fail
                    } else {
                        Call::Ok
                    };
                    let _ = send(&mut svc, call).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let snap = handle.snapshot();
    assert_eq!(snap.calls as usize, TASKS * CALLS);
    assert_eq!(snap.failures as usize, TASKS * CALLS / 4);
    assert_eq!(snap.in_flight, 0);
}

// ---------------------------------------------------------------- configuration

#[test]
fn bad_config_is_an_error_with_a_clear_message() {
    let b = CircuitBreakerLayer::builder;
    let cases: Vec<(Result<_, _>, &str)> = vec![
        (
            b().failure_rate_threshold(0.0).build(),
            "failure_rate_threshold: must be a percentage in (0, 100], got 0",
        ),
        (
            b().failure_rate_threshold(100.5).build(),
            "failure_rate_threshold: must be a percentage in (0, 100], got 100.5",
        ),
        (
            b().failure_rate_threshold(f64::NAN).build(),
            "failure_rate_threshold",
        ),
        (
            b().slow_call_rate_threshold(-1.0).build(),
            "slow_call_rate_threshold: must be a percentage",
        ),
        (
            b().count_window(0).build(),
            "count_window: must hold at least 1 call",
        ),
        (
            b().count_window(2_000_000).build(),
            "count_window: must be at most",
        ),
        (
            b().count_window(10).minimum_calls(11).build(),
            "minimum_calls: must not exceed the count window (11 > 10)",
        ),
        (
            b().minimum_calls(0).build(),
            "minimum_calls: must be at least 1",
        ),
        (
            b().time_window(0, Duration::from_secs(1)).build(),
            "time_window: buckets must be in 1..=1000, got 0",
        ),
        (
            b().time_window(10, Duration::ZERO).build(),
            "time_window: bucket width must be from 1 ms to 365 days, got 0ns",
        ),
        (
            b().time_window(10, Duration::from_micros(999)).build(),
            "time_window: bucket width must be from 1 ms to 365 days, got 999µs",
        ),
        (
            b().time_window(10, Duration::from_secs(366 * 24 * 3600)).build(),
            "time_window: bucket width must be from 1 ms to 365 days",
        ),
        (
            b().permitted_calls_in_half_open(0).build(),
            "permitted_calls_in_half_open: must be in 1..=1023, got 0",
        ),
        (
            b().permitted_calls_in_half_open(5000).build(),
            "permitted_calls_in_half_open: must be in 1..=1023",
        ),
        (
            b().consecutive_failures(0).build(),
            "consecutive_failures: must be at least 1",
        ),
        (
            b().wait_in_open(Duration::ZERO).build(),
            "wait_in_open: must be at least 1 ms (the breaker counts whole milliseconds), got 0ns",
        ),
        // Sub-millisecond periods were accepted, then panicked at the first trip (the jitter's clamp) or left
        // half-open expiring as it began (the wait truncated to 0 ms): the breaker counts whole milliseconds.
        (
            b().wait_in_open(Duration::from_micros(100))
                .max_wait_in_open(Duration::from_micros(500))
                .build(),
            "wait_in_open: must be at least 1 ms",
        ),
        (
            b().max_wait_in_open(Duration::from_secs(1)).build(),
            "max_wait_in_open: must not be shorter than wait_in_open",
        ),
        (
            b().backoff_multiplier(0.5).build(),
            "backoff_multiplier: must be a finite number ≥ 1",
        ),
        (
            b().jitter(1.0).build(),
            "jitter: must be a fraction in [0, 1)",
        ),
        (
            b().max_wait_in_half_open(Duration::ZERO).build(),
            "max_wait_in_half_open: must be at least 1 ms",
        ),
        (
            b().max_wait_in_half_open(Duration::from_micros(500)).build(),
            "max_wait_in_half_open: must be at least 1 ms (the breaker counts whole milliseconds), got 500µs",
        ),
        (
            b().slow_call_duration(Duration::ZERO).build(),
            "slow_call_duration: must be longer than zero",
        ),
    ];
    for (result, expected) in cases {
        let message = result.expect_err(expected).to_string();
        assert!(
            message.starts_with("invalid circuit breaker config: "),
            "{message}"
        );
        assert!(
            message.contains(expected),
            "{message:?} does not contain {expected:?}"
        );
    }
    assert!(b().build().is_ok());
    assert!(b()
        .failure_rate_threshold(100.0)
        .slow_call_rate_threshold(0.001)
        .build()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn jitter_never_exceeds_the_cap() {
    let layer = r4j()
        .count_window(1)
        .minimum_calls(1)
        .permitted_calls_in_half_open(1)
        .max_wait_in_open(Duration::from_secs(6))
        .jitter(0.9)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Fail).await;
    for _ in 0..20 {
        let period = handle.snapshot().open_remaining.unwrap();
        assert!(period <= Duration::from_secs(6), "{period:?}");
        assert!(period > Duration::ZERO);
        tokio::time::sleep(period).await;
        let _ = send(&mut svc, Call::Fail).await;
    }
}

// ---------------------------------------------------------------- observer

#[tokio::test(start_paused = true)]
async fn observer_sees_admissions_rejections_and_completions() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = r4j()
        .count_window(2)
        .minimum_calls(2)
        .observer(move |e: &Event| log.lock().unwrap().push(*e))
        .build()
        .unwrap();
    let mut svc = layer.layer(inner());
    let _ = send(&mut svc, Call::Ok).await;
    let _ = send(&mut svc, Call::Fail).await;
    let _ = send(&mut svc, Call::Ok).await;
    let events = events.lock().unwrap().clone();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Admitted { in_flight, .. } => format!("admitted {in_flight}"),
            Event::Completed {
                outcome, in_flight, ..
            } => format!("completed {outcome} {in_flight}"),
            Event::Rejected {
                reason,
                retry_after,
                ..
            } => format!("rejected {reason} {retry_after:?}"),
            Event::BreakerState { from, to, .. } => format!("{from} -> {to}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "admitted 1",
            "completed success 0",
            "admitted 1",
            "completed failure 0",
            "closed -> open",
            "rejected circuit_open Some(5s)",
        ]
    );
    assert!(events.iter().all(|e| match e {
        Event::Admitted { layer, .. }
        | Event::Completed { layer, .. }
        | Event::Rejected { layer, .. }
        | Event::BreakerState { layer, .. } => *layer == "breaker",
        _ => false,
    }));
}

#[tokio::test(start_paused = true)]
async fn readiness_mode_stays_blocked_while_forced_open() {
    let layer = r4j().readiness_mode(true).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    handle.force_open();
    let ready = tokio::time::timeout(Duration::from_secs(60), svc.ready()).await;
    assert!(ready.is_err(), "ready while forced open");
    handle.force_closed();
    let ready = tokio::time::timeout(Duration::from_millis(1), svc.ready()).await;
    assert!(ready.is_ok(), "still blocked after force_closed");
}

/// A service blocked in readiness mode wakes at an operator's change, not at the end of the open period it was
/// waiting out (which `max_wait_in_open` may make long): the task polling it is woken.
#[tokio::test(start_paused = true)]
async fn readiness_mode_wakes_when_an_operator_ends_the_open_state() {
    struct Woken(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let layer = r4j()
        .count_window(1)
        .minimum_calls(1)
        .wait_in_open(Duration::from_secs(3600))
        .max_wait_in_open(Duration::from_secs(3600))
        .readiness_mode(true)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner());
    let operators: [(&str, fn(&_)); 4] = [
        (
            "reset",
            |h: &tower_backpressure::breaker::CircuitBreakerHandle| h.reset(),
        ),
        ("force_closed", |h| h.force_closed()),
        ("disable", |h| h.disable()),
        ("metrics_only", |h| h.metrics_only()),
    ];
    for (name, operator) in operators {
        handle.reset();
        let _ = send(&mut svc, Call::Fail).await;
        assert_eq!(handle.state(), CircuitState::Open, "{name}");
        let woken = Arc::new(Woken(false.into()));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut ready = std::pin::pin!(svc.ready());
        assert!(
            ready.as_mut().poll(&mut cx).is_pending(),
            "{name}: blocked while open"
        );
        operator(&handle);
        assert!(
            woken.0.load(Ordering::SeqCst),
            "{name}: the blocked task was not woken"
        );
        assert!(ready.as_mut().poll(&mut cx).is_ready(), "{name}");
    }
}

/// In HTTP mode the call lasts until the response body is done: a body streamed slowly makes a slow call.
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_latency_runs_to_the_end_of_the_body() {
    use bytes::Bytes;
    use http::Response;
    use http_body_util::{BodyExt, Full};

    let layer = CircuitBreakerLayer::builder()
        .count_window(1)
        .minimum_calls(1)
        .slow_call_duration(Duration::from_secs(1))
        .slow_call_rate_threshold(100.0)
        .http()
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|_: ()| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    }));
    let res = svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(
        handle.snapshot().in_flight,
        1,
        "the body holds the call open"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    let snap = handle.snapshot();
    assert_eq!((snap.in_flight, snap.slow_calls), (0, 1));
    assert_eq!(snap.state, CircuitState::Open);
}

/// Many tasks on two threads arrive together after the open period: one Open → HalfOpen transition, exactly N
/// probes admitted, one verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_tasks_get_exactly_n_probes() {
    const TASKS: usize = 64;
    const PROBES: usize = 5;
    for round in 0..20 {
        let transitions = Transitions::default();
        let admitted = Arc::new(AtomicUsize::new(0));
        let count_admitted = {
            let admitted = admitted.clone();
            move |e: &Event| {
                if matches!(e, Event::Admitted { .. }) {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let layer = CircuitBreakerLayer::builder()
            .count_window(1)
            .minimum_calls(1)
            .wait_in_open(Duration::from_millis(1))
            .max_wait_in_open(Duration::from_millis(1))
            .jitter(0.0)
            .permitted_calls_in_half_open(PROBES as u32)
            .max_wait_in_half_open(Duration::from_secs(3600))
            .observer((transitions.observer(), count_admitted))
            .build()
            .unwrap();
        let handle = layer.handle();
        // Successful calls wait at the gate, so every probe is still in flight when the others arrive.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let svc = {
            let gate = gate.clone();
            layer.layer(service_fn(move |fail: bool| {
                let gate = gate.clone();
                async move {
                    if fail {
                        return Err::<(), BoxError>("boom".into());
                    }
                    gate.acquire().await.unwrap().forget();
                    Ok(())
                }
            }))
        };
        let _ = svc.clone().call(true).await;
        assert_eq!(handle.state(), CircuitState::Open);
        let open_until = tokio::time::Instant::now() + Duration::from_millis(2);
        let start = Arc::new(tokio::sync::Barrier::new(TASKS));
        let called = Arc::new(tokio::sync::Barrier::new(TASKS + 1));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let mut svc = svc.clone();
                let (start, called) = (start.clone(), called.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    tokio::time::sleep_until(open_until).await;
                    let response = svc.call(false);
                    called.wait().await;
                    response.await.is_ok()
                })
            })
            .collect();
        called.wait().await;
        assert_eq!(
            admitted.load(Ordering::Relaxed),
            1 + PROBES,
            "round {round}: the trip call and N probes"
        );
        gate.add_permits(TASKS);
        let mut succeeded = 0;
        for t in tasks {
            succeeded += usize::from(t.await.unwrap());
        }
        assert_eq!(succeeded, PROBES, "round {round}");
        use CircuitState::*;
        assert_eq!(
            transitions.list(),
            [(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)],
            "round {round}"
        );
    }
}
