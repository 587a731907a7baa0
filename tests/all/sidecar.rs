//! The sidecar API through the real `serve` binary: enqueue, refusals and their error codes,
//! forced retries, status, and where it may listen.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use asched_tests::{
    Receiver, Reply, Serve, TempDir, api_client_builder, event, ids, registration_yaml, temp_dir,
    wait_for_exit,
};
use serde_json::{Value, json};

use crate::asched_binary;

const WAIT: Duration = Duration::from_secs(10);

/// Kills the serve process when the test ends, also when it fails.
struct Running(Option<Serve>);

impl Running {
    fn start(data_dir: &Path, registrations: &Path, extra: &[&str]) -> Running {
        Running(Some(Serve::start(
            &asched_binary(),
            data_dir,
            registrations,
            extra,
        )))
    }

    fn serve(&self) -> &Serve {
        self.0
            .as_ref()
            .expect("the process runs until the guard is dropped")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(serve) = self.0.take() {
            serve.kill();
        }
    }
}

/// Writes one registration file per `(id, url)` into a fresh folder and returns it.
fn registrations(name: &str, appservices: &[(&str, Option<&str>)]) -> TempDir {
    let dir = temp_dir(&format!("{name}-registrations"));
    for (id, url) in appservices {
        std::fs::write(dir.join(format!("{id}.yaml")), registration_yaml(id, *url))
            .expect("the registration can be written");
    }
    dir
}

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    /// With the secret the sidecar was started with.
    Secret,
    /// Without an `Authorization` header.
    Missing,
    /// With this header value.
    Header(&'a str),
}

/// A client of one sidecar API.
struct Api {
    client: reqwest::Client,
    base: String,
    secret: String,
}

impl Api {
    fn new(serve: &Serve) -> Api {
        Api {
            client: api_client_builder()
                .timeout(WAIT)
                .build()
                .expect("the client builds"),
            base: serve.url(),
            secret: serve.secret.clone(),
        }
    }

    /// Sends a request; returns the status and the body as JSON (`null` when it is not JSON).
    async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Auth<'_>,
        body: Option<String>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method");
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        match auth {
            Auth::Secret => request = request.bearer_auth(&self.secret),
            Auth::Missing => {}
            Auth::Header(value) => request = request.header("Authorization", value),
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("the answer is read");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn post_events(&self, appservice: &str, events: &[String]) -> (u16, Value) {
        let body = format!("{{\"events\":[{}]}}", events.join(","));
        self.post_raw(appservice, body, Auth::Secret).await
    }

    async fn post_raw(&self, appservice: &str, body: String, auth: Auth<'_>) -> (u16, Value) {
        let path = format!("/_asched/v1/appservices/{appservice}/events");
        self.call("POST", &path, auth, Some(body)).await
    }

    async fn retry(&self, appservice: &str) -> (u16, Value) {
        let path = format!("/_asched/v1/appservices/{appservice}/retry");
        self.call("POST", &path, Auth::Secret, None).await
    }

    async fn status(&self, appservice: &str) -> (u16, Value) {
        let path = format!("/_asched/v1/appservices/{appservice}/status");
        self.call("GET", &path, Auth::Secret, None).await
    }

    /// Polls one appservice's status until `done` holds; panics after [`WAIT`].
    async fn wait_for_status(&self, appservice: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (code, status) = self.status(appservice).await;
            assert_eq!(code, 200, "{status}");
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "timed out; last status {status}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn events(from: usize, to: usize) -> Vec<String> {
    (from..=to).map(event).collect()
}

/// Every event id the receiver was sent, over all requests, in arrival order.
fn all_sent_event_ids(receiver: &Receiver) -> Vec<String> {
    receiver
        .requests()
        .into_iter()
        .flat_map(|r| r.event_ids)
        .collect()
}

fn error_body(errcode: &str, error: &str) -> Value {
    json!({ "errcode": errcode, "error": error })
}

/// Events posted in several requests are acknowledged with their count and arrive in order.
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_answers_the_count_and_events_arrive_in_order() {
    let receiver = Receiver::healthy().await;
    let regs = registrations("enqueue", &[("as1", Some(&receiver.url()))]);
    let data_dir = temp_dir("enqueue");
    let serve = Running::start(&data_dir, &regs, &[]);
    let api = Api::new(serve.serve());

    assert_eq!(
        api.post_events("as1", &events(1, 1)).await,
        (200, json!({"accepted": 1}))
    );
    assert_eq!(
        api.post_events("as1", &events(2, 8)).await,
        (200, json!({"accepted": 7}))
    );
    assert_eq!(
        api.post_events("as1", &[]).await,
        (200, json!({"accepted": 0}))
    );
    assert_eq!(
        api.post_events("as1", &events(9, 20)).await,
        (200, json!({"accepted": 12}))
    );

    assert_eq!(receiver.wait_for_events(20, WAIT).await, ids(1, 20));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all_sent_event_ids(&receiver), ids(1, 20));
}

/// Every kind of refusal answers its documented status, errcode and message, stores nothing,
/// and leaves the events accepted before and after it alone: they arrive once each, in order.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_answer_their_errcode_and_store_nothing() {
    let receiver = Receiver::healthy().await;
    let regs = registrations(
        "refusals",
        &[("as1", Some(&receiver.url())), ("silent", None)],
    );
    let data_dir = temp_dir("refusals");
    let serve = Running::start(&data_dir, &regs, &["--max-request-bytes", "8192"]);
    let api = Api::new(serve.serve());

