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
) -> impl Service<
    u64,
    Response = u64,
    Error = Infallible,
    Future = impl Future<Output = Result<u64, Infallible>> + Send,
> + Clone
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
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(log.clone(), 30));

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
    assert_eq!(
        (s.in_flight, s.depth, s.admitted, s.completed),
        (0, 0, 3, 3)
    );
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
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(Log::default(), 1000));

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
async fn a_max_wait_too_large_for_the_clock_means_no_limit() {
    let layer = QueueLayer::builder()
        .limit(1)
        .codel(false)
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(Log::default(), 1000));
    let running = tokio::spawn(svc.ready().await.unwrap().call(0));
    let start = Instant::now();
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(start.elapsed(), MS * 2000);
    running.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn codel_serves_a_short_burst_in_full() {
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(32)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(Log::default(), 5));

    // 18 requests of 5 ms on one worker: the last waits 85 ms, inside the 100 ms interval, far above the target.
    let mut tasks = Vec::new();
    for id in 0..18 {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(id)));
    }
    for (id, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), id as u64);
    }
    let s = handle.snapshot();
    assert_eq!(
        (s.completed, s.rejected_queue_timeout, s.rejected_queue_full),
        (18, 0, 0)
    );
}

/// A queue that stood, then drained and stayed empty for most of an interval: a short burst is served in full
/// and in order. (The standing verdict was once judged at intervals' ends only, and held for the whole next
/// interval: this burst, 74 ms after the drain, was cut to the 5 ms target and served newest first.)
#[tokio::test(start_paused = true)]
async fn a_burst_after_a_standing_queue_drained_is_served_in_full() {
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(1000)
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(log.clone(), 5));
    let origin = Instant::now();
    // 5x overload (a 5 ms request every ms on one worker) for 310 ms: the queue stands and is cut.
    let mut overload = Vec::new();
    for id in 1000.. {
        if origin.elapsed() >= MS * 310 {
            break;
        }
        overload.push(tokio::spawn(svc.clone().oneshot(id)));
        sleep(MS).await;
    }
    for task in overload {
        let _ = task.await.unwrap();
    }
    let before = handle.snapshot();
    assert!(before.rejected_queue_timeout > 100, "it stood: {before:?}");
    assert!(origin.elapsed() <= MS * 330, "drained by then");
    // Empty until 390 ms: the queue was non-empty for well under 90 % of the last interval.
    sleep(MS * 390 - origin.elapsed()).await;
    log.lock().unwrap().clear();
    // Eight requests: the last waits 35 ms, inside `max_wait` and inside the interval.
    let mut svc = svc;
    let mut burst = Vec::new();
    for id in 0..8 {
        burst.push(tokio::spawn(svc.ready().await.unwrap().call(id)));
    }
    for (id, task) in burst.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), id as u64);
    }
    assert_eq!(
        handle.snapshot().rejected_queue_timeout,
        before.rejected_queue_timeout
    );
    assert_eq!(*log.lock().unwrap(), (0..8).collect::<Vec<_>>(), "in order");
}

/// The other way round: a queue non-empty without a break for 90 % of an interval stands from then on, not from
/// the end of the interval that happens to be under way (up to a whole interval later). Overload starts 50 ms
/// after the layer is built; from 140 ms on the queue has not been empty for 90 ms, so a request served from
/// 150 ms on waited at most the 5 ms target.
#[tokio::test(start_paused = true)]
async fn a_queue_non_empty_for_an_interval_is_cut_to_the_target_from_then_on() {
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(1000)
        .build()
        .unwrap();
    let origin = Instant::now();
    let waits = Arc::new(Mutex::new(Vec::new()));
    let seen = waits.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |arrived: Instant| {
            let now = Instant::now();
            seen.lock().unwrap().push((now - origin, now - arrived));
            async move {
                sleep(MS * 5).await;
                Ok::<_, Infallible>(())
            }
        }));
    sleep(MS * 50).await;
    let mut tasks = Vec::new();
    while origin.elapsed() < MS * 400 {
        tasks.push(tokio::spawn(svc.clone().oneshot(Instant::now())));
        sleep(MS).await;
    }
    for task in tasks {
        let _ = task.await.unwrap();
    }
    let waits = waits.lock().unwrap();
    let long: Vec<_> = waits
        .iter()
        .filter(|&&(at, wait)| at >= MS * 150 && wait > MS * 5)
        .collect();
    assert!(
        long.is_empty(),
        "waits over the target once standing: {long:?}"
    );
    // Before it stood, the burst's waits grew past the target (FIFO, up to `max_wait`).
    assert!(waits
        .iter()
        .any(|&(at, wait)| at < MS * 150 && wait > MS * 50));
}

