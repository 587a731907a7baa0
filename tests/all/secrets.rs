//! Secrets stay in the host: the `hs_token`, the `as_token` and the appservices' URLs never
//! cross into the plugin (nothing it logs, reports or stores holds them) and never appear in a
//! log line, a status, the store or any file of the data folder, whatever way a send fails.
//!
//! Every log line of the process is captured at DEBUG, dependencies included (with `log`
//! records bridged, as the `asched` binary does), and checked as it is written. The appservices
//! listen on loopback addresses of their own (127.7.31.0/24, which no other test uses), so a
//! host:port in a line can only come from these tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use asched_host::registration::{self, Registration};
use asched_tests::{Receiver, Reply, Request, TestHost, event, fast_retries, ids, temp_dir};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

const WAIT: Duration = Duration::from_secs(10);

/// What the process's log subscriber wrote. Every line is checked for the watched secrets as
/// it is written, and only what the assertions need is kept: the other tests of the binary log
/// too (a host compiling the plugin writes some 5 MB at DEBUG).
#[derive(Default)]
struct Capture {
    /// The secrets looked for, each with what it is.
    watched: Vec<(String, String)>,
    /// The lines that contain a watched secret, each with what the secret is.
    leaks: Vec<(String, String)>,
    /// The lines about the appservices of these tests (their ids start with `sec-`).
    ours: Vec<String>,
    /// Lines written.
    lines: usize,
    /// Lines written at DEBUG.
    debug_lines: usize,
}

/// The writer of the global subscriber: a shared [`Capture`].
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Capture>>);

impl LogBuffer {
    /// Looks for `secret` in every line written from now on.
    fn watch(&self, what: &str, secret: &str) {
        let mut capture = self.0.lock().expect("log capture lock");
        capture.watched.push((what.to_owned(), secret.to_owned()));
    }

    /// The lines that contained a secret described as one of `whats`.
    fn leaks_of(&self, whats: &[String]) -> Vec<(String, String)> {
        let capture = self.0.lock().expect("log capture lock");
        let leaks = capture
            .leaks
            .iter()
            .filter(|(what, _)| whats.contains(what));
        leaks.cloned().collect()
    }

    /// The lines written about appservice `id` so far.
    fn lines_of(&self, id: &str) -> Vec<String> {
        let field = format!("appservice=\"{id}\"");
        let capture = self.0.lock().expect("log capture lock");
        let lines = capture.ours.iter().filter(|line| line.contains(&field));
        lines.cloned().collect()
    }

    /// How many lines, and how many DEBUG lines, were written so far.
    fn counts(&self) -> (usize, usize) {
        let capture = self.0.lock().expect("log capture lock");
        (capture.lines, capture.debug_lines)
    }
}

impl std::io::Write for LogBuffer {
    /// Takes one formatted event (the fmt layer writes each in one call).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut guard = self.0.lock().expect("log capture lock");
        let capture = &mut *guard;
        for line in text.lines() {
            capture.lines += 1;
            if line.contains(" DEBUG ") {
                capture.debug_lines += 1;
            }
            for (what, secret) in &capture.watched {
                if line.contains(secret.as_str()) {
                    capture.leaks.push((what.clone(), line.to_owned()));
                }
            }
            if line.contains("appservice=\"sec-") {
                capture.ours.push(line.to_owned());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

/// The process's log lines, captured by a global subscriber at DEBUG for every target,
/// installed by the first test that asks.
fn logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        tracing_subscriber::fmt()
            .with_max_level(LevelFilter::DEBUG)
            .with_ansi(false)
            .with_writer(buffer.clone())
            .try_init()
            .expect("no other test installs a global subscriber");
        buffer
    })
}

/// A registration of `id` at `url` with tokens no other test uses.
fn secret_registration(id: &str, url: &str) -> Registration {
    let hs_token = format!("hs{:016x}{:016x}", random(), random());
    let as_token = format!("as{:016x}{:016x}", random(), random());
    let yaml = format!(
        "id: {id}\nurl: \"{url}\"\nas_token: {as_token}\nhs_token: {hs_token}\nsender_localpart: {id}bot\nnamespaces:\n  users:\n    - regex: '@{id}_.*:example.org'\n      exclusive: true\n"
    );
    let reg = registration::parse(&yaml, Path::new(&format!("{id}.yaml")))
        .expect("the registration is valid");
    assert_eq!((&reg.hs_token, &reg.as_token), (&hs_token, &as_token));
    reg
}

fn random() -> u64 {
    asched_host::runtime::random_u64()
}

/// 127.7.31.`host`, port 0: a loopback address of these tests' own.
fn loopback(host: u8) -> SocketAddr {
    SocketAddr::from(([127, 7, 31, host], 0))
}