    assert_eq!(
        api.post_events("as1", &events(1, 3)).await,
        (200, json!({"accepted": 3}))
    );
    assert_eq!(receiver.wait_for_events(3, WAIT).await, ids(1, 3));

    // Malformed JSON: cut off after the first event.
    let cut = format!("{{\"events\":[{}", event(901));
    let (code, body) = api.post_raw("as1", cut, Auth::Secret).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["errcode"], "M_BAD_JSON");
    let message = body["error"].as_str().expect("a message");
    assert!(
        message
            .starts_with("the body must be a JSON object {\"events\": [...]}: EOF while parsing"),
        "{message}"
    );

    // A JSON object without `events`.
    let (code, body) = api
        .post_raw("as1", r#"{"event":[]}"#.into(), Auth::Secret)
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["errcode"], "M_BAD_JSON");
    assert!(
        body["error"]
            .as_str()
            .expect("a message")
            .contains("missing field `events`"),
        "{body}"
    );

    // A body that is not an object, even one serde could read as the right fields in order.
    for wrong in [
        "[1]".to_owned(),
        format!("[[{}]]", event(901)),
        " 42".to_owned(),
    ] {
        assert_eq!(
            api.post_raw("as1", wrong, Auth::Secret).await,
            (
                400,
                error_body(
                    "M_BAD_JSON",
                    "the body must be a JSON object {\"events\": [...]}, and it is not one"
                )
            )
        );
    }

    // An element that is not an object, after a valid one: nothing of the request is stored.
    let mixed = format!("{{\"events\":[{},42,{}]}}", event(902), event(903));
    assert_eq!(
        api.post_raw("as1", mixed, Auth::Secret).await,
        (
            400,
            error_body(
                "M_BAD_JSON",
                "event 1 is not acceptable: a room event must be a JSON object"
            )
        )
    );

    assert_eq!(
        api.post_events("nobody", &events(904, 904)).await,
        (
            404,
            error_body("M_UNKNOWN_APPSERVICE", "unknown appservice \"nobody\"")
        )
    );
    assert_eq!(
        api.post_events("silent", &events(905, 905)).await,
        (
            409,
            error_body(
                "M_URL_NOT_SET",
                "appservice \"silent\" has `url: null` and receives no traffic"
            )
        )
    );

    // About 12 KiB against a limit of 8 KiB.
    let large = events(910, 939);
    assert!(large.iter().map(String::len).sum::<usize>() > 8192);
    assert_eq!(
        api.post_events("as1", &large).await,
        (
            413,
            error_body(
                "M_TOO_LARGE",
                "the request body is larger than 8192 bytes; send fewer events per request"
            )
        )
    );

    let one = format!("{{\"events\":[{}]}}", event(940));
    let missing = error_body(
        "M_MISSING_TOKEN",
        "missing `Authorization: Bearer <secret>`",
    );
    assert_eq!(
        api.post_raw("as1", one.clone(), Auth::Missing).await,
        (401, missing.clone())
    );
    let forbidden = error_body(
        "M_FORBIDDEN",
        "the secret is not the one this sidecar was started with",
    );
    let wrong = "Bearer test-secret-0123456789abcdeX";
    assert_eq!(
        api.post_raw("as1", one.clone(), Auth::Header(wrong)).await,
        (403, forbidden)
    );
    // The right secret under another scheme is no bearer token at all.
    let basic = format!("Basic {}", api.secret);
    assert_eq!(
        api.post_raw("as1", one, Auth::Header(&basic)).await,
        (401, missing)
    );

    let unrecognized = error_body("M_UNRECOGNIZED", "no such endpoint");
    assert_eq!(
        api.call("GET", "/_asched/v1/nothing", Auth::Secret, None)
            .await,
        (404, unrecognized.clone())
    );
    assert_eq!(
        api.call(
            "POST",
            "/_matrix/app/v1/transactions/1",
            Auth::Secret,
            Some("{}".into())
        )
        .await,
        (404, unrecognized)
    );
    // A known endpoint with the wrong method: 405, still a JSON error, with `Allow`.
    let wrong_method = error_body("M_UNRECOGNIZED", "this endpoint does not take this method");
    assert_eq!(
        api.call(
            "GET",
            "/_asched/v1/appservices/as1/events",
            Auth::Secret,
            None
        )
        .await,
        (405, wrong_method.clone())
    );
    assert_eq!(
        api.call(
            "POST",
            "/_asched/v1/status",
            Auth::Secret,
            Some("{}".into())
        )
        .await,
        (405, wrong_method)
    );
    let response = api
        .client
        .delete(format!("{}/_asched/v1/appservices/as1/retry", api.base))
        .bearer_auth(&api.secret)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "POST");

    assert_eq!(
        api.post_events("as1", &events(4, 6)).await,
        (200, json!({"accepted": 3}))
    );

    // The limit is inclusive: a body of exactly 8192 bytes is taken, one byte more is not.
    let padded = |n: usize, len: usize| {
        let body = format!("{{\"events\":[{}]}}", event(n));
        let pad = " ".repeat(len - body.len());
        format!("{{\"events\":[{}{pad}]}}", event(n))
    };
    assert_eq!(padded(7, 8192).len(), 8192);
    let (code, body) = api.post_raw("as1", padded(950, 8193), Auth::Secret).await;
    assert_eq!(
        (code, &body["errcode"]),
        (413, &json!("M_TOO_LARGE")),
        "{body}"
    );
    assert_eq!(
        api.post_raw("as1", padded(7, 8192), Auth::Secret).await,
        (200, json!({"accepted": 1}))
    );

    assert_eq!(receiver.wait_for_events(7, WAIT).await, ids(1, 7));
    let status = api
        .wait_for_status("as1", |s| s["delivered_events"] == 7)
        .await;
    assert_eq!(status["backlog_events"], 0, "{status}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all_sent_event_ids(&receiver), ids(1, 7));
}

