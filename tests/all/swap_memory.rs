//! Field failures F18 and F20 from the host's side: memory and host-side state stay flat however
//! many times the plugin instance is swapped.
//!
//! - F18: a swap must not leak the instance it replaces (its store, its linear memory), however
//!   many swaps a long-running host goes through.
//! - F20: with many appservices, some DOWN with retry timers, the host's own per-plugin state
//!   (timers, sends in flight) must not grow with the number of swaps.
//!
//! Memory is read from `/proc/self/status`, so each test runs in a process of its own (the test
//! binary runs itself with just that test): other tests running in parallel in the same process
//! would move the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asched_host::AppserviceStatus;
use asched_tests::variants::Variant;
use asched_tests::{
    Receiver, Reply, Request, TestHost, assert_one_body_per_txn_id, event, fast_retries, ids,
    registration, temp_dir,
};

const WAIT: Duration = Duration::from_secs(30);

/// The environment variable that tells the test binary it runs one of these tests on its own.
const ISOLATED: &str = "ASCHED_SWAP_MEMORY_ISOLATED";

/// The longest a test may run in its own process; it is killed after that.
const OWN_PROCESS_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a feeder waits between two enqueues. Events arrive continuously (in F18 about one
/// for every two swaps, so sends are often in flight at a cut-over), while what the test's own
/// receivers keep of them (about 0.5 KiB per event) stays a few MiB over a whole test.
const FEED_INTERVAL: Duration = Duration::from_millis(2);

/// RSS may grow this much from the reading after swap 100 to any later one. Measured: under
/// +1 MiB over 10,000 swaps while some 5,000 events are delivered (and recorded by the test's
/// receivers). A leaked instance keeps its store and the pages of linear memory the plugin
/// touched: leaking one store per swap on purpose measured +0.9 MiB of RSS per swap, so one leak
/// per swap would add some 8.5 GiB by swap 10,000 and passes this bound within 40 swaps; any
/// leak of more than 3.3 KiB per swap (32 MiB / 9,900 swaps) fails F18.
const RSS_GROWTH_MAX_KIB: u64 = 32 * 1024;

/// VmSize may grow this much from the reading after swap 100 to any later one. Measured: +2 to
/// +5 MiB (thread stacks). Every live instance reserves 4 GiB + 32 MiB of address space for its
/// linear memory (wasmtime's default on 64-bit; leaking one store per swap on purpose measured
/// +4.16 GiB per swap), so a single leaked instance fails this.
const VM_GROWTH_MAX_KIB: u64 = 256 * 1024;

/// Runs the test `name` of this module in a process of its own and returns false, or returns
/// true when called in that process (the caller then runs the test's body).
///
/// That process runs with glibc's malloc limited to one arena: otherwise a thread that starts
/// allocating may get a heap of its own, reserving 64 MiB of address space each time (measured:
/// VmSize +66 to +340 MiB in 10,000 swaps, as tokio's blocking threads come and go), which would
/// blur the VmSize figures without telling anything about the host.
async fn in_own_process(name: &str) -> bool {
    if std::env::var(ISOLATED).as_deref() == Ok(name) {
        return true;
    }
    // stdout is read for the test result; stderr (the figures, a panic) goes straight through.
    let child =
        tokio::process::Command::new(std::env::current_exe().expect("the test binary is known"))
            .arg(format!("swap_memory::{name}"))
            .args(["--exact", "--nocapture", "--test-threads=1"])
            .env(ISOLATED, name)
            .env("MALLOC_ARENA_MAX", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the test binary can run itself");
    let output = tokio::time::timeout(OWN_PROCESS_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!("swap_memory::{name} did not end within {OWN_PROCESS_TIMEOUT:?}")
        })
        .expect("the test binary's own run ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "swap_memory::{name} failed in its own process ({}); its output:\n{stdout}",
        output.status
    );
    false
}

/// The process's resident and virtual size.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss_kib: u64,
    size_kib: u64,
}

