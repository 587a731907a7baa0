//! Hot swap and the sandbox, through the real host: swaps under load, refusals that name what
//! is wrong, rollback of a failing build, and containment of builds that loop, hog memory or
//! trap (F19).

use std::time::{Duration, Instant};

use asched_host::EnqueueError;
use asched_host::runtime::Sandbox;
use asched_tests::variants::Variant;
use asched_tests::{
    Receiver, Reply, Request, TempDir, TestHost, assert_one_body_per_txn_id, event, fast_retries,
    ids, registration, temp_dir,
};

const WAIT: Duration = Duration::from_secs(30);

/// Enqueues `events` one by one, retrying an event while the plugin is failing (as a
/// homeserver does on a 503), so every event is acknowledged once.
async fn enqueue_retrying(
    host: &TestHost,
    appservice: &str,
    events: impl IntoIterator<Item = String>,
) {
    for json in events {
        let deadline = Instant::now() + WAIT;
        loop {
            match host.host.enqueue(appservice, vec![json.clone()]).await {
                Ok(1) => break,
                Err(EnqueueError::PluginFailed(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("enqueue for {appservice} answered {other:?}"),
            }
        }
    }
}

/// Swapping between two builds again and again while events flow changes nothing the
/// appservices see: every event once, in order, one body per txn id, one request at a time.
#[tokio::test(flavor = "multi_thread")]
async fn swaps_under_load_deliver_everything_once_in_order() {
    let receivers = [
        Receiver::start(slow_ok).await,
        Receiver::start(slow_ok).await,
    ];
    let dir = temp_dir("swap-load");
    let regs = vec![
        registration("as1", Some(&receivers[0].url())),
        registration("as2", Some(&receivers[1].url())),
    ];
    let host = TestHost::start(&dir, regs, fast_retries());
    let builds = [Variant::Traps.wasm(), Variant::Shipped.wasm()];
    let feeders: Vec<_> = ["as1", "as2"]
        .into_iter()
        .map(|id| {
            let host = host.host.clone();
            tokio::spawn(async move {
                for n in 1..=600 {
                    host.enqueue(id, vec![event(n)])
                        .await
                        .expect("enqueues are accepted during swaps");
                }
            })
        })
        .collect();
    let mut pauses = Vec::new();
    for i in 0..40 {
        let report = host
            .host
            .swap(builds[i % 2].clone())
            .await
            .expect("both builds are accepted");
        pauses.push(report.pause_us);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    for feeder in feeders {
        feeder.await.expect("the feeder finishes");
    }
    for receiver in &receivers {
        assert_eq!(receiver.wait_for_events(600, WAIT).await, ids(1, 600));
        assert_one_body_per_txn_id(&receiver.requests());
        assert_eq!(receiver.max_concurrent(), 1);
    }
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!(
        (plugin.swaps, plugin.rollbacks, plugin.rebuilds),
        (40, 0, 0)
    );
    pauses.sort_unstable();
    eprintln!(
        "swap pause: p50 {} us, max {} us",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    host.stop().await;
}

fn slow_ok(_: &[Request]) -> Reply {
    Reply::Respond {
        status: 200,
        content_type: Some("application/json"),
        body: "{}",
        delay: Duration::from_millis(2),
    }
}

/// Components this host cannot run are refused with a message that names the import, the
/// export or the format; the running build keeps delivering.
#[tokio::test(flavor = "multi_thread")]
async fn components_the_host_cannot_run_are_refused_by_name() {
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("refusals");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    let before = host.host.plugin_status().await.expect("the host runs");
    let cases: [(Vec<u8>, &str); 3] = [
        (
            Variant::ImportsFs.wasm(),
            "`wasi:filesystem/types@0.2.6`, `wasi:filesystem/preopens@0.2.6`, which this host does not provide",
        ),
        (
            Variant::WrongVersion.wasm(),
            "does not export `asched:scheduler/scheduler@0.1.x` (it exports: asched:scheduler/scheduler@0.2.0)",
        ),
        (
            b"\0asm this is not a component".to_vec(),
            "not a valid WebAssembly component",
        ),
    ];
    for (n, (wasm, expected)) in cases.into_iter().enumerate() {
        let refusal = host
            .host
            .swap(wasm)
            .await
            .expect_err("the component is refused");
        assert!(
            refusal.contains(expected),
            "expected {expected:?} in {refusal:?}"
        );
        host.host
            .enqueue("as1", vec![event(n + 1)])
            .await
            .expect("the old build still runs");
    }
    assert_eq!(receiver.wait_for_events(3, WAIT).await, ids(1, 3));
    let after = host.host.plugin_status().await.expect("the host runs");
    assert_eq!(
        (after.sha256, after.swaps, after.state),
        (before.sha256, 0, "running")
    );
    host.stop().await;
}

/// A swapped-in build that traps within its probation is replaced by the previous build at
/// once; the reason is in the status; every acknowledged event is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_traps_in_probation_is_rolled_back() {
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("rollback");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    let shipped = host
        .host
        .plugin_status()
        .await
        .expect("the host runs")
        .sha256;
    let report = host
        .host
        .swap(Variant::TrapAfterN.wasm())
        .await
        .expect("the build starts");
    assert_eq!(report.previous_sha256, shipped);
    enqueue_retrying(&host, "as1", (1..=60).map(event)).await;
    assert_eq!(receiver.wait_for_events(60, WAIT).await, ids(1, 60));
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!(
        (plugin.sha256.as_str(), plugin.rollbacks, plugin.state),
        (shipped.as_str(), 1, "running")
    );
    let reason = plugin.last_failure.expect("the rollback is explained");
    assert!(
        reason.starts_with(&format!(
            "rolled back from {} to {shipped}: it trapped in",
            report.sha256
        )),
        "{reason}"
    );
    assert_one_body_per_txn_id(&receiver.requests());
    host.stop().await;
}

/// A host whose plugin is the test build that misbehaves on request, with `sandbox` limits,
/// and its data folder (removed when dropped).
fn misbehaving_host(name: &str, receiver: &Receiver, sandbox: Sandbox) -> (TempDir, TestHost) {
    let dir = temp_dir(name);
    let host = TestHost::start_with(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
        |config| {
            config.plugin_path = Some(Variant::Traps.path());
            config.sandbox = sandbox;
        },
    );
    (dir, host)
}

/// An event that asks the test build to misbehave in `way` (`loop`, `hog` or `trap`).
fn poison(way: &str) -> String {
    format!(
        r#"{{"type":"m.room.message","event_id":"$poison","room_id":"!r:example.org","sender":"@a:example.org","origin_server_ts":1,"content":{{"asched_test_{way}":true}}}}"#
    )
}

/// A plugin call that loops forever is interrupted by the CPU deadline; the caller is told
/// nothing was stored, the instance is rebuilt from the store, and delivery goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_loop_is_interrupted_and_delivery_continues() {
    let receiver = Receiver::healthy().await;
    let sandbox = Sandbox {
        call_deadline: Duration::from_millis(300),
        ..Sandbox::default()
    };
    let (_dir, host) = misbehaving_host("loop", &receiver, sandbox);
    host.enqueue_each("as1", (1..=5).map(event)).await;
    let started = Instant::now();
    let refused = host.host.enqueue("as1", vec![poison("loop")]).await;
    assert!(
        matches!(refused, Err(EnqueueError::PluginFailed(_))),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the loop ran for {:?}",
        started.elapsed()
    );
    host.enqueue_each("as1", (6..=10).map(event)).await;
    assert_eq!(receiver.wait_for_events(10, WAIT).await, ids(1, 10));
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!((plugin.rebuilds, plugin.state), (1, "running"));
    assert_eq!(
        plugin.last_failure.as_deref(),
        Some("ran past its CPU deadline of 300 ms in enqueue and was stopped")
    );
    host.stop().await;
}

/// A plugin call that allocates without bound hits the memory cap, and is contained the same
/// way.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_is_stopped_by_the_cap() {
    let receiver = Receiver::healthy().await;
    let sandbox = Sandbox {
        memory_bytes_max: 32 * 1024 * 1024,
        ..Sandbox::default()
    };
    let (_dir, host) = misbehaving_host("hog", &receiver, sandbox);
    host.enqueue_each("as1", (1..=5).map(event)).await;
    let refused = host.host.enqueue("as1", vec![poison("hog")]).await;
    assert!(
        matches!(refused, Err(EnqueueError::PluginFailed(_))),
        "{refused:?}"
    );
    host.enqueue_each("as1", (6..=10).map(event)).await;
    assert_eq!(receiver.wait_for_events(10, WAIT).await, ids(1, 10));
    assert_eq!(
        host.host
            .plugin_status()
            .await
            .expect("the host runs")
            .rebuilds,
        1
    );
    host.stop().await;
}

/// A burst of large enqueues that wait together is handed to the plugin a few at a time, so a
/// working build does not run out of memory because callers happened to arrive at once: 24
/// batches of about 1 MB, against a memory limit of 32 MiB, are all stored and delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_large_enqueues_fits_the_memory_limit() {
    const BATCHES: usize = 24;
    const PER_BATCH: usize = 2_500;
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("burst");
    let host = TestHost::start_with(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
        |config| {
            config.sandbox = Sandbox {
                memory_bytes_max: 32 * 1024 * 1024,
                ..Sandbox::default()
            };
        },
    );
    let calls: Vec<_> = (0..BATCHES)
        .map(|b| {
            let host = host.host.clone();
            let events: Vec<String> = (b * PER_BATCH + 1..=(b + 1) * PER_BATCH)
                .map(event)
                .collect();
            tokio::spawn(async move { host.enqueue("as1", events).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("the task ends"), Ok(PER_BATCH as u32));
    }
    let mut delivered = receiver.wait_for_events(BATCHES * PER_BATCH, WAIT).await;
    delivered.sort();
    let mut expected = ids(1, BATCHES * PER_BATCH);
    expected.sort();
    assert_eq!(delivered, expected);
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!((plugin.rebuilds, plugin.last_failure), (0, None));
    host.stop().await;
}

/// A round whose enqueues go to the plugin in several calls, the middle one trapping: only that
/// call's caller is refused; the batch before it is stored and answered once its commit is
/// durable, the one after it is stored by the rebuilt instance, and both arrive in order. (A
/// runaway call holds the engine so that the three batches wait together.)
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_in_one_call_of_a_split_round_refuses_only_its_batch() {
    const HALF: usize = 1_500;
    let receiver = Receiver::healthy().await;
    let sandbox = Sandbox {
        call_deadline: Duration::from_millis(300),
        ..Sandbox::default()
    };
    let (_dir, host) = misbehaving_host("split-trap", &receiver, sandbox);
    let enqueue = |events: Vec<String>| {
        let host = host.host.clone();
        tokio::spawn(async move { host.enqueue("as1", events).await })
    };
    let stall = enqueue(vec![poison("loop")]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = enqueue((1..=HALF).map(event).collect());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let trapping = enqueue(vec![poison("trap")]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after = enqueue((HALF + 1..=2 * HALF).map(event).collect());
    assert!(matches!(
        stall.await.expect("the task ends"),
        Err(EnqueueError::PluginFailed(_))
    ));
    assert_eq!(before.await.expect("the task ends"), Ok(HALF as u32));
    assert!(matches!(
        trapping.await.expect("the task ends"),
        Err(EnqueueError::PluginFailed(_))
    ));
    assert_eq!(after.await.expect("the task ends"), Ok(HALF as u32));
    assert_eq!(
        receiver.wait_for_events(2 * HALF, WAIT).await,
        ids(1, 2 * HALF)
    );
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!(plugin.rebuilds, 2);
    host.stop().await;
}

/// A trap in the middle of a call (here on request) is not acknowledged, and the events
/// accepted before and after it arrive once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_loses_nothing_acknowledged() {
    let receiver = Receiver::healthy().await;
    let (_dir, host) = misbehaving_host("trap", &receiver, Sandbox::default());
    host.enqueue_each("as1", (1..=5).map(event)).await;
    let refused = host.host.enqueue("as1", vec![poison("trap")]).await;
    assert!(
        matches!(refused, Err(EnqueueError::PluginFailed(_))),
        "{refused:?}"
    );
    host.enqueue_each("as1", (6..=10).map(event)).await;
    assert_eq!(receiver.wait_for_events(10, WAIT).await, ids(1, 10));
    host.stop().await;
}

/// F19: a build that traps on every call after the Nth pauses delivery without losing events;
/// rebuilds back off (the host does not spin) and show in status; swapping in a good build
/// resumes delivery with every acknowledged event.
#[tokio::test(flavor = "multi_thread")]
async fn f19_a_failing_build_is_held_back_and_a_good_build_resumes() {
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("f19");
    let host = TestHost::start_with(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
        |config| {
            config.plugin_path = Some(Variant::TrapAfterN.path());
        },
    );
    let mut acked = Vec::new();
    let mut n = 0;
    let held_back = loop {
        n += 1;
        if host.host.enqueue("as1", vec![event(n)]).await.is_ok() {
            acked.push(format!("$e{n}"));
        }
        let plugin = host.host.plugin_status().await.expect("the host runs");
        if plugin.state == "held-back" {
            break plugin;
        }
        assert!(n < 1_000, "the failing build was never held back");
    };
    assert!(held_back.consecutive_failures >= 2);
    assert!(held_back.next_rebuild_in_ms.is_some());
    let refused = host.host.enqueue("as1", vec![event(9_999)]).await;
    assert!(
        matches!(&refused, Err(EnqueueError::PluginFailed(why)) if why.contains("held back")),
        "{refused:?}"
    );
    let rebuilds_then = held_back.rebuilds;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = host.host.plugin_status().await.expect("the host runs");
    assert!(
        later.rebuilds - rebuilds_then <= 6,
        "rebuilt {} times in 2 s",
        later.rebuilds - rebuilds_then
    );
    host.host
        .swap(Variant::Shipped.wasm())
        .await
        .expect("the good build starts");
    assert_eq!(receiver.wait_for_events(acked.len(), WAIT).await, acked);
    assert_eq!(
        host.host
            .plugin_status()
            .await
            .expect("the host runs")
            .state,
        "probation"
    );
    host.stop().await;
}

/// One request whose events make the plugin trap, resent again and again by its sender, does
/// not hold the plugin back: other appservices' events keep being stored and delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_request_repeated_does_not_stop_the_others() {
    let receivers = [Receiver::healthy().await, Receiver::healthy().await];
    let dir = temp_dir("poison");
    let regs = vec![
        registration("as1", Some(&receivers[0].url())),
        registration("as2", Some(&receivers[1].url())),
    ];
    let host = TestHost::start_with(&dir, regs, fast_retries(), |config| {
        config.plugin_path = Some(Variant::Traps.path());
    });
    let poisoner = {
        let host = host.host.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                let refused = host.enqueue("as1", vec![poison("trap")]).await;
                assert!(
                    matches!(refused, Err(EnqueueError::PluginFailed(_))),
                    "{refused:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    enqueue_retrying(&host, "as2", (1..=200).map(event)).await;
    poisoner.await.expect("the poisoner finishes");
    assert_eq!(receivers[1].wait_for_events(200, WAIT).await, ids(1, 200));
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!((plugin.state, plugin.consecutive_failures), ("running", 0));
    assert!(plugin.rebuilds >= 40, "{} rebuilds", plugin.rebuilds);
    assert!(
        receivers[0].requests().is_empty(),
        "the poison was never stored"
    );
    host.stop().await;
}
