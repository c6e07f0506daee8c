//! The queue-depth shedder: bounds, CoDel, adaptive LIFO, priorities, deadlines, cancellation.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tower::{Service, ServiceExt};
use tower_backpressure::core::error::{DeadlineExceeded, QueueFull, QueueTimeout};
use tower_backpressure::core::{BoxError, Deadline, Event, LimitSource};
use tower_backpressure::queue::{Priority, QueueLayer};

type Log = Arc<Mutex<Vec<u64>>>;

const MS: Duration = Duration::from_millis(1);

/// A service that logs each request's id when it starts and takes `ms` to answer.
fn sleeper(
    log: Log,
    ms: u64,
) -> impl Service<u64, Response = u64, Error = Infallible, Future = impl Future<Output = Result<u64, Infallible>> + Send>
       + Clone
       + Send {
    tower::service_fn(move |id: u64| {
        log.lock().unwrap().push(id);
        async move {
            sleep(MS * ms as u32).await;
            Ok(id)
        }
    })
}

fn is<T: std::error::Error + 'static>(result: &Result<u64, BoxError>) -> bool {
    matches!(result, Err(e) if e.is::<T>())
}

#[tokio::test(start_paused = true)]
async fn full_queue_rejects_at_once() {
    let layer = QueueLayer::builder().limit(1).max_depth(2).build().unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(sleeper(log.clone(), 30));

    let running = tokio::spawn(svc.ready().await.unwrap().call(0));
    let q1 = tokio::spawn(svc.ready().await.unwrap().call(1));
    let q2 = tokio::spawn(svc.ready().await.unwrap().call(2));
    let start = Instant::now();
    let full = svc.ready().await.unwrap().call(3).await;
    assert!(is::<QueueFull>(&full), "{full:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);
    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth, s.rejected_queue_full), (1, 2, 1));

    for (task, id) in [(running, 0), (q1, 1), (q2, 2)] {
        assert_eq!(task.await.unwrap().unwrap(), id);
    }
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 2]);
    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth, s.admitted, s.completed), (0, 0, 3, 3));
}

#[tokio::test(start_paused = true)]
async fn max_wait_rejects_with_queue_timeout() {
    let layer = QueueLayer::builder()
        .limit(1)
        .codel(false)
        .max_wait(MS * 30)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(sleeper(Log::default(), 1000));

    let running = tokio::spawn(svc.ready().await.unwrap().call(0));
    let start = Instant::now();
    let waited = svc.ready().await.unwrap().call(1).await;
    assert!(is::<QueueTimeout>(&waited), "{waited:?}");
    assert_eq!(start.elapsed(), MS * 30);
    let s = handle.snapshot();
    assert_eq!((s.depth, s.rejected_queue_timeout, s.in_flight), (0, 1, 1));
    running.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn codel_serves_a_short_burst_in_full() {
    let layer = QueueLayer::builder().limit(1).max_depth(32).build().unwrap();
    let handle = layer.handle();
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(sleeper(Log::default(), 5));

    // 18 requests of 5 ms on one worker: the last waits 85 ms, inside the 100 ms interval, far above the target.
    let mut tasks = Vec::new();
    for id in 0..18 {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(id)));
    }
    for (id, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), id as u64);
    }
    let s = handle.snapshot();
    assert_eq!((s.completed, s.rejected_queue_timeout, s.rejected_queue_full), (18, 0, 0));
}

/// Offers 5x capacity for 2 s and returns the longest wait of a request served after the first 300 ms, and the
/// number of queue timeouts.
async fn standing_queue(codel: bool) -> (Duration, u64) {
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(1000)
        .max_wait(Duration::from_secs(10))
        .codel(codel)
        .adaptive_lifo(codel)
        .build()
        .unwrap();
    let handle = layer.handle();
    let waits = Arc::new(Mutex::new(Vec::new()));
    let origin = Instant::now();
    let inner = {
        let waits = waits.clone();
        tower::service_fn(move |arrived: Instant| {
            let now = Instant::now();
            if now - origin > MS * 300 {
                waits.lock().unwrap().push(now - arrived);
            }
            async move {
                sleep(MS * 5).await;
                Ok::<_, Infallible>(())
            }
        })
    };
    let svc = tower::ServiceBuilder::new().layer(layer).service(inner);
    let mut tasks = Vec::new();
    while origin.elapsed() < Duration::from_secs(2) {
        tasks.push(tokio::spawn(svc.clone().oneshot(Instant::now())));
        sleep(MS).await;
    }
    for t in tasks {
        let _ = t.await.unwrap();
    }
    let max = waits.lock().unwrap().iter().copied().max().unwrap();
    (max, handle.snapshot().rejected_queue_timeout)
}

