//! The `deadline` simulator strategy: requests whose client has given up stop costing backend time.
#![cfg(feature = "sim")]

use tower_backpressure::sim::{self, strategy, Scenario};

/// The built-in scenario `name` with every phase cut to `secs` seconds.
fn shortened(name: &str, secs: f64) -> Scenario {
    let mut scenario = Scenario::builtin()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap();
    for phase in &mut scenario.phases {
        phase.duration_s = secs;
    }
    scenario
}

#[test]
fn deadline_strategy_removes_wasted_work_at_3x_overload() {
    let scenario = shortened("s7-deadline", 5.0);
    let run = |name| sim::run(&scenario, strategy(name).unwrap()).unwrap();
    let unprotected = run("unprotected");
    let deadline = run("deadline");
    let wasted = |report: &sim::Report| report.row("3x", "all").unwrap().wasted_work;
    assert!(
        wasted(&unprotected) > 0.5,
        "unprotected wastes {}",
        wasted(&unprotected)
    );
    assert!(
        wasted(&deadline) <= 0.01,
        "deadline wastes {}",
        wasted(&deadline)
    );
    // Expired requests are answered 504 (a rejection), not left to time out at the client.
    assert!(deadline.row("3x", "all").unwrap().rejected_rps > 0.0);
    // What the deadline layer saves it saves by cutting work off at the deadline, work that then answers nobody:
    // alone, with no shedding in front of the backend, that is most of its time. Unprotected, nothing is cut.
    let cut = |report: &sim::Report| report.row("3x", "all").unwrap().cut_work;
    assert!(cut(&deadline) > 0.8, "deadline cuts {}", cut(&deadline));
    assert_eq!(cut(&unprotected), 0.0);
    // The recommended stack sheds before the work starts: little is cut, and goodput stays near capacity.
    let default = run("default");
    let row = default.row("3x", "all").unwrap();
    assert!(row.cut_work < 0.05, "default cuts {}", row.cut_work);
    assert!(row.goodput_rps >= 0.9 * row.capacity_rps);
}

#[test]
fn the_client_stack_passes_on_and_enforces_the_callers_deadline() {
    // Every request takes twice its client's deadline.
    let mut scenario = shortened("s5a-hang", 10.0);
    assert!(scenario.client.send_deadline && !scenario.client.cancel_on_timeout);
    let breaker = strategy("breaker").unwrap();
    let with_deadline = sim::run(&scenario, breaker).unwrap();
    scenario.client.send_deadline = false;
    let without = sim::run(&scenario, breaker).unwrap();
    let late = |report: &sim::Report| report.row("late", "all").unwrap().clone();
    // Without a deadline the stack cannot tell that the caller left: the backend works on for nobody.
    assert!(
        late(&without).wasted_work > 0.3,
        "without a deadline the breaker stack wastes {}",
        late(&without).wasted_work
    );
    // With the caller's deadline current, the propagation layer cuts each call off when it passes: no backend
    // time is spent after the caller gave up, and the caller gets a 504 rather than silence. (The simulated
    // backend stops when the call is dropped, as a stream reset stops a remote handler; it does not read the
    // header the layer writes, whose values the loopback multi-hop tests check.)
    assert!(
        late(&with_deadline).wasted_work <= 0.01,
        "with a deadline the breaker stack wastes {}",
        late(&with_deadline).wasted_work
    );
    assert!(late(&with_deadline).rejected_rps > 0.0);
}