/// An address on 127.7.31.`host` where nothing listens: a port that was bound, then released.
fn refused_addr(host: u8) -> SocketAddr {
    let listener =
        std::net::TcpListener::bind(loopback(host)).expect("the loopback address can be bound");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// A scripted appservice on 127.7.31.`host` that always replies `reply`.
async fn receiver_on(host: u8, reply: Reply) -> Receiver {
    Receiver::start_on(loopback(host), move |_| reply.clone()).await
}

/// Every place besides the logs where a secret must not be found, read after the host stopped.
struct Findings {
    /// The JSON of `full_status()`.
    status_json: String,
    /// Every key and value of the SQLite store, as text.
    store_entries: Vec<(String, String)>,
    /// Every file of the data folder, with its bytes.
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Findings {
    /// Panics naming the place if `secret` is found anywhere.
    fn assert_absent(&self, what: &str, secret: &str) {
        assert!(
            !self.status_json.contains(secret),
            "the {what} {secret:?} is in the status: {}",
            self.status_json
        );
        for (key, value) in &self.store_entries {
            assert!(
                !key.contains(secret) && !value.contains(secret),
                "the {what} {secret:?} is in the store: {key} = {value}"
            );
        }
        for (path, bytes) in &self.files {
            assert!(
                !bytes
                    .windows(secret.len())
                    .any(|window| window == secret.as_bytes()),
                "the {what} {secret:?} is in the file {}",
                path.display()
            );
        }
    }
}

/// Every key and value of the store in `data_dir`, opened read-only.
fn store_entries(data_dir: &Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("scheduler.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("the store can be opened read-only");
    let mut statement = conn
        .prepare("SELECT key, value FROM kv ORDER BY key")
        .expect("the store has its table");
    let rows = statement
        .query_map([], |row| {
            let key: String = row.get(0)?;
            let value: Vec<u8> = row.get(1)?;
            Ok((key, String::from_utf8_lossy(&value).into_owned()))
        })
        .expect("the table can be read");
    rows.map(|row| row.expect("a row can be read")).collect()
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("the data folder can be listed") {
        let path = entry.expect("an entry can be read").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).expect("a data file can be read");
            files.push((path, bytes));
        }
    }
    files
}

/// Polls until every appservice in `ids` has failed at least `attempts` times; panics after
/// [`WAIT`] with the statuses.
async fn wait_for_failures(host: &TestHost, ids: &[&str], attempts: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        let statuses = host.host.status().await;
        let failing = |id: &&str| {
            statuses
                .iter()
                .any(|s| s.appservice == *id && s.failed_attempts >= attempts)
        };
        if ids.iter().all(failing) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {ids:?} to fail {attempts} times: {statuses:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Five appservices with `?access_token=` on: one refuses connections, one drops the
/// connection after reading the request, one answers 403, one never answers (1 s timeout) and
/// one is healthy. After deliveries, backoff retries and forced retries, neither token of any
/// of them nor any of their host:port addresses is in a log line (DEBUG, every target), the
/// full status or the store; the failures are logged, and every request carried the token.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_urls_stay_out_of_logs_status_and_store() {
    let logs = logs();
    let refused = refused_addr(1);
    let dropping = receiver_on(2, Reply::Drop).await;
    let forbidden = receiver_on(3, Reply::status(403)).await;
    let hanging = receiver_on(4, Reply::Hang).await;
    let healthy = receiver_on(5, Reply::ok()).await;
    let urls = [
        ("sec-refused", format!("http://{refused}")),
        ("sec-drop", dropping.url()),
        ("sec-403", forbidden.url()),
        ("sec-hang", hanging.url()),
        ("sec-healthy", healthy.url()),
    ];
    let regs: Vec<Registration> = urls
        .iter()
        .map(|(id, url)| secret_registration(id, url))
        .collect();
    let tokens: BTreeMap<String, (String, String)> = regs
        .iter()
        .map(|r| (r.id.clone(), (r.hs_token.clone(), r.as_token.clone())))
        .collect();
    let mut secrets = Vec::new();
    for (id, (hs_token, as_token)) in &tokens {
        secrets.push((format!("hs_token of {id}"), hs_token.clone()));
        secrets.push((format!("as_token of {id}"), as_token.clone()));
    }
    for (id, url) in &urls {
        let host_port = url.trim_start_matches("http://").to_owned();
        secrets.push((format!("address of {id}"), host_port));
    }
    for (what, secret) in &secrets {
        logs.watch(what, secret);
    }
    let (lines_before, _) = logs.counts();
    let dir = temp_dir("secrets");
    let host = TestHost::start_with(&dir, regs.clone(), fast_retries(), |config| {
        config.legacy_query_auth = regs.iter().map(|r| r.id.clone()).collect();
    });
    let failing = ["sec-refused", "sec-drop", "sec-403", "sec-hang"];
    for (id, _) in &urls {
        host.enqueue_each(id, (1..=3).map(event)).await;
    }
    assert_eq!(healthy.wait_for_events(3, WAIT).await, ids(1, 3));
    wait_for_failures(&host, &failing, 2).await;
    for id in failing {
        host.host
            .force_retry(id)
            .await
            .expect("a retry can be forced");
    }
    for (id, _) in &urls {
        host.enqueue_each(id, (4..=6).map(event)).await;
    }
    assert_eq!(healthy.wait_for_events(6, WAIT).await, ids(1, 6));
    wait_for_failures(&host, &failing, 4).await;
    let (appservices, plugin) = host.host.full_status().await.expect("the host runs");
    for status in &appservices {
        let expected = if status.appservice == "sec-healthy" {
            "up"
        } else {
            "down"
        };
        assert_eq!(status.state, expected, "{status:?}");
    }
    let last_errors: BTreeMap<&str, Option<&str>> = appservices
        .iter()
        .map(|s| (s.appservice.as_str(), s.last_error.as_deref()))
        .collect();
    let expected_errors = BTreeMap::from([
        ("sec-403", Some("HTTP 403")),
        (
            "sec-drop",
            Some(
                "connection lost: error sending request: client error (SendRequest): connection closed before message completed",
            ),
        ),
        ("sec-hang", Some("timed out")),
        ("sec-healthy", None),
        (
            "sec-refused",
            Some(
                "connection failed: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)",
            ),
        ),
    ]);
    assert_eq!(last_errors, expected_errors);
    let status_json =
        serde_json::to_string(&(&appservices, &plugin)).expect("the status is serialisable");
    host.stop().await;

    let findings = Findings {
        status_json,
        store_entries: store_entries(&dir),
        files: files_under(&dir),
    };
    let stored: BTreeMap<&str, &str> = findings
        .store_entries
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    for (id, _) in &urls {
        assert!(
            stored.contains_key(format!("as/{id}/meta").as_str()),
            "the store holds the record of {id}: {stored:#?}"
        );
    }
    for id in failing {
        let txn = stored.get(format!("as/{id}/txn").as_str());
        let first = stored.get(format!("as/{id}/c/0000000000000000").as_str());
        assert!(
            txn.is_some_and(|t| t.contains("\"first\":0,\"end\":1"))
                && first.is_some_and(|c| c.contains("\"$e1\"")),
            "the store holds the stuck transaction [E1] of {id} and its event: {stored:#?}"
        );
    }
    let whats: Vec<String> = secrets.iter().map(|(what, _)| what.clone()).collect();
    let leaks = logs.leaks_of(&whats);
    assert!(
        leaks.is_empty(),
        "{} log lines hold a secret; the first ones: {:#?}",
        leaks.len(),
        &leaks[..leaks.len().min(5)]
    );
    let (lines, debug_lines) = logs.counts();
    assert!(
        lines > lines_before && debug_lines > 0,
        "log lines are captured, DEBUG ones too: {lines} lines, {debug_lines} at DEBUG"
    );
    let lines_of = |id: &str, text: &str| {
        let found = logs.lines_of(id);
        assert!(
            found.iter().any(|line| line.contains(text)),
            "no log line of {id} says {text:?}: {found:#?}"
        );
    };
    lines_of("sec-refused", "failed: connection failed: ");
    lines_of("sec-drop", "failed: connection lost: ");
    lines_of("sec-403", "the appservice rejected the hs_token (HTTP 403)");
    lines_of("sec-hang", "failed: timed out; will retry");
    for id in failing {
        lines_of(id, "retry forced");
        lines_of(id, "appservice is down");
    }
    for (what, secret) in &secrets {
        findings.assert_absent(what, secret);
    }

    for (id, receiver) in [
        ("sec-drop", &dropping),
        ("sec-403", &forbidden),
        ("sec-hang", &hanging),
        ("sec-healthy", &healthy),
    ] {
        let hs_token = &tokens[id].0;
        let requests = receiver.requests();
        assert!(requests.len() >= 2, "{id} got {} requests", requests.len());
        for request in &requests {
            assert_token_carried(request, hs_token);
        }
    }
}

/// The request carried `hs_token` in the `Authorization` header and in `?access_token=`.
fn assert_token_carried(request: &Request, hs_token: &str) {
    assert_eq!(
        request.authorization.as_deref(),
        Some(format!("Bearer {hs_token}").as_str())
    );
    assert_eq!(
        request.query.as_deref(),
        Some(format!("access_token={hs_token}").as_str())
    );
}