/// A receiver that answers 503 until `healthy` is set, then 200.
async fn flaky_receiver(healthy: Arc<AtomicBool>) -> Receiver {
    Receiver::start(move |_| {
        if healthy.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::status(503)
        }
    })
    .await
}

/// A forced retry skips a minute of backoff: the stored transaction goes again at once, under
/// its id and with its bytes, and the backlog follows.
#[tokio::test(flavor = "multi_thread")]
async fn retry_skips_the_backoff() {
    let healthy = Arc::new(AtomicBool::new(false));
    let receiver = flaky_receiver(healthy.clone()).await;
    let regs = registrations("retry", &[("as1", Some(&receiver.url())), ("silent", None)]);
    let data_dir = temp_dir("retry");
    let serve = Running::start(&data_dir, &regs, &["--retry-delay-ms-initial", "60000"]);
    let api = Api::new(serve.serve());

    assert_eq!(
        api.post_events("as1", &events(1, 1)).await,
        (200, json!({"accepted": 1}))
    );
    receiver.wait_for_requests(1, WAIT).await;
    api.wait_for_status("as1", |s| s["state"] == "down").await;
    assert_eq!(
        api.post_events("as1", &events(2, 5)).await,
        (200, json!({"accepted": 4}))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "nothing is sent during the backoff"
    );

    healthy.store(true, Ordering::SeqCst);
    let forced = Instant::now();
    assert_eq!(api.retry("as1").await, (200, json!({})));
    assert_eq!(
        receiver.wait_for_events(5, Duration::from_secs(2)).await,
        ids(1, 5)
    );
    assert!(forced.elapsed() < Duration::from_secs(2));
    let requests = receiver.requests();
    assert_eq!(requests[1].txn_id, requests[0].txn_id);
    assert_eq!(requests[1].body, requests[0].body);
    let status = api.wait_for_status("as1", |s| s["state"] == "up").await;
    assert_eq!(status["failed_attempts"], 0, "{status}");
    assert_eq!(status["next_retry_in_ms"], Value::Null, "{status}");

    assert_eq!(
        api.retry("nobody").await,
        (
            404,
            error_body("M_UNKNOWN_APPSERVICE", "unknown appservice \"nobody\"")
        )
    );
    assert_eq!(
        api.retry("silent").await,
        (
            409,
            error_body(
                "M_URL_NOT_SET",
                "appservice \"silent\" has `url: null` and receives no traffic"
            )
        )
    );
}

