//! The scheduler as a homeserver runs it: the reference host (engine thread, wasmtime, SQLite,
//! reqwest) in this process, the receiver in its own. The driver is the homeserver: it calls
//! [`Host::enqueue`] with batches of events as a homeserver does after persisting them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use asched_host::engine::StoreKind;
use asched_host::http::HttpConfig;
use asched_host::registration::Registration;
use asched_host::{Host, HostConfig, default_scheduler_config};

use crate::control::Receiver;
use crate::{event, now_ns, process_cpu_ns};

/// How long a run may take before it is called failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Homeserver tasks enqueueing at once.
const PRODUCERS: usize = 4;

/// A host started for one run, with its own data folder.
pub struct Bench {
    pub host: Host,
    engine: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Bench {
    /// Starts a host for appservices `as0 .. as{registered}`, the first `active` of them on
    /// the receiver's ports (the others on a port nobody listens on: they never get events).
    pub fn start(
        work: &Path,
        receiver: &Receiver,
        registered: usize,
        active: usize,
        store: StoreKind,
    ) -> Bench {
        let dir = work.join(format!("host-{}", asched_host::runtime::random_u64()));
        std::fs::create_dir_all(&dir).expect("the bench folder is writable");
        copy_plugin_cache(work, &dir);
        let registrations: Vec<Registration> = (0..registered)
            .map(|i| {
                let url = if i < active {
                    receiver.url(i)
                } else {
                    "http://127.0.0.1:9".to_owned()
                };
                asched_tests::registration(&appservice(i), Some(&url))
            })
            .collect();
        let config = HostConfig {
            data_dir: dir.clone(),
            registrations,
            plugin_path: None,
            scheduler: default_scheduler_config(),
            http: HttpConfig::default(),
            legacy_query_auth: Vec::new(),
            sandbox: Default::default(),
            probation: asched_host::engine::DEFAULT_PROBATION,
            store,
        };
        let (host, engine) = Host::start(config).expect("the host starts");
        keep_plugin_cache(&dir, work);
        Bench {
            host,
            engine: Some(engine),
            dir,
        }
    }

    /// Stops the host and removes its data folder.
    pub fn stop(mut self) {
        self.host.shutdown();
        if let Some(engine) = self.engine.take() {
            let _ = engine.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Compiling the plugin takes a second; every run after the first maps the compiled copy.
fn copy_plugin_cache(work: &Path, dir: &Path) {
    let cache = work.join("plugin-cache");
    if let Ok(entries) = std::fs::read_dir(&cache) {
        let target = dir.join("plugin-cache");
        let _ = std::fs::create_dir_all(&target);
        for entry in entries.flatten() {
            let _ = std::fs::copy(entry.path(), target.join(entry.file_name()));
        }
    }
}

fn keep_plugin_cache(dir: &Path, work: &Path) {
    let cache = work.join("plugin-cache");
    if cache.exists() {
        return;
    }
    let _ = std::fs::create_dir_all(&cache);
    if let Ok(entries) = std::fs::read_dir(dir.join("plugin-cache")) {
        for entry in entries.flatten() {
            let _ = std::fs::copy(entry.path(), cache.join(entry.file_name()));
        }
    }
}

/// The id of appservice `i`.
pub fn appservice(i: usize) -> String {
    format!("as{i:05}")
}

/// One throughput run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Throughput {
    pub events_per_s: f64,
    pub cpu_us_per_event: f64,
    pub txns: u64,
}

/// Enqueues `events` in calls of `batch` events, call `c` for appservice `c % appservices`,
/// from [`PRODUCERS`] tasks at once, each call waiting for its answer; returns when all are
/// answered.
async fn enqueue_all(host: &Host, events: Arc<Vec<String>>, batch: usize, appservices: usize) {
    let calls = events.len().div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let (host, events, next) = (host.clone(), events.clone(), next.clone());
        producers.push(tokio::spawn(async move {
            loop {
                let call = next.fetch_add(1, Ordering::Relaxed);
                if call >= calls {
                    return;
                }
                let chunk = &events[call * batch..((call + 1) * batch).min(events.len())];
                host.enqueue(&appservice(call % appservices), chunk.to_vec())
                    .await
                    .expect("the enqueue is accepted");
            }
        }));
    }
    for producer in producers {
        producer.await.expect("the producer finishes");
    }
}

/// [`enqueue_all`] with the throughput workload's spread over `appservices`, then waits
/// until the receiver has every event. Time runs
/// from the first enqueue to the arrival of the last event; CPU is this process's (driver and
/// host), not the receiver's.
pub async fn throughput(
    host: &Host,
    receiver: &Receiver,
    events: Arc<Vec<String>>,
    appservices: usize,
    batch: usize,
) -> Throughput {
    receiver.reset(false);
    let cpu_started = process_cpu_ns();
    let started = now_ns();
    let total = events.len() as u64;
    enqueue_all(host, events, batch, appservices).await;
    arrivals(receiver, total, started, cpu_started)
}

/// Waits until the receiver has `total` events, checks that each arrived once and with the
/// hs_token, and rates them from `started` (wall clock, ns) to the last arrival; CPU from
/// `cpu_started` to now.
fn arrivals(receiver: &Receiver, total: u64, started: u64, cpu_started: u64) -> Throughput {
    let arrived = tokio::task::block_in_place(|| receiver.wait_for(total, RUN_TIMEOUT));
    let cpu = process_cpu_ns() - cpu_started;
    assert!(arrived, "every event arrives within {RUN_TIMEOUT:?}");
    let last = receiver
        .dump()
        .iter()
        .map(|a| a.ns)
        .max()
        .unwrap_or(started);
    let stats = receiver.stats();
    assert_eq!(stats.events, total, "each event arrives once");
    assert_eq!(stats.no_auth, 0, "every request carries the hs_token");
    Throughput {
        events_per_s: total as f64 / ((last - started) as f64 / 1e9),
        cpu_us_per_event: cpu as f64 / 1e3 / total as f64,
        txns: stats.txns,
    }
}

/// Enqueue → arrival latency percentiles, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One event every `1 / rate` s for `duration`, round-robin over `appservices`, each stamped
/// just before its enqueue; the receiver stamps each when its transaction's last byte arrives.
pub async fn latency(
    host: &Host,
    receiver: &Receiver,
    rate: u32,
    duration: Duration,
    appservices: usize,
) -> Latency {
    receiver.reset(true);
    let total = (f64::from(rate) * duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let started = tokio::time::Instant::now();
    let mut sent_ns = std::collections::HashMap::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(started + period * i as u32).await;
        let e = event(i, "lat");
        sent_ns.insert(crate::event_id(i, "lat"), now_ns());
        host.enqueue(&appservice(i % appservices), vec![e])
            .await
            .expect("the enqueue is accepted");
    }
    let arrived = tokio::task::block_in_place(|| receiver.wait_for(total as u64, RUN_TIMEOUT));
    assert!(arrived, "every event arrives");
    let mut latencies: Vec<f64> = Vec::with_capacity(total);
    for arrival in receiver.dump() {
        for id in arrival.ids {
            if let Some(sent) = sent_ns.get(&id) {
                latencies.push((arrival.ns.saturating_sub(*sent)) as f64 / 1e6);
            }
        }
    }
    assert_eq!(latencies.len(), total, "every event's arrival is logged");
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Latency {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// A backlog run: memory while the appservice is down, then the drain after it recovers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    /// The plugin's linear memory before the backlog was enqueued.
    pub memory_before: usize,
    /// The plugin's linear memory with the whole backlog stored.
    pub memory_with_backlog: usize,
    /// How fast the backlog drained once the appservice answered again.
    pub drain: Throughput,
}

/// Builds a backlog of `events.len()` events for appservice 0 while its receiver answers 503,
/// then lets it recover and times the drain (from the forced retry to the last arrival).
pub async fn backlog(host: &Host, receiver: &Receiver, events: Arc<Vec<String>>) -> Backlog {
    receiver.reset(false);
    receiver.fail_with(503);
    let memory_before = host
        .plugin_status()
        .await
        .map_or(0, |status| status.memory_bytes);
    let total = events.len() as u64;
    enqueue_all(host, events, 1000, 1).await;
    let memory_with_backlog = host
        .plugin_status()
        .await
        .map_or(0, |status| status.memory_bytes);
    // Wait for the failed attempt to be answered, so the retry below is the one that counts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let status = host.status().await;
        if status[0].failed_attempts > 0 && !status[0].in_flight {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    receiver.reset(false);
    let cpu_started = process_cpu_ns();
    let started = now_ns();
    host.force_retry(&appservice(0))
        .await
        .expect("the retry is accepted");
    Backlog {
        memory_before,
        memory_with_backlog,
        drain: arrivals(receiver, total, started, cpu_started),
    }
}

/// The sidecar's enqueue rate: `events` POSTed to the HTTP API in bodies of `batch` events
/// from [`PRODUCERS`] connections, until every request is answered (each answer means its
/// events are durable). Returns (accepted events/s, end-to-end events/s).
pub async fn sidecar(
    host: &Host,
    receiver: &Receiver,
    events: Arc<Vec<String>>,
    batch: usize,
) -> (f64, f64) {
    receiver.reset(false);
    let router = asched_host::sidecar::router(host.clone(), "bench-secret", 64 << 20);
    let listen = asched_host::sidecar::Listen::Tcp("127.0.0.1:0".parse().expect("an address"));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        asched_host::sidecar::serve(
            router,
            &listen,
            |addr| {
                let _ = ready_tx.send(addr);
            },
            async move {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    let addr = ready_rx.await.expect("the sidecar listens");
    let bodies: Arc<Vec<String>> = Arc::new(
        events
            .chunks(batch)
            .map(|chunk| format!("{{\"events\":[{}]}}", chunk.join(",")))
            .collect(),
    );
    let client = asched_tests::api_client_builder()
        .pool_max_idle_per_host(PRODUCERS)
        .build()
        .expect("a client");
    let url = format!(
        "http://{addr}/_asched/v1/appservices/{}/events",
        appservice(0)
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = now_ns();
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let (client, bodies, next, url) =
            (client.clone(), bodies.clone(), next.clone(), url.clone());
        producers.push(tokio::spawn(async move {
            loop {
                let call = next.fetch_add(1, Ordering::Relaxed);
                if call >= bodies.len() {
                    return;
                }
                let response = client
                    .post(&url)
                    .bearer_auth("bench-secret")
                    .header("content-type", "application/json")
                    .body(bodies[call].clone())
                    .send()
                    .await
                    .expect("the sidecar answers");
                assert_eq!(response.status(), 200, "the sidecar accepts the batch");
                let _ = response.bytes().await;
            }
        }));
    }
    for producer in producers {
        producer.await.expect("the producer finishes");
    }
    let accepted = now_ns();
    let total = events.len() as u64;
    let delivered = arrivals(receiver, total, started, process_cpu_ns());
    let _ = stop_tx.send(());
    let _ = server.await;
    (
        total as f64 / ((accepted - started) as f64 / 1e9),
        delivered.events_per_s,
    )
}