impl Memory {
    /// `VmRSS` and `VmSize` from `/proc/self/status`.
    fn now() -> Memory {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs is mounted");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().strip_suffix(" kB"))
                .and_then(|kib| kib.trim().parse().ok())
                .unwrap_or_else(|| panic!("/proc/self/status has no {name}: {status}"))
        };
        Memory {
            rss_kib: field("VmRSS:"),
            size_kib: field("VmSize:"),
        }
    }

    /// Panics unless `late` is within the bounds of `self`.
    fn assert_flat(self, late: Memory, what: &str) {
        eprintln!(
            "{what}: RSS {} -> {} MiB ({:+} KiB), VmSize {} -> {} MiB ({:+} KiB)",
            self.rss_kib / 1024,
            late.rss_kib / 1024,
            late.rss_kib as i64 - self.rss_kib as i64,
            self.size_kib / 1024,
            late.size_kib / 1024,
            late.size_kib as i64 - self.size_kib as i64,
        );
        assert!(
            late.rss_kib <= self.rss_kib + RSS_GROWTH_MAX_KIB,
            "{what}: RSS grew from {} to {} KiB",
            self.rss_kib,
            late.rss_kib
        );
        assert!(
            late.size_kib <= self.size_kib + VM_GROWTH_MAX_KIB,
            "{what}: VmSize grew from {} to {} KiB",
            self.size_kib,
            late.size_kib
        );
    }
}

