//! The deterministic simulator (`asched_tests::sim`) over the real component: many seeds with
//! faults, the named field failures as scripted scenarios, and deliberately broken builds that
//! the checkers must catch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use asched_host::runtime::api;
use asched_tests::sim::{Compiled, Planned, Sim, StoreOp, run_seed, run_seed_with_swaps};
use asched_tests::variants::Variant;

/// Seeds the CI run checks.
const SEEDS: u64 = 200;

/// Safety-phase steps per seed.
const STEPS: u64 = 5_000;

/// The shipped plugin, compiled once for every test of this file.
fn shipped() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| Compiled::new(Variant::Shipped))
}

/// Runs seeds `from..to` on two threads; returns the failures' reports and the steps taken.
fn run_seeds(variant: Variant, seeds: std::ops::Range<u64>, steps: u64) -> (Vec<String>, u64) {
    let next = AtomicU64::new(seeds.start);
    let failures = Mutex::new(Vec::new());
    let total = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let compiled = Compiled::new(variant);
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        return;
                    }
                    match run_seed(&compiled, seed, steps) {
                        Ok(report) => {
                            total.fetch_add(report.steps, Ordering::Relaxed);
                        }
                        Err(failure) => failures
                            .lock()
                            .expect("no panics while locked")
                            .push(failure.to_string()),
                    }
                }
            });
        }
    });
    (
        failures.into_inner().expect("no panics while locked"),
        total.into_inner(),
    )
}