/// Offers 5x capacity for 2 s and returns the longest wait of a request served after the first 300 ms, and the
/// number of queue timeouts.
async fn standing_queue(codel: bool) -> (Duration, u64) {
    standing(codel, codel, 0).await
}

/// [`standing_queue`] with LIFO set apart, and a limit of 1 from a source expecting `expected_ms` (0: none).
async fn standing(codel: bool, lifo: bool, expected_ms: usize) -> (Duration, u64) {
    let limit = Live {
        limit: Arc::new(AtomicUsize::new(1)),
        expected_ms: Arc::new(AtomicUsize::new(expected_ms)),
    };
    let layer = QueueLayer::builder()
        .limit(limit)
        .max_depth(1000)
        .max_wait(Duration::from_secs(10))
        .codel(codel)
        .adaptive_lifo(lifo)
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

/// CoDel's target is at least half the expected latency when the limit source knows it: with 40 ms expected, a
/// standing queue (FIFO here, so that the oldest are the ones served) lets requests wait up to 20 ms, not 5.
#[tokio::test(start_paused = true)]
async fn codel_target_follows_the_expected_latency() {
    let (max_wait, timeouts) = standing(true, false, 0).await;
    assert!(max_wait <= MS * 5, "fixed target: waited {max_wait:?}");
    assert!(timeouts > 1000, "only {timeouts} shed");

    let (max_wait, timeouts) = standing(true, false, 40).await;
    assert!(
        max_wait > MS * 10 && max_wait <= MS * 20,
        "target 20 ms: waited {max_wait:?}"
    );
    assert!(timeouts > 1000, "only {timeouts} shed");
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
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(log.clone(), 60));
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
    // At 60 ms the first 100 ms interval is not over: FIFO serves 1. At 120 ms the queue has not been empty for
    // a whole interval: it stands, newest first.
    assert_eq!(service_order(true).await, vec![0, 1, 5, 4, 3, 2]);
    assert_eq!(service_order(false).await, vec![0, 1, 2, 3, 4, 5]);
}

fn by_priority(
    log: Log,
    ms: u64,
) -> impl Service<
    (Priority, u64),
    Response = u64,
    Error = Infallible,
    Future = impl Future<Output = Result<u64, Infallible>> + Send,
> + Clone
       + Send {
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
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(by_priority(log.clone(), 10));
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
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(by_priority(log.clone(), 10));
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
    assert!(
        matches!(&p8, Err(e) if e.is::<QueueFull>()),
        "nothing below sheddable_plus: {p8:?}"
    );
    let cp9 = tokio::spawn(call!((Priority::CriticalPlus, 9)));
    assert!(matches!(p5.await.unwrap(), Err(e) if e.is::<QueueFull>()));
    assert_eq!(handle.snapshot().depth_by_priority, [1, 2, 1, 0]);

    for t in [running, c4, c6, p7, cp9] {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock().unwrap(), vec![0, 9, 4, 6, 7]);
    assert_eq!(handle.snapshot().rejected_queue_full, 5);
}

/// A limit source with a live limit and an expected service time, as the adaptive limiter's handle provides.
#[derive(Clone)]
struct Live {
    limit: Arc<AtomicUsize>,
    /// Milliseconds; 0 for no estimate.
    expected_ms: Arc<AtomicUsize>,
}

impl LimitSource for Live {
    fn limit(&self) -> usize {
        self.limit.load(Ordering::SeqCst)
    }

