//! Shared parts of the integration tests: a scripted appservice on real HTTP/1.1 over
//! 127.0.0.1, a host started on a real SQLite file, the `serve` binary as a child process, and
//! realistic events.
//!
//! The scripted appservice speaks HTTP itself (on a plain TCP listener) so that a test can make
//! it do what real appservices and proxies do: answer any status and body, answer late, never
//! answer, or drop the connection after reading the request.

pub mod sim;
pub mod variants;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asched_host::engine::SchedulerConfig;
use asched_host::http::HttpConfig;
use asched_host::registration::{self, Registration};
use asched_host::{Host, HostConfig, default_scheduler_config};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request the scripted appservice read.
#[derive(Clone, Debug)]
pub struct Request {
    /// The path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// The txn id at the end of a transactions path.
    pub txn_id: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The exact body bytes.
    pub body: Vec<u8>,
    /// The `event_id`s in the body, in order.
    pub event_ids: Vec<String>,
    /// How many requests (this one included) were being handled when it arrived.
    pub concurrent: usize,
}

/// What the scripted appservice does with a request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer after `delay`.
    Respond {
        /// The status code.
        status: u16,
        /// The `Content-Type`, if any.
        content_type: Option<&'static str>,
        /// The body.
        body: &'static str,
        /// How long to wait before answering.
        delay: Duration,
    },
    /// Keep the connection open and never answer.
    Hang,
    /// Close the connection without answering (the request was read: "processed, answer lost").
    Drop,
}

impl Reply {
    /// `200 {}` at once.
    pub fn ok() -> Reply {
        Reply::Respond {
            status: 200,
            content_type: Some("application/json"),
            body: "{}",
            delay: Duration::ZERO,
        }
    }

    /// A JSON error with this status, at once.
    pub fn status(status: u16) -> Reply {
        Reply::Respond {
            status,
            content_type: Some("application/json"),
            body: r#"{"errcode":"M_UNKNOWN"}"#,
            delay: Duration::ZERO,
        }
    }
}

/// Decides the reply to each request; it sees every request so far (the current one last).
pub type Script = Box<dyn FnMut(&[Request]) -> Reply + Send>;

struct ReceiverState {
    requests: Vec<Request>,
    replies: Vec<Reply>,
    in_progress: usize,
    script: Script,
}

/// A scripted appservice listening on 127.0.0.1.
#[derive(Clone)]
pub struct Receiver {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    /// Starts on a free port with `script`.
    pub async fn start(script: impl FnMut(&[Request]) -> Reply + Send + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port exists");
        Self::serve(listener, Box::new(script))
    }

    /// Starts on `addr` (for an appservice that comes back on its old port).
    pub async fn start_on(
        addr: SocketAddr,
        script: impl FnMut(&[Request]) -> Reply + Send + 'static,
    ) -> Receiver {
        let listener = TcpListener::bind(addr)
            .await
            .expect("the port is free again");
        Self::serve(listener, Box::new(script))
    }

    /// Answers `200 {}` to everything.
    pub async fn healthy() -> Receiver {
        Self::start(|_| Reply::ok()).await
    }

    fn serve(listener: TcpListener, script: Script) -> Receiver {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let state = Arc::new(Mutex::new(ReceiverState {
            requests: Vec::new(),
            replies: Vec::new(),
            in_progress: 0,
            script,
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle_connection(stream, shared.clone()));
            }
        });
        Receiver { addr, state }
    }

    /// The base URL to put in a registration.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request read so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("receiver lock").requests.clone()
    }

    /// Event ids the appservice processed: from requests answered with 2xx, each txn id
    /// counted once (an appservice ignores a txn id it has processed).
    pub fn processed_event_ids(&self) -> Vec<String> {
        let state = self.state.lock().expect("receiver lock");
        let mut seen = BTreeSet::new();
        let mut ids = Vec::new();
        for (request, reply) in state.requests.iter().zip(&state.replies) {
            let accepted = matches!(
                reply,
                Reply::Respond {
                    status: 200..=299,
                    ..
                } | Reply::Drop
            );
            if accepted && seen.insert(request.txn_id.clone()) {
                ids.extend(request.event_ids.iter().cloned());
            }
        }
        ids
    }

    /// The most requests ever handled at once.
    pub fn max_concurrent(&self) -> usize {
        self.requests()
            .iter()
            .map(|r| r.concurrent)
            .max()
            .unwrap_or(0)
    }

    /// Waits until `n` events are processed; panics after `timeout` with what was seen.
    pub async fn wait_for_events(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ids = self.processed_event_ids();
            if ids.len() >= n {
                return ids;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} events; got {}: {ids:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} requests; got {}",
                requests.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn handle_connection(stream: TcpStream, state: Arc<Mutex<ReceiverState>>) {
    // The answer goes out in two writes; without this, delayed ACKs hold the second for ~40 ms.
    let _ = stream.set_nodelay(true);
    let mut stream = tokio::io::BufReader::new(stream);
    loop {
        let Some(mut request) = read_request(&mut stream).await else {
            return;
        };
        let reply = {
            let mut guard = state.lock().expect("receiver lock");
            let s = &mut *guard;
            s.in_progress += 1;
            request.concurrent = s.in_progress;
            s.requests.push(request);
            let reply = (s.script)(&s.requests);
            s.replies.push(reply.clone());
            reply
        };
        let keep_going = match reply {
            Reply::Respond {
                status,
                content_type,
                body,
                delay,
            } => {
                tokio::time::sleep(delay).await;
                let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                if let Some(ct) = content_type {
                    head.push_str(&format!("Content-Type: {ct}\r\n"));
                }
                head.push_str("\r\n");
                let written = stream.get_mut().write_all(head.as_bytes()).await.is_ok()
                    && stream.get_mut().write_all(body.as_bytes()).await.is_ok();
                written
            }
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                false
            }
            Reply::Drop => false,
        };
        state.lock().expect("receiver lock").in_progress -= 1;
        if !keep_going {
            return;
        }
    }
}

