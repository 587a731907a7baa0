//! The bundled demonstration: the whole delivery path on real parts, in one command.
//!
//! It loads the bundled registrations (`host/demo/registrations/`), starts a local appservice
//! receiver on 127.0.0.1 for all of them (it checks each request's `hs_token`, ignores txn ids
//! it has already processed, and answers 503 once to one appservice so that a retry shows),
//! points the registrations at it, and starts the host with a fresh SQLite store. It then feeds
//! the bundled event stream (`host/demo/events.jsonl`): each event goes to the appservices
//! whose namespaces it matches, one enqueue per event and appservice, as a homeserver would.
//! While it runs it prints progress; at the end, a summary per appservice that compares what was
//! enqueued with what the receiver saw.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use serde_json::Value;

use crate::engine::{HostConfig, default_scheduler_config};
use crate::http::HttpConfig;
use crate::registration::{self, Registration};
use crate::{Host, routing};

/// The bundled registration files.
const REGISTRATIONS: [(&str, &str); 3] = [
    ("irc.yaml", include_str!("../demo/registrations/irc.yaml")),
    (
        "slack.yaml",
        include_str!("../demo/registrations/slack.yaml"),
    ),
    (
        "telegram.yaml",
        include_str!("../demo/registrations/telegram.yaml"),
    ),
];

/// The bundled event stream, one client-format event per line.
const EVENTS: &str = include_str!("../demo/events.jsonl");

/// The homeserver name the bundled events use.
const SERVER_NAME: &str = "example.org";

/// The appservice whose receiver answers 503 to its second transaction, once.
const FLAKY_APPSERVICE: &str = "irc";

/// The longest the demo waits for delivery to finish.
const DEADLINE: Duration = Duration::from_secs(120);

/// What the receiver saw for one appservice.
#[derive(Default, Debug)]
struct Seen {
    txn_ids: Vec<String>,
    event_ids: Vec<String>,
    duplicates: u32,
    refused: u32,
    requests: u32,
}

/// The receiver's state: tokens per appservice and what each saw.
struct Receiver {
    hs_tokens: BTreeMap<String, String>,
    seen: Mutex<BTreeMap<String, Seen>>,
}

/// Parses the bundled registrations.
pub fn bundled_registrations() -> anyhow::Result<Vec<Registration>> {
    REGISTRATIONS
        .iter()
        .map(|(name, text)| registration::parse(text, Path::new(name)))
        .collect()
}

/// Parses the bundled event stream.
pub fn bundled_events() -> anyhow::Result<Vec<Value>> {
    EVENTS
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("events.jsonl line {}: {e}", i + 1))
        })
        .collect()
}

