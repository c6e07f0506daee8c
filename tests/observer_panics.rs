//! An observer is user code and may panic, as an inner service may. Each layer creates the permit that gives an
//! admission back before it tells the observer of it, so a panic on `Event::Admitted` leaves nothing taken: no
//! concurrency token, queue slot or in-flight count. (The adaptive limiter once lost its token for good, and a
//! queue waiter's slot was left to a released node.)

use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tower::{service_fn, Layer, Service, ServiceExt};
use tower_backpressure::adaptive::AdaptiveConcurrencyLayer;
use tower_backpressure::breaker::CircuitBreakerLayer;
use tower_backpressure::core::Event;
use tower_backpressure::queue::QueueLayer;

/// An observer that panics on the first `Admitted` event after `armed` is set.
fn panics_once(armed: &Arc<AtomicBool>) -> impl Fn(&Event) + Send + Sync + 'static {
    let armed = armed.clone();
    move |e: &Event| {
        if matches!(e, Event::Admitted { .. }) && armed.swap(false, Ordering::SeqCst) {
            panic!("observer bug");
        }
    }
}

fn echo() -> impl Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = std::future::Ready<Result<u32, Infallible>>,
> + Clone {
    service_fn(|n: u32| std::future::ready(Ok(n)))
}

/// Calls `svc` (made ready first) with the observer armed; the call must panic.
async fn call_panicking<S: Service<u32>>(svc: &mut S, armed: &Arc<AtomicBool>) {
    let _ = svc.ready().await;
    armed.store(true, Ordering::SeqCst);
    let panicked = catch_unwind(AssertUnwindSafe(|| drop(svc.call(1))));
    assert!(panicked.is_err(), "the observer panicked in call");
}

#[tokio::test(start_paused = true)]
async fn the_adaptive_limiter_keeps_no_token() {
    let armed = Arc::new(AtomicBool::new(false));
    let layer = AdaptiveConcurrencyLayer::builder()
        .initial_limit(1)
        .min_limit(1)
        .max_limit(1)
        .observer(panics_once(&armed))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    call_panicking(&mut svc, &armed).await;
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(
        svc.ready().await.unwrap().call(2).await.unwrap(),
        2,
        "the only token is back"
    );
}

#[tokio::test(start_paused = true)]
async fn the_queue_keeps_no_slot_admitted_at_once_or_after_waiting() {
    let armed = Arc::new(AtomicBool::new(false));
    let layer = QueueLayer::builder()
        .limit(1)
        .observer(panics_once(&armed))
        .build()
        .unwrap();
    let handle = layer.handle();
    // Request 0 says when it runs, then holds its slot until the gate opens.
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (gate, opened) = tokio::sync::oneshot::channel::<()>();
    let hold = Arc::new(std::sync::Mutex::new(Some((started_tx, opened))));
    let svc = layer.layer(service_fn(move |n: u32| {
        let held = if n == 0 {
            hold.lock().unwrap().take()
        } else {
            None
        };
        async move {
            if let Some((started_tx, opened)) = held {
                let _ = started_tx.send(());
                let _ = opened.await;
            }
            Ok::<_, Infallible>(n)
        }
    }));
    // Admitted at once.
    call_panicking(&mut svc.clone(), &armed).await;
    assert_eq!(handle.snapshot().in_flight, 0);
    // Admitted after waiting: the slot is handed over while request 0 holds it, and the observer panics as the
    // waiter collects it.
    let first = tokio::spawn(svc.clone().oneshot(0));
    started.await.unwrap();
    let mut waiting = Box::pin(svc.clone().oneshot(1));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    assert_eq!(handle.snapshot().depth, 1);
    armed.store(true, Ordering::SeqCst);
    gate.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 0);
    let panicked = tokio::spawn(waiting).await;
    assert!(panicked.unwrap_err().is_panic());
    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth), (0, 0));
    assert_eq!(svc.oneshot(2).await.unwrap(), 2, "the slot is back");
}

#[tokio::test(start_paused = true)]
async fn the_breaker_counts_nothing_in_flight() {
    let armed = Arc::new(AtomicBool::new(false));
    let layer = CircuitBreakerLayer::builder()
        .observer(panics_once(&armed))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(
        |n: u32| async move { Ok::<_, tower::BoxError>(n) },
    ));
    call_panicking(&mut svc, &armed).await;
    assert_eq!(handle.snapshot().in_flight, 0);
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn the_deadline_layer_counts_nothing_in_flight() {
    use std::time::Duration;
    use tower_backpressure::deadline::DeadlineLayer;

    let armed = Arc::new(AtomicBool::new(false));
    let layer = DeadlineLayer::builder()
        .max_timeout(Duration::from_secs(1))
        .observer(panics_once(&armed))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|_: http::Request<()>| async {
        Ok::<_, tower::BoxError>(http::Response::new(()))
    }));
    let _ = svc.ready().await;
    armed.store(true, Ordering::SeqCst);
    let panicked = catch_unwind(AssertUnwindSafe(|| drop(svc.call(http::Request::new(())))));
    assert!(panicked.is_err());
    assert_eq!(handle.snapshot().in_flight, 0);
}