/// Reads one HTTP/1.1 request with a `Content-Length` body.
async fn read_request(stream: &mut tokio::io::BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if stream.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_owned();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target, None),
    };
    let mut length = 0usize;
    let mut authorization = None;
    let mut content_type = None;
    loop {
        let mut header = String::new();
        stream.read_line(&mut header).await.ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        let value = value.trim().to_owned();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok()?,
            "authorization" => authorization = Some(value),
            "content-type" => content_type = Some(value),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    let event_ids = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect();
    let txn_id = path.rsplit('/').next().unwrap_or_default().to_owned();
    Some(Request {
        path,
        query,
        txn_id,
        authorization,
        content_type,
        body,
        event_ids,
        concurrent: 0,
    })
}

/// Asserts that every txn id among `requests` was sent with one body only: a retry resends the
/// same bytes, and an id never carries other content.
pub fn assert_one_body_per_txn_id(requests: &[Request]) {
    let mut bodies: std::collections::BTreeMap<&str, &[u8]> = std::collections::BTreeMap::new();
    for r in requests {
        let first = *bodies.entry(&r.txn_id).or_insert(&r.body);
        assert_eq!(
            first,
            &r.body[..],
            "txn {} was sent with two bodies",
            r.txn_id
        );
    }
}

/// Waits for `child` to exit and returns its output; if it still runs after `timeout`, kills it
/// and fails the test with `what` and what it printed.
pub fn wait_for_exit(mut child: Child, timeout: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    while child
        .try_wait()
        .expect("the child can be waited for")
        .is_none()
    {
        if Instant::now() > deadline {
            child.kill().expect("the child can be killed");
            let output = child.wait_with_output().expect("the child ends");
            panic!("{what}: {}", String::from_utf8_lossy(&output.stdout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("the output is read")
}

/// A realistic `m.room.message` event with id `$e{n}`, about 400 bytes.
pub fn event(n: usize) -> String {
    serde_json::json!({
        "type": "m.room.message",
        "event_id": format!("$e{n}"),
        "room_id": "!bridged:example.org",
        "sender": "@alice:example.org",
        "origin_server_ts": 1_764_000_000_000u64 + n as u64,
        "content": {
            "msgtype": "m.text",
            "body": format!("message number {n}: the quick brown fox jumps over the lazy dog near the river bank"),
            "format": "org.matrix.custom.html",
            "formatted_body": format!("<p>message number <b>{n}</b>: the quick brown fox jumps over the lazy dog</p>")
        },
        "unsigned": { "age": 12 }
    })
    .to_string()
}

/// The ids of `event(from)` … `event(to)`, inclusive.
pub fn ids(from: usize, to: usize) -> Vec<String> {
    (from..=to).map(|n| format!("$e{n}")).collect()
}

/// A registration for appservice `id` at `url` (or `url: null`), with tokens derived from `id`.
pub fn registration(id: &str, url: Option<&str>) -> Registration {
    registration::parse(
        &registration_yaml(id, url),
        Path::new(&format!("{id}.yaml")),
    )
    .expect("test registrations are valid")
}

/// The YAML text of [`registration`].
pub fn registration_yaml(id: &str, url: Option<&str>) -> String {
    let url = url.map_or("null".to_owned(), |u| format!("\"{u}\""));
    format!(
        "id: {id}\nurl: {url}\nas_token: as-token-{id}\nhs_token: hs-token-{id}\nsender_localpart: {id}bot\nnamespaces:\n  users:\n    - regex: '@{id}_.*:example.org'\n      exclusive: true\n"
    )
}

/// The scheduler configuration of the tests: the defaults with retries in milliseconds rather
/// than seconds, so retry paths run quickly in real time.
pub fn fast_retries() -> SchedulerConfig {
    SchedulerConfig {
        retry_delay_ms_initial: 50,
        retry_delay_ms_max: 400,
        retry_jitter_percent: 0,
        ..default_scheduler_config()
    }
}

/// A fresh, empty folder under the system's temp folder; removed when dropped, unless the test
/// is failing (then its path is printed, to look inside).
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "asched-test-{name}-{}-{}",
        std::process::id(),
        asched_host::runtime::random_u64()
    ));
    std::fs::create_dir_all(&dir).expect("the temp folder is writable");
    TempDir(dir)
}

/// A folder made by [`temp_dir`].
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the folder of the failing test: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A host on a real SQLite file in `data_dir`.
pub struct TestHost {
    /// The handle.
    pub host: Host,
    engine: Option<std::thread::JoinHandle<()>>,
}

impl TestHost {
    /// Starts a host with `registrations` and `scheduler` settings, and a 1 s request timeout.
    pub fn start(
        data_dir: &Path,
        registrations: Vec<Registration>,
        scheduler: SchedulerConfig,
    ) -> TestHost {
        Self::start_with(data_dir, registrations, scheduler, |_| {})
    }

    /// Like [`TestHost::start`], with a chance to change the whole configuration.
    pub fn start_with(
        data_dir: &Path,
        registrations: Vec<Registration>,
        scheduler: SchedulerConfig,
        tweak: impl FnOnce(&mut HostConfig),
    ) -> TestHost {
        let mut config = HostConfig {
            data_dir: data_dir.to_path_buf(),
            registrations,
            plugin_path: None,
            scheduler,
            http: HttpConfig {
                connect_timeout: Duration::from_secs(1),
                total_timeout: Duration::from_secs(1),
            },
            legacy_query_auth: Vec::new(),
            sandbox: Default::default(),
            probation: asched_host::engine::DEFAULT_PROBATION,
            store: Default::default(),
        };
        tweak(&mut config);
        let (host, engine) = Host::start(config).expect("the host starts");
        TestHost {
            host,
            engine: Some(engine),
        }
    }

    /// Enqueues one event per call, in order, each durable before the next.
    pub async fn enqueue_each(&self, appservice: &str, events: impl IntoIterator<Item = String>) {
        for event in events {
            self.host
                .enqueue(appservice, vec![event])
                .await
                .expect("the enqueue is accepted");
        }
    }

    /// The status of one appservice.
    pub async fn status(&self, appservice: &str) -> asched_host::AppserviceStatus {
        self.host
            .status()
            .await
            .into_iter()
            .find(|s| s.appservice == appservice)
            .expect("the appservice is registered")
    }

    /// Stops the engine thread and waits for it.
    pub async fn stop(mut self) {
        self.host.shutdown();
        if let Some(engine) = self.engine.take() {
            tokio::task::spawn_blocking(move || engine.join())
                .await
                .expect("join")
                .expect("the engine thread ends cleanly");
        }
    }
}

/// The `asched serve` process, started from the test binary `asched-under-test`.
pub struct Serve {
    /// The child process.
    pub child: Child,
    /// The API's address.
    pub addr: String,
    /// The shared secret.
    pub secret: String,
}

impl Serve {
    /// Starts `binary serve` (the `asched` command line) with its data in `data_dir`,
    /// registrations from `registrations_dir`, and extra arguments; waits until it listens.
    pub fn start(
        binary: &Path,
        data_dir: &Path,
        registrations_dir: &Path,
        extra: &[&str],
    ) -> Serve {
        let secret = "test-secret-0123456789abcdef".to_owned();
        let secret_file = data_dir.join("secret");
        std::fs::create_dir_all(data_dir).expect("the data folder can be created");
        std::fs::write(&secret_file, &secret).expect("the secret file can be written");
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--registration")
            .arg(registrations_dir)
            .arg("--secret-file")
            .arg(&secret_file)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the serve binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve prints its address before anything else")
                .expect("stdout is readable");
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.to_owned();
            }
        };
        Serve {
            child,
            addr,
            secret,
        }
    }

    /// The API base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(mut self) {
        self.child.kill().expect("the child can be killed");
        self.child.wait().expect("the child can be waited for");
    }

    /// Posts events for an appservice through the API; returns the status code and body.
    pub async fn enqueue(
        &self,
        client: &reqwest::Client,
        appservice: &str,
        events: &[String],
    ) -> (u16, String) {
        let body = format!("{{\"events\":[{}]}}", events.join(","));
        let response = client
            .post(format!(
                "{}/_asched/v1/appservices/{appservice}/events",
                self.url()
            ))
            .bearer_auth(&self.secret)
            .body(body)
            .send()
            .await
            .expect("the API answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

/// A builder for clients of the sidecar API. reqwest is built here without a TLS crypto
/// provider and panics when a client is built before one is installed; the host installs its
/// own (`ring`) when it sets up its HTTP client, so one is set up first.
pub fn api_client_builder() -> reqwest::ClientBuilder {
    asched_host::http::Net::new(&HttpConfig::default(), &[], &[])
        .expect("an HTTP client without appservices can be built");
    reqwest::Client::builder().no_proxy()
}