/// Runs the demo with its store in `data_dir`.
pub async fn run(data_dir: &Path, swap_to: Option<&Path>) -> anyhow::Result<()> {
    let started = Instant::now();
    let other_build = match swap_to {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let mut registrations = bundled_registrations()?;
    let (receiver_url, receiver) = start_receiver(&registrations).await?;
    for r in &mut registrations {
        r.url = Some(format!("{receiver_url}/{}", r.id));
    }
    reset_store(data_dir)?;
    let events = bundled_events()?;
    let (plan, unrouted) = route(&events, &registrations);
    println!(
        "asched demo: {} events ({unrouted} in no appservice's namespaces), {} appservices, receiver at {receiver_url}",
        events.len(),
        registrations.len()
    );
    println!("store: {}", data_dir.join("scheduler.sqlite").display());
    let config = HostConfig {
        data_dir: data_dir.to_path_buf(),
        registrations: registrations.clone(),
        plugin_path: None,
        scheduler: default_scheduler_config(),
        http: HttpConfig::default(),
        legacy_query_auth: Vec::new(),
        sandbox: Default::default(),
        probation: crate::engine::DEFAULT_PROBATION,
        store: Default::default(),
    };
    let (host, engine) = Host::start(config)?;
    let feeders = feed(&host, &plan);
    let swapper = other_build.map(|other| tokio::spawn(swap_back_and_forth(host.clone(), other)));
    let delivered = wait_for_delivery(&host, &receiver, &plan).await;
    for feeder in feeders {
        feeder.await??;
    }
    if let Some(swapper) = swapper {
        swapper.abort();
        let plugin = host.plugin_status().await.unwrap_or_default();
        println!(
            "{} plugin swaps during delivery, {} rolled back; running {}",
            plugin.swaps, plugin.rollbacks, plugin.sha256
        );
    }
    let elapsed = started.elapsed();
    let ok = summarize(&receiver, &plan, &host.status().await, elapsed);
    host.shutdown();
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    anyhow::ensure!(
        delivered,
        "delivery did not finish within {} s",
        DEADLINE.as_secs()
    );
    anyhow::ensure!(
        ok,
        "the receiver did not see exactly the enqueued events in order"
    );
    Ok(())
}

/// Swaps to `other` and back to the bundled build every 100 ms, until aborted.
async fn swap_back_and_forth(host: Host, other: Vec<u8>) {
    let builds = [other, crate::engine::EMBEDDED_PLUGIN.to_vec()];
    for build in builds.iter().cycle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match host.swap(build.clone()).await {
            Ok(report) => println!(
                "swapped to {} in {} us",
                &report.sha256[..12],
                report.pause_us
            ),
            Err(why) => println!("swap refused: {why}"),
        }
    }
}

/// Removes the demo's earlier store, so every run starts from nothing.
fn reset_store(data_dir: &Path) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let path: PathBuf = data_dir.join(format!("scheduler.sqlite{suffix}"));
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The events each appservice should get, in stream order, as (event id, JSON text); and how
/// many events no appservice gets.
fn route(
    events: &[Value],
    registrations: &[Registration],
) -> (BTreeMap<String, Vec<(String, String)>>, usize) {
    let mut plan: BTreeMap<String, Vec<(String, String)>> = registrations
        .iter()
        .map(|r| (r.id.clone(), Vec::new()))
        .collect();
    let mut unrouted = 0;
    for event in events {
        let id = event["event_id"].as_str().unwrap_or_default().to_owned();
        let interested = routing::interested(event, registrations, SERVER_NAME);
        if interested.is_empty() {
            unrouted += 1;
        }
        for appservice in interested {
            let queue = plan
                .get_mut(appservice)
                .expect("the plan has every registration");
            queue.push((id.clone(), event.to_string()));
        }
    }
    (plan, unrouted)
}

/// One task per appservice enqueues its events one at a time, in order, like a homeserver
/// that notifies the scheduler as each event is persisted.
fn feed(
    host: &Host,
    plan: &BTreeMap<String, Vec<(String, String)>>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    plan.iter()
        .map(|(appservice, events)| {
            let host = host.clone();
            let appservice = appservice.clone();
            let events: Vec<String> = events.iter().map(|(_, json)| json.clone()).collect();
            tokio::spawn(async move {
                for json in events {
                    host.enqueue(&appservice, vec![json]).await?;
                }
                Ok(())
            })
        })
        .collect()
}