fn as_u64(status: &Value, field: &str) -> u64 {
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is a number in {status}"))
}

/// The status of a DOWN appservice with a known backlog, field by field; and the list of all,
/// with an UP and a `url: null` appservice beside it.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_every_field_of_a_down_appservice() {
    let failing = Receiver::start(|_| Reply::status(503)).await;
    let healthy = Receiver::healthy().await;
    let regs = registrations(
        "status",
        &[
            ("down", Some(&failing.url())),
            ("silent", None),
            ("up", Some(&healthy.url())),
        ],
    );
    let data_dir = temp_dir("status");
    let serve = Running::start(
        &data_dir,
        &regs,
        &[
            "--retry-delay-ms-initial",
            "60000",
            "--retry-jitter-percent",
            "0",
            "--max-events-per-txn",
            "10",
        ],
    );
    let api = Api::new(serve.serve());

    let before_first = Instant::now();
    assert_eq!(
        api.post_events("down", &events(1, 1)).await,
        (200, json!({"accepted": 1}))
    );
    let first_acknowledged = Instant::now();
    let txn_id = failing.wait_for_requests(1, WAIT).await[0].txn_id.clone();
    api.wait_for_status("down", |s| s["failed_attempts"] == 1)
        .await;
    assert_eq!(
        api.post_events("down", &events(2, 25)).await,
        (200, json!({"accepted": 24}))
    );
    assert_eq!(
        api.post_events("up", &events(101, 103)).await,
        (200, json!({"accepted": 3}))
    );
    healthy.wait_for_events(3, WAIT).await;
    api.wait_for_status("up", |s| s["delivered_events"] == 3)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = Instant::now();
    let (code, down) = api.status("down").await;
    let answered = Instant::now();
    assert_eq!(code, 200, "{down}");
    let age = as_u64(&down, "oldest_undelivered_age_ms");
    let age_min = (asked - first_acknowledged).as_millis() as u64;
    let age_max = (answered - before_first).as_millis() as u64;
    assert!(
        (age_min.saturating_sub(5)..=age_max + 5).contains(&age),
        "age {age} not in {age_min}..={age_max}"
    );
    let next = as_u64(&down, "next_retry_in_ms");
    let next_min = 60_000 - (answered - before_first).as_millis() as u64;
    assert!(
        (next_min..=60_000 - 300).contains(&next),
        "next retry {next} not in {next_min}..=59700"
    );
    let backlog_bytes: usize = events(1, 25).iter().map(String::len).sum();
    let expected = json!({
        "appservice": "down",
        "state": "down",
        // The stored transaction (event 1) and 24 queued events in transactions of 10.
        "backlog_txns": 4,
        "backlog_events": 25,
        "backlog_bytes": backlog_bytes,
        "oldest_undelivered_age_ms": age,
        "current_txn_id": txn_id,
        "in_flight": false,
        "failed_attempts": 1,
        "last_error": "HTTP 503",
        "next_retry_in_ms": next,
        "paused_by_storage": false,
        "delivered_txns": 0,
        "delivered_events": 0,
    });
    assert_eq!(down, expected);
    assert_eq!(
        failing.requests().len(),
        1,
        "the retry waits for its backoff"
    );

    let (code, all) = api
        .call("GET", "/_asched/v1/status", Auth::Secret, None)
        .await;
    assert_eq!(code, 200, "{all}");
    let list = all["appservices"].as_array().expect("a list of statuses");
    assert_eq!(list.len(), 3, "{all}");
    let mut down_again = list[0].clone();
    for field in ["oldest_undelivered_age_ms", "next_retry_in_ms"] {
        assert!(down_again[field].is_u64(), "{field} in {down_again}");
        down_again[field] = expected[field].clone();
    }
    assert_eq!(down_again, expected);
    assert_eq!(
        list[1],
        json!({
            "appservice": "silent",
            "state": "no-traffic",
            "backlog_txns": 0,
            "backlog_events": 0,
            "backlog_bytes": 0,
            "oldest_undelivered_age_ms": null,
            "current_txn_id": null,
            "in_flight": false,
            "failed_attempts": 0,
            "last_error": null,
            "next_retry_in_ms": null,
            "paused_by_storage": false,
            "delivered_txns": 0,
            "delivered_events": 0,
        })
    );
    assert_eq!(
        list[2],
        json!({
            "appservice": "up",
            "state": "up",
            "backlog_txns": 0,
            "backlog_events": 0,
            "backlog_bytes": 0,
            "oldest_undelivered_age_ms": null,
            "current_txn_id": null,
            "in_flight": false,
            "failed_attempts": 0,
            "last_error": null,
            "next_retry_in_ms": null,
            "paused_by_storage": false,
            "delivered_txns": 1,
            "delivered_events": 3,
        })
    );
    assert_eq!(api.status("silent").await, (200, list[1].clone()));
    assert_eq!(
        api.status("nobody").await,
        (
            404,
            error_body("M_UNKNOWN_APPSERVICE", "unknown appservice \"nobody\"")
        )
    );
    assert_eq!(
        api.call("GET", "/_asched/v1/status", Auth::Missing, None)
            .await
            .0,
        401
    );
}

