//! The pause a hot swap causes under a steady load of 1,000 events/s over 10 appservices, over
//! 200 swaps between two builds: the cut-over time measured inside the engine (no enqueue is
//! answered and no send starts meanwhile) and the enqueue latency seen by callers, with and
//! without a swap in progress.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asched_tests::variants::Variant;
use asched_tests::{Receiver, TestHost, event, fast_retries, registration, temp_dir};

/// Appservices under load.
const APPSERVICES: usize = 10;

/// Swaps measured.
const SWAPS: usize = 200;

/// Time between two swaps.
const SWAP_INTERVAL: Duration = Duration::from_millis(25);

/// Time between two enqueues: 1,000 events/s.
const ENQUEUE_INTERVAL: Duration = Duration::from_millis(1);

/// The value at quantile `q` of sorted `values`.
fn quantile(values: &[u64], q: f64) -> u64 {
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index]
}

/// Enqueue latencies, each marked with whether a swap was in progress when it was issued.
type Latencies = Arc<Mutex<Vec<(u64, bool)>>>;

pub async fn swap_pause() {
    let mut receivers = Vec::new();
    let mut registrations = Vec::new();
    for i in 0..APPSERVICES {
        let receiver = Receiver::healthy().await;
        registrations.push(registration(&format!("as{i}"), Some(&receiver.url())));
        receivers.push(receiver);
    }
    let dir = temp_dir("bench-swap");
    let host = TestHost::start(&dir, registrations, fast_retries());
    let builds = [Variant::Traps.wasm(), Variant::Shipped.wasm()];
    let swapping = Arc::new(Mutex::new(false));
    let latencies: Latencies = Arc::default();
    let load = tokio::spawn(steady_load(
        host.host.clone(),
        swapping.clone(),
        latencies.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut pauses = Vec::with_capacity(SWAPS);
    for i in 0..SWAPS {
        *swapping.lock().expect("no panics while locked") = true;
        let report = host
            .host
            .swap(builds[i % 2].clone())
            .await
            .expect("both builds are accepted");
        *swapping.lock().expect("no panics while locked") = false;
        pauses.push(report.pause_us);
        tokio::time::sleep(SWAP_INTERVAL).await;
    }
    load.abort();
    pauses.sort_unstable();
    let latencies = latencies.lock().expect("no panics while locked").clone();
    let mut during: Vec<u64> = latencies
        .iter()
        .filter(|(_, s)| *s)
        .map(|(l, _)| *l)
        .collect();
    let mut outside: Vec<u64> = latencies
        .iter()
        .filter(|(_, s)| !*s)
        .map(|(l, _)| *l)
        .collect();
    during.sort_unstable();
    outside.sort_unstable();
    println!(
        "hot swap under {} events/s over {APPSERVICES} appservices, {SWAPS} swaps",
        1_000 / ENQUEUE_INTERVAL.as_millis()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>7}",
        "figure (microseconds)", "p50", "p99", "max", "count"
    );
    let row = |name: &str, values: &[u64]| {
        if values.is_empty() {
            println!("{name:<44} {:>9}", "no samples");
        } else {
            let (p50, p99, max) = (
                quantile(values, 0.5),
                quantile(values, 0.99),
                values[values.len() - 1],
            );
            println!("{name:<44} {p50:>9} {p99:>9} {max:>9} {:>7}", values.len());
        }
    };
    row("swap pause (engine cut-over)", &pauses);
    row("enqueue latency, issued during a swap", &during);
    row("enqueue latency, no swap in progress", &outside);
    let target = 5_000;
    let verdict = if quantile(&pauses, 0.99) < target {
        "met"
    } else {
        "NOT met"
    };
    println!("target: swap pause p99 under {target} us: {verdict}");
    host.stop().await;
}

/// Enqueues one event every millisecond, round robin over the appservices, recording each
/// enqueue's latency.
async fn steady_load(host: asched_host::Host, swapping: Arc<Mutex<bool>>, latencies: Latencies) {
    let mut ticker = tokio::time::interval(ENQUEUE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0.. {
        ticker.tick().await;
        let host = host.clone();
        let swapping = swapping.clone();
        let latencies = latencies.clone();
        tokio::spawn(async move {
            let during = *swapping.lock().expect("no panics while locked");
            let started = Instant::now();
            let appservice = format!("as{}", n % APPSERVICES);
            if host.enqueue(&appservice, vec![event(n)]).await.is_ok() {
                let micros = started.elapsed().as_micros() as u64;
                latencies
                    .lock()
                    .expect("no panics while locked")
                    .push((micros, during));
            }
        });
    }
}