/// Prints progress until every appservice's receiver has every event; false on timeout.
async fn wait_for_delivery(
    host: &Host,
    receiver: &Receiver,
    plan: &BTreeMap<String, Vec<(String, String)>>,
) -> bool {
    let deadline = Instant::now() + DEADLINE;
    let mut last_line = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let statuses = host.status().await;
        let seen = receiver
            .seen
            .lock()
            .expect("the receiver never panics while holding the lock");
        let mut done = true;
        let mut parts = Vec::new();
        for (appservice, events) in plan {
            let got = seen.get(appservice).map_or(0, |s| s.event_ids.len());
            let state = statuses
                .iter()
                .find(|s| &s.appservice == appservice)
                .map_or("?", |s| s.state);
            done &= got >= events.len();
            parts.push(format!("{appservice} {got}/{} ({state})", events.len()));
        }
        drop(seen);
        let line = format!("delivered: {}", parts.join(", "));
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        let drained = statuses.iter().all(|s| s.backlog_events == 0);
        if done && drained {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

/// Prints the summary table; returns whether every appservice saw exactly its events, in order.
fn summarize(
    receiver: &Receiver,
    plan: &BTreeMap<String, Vec<(String, String)>>,
    statuses: &[crate::AppserviceStatus],
    elapsed: Duration,
) -> bool {
    let seen = receiver
        .seen
        .lock()
        .expect("the receiver never panics while holding the lock");
    println!();
    println!(
        "{:<10} {:>8} {:>8} {:>6} {:>8} {:>9}  {:<8} txn ids",
        "appservice", "enqueued", "received", "txns", "retried", "in order", "state"
    );
    let mut all_ok = true;
    for (appservice, events) in plan {
        let empty = Seen::default();
        let s = seen.get(appservice).unwrap_or(&empty);
        let expected: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
        let in_order = s
            .event_ids
            .iter()
            .map(String::as_str)
            .eq(expected.iter().copied());
        let distinct: BTreeSet<&String> = s.txn_ids.iter().collect();
        let ids_ok = distinct.len() == s.txn_ids.len();
        all_ok &= in_order && ids_ok;
        let state = statuses
            .iter()
            .find(|st| &st.appservice == appservice)
            .map_or("?", |st| st.state);
        let ids = match (s.txn_ids.first(), s.txn_ids.last()) {
            (Some(first), Some(last)) => format!("{first} … {last}"),
            _ => "-".into(),
        };
        println!(
            "{appservice:<10} {:>8} {:>8} {:>6} {:>8} {:>9}  {state:<8} {ids}",
            events.len(),
            s.event_ids.len(),
            s.txn_ids.len(),
            s.refused,
            if in_order { "yes" } else { "NO" },
        );
    }
    println!();
    println!(
        "{} requests, {} refused by the receiver and retried, {} duplicate deliveries ignored; {:.2} s in all",
        seen.values().map(|s| s.requests).sum::<u32>(),
        seen.values().map(|s| s.refused).sum::<u32>(),
        seen.values().map(|s| s.duplicates).sum::<u32>(),
        elapsed.as_secs_f64()
    );
    all_ok
}

/// Starts the receiver on 127.0.0.1; returns its base URL and what it records.
async fn start_receiver(registrations: &[Registration]) -> anyhow::Result<(String, Arc<Receiver>)> {
    let receiver = Arc::new(Receiver {
        hs_tokens: registrations
            .iter()
            .map(|r| (r.id.clone(), r.hs_token.clone()))
            .collect(),
        seen: Mutex::default(),
    });
    let app = axum::Router::new()
        .route(
            "/{appservice}/_matrix/app/v1/transactions/{txn_id}",
            put(receive),
        )
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, receiver))
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    UrlPath((appservice, txn_id)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, &'static str) {
    let expected = receiver
        .hs_tokens
        .get(&appservice)
        .map(|t| format!("Bearer {t}"));
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if expected.is_none() || given != expected.as_deref() {
        return (StatusCode::FORBIDDEN, r#"{"errcode":"M_FORBIDDEN"}"#);
    }
    let mut seen = receiver
        .seen
        .lock()
        .expect("the receiver never panics while holding the lock");
    let s = seen.entry(appservice.clone()).or_default();
    s.requests += 1;
    if s.txn_ids.contains(&txn_id) {
        s.duplicates += 1;
        return (StatusCode::OK, "{}");
    }
    if appservice == FLAKY_APPSERVICE && s.txn_ids.len() == 1 && s.refused == 0 {
        s.refused += 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"errcode":"M_UNAVAILABLE"}"#,
        );
    }
    let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, r#"{"errcode":"M_NOT_JSON"}"#);
    };
    let ids = parsed["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["event_id"].as_str());
    s.event_ids.extend(ids.map(str::to_owned));
    s.txn_ids.push(txn_id);
    (StatusCode::OK, "{}")
}