    fn expected_latency(&self) -> Option<Duration> {
        match self.expected_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(MS * ms as u32),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_type_can_carry_its_own_priority_and_deadline() {
    #[derive(Clone, Copy)]
    struct Job {
        id: u64,
        priority: Priority,
        deadline: Option<Deadline>,
    }
    let layer = QueueLayer::builder()
        .limit(Live {
            limit: Arc::new(AtomicUsize::new(1)),
            expected_ms: Arc::new(AtomicUsize::new(20)),
        })
        .codel(false)
        .adaptive_lifo(false)
        .max_wait(Duration::from_secs(5))
        .prioritize(|job: &Job| job.priority)
        .deadline_source(|job: &Job| job.deadline)
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .map_request(|job: Job| job.id)
        .service(sleeper(log.clone(), 20));
    let job = |id, priority, left: Option<Duration>| Job {
        id,
        priority,
        deadline: left.map(Deadline::after),
    };
    // 10 ms left for 20 ms of work: refused on arrival, though a slot is free.
    let doomed = svc
        .ready()
        .await
        .unwrap()
        .call(job(0, Priority::Critical, Some(MS * 10)))
        .await;
    assert!(
        matches!(&doomed, Err(e) if e.is::<DeadlineExceeded>()),
        "{doomed:?}"
    );
    let running = tokio::spawn(
        svc.ready()
            .await
            .unwrap()
            .call(job(1, Priority::Critical, None)),
    );
    // Both wait for the running one; the critical one is served first, though it came second.
    let low = tokio::spawn(svc.ready().await.unwrap().call(job(
        2,
        Priority::Sheddable,
        Some(Duration::from_secs(1)),
    )));
    let high = tokio::spawn(
        svc.ready()
            .await
            .unwrap()
            .call(job(3, Priority::Critical, None)),
    );
    running.await.unwrap().unwrap();
    high.await.unwrap().unwrap();
    low.await.unwrap().unwrap();
    // The source replaces the current deadline: an expired scope around the call is not read.
    let unread = Deadline::at(Instant::now()).scope(async {
        let call = svc
            .ready()
            .await
            .unwrap()
            .call(job(4, Priority::Critical, None));
        call.await
    });
    assert_eq!(unread.await.unwrap(), 4);
    assert_eq!(*log.lock().unwrap(), vec![1, 3, 2, 4]);
    assert_eq!(handle.snapshot().rejected_deadline, 1);
}

/// A job for [`judged_again`]: how long it runs, and how long it has.
#[derive(Clone, Copy)]
struct Job {
    ms: u64,
    deadline: Option<Deadline>,
}

/// A queue with one slot, no CoDel and `max_wait`, reading deadlines from jobs, whose limit source expects what
/// `expected_ms` says.
fn judged_again(
    expected_ms: Arc<AtomicUsize>,
    max_wait: Duration,
) -> impl Service<Job, Response = u64, Error = BoxError, Future: Send> + Clone {
    let layer = QueueLayer::builder()
        .limit(Live {
            limit: Arc::new(AtomicUsize::new(1)),
            expected_ms,
        })
        .codel(false)
        .max_wait(max_wait)
        .deadline_source(|job: &Job| job.deadline)
        .build()
        .unwrap();
    tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|job: Job| async move {
            sleep(MS * job.ms as u32).await;
            Ok::<_, Infallible>(job.ms)
        }))
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_is_judged_by_the_expected_time_when_its_timer_fires() {
    // Each case: a job with 300 ms left queues behind one running `running` ms while the service is expected to
    // take 100 ms, so its timer is set for 200 ms, when it would be doomed; at 50 ms the expected time falls to
    // 10 ms. When the timer fires the job can still finish: it waits on, until it is served, its wait runs out, or
    // it is doomed by the new expectation.
    let cases = [
        // (running ms, max_wait ms, answered at ms, answer: Ok(ms) or the error's name)
        (250, 5_000, 260, Ok(10)),
        (1_000, 250, 250, Err("QueueTimeout")),
        (1_000, 5_000, 290, Err("DeadlineExceeded")),
    ];
    for (running, max_wait, at, expected_answer) in cases {
        let expected_ms = Arc::new(AtomicUsize::new(100));
        let mut svc = judged_again(expected_ms.clone(), MS * max_wait);
        let start = Instant::now();
        let first = Job {
            ms: running,
            deadline: None,
        };
        let running = tokio::spawn(svc.ready().await.unwrap().call(first));
        let job = Job {
            ms: 10,
            deadline: Some(Deadline::after(MS * 300)),
        };
        let queued = tokio::spawn(svc.ready().await.unwrap().call(job));
        sleep(MS * 50).await;
        expected_ms.store(10, Ordering::SeqCst);
        let answer = queued.await.unwrap();
        let case = format!("running {} ms, max_wait {max_wait} ms", first.ms);
        assert_eq!(start.elapsed(), MS * at, "{case}");
        let answer = answer.map_err(|e| {
            if e.is::<QueueTimeout>() {
                "QueueTimeout"
            } else if e.is::<DeadlineExceeded>() {
                "DeadlineExceeded"
            } else {
                "other"
            }
        });
        assert_eq!(answer, expected_answer, "{case}");
        running.await.unwrap().unwrap();
    }
}

#[cfg(feature = "http")]
mod http_requests {
    use super::*;
    use http::Request;