const UNIX_SECRET: &str = "unix-secret-0123456789abcdef";

/// `serve` listening on the Unix socket `socket`, its stdout piped.
fn spawn_unix(data_dir: &Path, regs: &Path, socket: &Path, stderr: Stdio) -> std::process::Child {
    std::fs::create_dir_all(data_dir).expect("the data folder can be created");
    let secret_file = data_dir.join("secret");
    std::fs::write(&secret_file, UNIX_SECRET).expect("the secret file can be written");
    Command::new(asched_binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--registration")
        .arg(regs)
        .arg("--secret-file")
        .arg(&secret_file)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("the serve binary starts")
}

/// Starts `serve` on a Unix socket and waits until it listens there.
fn start_unix(data_dir: &Path, regs: &Path, socket: &Path) -> Running {
    let mut child = spawn_unix(data_dir, regs, socket, Stdio::inherit());
    let stdout = child.stdout.take().expect("stdout is piped");
    let first = BufReader::new(stdout)
        .lines()
        .next()
        .expect("serve prints its address")
        .expect("stdout is readable");
    let serve = Running(Some(Serve {
        child,
        addr: first.clone(),
        secret: UNIX_SECRET.into(),
    }));
    assert_eq!(first, format!("listening on unix:{}", socket.display()));
    serve
}

/// Runs `serve` on a Unix socket where it is expected to refuse to start; returns its stderr.
fn refused_unix(data_dir: &Path, regs: &Path, socket: &Path) -> String {
    let child = spawn_unix(data_dir, regs, socket, Stdio::piped());
    let output = wait_for_exit(child, WAIT, "serve started instead of refusing");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty(), "it never listened: {stderr}");
    stderr
}

fn unix_api(socket: &Path) -> Api {
    Api {
        client: api_client_builder()
            .unix_socket(socket)
            .timeout(WAIT)
            .build()
            .expect("the client builds"),
        base: "http://localhost".into(),
        secret: UNIX_SECRET.into(),
    }
}

