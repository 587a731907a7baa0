//! Delivery to appservice libraries nobody here wrote: the Python `mautrix` package's
//! `AppService` and the npm `matrix-appservice` package's `AppService`, each running on
//! 127.0.0.1 (see `tests/receivers/`). Each must receive every bundled event meant for it,
//! exactly once and in stream order.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use asched_host::registration::Registration;
use asched_host::{demo, routing};
use asched_tests::variants::Variant;
use asched_tests::{TestHost, fast_retries, temp_dir};

/// Where the receivers and their installed packages live.
fn receivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("receivers")
}

/// A receiver process and the file it writes one JSON line per event to.
struct ReceiverProcess {
    child: Child,
    port: u16,
    output: PathBuf,
}

impl ReceiverProcess {
    /// Starts `program script PORT OUTPUT --hs-token … --as-token … --id …` and waits for its
    /// `ready <port>` line.
    fn start(
        program: &Path,
        script: &str,
        registration: &Registration,
        output: PathBuf,
    ) -> ReceiverProcess {
        assert!(
            program.exists() || program.components().count() == 1,
            "{} is missing: run ./scripts/test, which installs the receivers' packages",
            program.display()
        );
        let mut child = Command::new(program)
            .current_dir(receivers_dir())
            .arg(script)
            .arg("0")
            .arg(&output)
            .args([
                "--hs-token",
                &registration.hs_token,
                "--as-token",
                &registration.as_token,
                "--id",
                &registration.id,
            ])
            .args([
                "--bot-localpart",
                &registration.sender_localpart,
                "--domain",
                "example.org",
            ])
            .env("RECEIVER_LOG_LEVEL", "WARNING")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} {script}: {e}; run ./scripts/test first",
                    program.display()
                )
            });
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("the receiver prints `ready <port>`")
                .expect("stdout is readable");
            if let Some(port) = line.strip_prefix("ready ") {
                break port.trim().parse().expect("the port is a number");
            }
        };
        ReceiverProcess {
            child,
            port,
            output,
        }
    }

    /// The (txn id, event id) pairs the receiver has handed to its application so far.
    fn received(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|v| {
                Some((
                    v["txn_id"].as_str()?.to_owned(),
                    v["event_id"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Delivers the bundled stream to `appservice` through a real receiver and checks that it
/// received exactly the events routed to it, in order, under txn ids it never saw twice.
async fn delivers_bundled_stream_to(appservice: &str, program: &Path, script: &str, swaps: bool) {
    let dir = temp_dir(&format!("third-party-{appservice}"));
    let mut registration = demo::bundled_registrations()
        .expect("the bundled registrations parse")
        .into_iter()
        .find(|r| r.id == appservice)
        .expect("the bundled registration exists");
    let receiver =
        ReceiverProcess::start(program, script, &registration, dir.join("received.jsonl"));
    registration.url = Some(format!("http://127.0.0.1:{}", receiver.port));
    let events = demo::bundled_events().expect("the bundled events parse");
    let registrations = [registration.clone()];
    let mine: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| !routing::interested(e, &registrations, "example.org").is_empty())
        .collect();
    assert!(
        mine.len() >= 150,
        "the bundled stream has {} events for {appservice}",
        mine.len()
    );
    let host = TestHost::start(&dir, vec![registration], fast_retries());
    let swapper = swaps.then(|| tokio::spawn(swap_back_and_forth(host.host.clone())));
    host.enqueue_each(appservice, mine.iter().map(|e| e.to_string()))
        .await;

    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.received().len() < mine.len() {
        assert!(
            Instant::now() < deadline,
            "{appservice}: got {} of {} events",
            receiver.received().len(),
            mine.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(swapper) = swapper {
        let swapped = swapper.await.expect("the swapper finishes");
        assert!(
            swapped >= 10,
            "only {swapped} swaps happened during delivery"
        );
    }
    host.stop().await;
    let received = receiver.received();
    let got: Vec<&str> = received.iter().map(|(_, id)| id.as_str()).collect();
    let expected: Vec<&str> = mine
        .iter()
        .map(|e| e["event_id"].as_str().expect("events have ids"))
        .collect();
    assert_eq!(
        got, expected,
        "{appservice} received the events out of order or with gaps"
    );
    let mut txn_ids: Vec<&str> = received.iter().map(|(txn, _)| txn.as_str()).collect();
    txn_ids.dedup();
    let distinct: std::collections::BTreeSet<&str> = txn_ids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        txn_ids.len(),
        "a txn id was handed to {appservice} twice"
    );
}

/// Swaps between the shipped build and another build (the test build, which behaves the same
/// unless asked to trap) every 20 ms, 20 times; returns how many swaps took place.
async fn swap_back_and_forth(host: asched_host::Host) -> usize {
    let builds = [Variant::Traps.wasm(), Variant::Shipped.wasm()];
    let mut swapped = 0;
    for build in builds.iter().cycle().take(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        host.swap(build.clone())
            .await
            .expect("both builds are accepted");
        swapped += 1;
    }
    swapped
}

/// mautrix's `AppService` (Python) receives the telegram bridge's events.
#[tokio::test(flavor = "multi_thread")]
async fn mautrix_appservice_receives_every_event_in_order() {
    let python = receivers_dir().join(".venv/bin/python");
    delivers_bundled_stream_to("telegram", &python, "mautrix_receiver.py", false).await;
}

/// Repeated swaps between two builds during delivery change nothing mautrix receives.
#[tokio::test(flavor = "multi_thread")]
async fn mautrix_receives_every_event_across_repeated_swaps() {
    let python = receivers_dir().join(".venv/bin/python");
    delivers_bundled_stream_to("telegram", &python, "mautrix_receiver.py", true).await;
}

/// matrix-appservice's `AppService` (Node) receives the slack bridge's events.
#[tokio::test(flavor = "multi_thread")]
async fn matrix_appservice_npm_receives_every_event_in_order() {
    assert!(
        receivers_dir()
            .join("node_modules/matrix-appservice")
            .exists(),
        "tests/receivers/node_modules is missing: run ./scripts/test, which installs it"
    );
    delivers_bundled_stream_to(
        "slack",
        Path::new("node"),
        "matrix_appservice_receiver.js",
        false,
    )
    .await;
}
