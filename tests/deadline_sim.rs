//! The `deadline` simulator strategy: requests whose client has given up stop costing backend time.
#![cfg(feature = "sim")]

use tower_backpressure::sim::{self, strategy, Scenario};

#[test]
fn deadline_strategy_removes_wasted_work_at_3x_overload() {
    let mut scenario = Scenario::builtin()
        .into_iter()
        .find(|s| s.name == "s7-deadline")
        .unwrap();
    for phase in &mut scenario.phases {
        phase.duration_s = 5.0;
    }
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
}
