//! Registrations and startup errors through the binary, and the `serve` process killed with
//! SIGKILL while it delivers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use asched_tests::{
    Receiver, Reply, Serve, api_client_builder, event, registration_yaml, temp_dir,
};
use serde_json::{Value, json};

use crate::asched_binary;

/// Runs the binary with `args`, logging only warnings; it must end within 10 s (a `serve`
/// that should have refused to start is killed, and the test fails).
fn run(args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(asched_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child
        .try_wait()
        .expect("the child can be waited for")
        .is_none()
    {
        if Instant::now() > deadline {
            child.kill().expect("the child can be killed");
            let output = child.wait_with_output().expect("the child ends");
            panic!(
                "still running after 10 s: {}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("the output is read")
}

fn check_registrations(path: &Path) -> Output {
    run(&["check-registrations".as_ref(), path.as_os_str()])
}

/// Asserts exit code 1 and that stderr is `error: <expected>` and nothing else.
fn assert_fails_with(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr, format!("error: {expected}\n"));
}

/// A valid registration file as bridges ship them.
fn good(id: &str) -> String {
    registration_yaml(id, Some("http://127.0.0.1:9001/"))
}

/// A folder holding `files` (name, content).
fn folder(name: &str, files: &[(&str, String)]) -> PathBuf {
    let dir = temp_dir(name);
    for (file, text) in files {
        std::fs::write(dir.join(file), text).expect("the temp folder is writable");
    }
    dir
}

/// Each kind of error in one file is refused with exit code 1, naming the file and the field.
#[test]
fn check_registrations_names_the_file_and_field_of_each_error() {
    let base = good("bridge");
    let cases = [
        (
            base.replace("as_token: as-token-bridge\n", ""),
            "missing required field `as_token`",
        ),
        (
            base.replace("namespaces:", "namespace:"),
            "missing required field `namespaces`",
        ),
        (
            base.replace("id: bridge", "id: 42"),
            "field `id` must be a string, found a number",
        ),
        (
            base.replace("hs_token: hs-token-bridge", "hs_token: [a, b]"),
            "field `hs_token` must be a string, found a list",
        ),
        (
            base.replace("exclusive: true", "exclusive: \"true\""),
            "field `namespaces.users[0].exclusive` must be true or false, found a string",
        ),
        (
            format!("{base}rate_limited: 1\n"),
            "field `rate_limited` must be true or false, found a number",
        ),
        (
            base.replace("url: \"http://127.0.0.1:9001/\"\n", ""),
            "missing required field `url` (write `url: null` for an appservice that receives no traffic)",
        ),
        (
            base.replace("\"http://127.0.0.1:9001/\"", "\"127.0.0.1:9001\""),
            "field `url` must be an http:// or https:// URL, found \"127.0.0.1:9001\"",
        ),
        (
            base.replace("url: \"http://127.0.0.1:9001/\"", "url: 9001"),
            "field `url` must be a string or null, found a number",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let dir = folder(&format!("check-{i}"), &[("bridge.yaml", text.clone())]);
        let file = dir.join("bridge.yaml");
        assert_fails_with(
            &check_registrations(&dir),
            &format!("{}: {expected}", file.display()),
        );
        // The file named directly gives the same answer.
        assert_fails_with(
            &check_registrations(&file),
            &format!("{}: {expected}", file.display()),
        );
    }

    // A regular expression the regex crate does not accept: the message carries its reason.
    let text = base.replace("'@bridge_.*:example.org'", "'@bridge_(.*:example.org'");
    let dir = folder("check-regex", &[("bridge.yaml", text)]);
    let output = check_registrations(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "error: {}: field `namespaces.users[0].regex` is not a supported regular expression: regex parse error:",
        dir.join("bridge.yaml").display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert!(stderr.contains("unclosed group"), "{stderr}");
}

/// Two files may not share an `id` or an `as_token`; the error names both files.
#[test]
fn check_registrations_refuses_duplicates_across_files() {
    let second = good("bridge").replace("as-token-bridge", "as-token-other");
    let dir = folder(
        "check-dup-id",
        &[("a.yaml", good("bridge")), ("b.yaml", second)],
    );
    assert_fails_with(
        &check_registrations(&dir),
        &format!(
            "{}: field `id` \"bridge\" is already used by {}",
            dir.join("b.yaml").display(),
            dir.join("a.yaml").display()
        ),
    );

    let second = good("other").replace("as-token-other", "as-token-bridge");
    let dir = folder(
        "check-dup-token",
        &[("a.yaml", good("bridge")), ("b.yaml", second)],
    );
    assert_fails_with(
        &check_registrations(&dir),
        &format!(
            "{}: field `as_token` is already used by {} (every appservice needs its own)",
            dir.join("b.yaml").display(),
            dir.join("a.yaml").display()
        ),
    );

    // Across two paths given separately, too.
    let one = folder("check-dup-one", &[("x.yaml", good("bridge"))]);
    let two = folder(
        "check-dup-two",
        &[(
            "y.yml",
            good("bridge").replace("as-token-bridge", "as-token-y"),
        )],
    );
    let output = run(&[
        "check-registrations".as_ref(),
        one.as_os_str(),
        two.as_os_str(),
    ]);
    assert_fails_with(
        &output,
        &format!(
            "{}: field `id` \"bridge\" is already used by {}",
            two.join("y.yml").display(),
            one.join("x.yaml").display()
        ),
    );
}

/// A valid folder: one line per file and a summary, exit code 0. An empty folder is an error.
#[test]
fn check_registrations_summarises_a_valid_folder() {
    let silent = registration_yaml("silent", None);
    let dir = folder(
        "check-valid",
        &[
            ("bridge.yaml", good("bridge")),
            ("silent.yml", silent),
            ("notes.txt", "not a registration".into()),
        ],
    );
    let output = check_registrations(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "{}: id \"bridge\", url http://127.0.0.1:9001, 1 user / 0 alias / 0 room namespaces\n\
             {}: id \"silent\", url null (no traffic), 1 user / 0 alias / 0 room namespaces\n\
             2 registrations, all valid\n",
            dir.join("bridge.yaml").display(),
            dir.join("silent.yml").display()
        )
    );

    let empty = temp_dir("check-empty");
    assert_fails_with(
        &check_registrations(&empty),
        &format!("no registration files found in {}", empty.display()),
    );
}

/// Runs `serve` with a registration folder and a secret; it is expected to refuse to start.
/// Returns its output and the secret file.
fn serve_refusing(registrations: &Path, secret: &str) -> (Output, PathBuf) {
    let data_dir = temp_dir("refused-data");
    let secret_file = data_dir.join("secret");
    std::fs::write(&secret_file, secret).expect("the secret can be written");
    let output = run(&[
        "serve".as_ref(),
        "--data-dir".as_ref(),
        data_dir.join("store").as_os_str(),
        "--registration".as_ref(),
        registrations.as_os_str(),
        "--secret-file".as_ref(),
        secret_file.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]);
    assert!(
        !data_dir.join("store").exists(),
        "a refused start creates no store"
    );
    (output, secret_file)
}

/// `serve` with a bad registration or a short secret exits 1 before it listens.
#[test]
fn serve_refuses_a_bad_registration_or_a_short_secret() {
    let secret = "test-secret-0123456789abcdef";
    let bad = good("broken").replace("sender_localpart: brokenbot\n", "");
    let dir = folder(
        "serve-bad",
        &[("a.yaml", good("fine")), ("broken.yaml", bad)],
    );
    let (output, _) = serve_refusing(&dir, secret);
    assert_fails_with(
        &output,
        &format!(
            "{}: missing required field `sender_localpart`",
            dir.join("broken.yaml").display()
        ),
    );
    assert!(output.stdout.is_empty(), "it never listened");

    let dup = good("fine").replace("as-token-fine", "as-token-again");
    let dir = folder("serve-dup", &[("a.yaml", good("fine")), ("b.yaml", dup)]);
    let (output, _) = serve_refusing(&dir, secret);
    assert_fails_with(
        &output,
        &format!(
            "{}: field `id` \"fine\" is already used by {}",
            dir.join("b.yaml").display(),
            dir.join("a.yaml").display()
        ),
    );

    // 15 characters once trimmed, though the file itself is longer.
    let dir = folder("serve-secret", &[("a.yaml", good("fine"))]);
    let (output, secret_file) = serve_refusing(&dir, "  0123456789abcde  \n");
    assert_fails_with(
        &output,
        &format!(
            "{}: the secret must be at least 16 characters",
            secret_file.display()
        ),
    );
    assert!(output.stdout.is_empty(), "it never listened");

    // A missing secret file is named too.
    let secret_file = temp_dir("refused-no-secret").join("missing-secret");
    let output = run(&[
        "serve".as_ref(),
        "--data-dir".as_ref(),
        temp_dir("refused-no-secret").join("store").as_os_str(),
        "--registration".as_ref(),
        dir.as_os_str(),
        "--secret-file".as_ref(),
        secret_file.as_os_str(),
    ]);
    assert_fails_with(
        &output,
        &format!(
            "cannot read the secret file {}: No such file or directory (os error 2)",
            secret_file.display()
        ),
    );
}

/// SplitMix64: a small seeded generator so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// Kills the serve process when the test ends, also when it fails.
struct Running(Option<Serve>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(serve) = self.0.take() {
            serve.kill();
        }
    }
}

/// One batch as posted: its event numbers and how many of its requests failed.
#[derive(Clone, Debug)]
struct Batch {
    events: Vec<usize>,
    failed_posts: u32,
}

/// The API of the serve process now running: its generation (0, then one more per restart)
/// and its URL.
type Current = tokio::sync::watch::Receiver<(u64, String)>;

const SECRET: &str = "test-secret-0123456789abcdef";

/// Posts every batch in order, each until it is answered 200; a request that fails is posted
/// again once the next serve process listens.
async fn post_all(
    appservice: &'static str,
    mut batches: Vec<Batch>,
    mut current: Current,
    acknowledged: Arc<AtomicUsize>,
    seed: u64,
) -> Vec<Batch> {
    let client = api_client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("the client builds");
    let mut rng = Rng(seed);
    for batch in &mut batches {
        let body = format!(
            "{{\"events\":[{}]}}",
            batch
                .events
                .iter()
                .map(|&n| event(n))
                .collect::<Vec<_>>()
                .join(",")
        );
        loop {
            let (generation, url) = current.borrow_and_update().clone();
            let sent = client
                .post(format!("{url}/_asched/v1/appservices/{appservice}/events"))
                .bearer_auth(SECRET)
                .body(body.clone())
                .send()
                .await;
            let answer = match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    response.text().await.map(|text| (status, text))
                }
                Err(error) => Err(error),
            };
            match answer {
                Ok((200, text)) => {
                    let answer: Value = serde_json::from_str(&text).expect("a JSON answer");
                    assert_eq!(answer, json!({ "accepted": batch.events.len() }));
                    acknowledged.fetch_add(batch.events.len(), Ordering::SeqCst);
                    break;
                }
                Ok((status, text)) => panic!("{appservice}: a batch was answered {status} {text}"),
                Err(_) => {
                    batch.failed_posts += 1;
                    current
                        .wait_for(|(g, _)| *g > generation)
                        .await
                        .expect("the test keeps a serve process running");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, 10))).await;
    }
    batches
}

/// Checks that `delivered` is every batch in order, each once, except that a batch whose post
/// failed may follow itself once more per failed post (it may have been stored before the
/// process died, and was posted again).
fn assert_batches_in_order(appservice: &str, delivered: &[String], batches: &[Batch]) -> usize {
    let mut at = 0;
    let mut duplicates = 0;
    for (i, batch) in batches.iter().enumerate() {
        let ids: Vec<String> = batch.events.iter().map(|n| format!("$e{n}")).collect();
        let mut copies = 0;
        while copies <= batch.failed_posts && delivered[at..].starts_with(&ids) {
            at += ids.len();
            copies += 1;
        }
        assert!(
            copies >= 1,
            "{appservice}: batch {i} {batch:?} is not delivered at position {at}; found {:?}",
            &delivered[at..delivered.len().min(at + ids.len())]
        );
        duplicates += copies - 1;
    }
    assert_eq!(
        at,
        delivered.len(),
        "{appservice}: events beyond the batches posted: {:?}",
        &delivered[at..]
    );
    duplicates as usize
}

const EVENTS_PER_APPSERVICE: usize = 1000;

/// Three appservices (one answers in 30 ms), 3000 events posted through the API, the serve
/// process killed with SIGKILL at three random points of delivery and restarted on the same
/// data folder. Every acknowledged event arrives, in order per appservice; a txn id never
/// carries two bodies; only batches whose post failed may arrive twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_delivery_loses_and_reorders_nothing() {
    let seed = std::env::var("ASCHED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(asched_host::runtime::random_u64);
    println!("crash test seed {seed} (ASCHED_CRASH_SEED={seed} repeats this run)");
    let mut rng = Rng(seed);

    let slow_reply = Reply::Respond {
        status: 200,
        content_type: Some("application/json"),
        body: "{}",
        delay: Duration::from_millis(30),
    };
    let receivers = [
        ("fast1", Receiver::healthy().await),
        ("fast2", Receiver::healthy().await),
        ("slow", Receiver::start(move |_| slow_reply.clone()).await),
    ];
    let regs = temp_dir("crash-registrations");
    for (id, receiver) in &receivers {
        std::fs::write(
            regs.join(format!("{id}.yaml")),
            registration_yaml(id, Some(&receiver.url())),
        )
        .expect("the registration can be written");
    }
    let data_dir = temp_dir("crash");
    let start = {
        let (data_dir, regs) = (data_dir.clone(), regs.clone());
        move || {
            let args = ["--max-events-per-txn", "20", "--request-timeout-ms", "5000"];
            Serve::start(&asched_binary(), &data_dir, &regs, &args)
        }
    };
    let began = Instant::now();
    let serve = tokio::task::spawn_blocking(start.clone())
        .await
        .expect("started");
    assert_eq!(serve.secret, SECRET);
    let (publish, current) = tokio::sync::watch::channel((0u64, serve.url()));
    let mut running = Running(Some(serve));

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (k, (id, _)) in receivers.iter().enumerate() {
        let mut batches = Vec::new();
        let mut next = k * EVENTS_PER_APPSERVICE;
        let end = next + EVENTS_PER_APPSERVICE;
        while next < end {
            let size = (rng.range(1, 50) as usize).min(end - next);
            batches.push(Batch {
                events: (next..next + size).collect(),
                failed_posts: 0,
            });
            next += size;
        }
        tasks.push(tokio::spawn(post_all(
            id,
            batches,
            current.clone(),
            acknowledged.clone(),
            rng.next(),
        )));
    }

    // Three kill points in progress (events acknowledged plus events delivered, over all
    // appservices), at least 300 apart: most fall while events are still being posted.
    let total = 2 * receivers.len() * EVENTS_PER_APPSERVICE;
    let kill_points = loop {
        let mut points: Vec<usize> = (0..3)
            .map(|_| rng.range(total as u64 / 20, total as u64 * 9 / 10) as usize)
            .collect();
        points.sort_unstable();
        if points.windows(2).all(|w| w[1] - w[0] >= 300) {
            break points;
        }
    };
    println!("killing at progress {kill_points:?} of {total}");
    let delivered = || -> usize {
        receivers
            .iter()
            .map(|(_, r)| r.processed_event_ids().len())
            .sum()
    };
    let progress = || acknowledged.load(Ordering::SeqCst) + delivered();
    let deadline = Instant::now() + Duration::from_secs(15);
    for (generation, point) in (1u64..).zip(&kill_points) {
        while progress() < *point {
            assert!(
                Instant::now() < deadline,
                "stalled at progress {}",
                progress()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        running.0.take().expect("a serve process runs").kill();
        let killed = Instant::now();
        println!(
            "killed with {} events acknowledged and {} delivered, {:?} after the start",
            acknowledged.load(Ordering::SeqCst),
            delivered(),
            began.elapsed()
        );
        let serve = tokio::task::spawn_blocking(start.clone())
            .await
            .expect("restarted");
        println!("restarted in {:?}", killed.elapsed());
        publish.send_replace((generation, serve.url()));
        running.0 = Some(serve);
    }

    let mut posted = Vec::new();
    for task in tasks {
        let joined = tokio::time::timeout_at(deadline.into(), task)
            .await
            .expect("posting ends before the deadline");
        posted.push(joined.expect("every batch is posted"));
    }
    for ((id, receiver), batches) in receivers.iter().zip(&posted) {
        let expected: usize = batches.iter().map(|b| b.events.len()).sum();
        assert_eq!(expected, EVENTS_PER_APPSERVICE);
        loop {
            let ids = receiver.processed_event_ids();
            let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
            if unique.len() >= expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: {} of {expected} events delivered",
                unique.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Let anything still in flight arrive before the final count.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = api_client_builder().build().expect("the client builds");
    let url = running.0.as_ref().expect("a serve process runs").url();
    let status = client
        .get(format!("{url}/_asched/v1/status"))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("the API answers")
        .bytes()
        .await
        .expect("the answer is read");
    let status: Value = serde_json::from_slice(&status).expect("a JSON status");
    for s in status["appservices"].as_array().expect("a list") {
        assert_eq!(s["backlog_events"], 0, "{s}");
        assert_eq!(s["state"], "up", "{s}");
    }

    for ((id, receiver), batches) in receivers.iter().zip(&posted) {
        let requests = receiver.requests();
        let mut bodies: BTreeMap<&str, &[u8]> = BTreeMap::new();
        let mut resent = 0;
        for request in &requests {
            if let Some(earlier) = bodies.insert(&request.txn_id, &request.body) {
                resent += 1;
                assert!(
                    earlier == request.body.as_slice(),
                    "{id}: txn {} carried two bodies:\n{}\n{}",
                    request.txn_id,
                    String::from_utf8_lossy(earlier),
                    String::from_utf8_lossy(&request.body)
                );
            }
            assert_eq!(
                request.authorization.as_deref(),
                Some(format!("Bearer hs-token-{id}").as_str())
            );
        }
        // One transaction is in flight at a time: once the next one is sent, a txn id is
        // never sent again, whatever restarts happened.
        let mut runs: Vec<&str> = requests.iter().map(|r| r.txn_id.as_str()).collect();
        runs.dedup();
        let distinct: std::collections::BTreeSet<&str> = runs.iter().copied().collect();
        assert_eq!(
            runs.len(),
            distinct.len(),
            "{id}: a txn id came back later: {runs:?}"
        );
        let duplicates = assert_batches_in_order(id, &receiver.processed_event_ids(), batches);
        let failed: u32 = batches.iter().map(|b| b.failed_posts).sum();
        println!(
            "{id}: {} requests, {} txn ids, {resent} resent under their id, {failed} failed posts, {duplicates} batches stored twice",
            requests.len(),
            bodies.len()
        );
    }
    println!("done in {:?}", began.elapsed());
}