    fn request(id: u64, priority: Option<&str>, deadline: Option<Duration>) -> Request<u64> {
        let mut builder = Request::builder();
        if let Some(p) = priority {
            builder = builder.header("x-priority", p);
        }
        let mut req = builder.body(id).unwrap();
        if let Some(d) = deadline {
            req.extensions_mut().insert(Deadline::after(d));
        }
        req
    }

    fn logging(
        log: Log,
        ms: u64,
    ) -> impl Service<
        Request<u64>,
        Response = u64,
        Error = Infallible,
        Future = impl Future<Output = Result<u64, Infallible>> + Send,
    > + Clone
           + Send {
        let inner = sleeper(log, ms);
        tower::ServiceBuilder::new()
            .map_request(|r: Request<u64>| r.into_body())
            .service(inner)
    }

    #[tokio::test(start_paused = true)]
    async fn doomed_requests_are_shed_on_arrival_while_queued_and_at_dequeue() {
        let limit = Arc::new(AtomicUsize::new(1));
        let expected = Arc::new(AtomicUsize::new(20));
        let layer = QueueLayer::builder()
            .limit(Live {
                limit: limit.clone(),
                expected_ms: expected.clone(),
            })
            .codel(false)
            .max_wait(Duration::from_secs(5))
            // The deadlines are in the requests' extensions, which only this source reads.
            .deadline_source(tower_backpressure::core::RequestDeadline)
            .build()
            .unwrap();
        let handle = layer.handle();
        let log = Log::default();
        let mut svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(logging(log.clone(), 200));
        macro_rules! call {
            ($r:expr) => {
                svc.ready().await.unwrap().call($r)
            };
        }

        // Free capacity, but 10 ms left for 20 ms of work: rejected at once.
        let start = Instant::now();
        let doomed = call!(request(0, None, Some(MS * 10))).await;
        assert!(
            matches!(&doomed, Err(e) if e.is::<DeadlineExceeded>()),
            "{doomed:?}"
        );
        assert_eq!(start.elapsed(), Duration::ZERO);

        let running = tokio::spawn(call!(request(1, None, None)));
        // Queued behind a 200 ms request with 100 ms left: leaves when only the expected 20 ms remain.
        let queued = call!(request(2, None, Some(MS * 100))).await;
        assert!(
            matches!(&queued, Err(e) if e.is::<DeadlineExceeded>()),
            "{queued:?}"
        );
        assert_eq!(start.elapsed(), MS * 80);

        // Served at dequeue only if still feasible: the queue checks again when a slot frees. By then (200 ms) the
        // service has slowed to 50 ms a request, and `late` has only 40 ms left.
        let late = tokio::spawn(call!(request(3, None, Some(MS * 160))));
        let fine = tokio::spawn(call!(request(4, None, Some(MS * 400))));
        sleep(MS * 100).await;
        expected.store(50, Ordering::SeqCst);
        assert!(matches!(late.await.unwrap(), Err(e) if e.is::<DeadlineExceeded>()));
        assert_eq!(fine.await.unwrap().unwrap(), 4);
        running.await.unwrap().unwrap();
        assert_eq!(*log.lock().unwrap(), vec![1, 4]);
        assert_eq!(handle.snapshot().rejected_deadline, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn priority_comes_from_the_header_an_extension_or_the_default() {
        let layer = QueueLayer::builder()
            .limit(1)
            .codel(false)
            .adaptive_lifo(false)
            .prioritize(
                tower_backpressure::queue::HeaderPriority::default()
                    .extractor(|ext| ext.get::<&'static str>().map(|_| Priority::CriticalPlus)),
            )
            .build()
            .unwrap();
        let handle = layer.handle();
        let log = Log::default();
        let mut svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(logging(log.clone(), 10));
        macro_rules! call {
            ($r:expr) => {
                tokio::spawn(svc.ready().await.unwrap().call($r))
            };
        }
        let mut extension = request(5, None, None);
        extension.extensions_mut().insert(Priority::Sheddable);
        let mut extracted = request(6, Some("sheddable"), None);
        extracted.extensions_mut().insert("vip");
        let tasks = [
            call!(request(0, None, None)),
            call!(request(1, Some("sheddable"), None)),
            call!(request(2, Some("SHEDDABLE!"), None)),
            call!(request(3, Some("sheddable_plus"), None)),
            call!(request(4, None, None)),
            call!(extension),
            call!(extracted),
        ];
        // Malformed and absent are critical; a Priority extension wins over the header; the extractor next.
        assert_eq!(handle.snapshot().depth_by_priority, [1, 2, 1, 2]);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 6, 2, 4, 3, 1, 5]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_raised_limit_is_used_at_the_next_arrival() {
    let limit = Arc::new(AtomicUsize::new(1));
    let layer = QueueLayer::builder()
        .limit(Live {
            limit: limit.clone(),
            expected_ms: Arc::default(),
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(log.clone(), 50));
    let a = tokio::spawn(svc.ready().await.unwrap().call(0));
    let b = tokio::spawn(svc.ready().await.unwrap().call(1));
    tokio::task::yield_now().await;
    assert_eq!(*log.lock().unwrap(), vec![0]);
    limit.store(3, Ordering::SeqCst);
    let c = tokio::spawn(svc.ready().await.unwrap().call(2));
    let start = Instant::now();
    for t in [a, b, c] {
        t.await.unwrap().unwrap();
    }
    assert_eq!(start.elapsed(), MS * 50, "all three ran together");
    let mut started = log.lock().unwrap().clone();
    started.sort_unstable();
    assert_eq!(started, vec![0, 1, 2]);
    assert_eq!(handle.snapshot().limit, 3);
}

#[tokio::test(start_paused = true)]
async fn the_critical_reserve_binds_only_at_saturation() {
    let layer = QueueLayer::builder()
        .limit(4)
        .critical_reserve(0.5)
        .prioritize(|r: &(Priority, u64)| r.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(by_priority(log.clone(), 50));
    let mut tasks = Vec::new();
    // Idle capacity is borrowed: sheddable traffic takes all four slots.
    for id in 0..4 {
        tasks.push(tokio::spawn(
            svc.ready().await.unwrap().call((Priority::Sheddable, id)),
        ));
    }
    // At saturation, critical traffic still gets its reserved two slots; a third critical one and further
    // sheddable ones wait.
    for id in 4..7 {
        tasks.push(tokio::spawn(
            svc.ready().await.unwrap().call((Priority::Critical, id)),
        ));
    }
    tasks.push(tokio::spawn(
        svc.ready().await.unwrap().call((Priority::Sheddable, 7)),
    ));
    tokio::task::yield_now().await;
    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth), (6, 2));
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth, s.completed), (0, 0, 8));
}

/// A limit source may say "no limit" with `usize::MAX`: the critical reserve on top of it saturates instead of
/// overflowing (a panic in `call` in debug builds, a wrapped ceiling in release ones).
#[tokio::test(start_paused = true)]
async fn a_critical_reserve_over_an_unbounded_limit_admits() {
    let layer = QueueLayer::builder()
        .limit(usize::MAX)
        .critical_reserve(0.5)
        .prioritize(|r: &(Priority, u64)| r.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(by_priority(Log::default(), 1));
    for priority in [Priority::Critical, Priority::Sheddable] {
        let served = tokio::spawn(svc.clone().oneshot((priority, 7))).await;
        assert_eq!(served.expect("no panic in call").unwrap(), 7);
    }
    assert_eq!(handle.snapshot().completed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_frees_its_place_and_passes_on_a_slot_it_was_handed() {
    let layer = QueueLayer::builder().limit(1).max_depth(3).build().unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(log.clone(), 10));

    let mut running = Box::pin(svc.ready().await.unwrap().call(0));
    let dropped_queued = svc.ready().await.unwrap().call(1);
    let handed = svc.ready().await.unwrap().call(2);
    let next = tokio::spawn(svc.ready().await.unwrap().call(3));
    assert_eq!(handle.snapshot().depth, 3);

    // Leaves the queue at once: the place is free again.
    drop(dropped_queued);
    let s = handle.snapshot();
    assert_eq!((s.depth, s.cancelled), (2, 1));

    // The running request finishes; its slot goes to `handed`, which is dropped before it ever runs: the slot
    // must pass on to `next`.
    assert_eq!((&mut running).await.unwrap(), 0);
    assert_eq!(
        handle.snapshot().in_flight,
        1,
        "the slot is handed over, not freed"
    );
    drop(handed);
    assert_eq!(next.await.unwrap().unwrap(), 3);
    assert_eq!(*log.lock().unwrap(), vec![0, 3]);
    let s = handle.snapshot();
    assert_eq!(
        (s.in_flight, s.depth, s.cancelled, s.admitted, s.completed),
        (0, 0, 2, 2, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn observer_sees_depth_waits_and_one_completion_per_admission() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(1)
        .observer(move |e: &Event| sink.lock().unwrap().push(*e))
        .build()
        .unwrap();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(Log::default(), 10));
    let a = tokio::spawn(svc.ready().await.unwrap().call(0));
    let b = tokio::spawn(svc.ready().await.unwrap().call(1));
    let _ = svc.ready().await.unwrap().call(2).await;
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let events = events.lock().unwrap();
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    assert_eq!(
        count(&|e| matches!(e, Event::Admitted { layer: "queue", .. })),
        2
    );
    assert_eq!(
        count(&|e| matches!(e, Event::Completed { layer: "queue", .. })),
        2
    );
    assert_eq!(count(&|e| matches!(e, Event::Rejected { .. })), 1);
    assert!(events.contains(&Event::QueueDepth {
        layer: "queue",
        depth: 1
    }));
    assert!(events.contains(&Event::QueueWait {
        layer: "queue",
        wait: MS * 10
    }));
}

#[tokio::test(start_paused = true)]
async fn depth_never_exceeds_max_depth_under_100x_capacity() {
    let max_seen = Arc::new(AtomicUsize::new(0));
    let seen = max_seen.clone();
    let layer = QueueLayer::builder()
        .limit(2)
        .max_depth(20)
        .observer(move |e: &Event| {
            if let Event::QueueDepth { depth, .. } = e {
                seen.fetch_max(*depth, Ordering::Relaxed);
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let inner = {
        let (in_flight, peak) = (in_flight.clone(), peak.clone());
        tower::service_fn(move |_: u64| {
            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            let in_flight = in_flight.clone();
            async move {
                sleep(MS * 20).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(0)
            }
        })
    };
    let svc = tower::ServiceBuilder::new().layer(layer).service(inner);
    // Capacity 100/s; 10 000/s offered for 20 s.
    let origin = Instant::now();
    let mut offered = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while origin.elapsed() < Duration::from_secs(20) {
        for _ in 0..10 {
            tasks.spawn(svc.clone().oneshot(offered));
            offered += 1;
        }
        assert!(handle.snapshot().depth <= 20);
        sleep(MS).await;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let s = handle.snapshot();
    assert!(max_seen.load(Ordering::Relaxed) <= 20);
    assert_eq!(max_seen.load(Ordering::Relaxed), 20, "the queue did fill");
    assert!(peak.load(Ordering::SeqCst) <= 2);
    assert_eq!((s.in_flight, s.depth), (0, 0));
    assert_eq!(s.admitted, s.completed);
    let rejected = s.rejected_queue_full + s.rejected_queue_timeout + s.rejected_deadline;
    assert_eq!(s.completed + rejected + s.cancelled, offered);
    // Served at capacity throughout: 100/s for 20 s.
    assert!(s.completed >= 1990, "{s:?}");
}

#[test]
fn bad_configuration_is_an_error_not_a_panic() {
    let err = |r: Result<_, tower_backpressure::core::ConfigError>| r.map(|_| ()).unwrap_err();
    let e = err(QueueLayer::builder().max_depth(0).build());
    assert_eq!(e.field(), "max_depth");
    assert!(
        e.to_string()
            .starts_with("invalid queue config: max_depth:"),
        "{e}"
    );
    assert_eq!(err(QueueLayer::builder().build()).field(), "limit");
    assert_eq!(err(QueueLayer::builder().limit(0).build()).field(), "limit");
    let e = err(QueueLayer::builder()
        .limit(1)
        .codel_target(Duration::ZERO)
        .build());
    assert_eq!(e.field(), "codel_target");
    let e = err(QueueLayer::builder()
        .limit(1)
        .codel_interval(Duration::ZERO)
        .build());
    assert_eq!(e.field(), "codel_interval");
    let e = err(QueueLayer::builder()
        .limit(1)
        .codel_target(MS * 200)
        .build());
    assert!(e.to_string().contains("below the interval"), "{e}");
    assert_eq!(
        err(QueueLayer::builder()
            .limit(1)
            .max_wait(Duration::ZERO)
            .build())
        .field(),
        "max_wait"
    );
    assert_eq!(
        err(QueueLayer::builder().limit(1).critical_reserve(1.0).build()).field(),
        "critical_reserve"
    );
    assert_eq!(
        err(QueueLayer::builder()
            .limit(1)
            .critical_reserve(f64::NAN)
            .build())
        .field(),
        "critical_reserve"
    );
    // No queue at all is a valid choice: a pure load shedder.
    assert!(QueueLayer::builder().limit(1).max_depth(0).build().is_ok());
}

#[tokio::test(start_paused = true)]
async fn max_depth_zero_sheds_beyond_the_limit() {
    let layer = QueueLayer::builder().limit(1).max_depth(0).build().unwrap();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(Log::default(), 10));
    let a = tokio::spawn(svc.ready().await.unwrap().call(0));
    let b = svc.ready().await.unwrap().call(1).await;
    assert!(is::<QueueFull>(&b));
    a.await.unwrap().unwrap();
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 2);
}

/// Many callers on two worker threads, a third of them giving up while queued or running (dropped by `select!`
/// or aborted): every slot must come back, and the limit must hold throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cancellations_leak_nothing() {
    const LIMIT: usize = 4;
    const CALLERS: u64 = 4000;
    let layer = QueueLayer::builder()
        .limit(LIMIT)
        .max_depth(CALLERS as usize)
        .codel(false)
        .max_wait(Duration::from_secs(600))
        .build()
        .unwrap();
    let handle = layer.handle();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let inner = {
        let (in_flight, peak) = (in_flight.clone(), peak.clone());
        tower::service_fn(move |id: u64| {
            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            let in_flight = in_flight.clone();
            async move {
                struct Done(Arc<AtomicUsize>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _done = Done(in_flight);
                for _ in 0..(id % 7) {
                    tokio::task::yield_now().await;
                }
                Ok::<_, Infallible>(id)
            }
        })
    };
    // Counts the requests that reached the queue's `call` (an aborted task may never get that far).
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = tower::ServiceBuilder::new()
        .map_request(move |id: u64| {
            counter.fetch_add(1, Ordering::SeqCst);
            id
        })
        .layer(layer)
        .service(inner);

    let run = async {
        let mut tasks = Vec::new();
        let mut aborts = Vec::new();
        for id in 0..CALLERS {
            let call = svc.clone().oneshot(id);
            match id % 3 {
                0 => tasks.push(tokio::spawn(async move {
                    let patience = id % 11;
                    tokio::select! {
                        r = call => Some(r.unwrap()),
                        _ = async {
                            for _ in 0..patience {
                                tokio::task::yield_now().await;
                            }
                        } => None,
                    }
                })),
                1 => aborts.push(tokio::spawn(async move { Some(call.await.unwrap()) })),
                _ => tasks.push(tokio::spawn(async move { Some(call.await.unwrap()) })),
            }
            if id % 5 == 0 {
                if let Some(t) = aborts.pop() {
                    t.abort();
                    tasks.push(t);
                }
            }
        }
        tasks.extend(aborts);
        let mut served = 0u64;
        for t in tasks {
            match t.await {
                Ok(Some(_)) => served += 1,
                Ok(None) => {}
                Err(e) => assert!(e.is_cancelled()),
            }
        }
        served
    };
    let served = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("a lost wake-up left callers waiting forever");

    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth), (0, 0), "{s:?}");
    assert_eq!(in_flight.load(Ordering::SeqCst), 0);
    assert!(peak.load(Ordering::SeqCst) <= LIMIT, "limit exceeded");
    assert_eq!(s.admitted, s.completed);
    assert_eq!(
        s.rejected_queue_full + s.rejected_queue_timeout + s.rejected_deadline,
        0
    );
    let calls = calls.load(Ordering::SeqCst) as u64;
    assert!(calls > CALLERS / 2, "{calls}");
    assert_eq!(s.completed + s.cancelled, calls, "{s:?}");
    assert!(
        served <= s.completed && s.cancelled > 0,
        "served {served}, {s:?}"
    );
    // Nothing is left holding a slot: the full limit is usable at once.
    let mut all = Vec::new();
    for id in 0..LIMIT as u64 {
        all.push(svc.clone().oneshot(id));
    }
    futures::future::join_all(all).await;
    assert_eq!(handle.snapshot().depth, 0);
}

#[tokio::test(start_paused = true)]
async fn a_standing_flood_of_sheddable_traffic_does_not_cut_critical_waits() {
    let layer = QueueLayer::builder()
        .limit(1)
        .max_depth(1000)
        .prioritize(|r: &(Priority, u64)| r.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(by_priority(Log::default(), 10));
    let origin = Instant::now();
    let (mut critical, mut sheddable) = (Vec::new(), Vec::new());
    let mut tick = 0u64;
    while origin.elapsed() < Duration::from_secs(2) {
        // Ten times the capacity in sheddable requests; a critical one every 47 ms, at every phase of a service.
        sheddable.push(tokio::spawn(
            svc.clone().oneshot((Priority::Sheddable, tick)),
        ));
        if tick % 47 == 0 {
            critical.push(tokio::spawn(
                svc.clone().oneshot((Priority::Critical, tick)),
            ));
        }
        tick += 1;
        sleep(MS).await;
    }
    let n = critical.len();
    for t in critical {
        // Each waits for the request in service (up to 10 ms, above the 5 ms target): the critical level's queue
        // never stands, so CoDel leaves it alone.
        t.await.unwrap().unwrap();
    }
    let mut shed = 0;
    for t in sheddable {
        if t.await.unwrap().is_err() {
            shed += 1;
        }
    }
    assert!(n >= 40);
    assert!(shed > 1500, "the flood was shed: {shed}");
    assert_eq!(handle.snapshot().in_flight, 0);
}

#[cfg(feature = "sim")]
#[test]
fn the_priority_header_is_the_one_the_simulator_sends() {
    assert_eq!(
        tower_backpressure::queue::PRIORITY_HEADER,
        tower_backpressure::sim::PRIORITY_HEADER
    );
}

/// A live limit raised while a request waits, with no arrival or release to hand the new slot over: when the
/// request's wait runs out the queue must admit it into the free slot, not refuse it with `QueueTimeout`.
#[tokio::test(start_paused = true)]
async fn a_waiter_whose_wait_runs_out_takes_a_slot_a_raised_limit_freed() {
    let limit = Arc::new(AtomicUsize::new(1));
    let layer = QueueLayer::builder()
        .limit(Live {
            limit: limit.clone(),
            expected_ms: Arc::default(),
        })
        .max_wait(MS * 100)
        // Off: CoDel would rightly cut a request that waited a whole standing interval.
        .codel(false)
        .build()
        .unwrap();
    let handle = layer.handle();
    let log = Log::default();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(sleeper(log.clone(), 1000));
    let a = tokio::spawn(svc.ready().await.unwrap().call(0));
    let b = tokio::spawn(svc.ready().await.unwrap().call(1));
    sleep(MS * 10).await;
    assert_eq!(handle.snapshot().depth, 1);
    limit.store(2, Ordering::SeqCst);
    let start = Instant::now();
    let b = b.await.unwrap();
    assert!(b.is_ok(), "refused with a free slot: {b:?}");
    assert_eq!(*log.lock().unwrap(), vec![0, 1]);
    // Admitted when its wait ran out (t = 100 ms), not when the first request freed its slot (t = 1000 ms).
    assert!(start.elapsed() < MS * 1100, "{:?}", start.elapsed());
    a.await.unwrap().unwrap();
    let s = handle.snapshot();
    assert_eq!((s.in_flight, s.depth, s.rejected_queue_timeout), (0, 0, 0));
}