#[tokio::test(start_paused = true)]
async fn codel_caps_waits_in_a_standing_queue() {
    let (max_wait, timeouts) = standing_queue(true).await;
    assert!(max_wait <= MS * 5, "CoDel let a request wait {max_wait:?}");
    assert!(timeouts > 1000, "only {timeouts} shed");

    // Without CoDel the same load builds a queue whose wait keeps growing.
    let (max_wait, _) = standing_queue(false).await;
    assert!(max_wait > Duration::from_millis(500), "{max_wait:?}");
}

async fn service_order(lifo: bool) -> Vec<u64> {
    let layer = QueueLayer::builder()
        .limit(1)
        .codel(false)
        .adaptive_lifo(lifo)
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(sleeper(log.clone(), 60));
    let mut tasks = Vec::new();
    for id in 0..6 {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(id)));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let order = log.lock().unwrap().clone();
    order
}

#[tokio::test(start_paused = true)]
async fn lifo_serves_newest_first_once_the_queue_stands() {
    // At 60 ms the queue has stood for less than the 100 ms interval: FIFO serves 1. From 120 ms on it stands:
    // newest first.
    assert_eq!(service_order(true).await, vec![0, 1, 5, 4, 3, 2]);
    assert_eq!(service_order(false).await, vec![0, 1, 2, 3, 4, 5]);
}

fn by_priority(log: Log, ms: u64) -> impl Service<(Priority, u64), Response = u64, Error = Infallible, Future = impl Future<Output = Result<u64, Infallible>> + Send> + Clone + Send {
    let inner = sleeper(log, ms);
    tower::ServiceBuilder::new()
        .map_request(|(_, id): (Priority, u64)| id)
        .service(inner)
}

#[tokio::test(start_paused = true)]
async fn higher_priorities_are_served_first() {
    let layer = QueueLayer::builder()
        .limit(1)
        .codel(false)
        .adaptive_lifo(false)
        .max_wait(Duration::from_secs(5))
        .prioritize(|r: &(Priority, u64)| r.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(by_priority(log.clone(), 10));
    let mut tasks = Vec::new();
    let arrivals = [
        (Priority::Critical, 0),
        (Priority::Sheddable, 1),
        (Priority::Critical, 2),
        (Priority::SheddablePlus, 3),
        (Priority::CriticalPlus, 4),
        (Priority::Sheddable, 5),
    ];
    for r in arrivals {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(r)));
    }
    assert_eq!(handle.snapshot().depth_by_priority, [1, 1, 1, 2]);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock().unwrap(), vec![0, 4, 2, 3, 1, 5]);
}

#[tokio::test(start_paused = true)]
async fn higher_arrivals_displace_the_lowest_and_low_levels_get_a_smaller_share() {
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(4)
        .codel(false)
        .max_wait(Duration::from_secs(5))
        .prioritize(|r: &(Priority, u64)| r.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(by_priority(log.clone(), 10));
    macro_rules! call {
        ($r:expr) => {
            svc.ready().await.unwrap().call($r)
        };
    }

    let running = tokio::spawn(call!((Priority::Critical, 0)));
    // Sheddable traffic may fill half of the four places.
    let s1 = tokio::spawn(call!((Priority::Sheddable, 1)));
    let s2 = tokio::spawn(call!((Priority::Sheddable, 2)));
    let s3 = call!((Priority::Sheddable, 3)).await;
    assert!(matches!(&s3, Err(e) if e.is::<QueueFull>()), "{s3:?}");
    let c4 = tokio::spawn(call!((Priority::Critical, 4)));
    // Sheddable_plus may fill three places: at three, it displaces the oldest sheddable request.
    let p5 = tokio::spawn(call!((Priority::SheddablePlus, 5)));
    assert!(matches!(s1.await.unwrap(), Err(e) if e.is::<QueueFull>()));
    let c6 = tokio::spawn(call!((Priority::Critical, 6)));
    assert_eq!(handle.snapshot().depth_by_priority, [0, 2, 1, 1]);
    // Full: arrivals displace the oldest of the lowest level below their own.
    let p7 = tokio::spawn(call!((Priority::SheddablePlus, 7)));
    assert!(matches!(s2.await.unwrap(), Err(e) if e.is::<QueueFull>()));
    let p8 = call!((Priority::SheddablePlus, 8)).await;
    assert!(matches!(&p8, Err(e) if e.is::<QueueFull>()), "nothing below sheddable_plus: {p8:?}");
    let cp9 = tokio::spawn(call!((Priority::CriticalPlus, 9)));
    assert!(matches!(p5.await.unwrap(), Err(e) if e.is::<QueueFull>()));
    assert_eq!(handle.snapshot().depth_by_priority, [1, 2, 1, 0]);

    for t in [running, c4, c6, p7, cp9] {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock().unwrap(), vec![0, 9, 4, 6, 7]);
    assert_eq!(handle.snapshot().rejected_queue_full, 5);
}