/// 200 seeds of 5,000 faulty steps each, then healing: no invariant breaks and every
/// acknowledged event is delivered. A failure prints its seed and the command that replays it.
#[test]
fn two_hundred_seeds_of_faults_break_no_invariant() {
    let (failures, steps) = run_seeds(Variant::Shipped, 0..SEEDS, STEPS);
    assert!(
        failures.is_empty(),
        "{} of {SEEDS} seeds failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(steps >= SEEDS * STEPS, "only {steps} steps were run");
}

/// The same seed replays exactly: same steps, acknowledgements, requests and restarts.
#[test]
fn a_seed_replays_identically() {
    let first = run_seed(shipped(), 7, 2_000).expect("seed 7 passes");
    let again = run_seed(shipped(), 7, 2_000).expect("seed 7 passes");
    assert_eq!(
        (first.steps, first.acked, first.requests, first.restarts),
        (again.steps, again.acked, again.requests, again.restarts)
    );
    assert!(first.requests > 100 && first.restarts > 0, "{first:?}");
}

/// The plugin's linear memory stays small however the seeds load it: the backlog lives in the
/// store.
#[test]
fn plugin_memory_stays_bounded() {
    let report = run_seed(shipped(), 11, STEPS).expect("seed 11 passes");
    assert!(
        report.max_memory_bytes <= 4 * 1024 * 1024,
        "{} bytes",
        report.max_memory_bytes
    );
}

/// The plugin's memory does not grow with the backlog of a DOWN appservice: the backlog lives
/// in the store. Memory after 2,000 queued events and after 20,000 is the same.
#[test]
fn plugin_memory_is_flat_as_a_backlog_grows() {
    let mut sim = Sim::scripted(shipped(), 1, config());
    sim.script(0, |_| status(503));
    for _ in 0..2_000 {
        assert!(sim.enqueue_one(0).1);
    }
    sim.run_for(10_000);
    let at_2k = sim.memory_bytes();
    for _ in 0..18_000 {
        assert!(sim.enqueue_one(0).1);
    }
    sim.run_for(10_000);
    let at_20k = sim.memory_bytes();
    assert_eq!(sim.status(0).expect("as0").backlog_events, 20_000);
    assert_eq!(
        at_20k, at_2k,
        "memory grew from {at_2k} to {at_20k} bytes with the backlog"
    );
    assert!(at_20k <= 4 * 1024 * 1024, "{at_20k} bytes");
    sim.finish().unwrap_or_else(|f| panic!("{f}"));
}

/// Seeds with plugin traps on demand: every trap rebuilds the instance from the store and
/// nothing is lost.
#[test]
fn traps_are_survived_without_loss() {
    let (failures, _) = run_seeds(Variant::Traps, 1_000..1_040, 3_000);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Swaps between two builds at random steps, with every fault on: the checkers hold across
/// each swap (sends in flight are handed over, nothing is lost or sent twice under new ids).
#[test]
fn swaps_under_faults_break_no_invariant() {
    let other = Compiled::new(Variant::Traps);
    let mut failures = Vec::new();
    let mut swaps = 0;
    for seed in 2_000..2_040 {
        match run_seed_with_swaps(shipped(), &other, seed, 3_000) {
            Ok(report) => swaps += report.swaps,
            Err(failure) => failures.push(failure.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(swaps >= 40 * 20, "only {swaps} swaps in 40 seeds");
}

/// Each deliberately broken build is caught within 30 seeds, by the checker meant for it.
#[test]
fn broken_builds_are_caught() {
    let cases = [
        (Variant::ReuseTxnId, "was sent with different bodies"),
        (Variant::AckBeforePersist, "acknowledged"),
        (Variant::DoubleSend, "two requests in flight"),
    ];
    for (variant, expected) in cases {
        let compiled = Compiled::new(variant);
        let caught = (0..30).find_map(|seed| run_seed(&compiled, seed, 3_000).err());
        let failure =
            caught.unwrap_or_else(|| panic!("{} was not caught in 30 seeds", variant.name()));
        assert!(
            failure.violation.contains(expected),
            "{}: caught by another checker:\n{failure}",
            variant.name()
        );
        assert!(failure.to_string().contains(&format!(
            "--variant {} --seed {}",
            variant.name(),
            failure.params.seed
        )));
    }
}

/// The defaults with small delays, so scenarios read in milliseconds.
fn config() -> api::Config {
    api::Config {
        max_events_per_txn: 100,
        max_txn_body_bytes: 512 * 1024,
        retry_delay_ms_initial: 2_000,
        retry_delay_ms_max: 512_000,
        retry_jitter_percent: 0,
        storage_retry_delay_ms: 1_000,
    }
}

fn ok(latency_ms: u64) -> Planned {
    (
        true,
        api::SendOutcome::Response(api::Response {
            status: 200,
            body_is_json: true,
        }),
        latency_ms,
    )
}

fn status(code: u16) -> Planned {
    (
        false,
        api::SendOutcome::Response(api::Response {
            status: code,
            body_is_json: true,
        }),
        5,
    )
}

/// The (txn id, event seqs) of the requests to appservice 0.
fn requests(sim: &mut Sim<'_>) -> Vec<(String, Vec<u64>)> {
    sim.sent()
        .into_iter()
        .filter(|r| r.appservice == 0)
        .map(|r| (r.txn_id, r.seqs))
        .collect()
}

/// F1: events queued behind an in-flight transaction survive a crash; the in-flight
/// transaction is resent with its id and exactly its events.
#[test]
fn f1_crash_with_txn_in_flight_loses_nothing() {
    let mut sim = Sim::scripted(shipped(), 1, config());
    sim.script(0, |_| ok(5_000));
    for _ in 0..3 {
        assert!(sim.enqueue_one(0).1);
    }
    sim.run_for(2_000);
    sim.unscript(0);
    sim.crash();
    sim.run_for(1_000);
    let sent = requests(&mut sim);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[0].1, [1]);
    assert_eq!(
        sent[1], sent[0],
        "the in-flight txn is resent with the same id and events"
    );
    assert_eq!(sent[2].1, [2, 3]);
    assert_ne!(sent[2].0, sent[0].0);
    sim.finish().unwrap_or_else(|f| panic!("{f}"));
}

/// F7: a storage error while forming the next transaction pauses the queue; it never skips or
/// reorders.
#[test]
fn f7_storage_error_pauses_without_reordering() {
    let mut sim = Sim::scripted(shipped(), 1, config());
    sim.script(0, |_| ok(100));
    assert!(sim.enqueue_one(0).1);
    assert!(sim.enqueue_one(0).1);
    sim.store_rule(StoreOp::Commit, "/txn", 1);
    sim.run_for(150);
    assert!(sim.enqueue_one(0).1);
    sim.run_for(3_000);
    let seqs: Vec<u64> = requests(&mut sim)
        .into_iter()
        .flat_map(|(_, s)| s)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    sim.check().unwrap_or_else(|f| panic!("{f}"));
    sim.finish().unwrap_or_else(|f| panic!("{f}"));
}

/// F8: when recording a delivered transaction fails, the appservice is not marked DOWN; the
/// write is retried and at most that transaction is resent, under its id.
#[test]
fn f8_failed_bookkeeping_after_success_is_retried_without_down() {
    let mut sim = Sim::scripted(shipped(), 1, config());
    sim.script(0, |_| ok(10));
    assert!(sim.enqueue_one(0).1);
    sim.store_rule(StoreOp::Commit, "/c/", 1);
    sim.run_for(20);
    let status = sim.status(0).expect("as0 is registered");
    assert_eq!(status.state, api::AppserviceState::Up);
    assert!(status.paused_by_storage);
    sim.run_for(2_000);
    assert!(sim.enqueue_one(0).1);
    sim.run_for(100);
    let sent = requests(&mut sim);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].1, [1]);
    assert_eq!(sent[1].1, [2]);
    let counter = |id: &str| id.rsplit('.').next().and_then(|n| n.parse::<u64>().ok());
    assert_eq!(
        counter(&sent[1].0),
        counter(&sent[0].0).map(|n| n + 1),
        "no gap, no new id for T1"
    );
    assert_eq!(sim.status(0).expect("as0").state, api::AppserviceState::Up);
    sim.finish().unwrap_or_else(|f| panic!("{f}"));
}

/// F16: after the answer to X=[E1] is lost, the retry is X with exactly [E1]; E2 gets a new id.
#[test]
fn f16_retry_after_lost_answer_keeps_id_and_events() {
    let mut sim = Sim::scripted(shipped(), 1, config());
    let first = Arc::new(AtomicU64::new(0));
    let seen = first.clone();
    sim.script(0, move |_| {
        if seen.fetch_add(1, Ordering::Relaxed) == 0 {
            (
                true,
                api::SendOutcome::ConnectionLost("connection closed before the answer".into()),
                50,
            )
        } else {
            ok(10)
        }
    });
    assert!(sim.enqueue_one(0).1);
    sim.run_for(20);
    assert!(sim.enqueue_one(0).1);
    sim.run_for(5_000);
    let sent = requests(&mut sim);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[0].1, [1]);
    assert_eq!(sent[1], sent[0]);
    assert_eq!(sent[2].1, [2]);
    assert_ne!(sent[2].0, sent[0].0);
    sim.finish().unwrap_or_else(|f| panic!("{f}"));
}

/// F17: while a failed transaction's stored body cannot be read, it is never sent partial or
/// empty; the queue backs off and sends it whole later.
#[test]
fn f17_unreadable_body_is_never_sent_partial() {
    let mut sim = Sim::scripted(shipped(), 1, config());
    sim.script(0, |sent| {
        if sent.len() == 1 {
            ok(500)
        } else {
            status(500)
        }
    });
    for _ in 0..3 {
        assert!(sim.enqueue_one(0).1);
    }
    sim.run_for(700);
    assert_eq!(
        requests(&mut sim).last().map(|(_, seqs)| seqs.clone()),
        Some(vec![2, 3])
    );
    sim.store_rule(StoreOp::Get, "txn-body", 5);
    sim.run_for(120_000);
    sim.unscript(0);
    sim.run_for(600_000);
    let sent = requests(&mut sim);
    let t2: Vec<&(String, Vec<u64>)> = sent.iter().filter(|(id, _)| *id == sent[1].0).collect();
    assert!(
        t2.len() >= 2 && t2.iter().all(|(_, seqs)| seqs == &[2, 3]),
        "{sent:?}"
    );
    assert!(sent.iter().all(|(_, seqs)| !seqs.is_empty()));
    let bodies: std::collections::BTreeSet<Vec<u8>> = sim
        .sent()
        .into_iter()
        .filter(|r| r.txn_id == sent[1].0)
        .map(|r| r.body)
        .collect();
    assert_eq!(
        bodies.len(),
        1,
        "every attempt of the txn has the same bytes"
    );
    sim.finish().unwrap_or_else(|f| panic!("{f}"));
}

/// A power loss at any moment of a delivery (the store loses what was committed since the host
/// last let an effect out) loses no acknowledged event and never sends a transaction after a
/// later one: the txn that follows a delivered one leaves only once the delivery is durable.
/// What was in flight, or delivered without anything let out since, is resent under its id.
#[test]
fn power_losses_lose_and_reorder_nothing() {
    // [1] is sent at 0 ms and answered at 10, [2, 3] then sent and answered at 20.
    for at in [0, 5, 10, 11, 15, 20, 21, 25, 40] {
        let mut sim = Sim::scripted(shipped(), 1, config());
        sim.script(0, |_| ok(10));
        for _ in 0..3 {
            assert!(sim.enqueue_one(0).1);
        }
        sim.run_for(at);
        sim.lose_power();
        assert!(sim.enqueue_one(0).1);
        sim.run_for(1_000);
        let sent = requests(&mut sim);
        let seqs: Vec<Vec<u64>> = sent.iter().map(|(_, seqs)| seqs.clone()).collect();
        if at < 10 {
            assert_eq!(
                seqs,
                [vec![1], vec![1], vec![2, 3, 4]],
                "power loss at {at} ms"
            );
            assert_eq!(sent[1].0, sent[0].0, "power loss at {at} ms");
        } else {
            assert_eq!(
                seqs,
                [vec![1], vec![2, 3], vec![2, 3], vec![4]],
                "power loss at {at} ms"
            );
            assert_eq!(sent[2].0, sent[1].0, "power loss at {at} ms");
        }
        sim.finish()
            .unwrap_or_else(|f| panic!("power loss at {at} ms: {f}"));
    }
}