/// `--listen unix:PATH` serves the same API on a Unix socket.
#[tokio::test(flavor = "multi_thread")]
async fn listens_on_a_unix_socket() {
    let receiver = Receiver::healthy().await;
    let regs = registrations("unix", &[("as1", Some(&receiver.url()))]);
    let data_dir = temp_dir("unix");
    let socket = data_dir.join("api.sock");
    let secret = UNIX_SECRET;
    let serve = start_unix(&data_dir, &regs, &socket);

    let api = unix_api(&socket);
    assert_eq!(
        api.post_events("as1", &events(1, 4)).await,
        (200, json!({"accepted": 4}))
    );
    assert_eq!(receiver.wait_for_events(4, WAIT).await, ids(1, 4));
    let status = api
        .wait_for_status("as1", |s| s["delivered_events"] == 4)
        .await;
    assert_eq!(status["state"], "up", "{status}");
    let wrong = "Bearer unix-secret-0123456789abcdeX";
    assert_eq!(
        api.post_raw(
            "as1",
            format!("{{\"events\":[{}]}}", event(5)),
            Auth::Header(wrong)
        )
        .await
        .0,
        403
    );

    // The socket is plain HTTP/1.1: a request written by hand is answered.
    let mut stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the socket accepts connections");
    let request = format!(
        "GET /_asched/v1/appservices/as1/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .expect("the request is written");
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
        .await
        .expect("the answer is read");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let body: Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(body["appservice"], "as1");
    assert_eq!(body["delivered_events"], 4);
    drop(serve);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all_sent_event_ids(&receiver), ids(1, 4));
}

/// The socket file a killed process left behind is taken over on restart; a file that is not
/// a socket, or a socket another process serves, is left alone and the start is refused.
#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_left_by_a_killed_process_is_reclaimed_but_never_clobbered() {
    let receiver = Receiver::healthy().await;
    let regs = registrations("unix-reclaim", &[("as1", Some(&receiver.url()))]);
    let data_dir = temp_dir("unix-reclaim");
    let socket = data_dir.join("api.sock");

    std::fs::write(&socket, "not a socket").expect("writable");
    let stderr = refused_unix(&data_dir.join("a"), &regs, &socket);
    assert_eq!(
        stderr,
        format!(
            "error: cannot listen on {}: it exists and is not a socket\n",
            socket.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(&socket).expect("the file is still there"),
        "not a socket"
    );
    std::fs::remove_file(&socket).expect("removable");

    let first = start_unix(&data_dir.join("a"), &regs, &socket);
    let api = unix_api(&socket);
    assert_eq!(
        api.post_events("as1", &events(1, 1)).await,
        (200, json!({"accepted": 1}))
    );

    let stderr = refused_unix(&data_dir.join("b"), &regs, &socket);
    assert_eq!(
        stderr,
        format!(
            "error: cannot listen on {}: another process is listening on it\n",
            socket.display()
        )
    );
    assert_eq!(
        api.post_events("as1", &events(2, 2)).await,
        (200, json!({"accepted": 1}))
    );
    assert_eq!(receiver.wait_for_events(2, WAIT).await, ids(1, 2));
    api.wait_for_status("as1", |s| s["delivered_events"] == 2)
        .await;

    drop(first);
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let _again = start_unix(&data_dir.join("a"), &regs, &socket);
    let api = unix_api(&socket);
    assert_eq!(
        api.post_events("as1", &events(3, 3)).await,
        (200, json!({"accepted": 1}))
    );
    assert_eq!(receiver.wait_for_events(3, WAIT).await, ids(1, 3));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all_sent_event_ids(&receiver), ids(1, 3));
}

/// A non-loopback TCP address is refused before anything starts, with a message that says why.
#[test]
fn non_loopback_listen_is_refused() {
    let data_dir = temp_dir("non-loopback");
    let regs = registrations("non-loopback", &[("as1", Some("http://127.0.0.1:9"))]);
    let secret_file = data_dir.join("secret");
    std::fs::write(&secret_file, "test-secret-0123456789abcdef").expect("writable");
    for listen in ["0.0.0.0:0", "[::]:8785", "192.0.2.1:8785"] {
        let output = Command::new(asched_binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir.join("data"))
            .arg("--registration")
            .arg(&regs)
            .arg("--secret-file")
            .arg(&secret_file)
            .args(["--listen", listen])
            .env("RUST_LOG", "warn")
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{listen}: {stderr}");
        assert!(output.stdout.is_empty(), "{listen}");
        let expected = format!(
            "error: invalid value '{listen}' for '--listen <LISTEN>': \"{listen}\" is not a loopback address; the sidecar API only listens on 127.0.0.1, ::1 or a Unix socket\n"
        );
        assert!(stderr.starts_with(&expected), "{listen}: {stderr}");
        assert!(
            !data_dir.join("data").exists(),
            "nothing is created for a refused start"
        );
    }
}
