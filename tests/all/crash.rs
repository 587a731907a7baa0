//! Registrations and startup errors through the binary, and the `serve` process killed with
//! SIGKILL while it delivers.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use asched_tests::{
    Receiver, Reply, Serve, TempDir, api_client_builder, event, registration_yaml, temp_dir,
    wait_for_exit,
};
use serde_json::{Value, json};

use crate::asched_binary;

/// Runs the binary with `args`, logging only warnings; it must end within 10 s (a `serve`
/// that should have refused to start is killed, and the test fails).
fn run(args: &[&std::ffi::OsStr]) -> Output {
    let child = Command::new(asched_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    wait_for_exit(child, Duration::from_secs(10), "still running after 10 s")
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
fn folder(name: &str, files: &[(&str, String)]) -> TempDir {
    let dir = temp_dir(name);
    for (file, text) in files {
        std::fs::write(dir.join(file), text).expect("the temp folder is writable");
    }
    dir
}

/// Every bad file of a folder is named in one run, each with its field; the good ones are not.
#[test]
fn check_registrations_names_every_bad_file_of_a_folder() {
    let base = good("bridge");
    let dir = folder(
        "check-several",
        &[
            ("a.yaml", base.replace("id: bridge", "id: 42")),
            ("b.yaml", good("fine")),
            ("c.yaml", base.replace("as_token: as-token-bridge\n", "")),
        ],
    );
    assert_fails_with(
        &check_registrations(&dir),
        &format!(
            "2 registration files are not valid:\n  {}: field `id` must be a string, found a \
             number\n  {}: missing required field `as_token`",
            dir.join("a.yaml").display(),
            dir.join("c.yaml").display()
        ),
    );
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
    assert!(stderr.contains("    @bridge_(.*:example.org\n"), "{stderr}");
    assert!(!stderr.contains("^(?:"), "{stderr}");
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

/// Logs that go to a pipe or a file are plain text: no terminal colour codes.
#[test]
fn logs_not_written_to_a_terminal_have_no_colour_codes() {
    let dir = temp_dir("demo-plain-logs");
    let data = dir.join("demo-data");
    let output = run(&["demo".as_ref(), "--data-dir".as_ref(), data.as_os_str()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(" WARN asched::plugin: "), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with(
            "asched demo: 600 events (108 in no appservice's namespaces), 3 appservices, \
             receiver at http://127.0.0.1:"
        ),
        "{stdout}"
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
    let no_secret = temp_dir("refused-no-secret");
    let secret_file = no_secret.join("missing-secret");
    let output = run(&[
        "serve".as_ref(),
        "--data-dir".as_ref(),
        no_secret.join("store").as_os_str(),
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

/// A `--data-dir` that names a file is refused, and the error says so.
#[test]
fn serve_refuses_a_data_dir_that_is_a_file() {
    let dir = folder("serve-data-file", &[("a.yaml", good("fine"))]);
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "test-secret-0123456789abcdef").expect("writable");
    let not_a_folder = dir.join("a.yaml");
    let output = run(&[
        "serve".as_ref(),
        "--data-dir".as_ref(),
        not_a_folder.as_os_str(),
        "--registration".as_ref(),
        not_a_folder.as_os_str(),
        "--secret-file".as_ref(),
        secret_file.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]);
    assert_fails_with(
        &output,
        &format!(
            "the data folder {} is a file, not a folder",
            not_a_folder.display()
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

/// One batch as posted: its event numbers and the requests for it that failed.
#[derive(Clone, Debug)]
struct Batch {
    events: Vec<usize>,
    /// The generations of the serve processes that died with a request for this batch sent
    /// and unanswered: each may have stored the batch before it died.
    lost: Vec<u64>,
    /// Requests that found no process listening (nothing was sent).
    refused: u32,
}

/// The API of the serve process now running: its generation (0, then one more per restart)
/// and its URL.
type Current = tokio::sync::watch::Receiver<(u64, String)>;

const SECRET: &str = "test-secret-0123456789abcdef";

/// Posts every batch in order, each until it is answered 200; a request that fails is posted
/// again once the next serve process listens.
async fn post_all(
    appservice: String,
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
                Err(error) => {
                    if error.is_connect() {
                        batch.refused += 1;
                    } else {
                        batch.lost.push(generation);
                    }
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

/// Checks that `delivered` is every batch in order, each once, except that a batch may follow
/// itself once more per request for it that a dying process left unanswered (it may have been
/// stored before the process died, and was posted again). Returns how many batches arrived
/// twice.
fn assert_batches_in_order(appservice: &str, delivered: &[String], batches: &[Batch]) -> usize {
    let mut at = 0;
    let mut duplicates = 0;
    for (i, batch) in batches.iter().enumerate() {
        let ids: Vec<String> = batch.events.iter().map(|n| format!("$e{n}")).collect();
        let mut copies = 0;
        while copies <= batch.lost.len() && delivered[at..].starts_with(&ids) {
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
    duplicates
}

/// What a [`counting_receiver`] has read so far, cheap to look at while a run is under way.
#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    /// Distinct events.
    events: AtomicUsize,
}

/// An appservice that answers `200 {}` after `delay`, and counts what it reads.
async fn counting_receiver(delay: Duration) -> (Receiver, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let counted = counts.clone();
    let mut seen = HashSet::new();
    let receiver = Receiver::start(move |requests| {
        let request = requests.last().expect("the current request is last");
        let new = request
            .event_ids
            .iter()
            .filter(|id| seen.insert((*id).clone()))
            .count();
        counted.events.fetch_add(new, Ordering::SeqCst);
        counted.requests.store(requests.len(), Ordering::SeqCst);
        Reply::Respond {
            status: 200,
            content_type: Some("application/json"),
            body: "{}",
            delay,
        }
    })
    .await;
    (receiver, counts)
}

/// `count` points in `low..=high`, sorted, at least `gap` apart, drawn uniformly among all
/// such sets.
fn spread_points(rng: &mut Rng, count: usize, low: usize, high: usize, gap: usize) -> Vec<usize> {
    let slack = (high - low)
        .checked_sub(count.saturating_sub(1) * gap)
        .expect("the points fit in the range");
    let mut points: Vec<usize> = (0..count)
        .map(|_| rng.range(0, slack as u64) as usize)
        .collect();
    points.sort_unstable();
    points
        .iter()
        .enumerate()
        .map(|(i, p)| low + p + i * gap)
        .collect()
}

/// The shape of one crash run.
struct CrashRun {
    /// The test's name, for the line that repeats a run.
    name: &'static str,
    /// Appservices that answer at once; one more answers each request after `slow_delay`.
    fast: usize,
    slow_delay: Duration,
    events_per_appservice: usize,
    /// Each batch posted holds 1 to this many events.
    max_batch: u64,
    /// `--max-events-per-txn` of the serve process.
    max_events_per_txn: u32,
    /// How many times the serve process is killed while events are being posted.
    posting_kills: usize,
    /// The least progress (events acknowledged plus delivered) between two of those.
    kill_gap: usize,
    /// How many times it is killed once every batch is acknowledged, while the backlog drains.
    draining_kills: usize,
    /// The least number of kills that interrupted work: a post was left unanswered, or the
    /// transaction the killed process had sent last was sent again by the next one.
    interrupted_kills: usize,
    /// The least number of posts that dying processes left unanswered.
    unanswered_posts: usize,
    /// Everything (posting, kills, draining) ends within this.
    deadline: Duration,
}

/// What a kill found and left.
struct Kill {
    /// The generation of the process killed.
    generation: u64,
    acknowledged: usize,
    delivered: usize,
    /// Requests each receiver had read when the process was dead.
    requests_before: Vec<usize>,
}

/// Runs `run`: appservices (the last one slow) behind one serve process on a real SQLite file,
/// every event posted through the API in random batches by one task per appservice, the
/// process killed with SIGKILL at random points of progress and restarted on the same data
/// folder each time. Then: every acknowledged event arrived, in order per appservice; only a
/// batch whose post a dying process left unanswered may arrive twice; a txn id never carries
/// two bodies and never comes back once the next one is sent; the kills interrupted work.
async fn crash_run(run: CrashRun) {
    let seed = std::env::var("ASCHED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(asched_host::runtime::random_u64);
    println!(
        "crash test seed {seed} (ASCHED_CRASH_SEED={seed} cargo test -p asched-tests --test all crash::{} repeats this run)",
        run.name
    );
    let mut rng = Rng(seed);

    let mut receivers = Vec::new();
    for k in 0..run.fast {
        receivers.push((
            format!("fast{}", k + 1),
            counting_receiver(Duration::ZERO).await,
        ));
    }
    receivers.push(("slow".to_owned(), counting_receiver(run.slow_delay).await));
    let regs = temp_dir("crash-registrations");
    for (id, (receiver, _)) in &receivers {
        std::fs::write(
            regs.join(format!("{id}.yaml")),
            registration_yaml(id, Some(&receiver.url())),
        )
        .expect("the registration can be written");
    }
    let data_dir = temp_dir("crash");
    let start = {
        let (data_dir, regs) = (data_dir.to_path_buf(), regs.to_path_buf());
        let cap = run.max_events_per_txn.to_string();
        move || {
            let args = [
                "--max-events-per-txn",
                cap.as_str(),
                "--request-timeout-ms",
                "5000",
            ];
            Serve::start(&asched_binary(), &data_dir, &regs, &args)
        }
    };
    let began = Instant::now();
    let deadline = began + run.deadline;
    let serve = tokio::task::spawn_blocking(start.clone())
        .await
        .expect("started");
    assert_eq!(serve.secret, SECRET);
    let (publish, current) = tokio::sync::watch::channel((0u64, serve.url()));
    let mut running = Running(Some(serve));

    let events = receivers.len() * run.events_per_appservice;
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (k, (id, _)) in receivers.iter().enumerate() {
        let mut batches = Vec::new();
        let mut next = k * run.events_per_appservice;
        let end = next + run.events_per_appservice;
        while next < end {
            let size = (rng.range(1, run.max_batch) as usize).min(end - next);
            batches.push(Batch {
                events: (next..next + size).collect(),
                lost: Vec::new(),
                refused: 0,
            });
            next += size;
        }
        tasks.push(tokio::spawn(post_all(
            id.clone(),
            batches,
            current.clone(),
            acknowledged.clone(),
            rng.next(),
        )));
    }

    // Kill points in progress: events acknowledged plus distinct events delivered, over all
    // appservices. The first ones are spread from 5 % to 95 % of the number of events: progress
    // is below it only while some events are not yet acknowledged, so these fall while posting.
    // The others are spread over the first 90 % of the progress still to come once every batch
    // is acknowledged (given here in millionths of it), while the backlog drains.
    let total = 2 * events;
    let posting_points = spread_points(
        &mut rng,
        run.posting_kills,
        events / 20,
        events * 19 / 20,
        run.kill_gap,
    );
    let draining_shares = spread_points(
        &mut rng,
        run.draining_kills,
        0,
        900_000,
        450_000 / run.draining_kills.max(1),
    );
    println!(
        "killing at progress {posting_points:?} of {total} while posting, and at {draining_shares:?} millionths of the rest while draining"
    );
    let delivered = || -> usize {
        receivers
            .iter()
            .map(|(_, (_, counts))| counts.events.load(Ordering::SeqCst))
            .sum()
    };
    let progress = || acknowledged.load(Ordering::SeqCst) + delivered();
    let mut kills = Vec::new();
    let mut points = VecDeque::from(posting_points);
    let mut draining = Some(draining_shares);
    let mut posted = Vec::new();
    loop {
        let Some(point) = points.pop_front() else {
            let Some(shares) = draining.take() else {
                break;
            };
            for task in std::mem::take(&mut tasks) {
                let joined = tokio::time::timeout_at(deadline.into(), task)
                    .await
                    .expect("posting ends before the deadline");
                posted.push(joined.expect("every batch is posted"));
            }
            let from = progress();
            assert!(
                from < total,
                "everything was delivered before the first kill while draining"
            );
            points = shares
                .iter()
                .map(|share| from + (total - from) * share / 1_000_000)
                .collect();
            println!(
                "every batch posted after {:?}, at progress {from}; killing at {points:?}",
                began.elapsed()
            );
            continue;
        };
        while progress() < point {
            assert!(
                Instant::now() < deadline,
                "stalled at progress {}",
                progress()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        running.0.take().expect("a serve process runs").kill();
        let killed = Instant::now();
        let kill = Kill {
            generation: kills.len() as u64,
            acknowledged: acknowledged.load(Ordering::SeqCst),
            delivered: delivered(),
            requests_before: receivers
                .iter()
                .map(|(_, (_, counts))| counts.requests.load(Ordering::SeqCst))
                .collect(),
        };
        let serve = tokio::task::spawn_blocking(start.clone())
            .await
            .expect("restarted");
        println!(
            "kill {}: {} events acknowledged and {} delivered, {:?} after the start; restarted in {:?}",
            kill.generation + 1,
            kill.acknowledged,
            kill.delivered,
            killed - began,
            killed.elapsed()
        );
        publish.send_replace((kill.generation + 1, serve.url()));
        kills.push(kill);
        running.0 = Some(serve);
    }

    for ((id, (_, counts)), batches) in receivers.iter().zip(&posted) {
        let expected: usize = batches.iter().map(|b| b.events.len()).sum();
        assert_eq!(expected, run.events_per_appservice);
        while counts.events.load(Ordering::SeqCst) < expected {
            assert!(
                Instant::now() < deadline,
                "{id}: {} of {expected} events delivered",
                counts.events.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Let anything still in flight arrive before the final count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drained = began.elapsed();

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
    let statuses = status["appservices"].as_array().expect("a list");
    assert_eq!(statuses.len(), receivers.len(), "{status}");
    for s in statuses {
        assert_eq!(s["backlog_events"], 0, "{s}");
        assert_eq!(s["state"], "up", "{s}");
    }

    // How many txn ids each kill left to be sent again, and posts it left unanswered.
    let mut resent_across = vec![0usize; kills.len()];
    let mut lost_by = vec![0usize; kills.len()];
    for batches in &posted {
        for generation in batches.iter().flat_map(|b| &b.lost) {
            lost_by[*generation as usize] += 1;
        }
    }
    for (r, ((id, (receiver, _)), batches)) in receivers.iter().zip(&posted).enumerate() {
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
        let distinct: BTreeSet<&str> = runs.iter().copied().collect();
        assert_eq!(
            runs.len(),
            distinct.len(),
            "{id}: a txn id came back later: {runs:?}"
        );
        // Every answer is a 200, so a txn id is sent again only because a kill cut its send
        // short: at most once per kill.
        assert!(
            resent <= kills.len(),
            "{id}: {resent} txns sent again after {} kills",
            kills.len()
        );
        for (k, kill) in kills.iter().enumerate() {
            let (before, after) = requests.split_at(kill.requests_before[r]);
            if let Some(last) = before.last()
                && after.iter().any(|request| request.txn_id == last.txn_id)
            {
                resent_across[k] += 1;
            }
        }
        let duplicates = assert_batches_in_order(id, &receiver.processed_event_ids(), batches);
        let lost: usize = batches.iter().map(|b| b.lost.len()).sum();
        let refused: u32 = batches.iter().map(|b| b.refused).sum();
        println!(
            "{id}: {} requests, {} txn ids, {resent} resent under their id, {lost} posts unanswered and {refused} refused, {duplicates} batches stored twice",
            requests.len(),
            bodies.len()
        );
    }

    let posting = kills.iter().filter(|k| k.acknowledged < events).count();
    let interrupted = (0..kills.len())
        .filter(|&k| lost_by[k] > 0 || resent_across[k] > 0)
        .count();
    let unanswered: usize = lost_by.iter().sum();
    println!(
        "{} kills, {posting} while posting, {} while draining; per kill, posts left unanswered {lost_by:?} and txns sent again {resent_across:?}; {interrupted} kills interrupted work",
        kills.len(),
        kills.len() - posting
    );
    assert_eq!(
        (posting, kills.len() - posting),
        (run.posting_kills, run.draining_kills)
    );
    assert!(
        interrupted >= run.interrupted_kills,
        "only {interrupted} kills interrupted work; at least {} should",
        run.interrupted_kills
    );
    assert!(
        unanswered >= run.unanswered_posts,
        "only {unanswered} posts were left unanswered; at least {} should",
        run.unanswered_posts
    );
    println!(
        "{events} events drained after {drained:?}, done in {:?}",
        began.elapsed()
    );
}

/// Three appservices (one answers in 30 ms), 3000 events posted through the API in batches of
/// 1 to 50, the serve process killed with SIGKILL twice while posting and once while draining,
/// and restarted on the same data folder each time. Every acknowledged event arrives, in order
/// per appservice; a txn id never carries two bodies; only batches whose post was left
/// unanswered may arrive twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_delivery_loses_and_reorders_nothing() {
    crash_run(CrashRun {
        name: "sigkill_during_delivery_loses_and_reorders_nothing",
        fast: 2,
        slow_delay: Duration::from_millis(30),
        events_per_appservice: 1000,
        max_batch: 50,
        max_events_per_txn: 20,
        posting_kills: 2,
        kill_gap: 300,
        draining_kills: 1,
        interrupted_kills: 2,
        unanswered_posts: 0,
        deadline: Duration::from_secs(15),
    })
    .await;
}

/// The same under load: five appservices (one answers in 30 ms), 50,000 events in batches of
/// 1 to 100, the serve process killed with SIGKILL 24 times, 12 while posting and 12 while
/// the backlog drains; at least 18 of the kills must catch a post or a transaction in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_24_times_under_load_loses_and_reorders_nothing() {
    crash_run(CrashRun {
        name: "sigkill_24_times_under_load_loses_and_reorders_nothing",
        fast: 4,
        slow_delay: Duration::from_millis(30),
        events_per_appservice: 10_000,
        max_batch: 100,
        max_events_per_txn: 50,
        posting_kills: 12,
        kill_gap: 1500,
        draining_kills: 12,
        interrupted_kills: 18,
        unanswered_posts: 3,
        deadline: Duration::from_secs(90),
    })
    .await;
}