/// Polls the status until `done` holds for every appservice; panics after [`WAIT`] with the
/// ones it does not hold for.
async fn wait_for_all(host: &TestHost, what: &str, done: impl Fn(&AppserviceStatus) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = host.host.status().await;
        let left: Vec<_> = all.iter().filter(|s| !done(s)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until every appservice is {what}: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the appservice is UP with nothing left to send.
fn idle(s: &AppserviceStatus) -> bool {
    s.state == "up" && s.backlog_events == 0 && !s.in_flight
}

/// The median and 99th percentile of `values`.
fn p50_p99(mut values: Vec<u64>) -> (u64, u64) {
    values.sort_unstable();
    (values[values.len() / 2], values[values.len() * 99 / 100])
}

/// Enqueues `event(already + 1)`, `event(already + 2)`, … for `appservices` in turn, one every
/// [`FEED_INTERVAL`], until `stop`; returns how many events each has in all.
fn feed(
    host: &TestHost,
    appservices: Vec<String>,
    already: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<String, usize>> {
    let host = host.host.clone();
    tokio::spawn(async move {
        let mut counts: BTreeMap<String, usize> =
            appservices.iter().map(|id| (id.clone(), already)).collect();
        for id in appservices.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let n = counts.get_mut(id).expect("every appservice is counted");
            *n += 1;
            let stored = host.enqueue(id, vec![event(*n)]).await;
            assert_eq!(
                stored,
                Ok(1),
                "the enqueue of event {n} for {id} during swaps"
            );
            tokio::time::sleep(FEED_INTERVAL).await;
        }
        counts
    })
}

/// F18: 10,000 swaps between the shipped build and the test-traps build (identical unless an
/// event asks it to trap) while two appservices receive a steady flow of events. Memory after
/// swap 10,000 is what it was after swap 100, so no swap leaks the instance it replaced; every
/// event arrives once and in order, each txn id with one body, one request at a time.
#[tokio::test(flavor = "multi_thread")]
async fn f18_ten_thousand_swaps_under_delivery_leave_memory_flat() {
    const SWAPS: usize = 10_000;
    if !in_own_process("f18_ten_thousand_swaps_under_delivery_leave_memory_flat").await {
        return;
    }
    let receivers = [Receiver::healthy().await, Receiver::healthy().await];
    let dir = temp_dir("f18");
    let regs = vec![
        registration("as1", Some(&receivers[0].url())),
        registration("as2", Some(&receivers[1].url())),
    ];
    let host = TestHost::start(&dir, regs, fast_retries());
    let builds = [Variant::Shipped.wasm(), Variant::Traps.wasm()];
    let shipped = host
        .host
        .plugin_status()
        .await
        .expect("the host runs")
        .sha256;
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(&host, vec!["as1".into(), "as2".into()], 0, stop.clone());

    let started = Instant::now();
    let mut pauses = Vec::with_capacity(SWAPS);
    let mut previous = shipped.clone();
    let mut early = None;
    for i in 1..=SWAPS {
        let report = host
            .host
            .swap(builds[i % 2].clone())
            .await
            .expect("both builds are accepted");
        assert_eq!(report.previous_sha256, previous, "swap {i}");
        assert_eq!(
            report.sha256 == shipped,
            i % 2 == 0,
            "swap {i} runs the build it was given"
        );
        previous = report.sha256;
        pauses.push(report.pause_us);
        if i == 100 {
            early = Some(Memory::now());
        }
        if i % 1000 == 0 {
            let early = early.expect("swap 100 comes first");
            early.assert_flat(
                Memory::now(),
                &format!("F18 after swap 100 -> after swap {i}"),
            );
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let counts = feeder.await.expect("the feeder finishes");

    let (p50, p99) = p50_p99(pauses);
    eprintln!(
        "F18: {SWAPS} swaps in {elapsed:.1?} ({:.0} swaps/s) while delivering {} events; pause p50 {p50} us, p99 {p99} us",
        SWAPS as f64 / elapsed.as_secs_f64(),
        counts.values().sum::<usize>()
    );
    for (receiver, id) in receivers.iter().zip(["as1", "as2"]) {
        let n = counts[id];
        assert!(n > SWAPS / 100, "{id} got only {n} events during the swaps");
        assert_eq!(receiver.wait_for_events(n, WAIT).await, ids(1, n), "{id}");
        assert_one_body_per_txn_id(&receiver.requests());
        assert_eq!(receiver.max_concurrent(), 1, "{id}");
    }
    wait_for_all(&host, "up and idle", idle).await;
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!(plugin.sha256, shipped);
    assert_eq!(
        (
            plugin.swaps,
            plugin.rollbacks,
            plugin.rebuilds,
            plugin.consecutive_failures
        ),
        (SWAPS as u64, 0, 0, 0)
    );
    assert_eq!((plugin.timers_pending, plugin.sends_in_flight), (0, 0));
    host.stop().await;
}

/// The appservices of F20: `as000` … `as099`, every fourth one (`as000`, `as004`, …) DOWN.
const APPSERVICES: usize = 100;

fn appservice(i: usize) -> String {
    format!("as{i:03}")
}

fn is_down(id: &str) -> bool {
    id[2..].parse::<usize>().expect("ids are as000 … as099") % 4 == 0
}

/// The appservice a request was for: the first segment of its path (`/as017/_matrix/…`).
fn addressee(request: &Request) -> String {
    request
        .path
        .split('/')
        .nth(1)
        .expect("the path starts with the appservice")
        .to_owned()
}

/// F20: 1,000 swaps with 100 appservices, 25 of them DOWN (answering 500) with retry timers and
/// the rest receiving events. Each swap cancels the old instance's timers and the new one sets
/// its own, so the host never keeps more than one timer and one send per appservice, and memory
/// after swap 1,000 is what it was after swap 100. When the DOWN ones come back, the last
/// instance's timers retry them and everything arrives once and in order; then no timer and no
/// send is left.
#[tokio::test(flavor = "multi_thread")]
async fn f20_thousand_swaps_with_down_appservices_keep_host_state_bounded() {
    const SWAPS: usize = 1_000;
    if !in_own_process("f20_thousand_swaps_with_down_appservices_keep_host_state_bounded").await {
        return;
    }
    let outage = Arc::new(AtomicBool::new(true));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let receiver = {
        let (outage, statuses) = (outage.clone(), statuses.clone());
        Receiver::start(move |requests| {
            let request = requests.last().expect("the current request is last");
            let status = if outage.load(Ordering::Relaxed) && is_down(&addressee(request)) {
                500
            } else {
                200
            };
            statuses.lock().expect("statuses lock").push(status);
            Reply::status(status)
        })
        .await
    };
    let ids_all: Vec<String> = (0..APPSERVICES).map(appservice).collect();
    let regs = ids_all
        .iter()
        .map(|id| registration(id, Some(&format!("{}/{id}", receiver.url()))))
        .collect();
    let dir = temp_dir("f20");
    let host = TestHost::start(&dir, regs, fast_retries());
    for id in &ids_all {
        host.enqueue_each(id, [event(1)]).await;
    }
    // Until one round of the engine finds every DOWN appservice waiting for its retry (not
    // sending it) and every other one done: then the host holds exactly one timer per DOWN one.
    let deadline = Instant::now() + WAIT;
    loop {
        let (all, plugin) = host.host.full_status().await.expect("the host runs");
        let settled = |s: &AppserviceStatus| {
            if is_down(&s.appservice) {
                s.state == "down" && s.next_retry_in_ms.is_some() && !s.in_flight
            } else {
                s.delivered_events == 1 && !s.in_flight
            }
        };
        if all.iter().all(settled) {
            assert_eq!(
                (plugin.timers_pending, plugin.sends_in_flight),
                (APPSERVICES / 4, 0),
                "one retry timer per DOWN appservice"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the DOWN appservices never all waited for a retry at once: {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let builds = [Variant::Shipped.wasm(), Variant::Traps.wasm()];
    let stop = Arc::new(AtomicBool::new(false));
    // Event 1 is already enqueued for every appservice: the feeder goes on from event 2.
    let feeder = feed(&host, ids_all.clone(), 1, stop.clone());
    let started = Instant::now();
    let mut pauses = Vec::with_capacity(SWAPS);
    let (mut timers_max, mut sends_max) = (0, 0);
    let mut early = None;
    for i in 1..=SWAPS {
        let report = host
            .host
            .swap(builds[i % 2].clone())
            .await
            .expect("both builds are accepted");
        pauses.push(report.pause_us);
        let plugin = host.host.plugin_status().await.expect("the host runs");
        assert!(
            plugin.timers_pending <= APPSERVICES && plugin.sends_in_flight <= APPSERVICES,
            "after swap {i} the host keeps {} timers and {} sends for {APPSERVICES} appservices",
            plugin.timers_pending,
            plugin.sends_in_flight
        );
        timers_max = timers_max.max(plugin.timers_pending);
        sends_max = sends_max.max(plugin.sends_in_flight);
        if i == 100 {
            early = Some(Memory::now());
        }
        if i > 100 && i % 100 == 0 {
            let early = early.expect("swap 100 comes first");
            early.assert_flat(
                Memory::now(),
                &format!("F20 after swap 100 -> after swap {i}"),
            );
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let counts = feeder.await.expect("the feeder finishes");
    let (p50, p99) = p50_p99(pauses);
    eprintln!(
        "F20: {SWAPS} swaps with {APPSERVICES} appservices in {elapsed:.1?} ({:.0} swaps/s), {} events enqueued; at most {timers_max} timers and {sends_max} sends pending; pause p50 {p50} us, p99 {p99} us",
        SWAPS as f64 / elapsed.as_secs_f64(),
        counts.values().sum::<usize>()
    );

    let requests = receiver.requests();
    for id in ids_all.iter().filter(|id| is_down(id)) {
        let mine: Vec<&Request> = requests.iter().filter(|r| addressee(r) == *id).collect();
        assert!(
            mine.len() >= 2,
            "{id} was retried while DOWN: {} requests",
            mine.len()
        );
        let txns: BTreeSet<&str> = mine.iter().map(|r| r.txn_id.as_str()).collect();
        assert_eq!(
            txns.len(),
            1,
            "{id} retried one stuck txn during the outage"
        );
        assert_eq!(mine[0].event_ids, ids(1, 1), "{id}");
    }
    outage.store(false, Ordering::Relaxed);
    wait_for_all(&host, "up and idle", idle).await;

    let requests = receiver.requests();
    let statuses = statuses.lock().expect("statuses lock").clone();
    assert_eq!(requests.len(), statuses.len());
    assert_one_body_per_txn_id(&requests);
    let mut seen = BTreeSet::new();
    let mut delivered: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (request, status) in requests.iter().zip(&statuses) {
        if *status == 200 && seen.insert(request.txn_id.clone()) {
            delivered
                .entry(addressee(request))
                .or_default()
                .extend(request.event_ids.iter().cloned());
        }
    }
    for id in &ids_all {
        assert_eq!(delivered.get(id), Some(&ids(1, counts[id])), "{id}");
    }
    let plugin = host.host.plugin_status().await.expect("the host runs");
    assert_eq!(
        (
            plugin.swaps,
            plugin.rollbacks,
            plugin.rebuilds,
            plugin.consecutive_failures
        ),
        (SWAPS as u64, 0, 0, 0)
    );
    assert_eq!((plugin.timers_pending, plugin.sends_in_flight), (0, 0));
    host.stop().await;
}
