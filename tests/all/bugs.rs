//! Field failures, each reproduced through the real component, a real SQLite file and real HTTP
//! on 127.0.0.1: retries that need no new traffic, batch sizes after an outage, timeouts, one
//! appservice stalling another, txn ids across batches, lost stores and re-registrations, odd
//! success answers, query-string auth, answers lost after processing, a stop with a send in
//! flight, and what the status of a DOWN appservice says.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asched_host::AppserviceStatus;
use asched_host::engine::SchedulerConfig;
use asched_host::registration::{self, Registration};
use asched_tests::{
    Receiver, Reply, Request, TestHost, event, fast_retries, ids, registration, registration_yaml,
    temp_dir,
};

/// The longest any single wait of these tests may take before it fails.
const WAIT: Duration = Duration::from_secs(5);

/// One answer a scripted appservice chose, and when.
#[derive(Clone, Debug)]
struct Answer {
    /// When the script chose it (the request had been read).
    at: Instant,
    /// The request.
    request: Request,
    /// The status sent, or `None` for a hang or a dropped connection.
    status: Option<u16>,
}

/// Every answer of one scripted appservice, in order.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<Vec<Answer>>>);

impl Answers {
    /// Wraps `script` so that every answer it chooses is recorded here.
    fn record(
        &self,
        mut script: impl FnMut(&[Request]) -> Reply + Send + 'static,
    ) -> impl FnMut(&[Request]) -> Reply + Send + 'static {
        let log = self.0.clone();
        move |requests| {
            let reply = script(requests);
            let status = match &reply {
                Reply::Respond { status, .. } => Some(*status),
                Reply::Hang | Reply::Drop => None,
            };
            let request = requests
                .last()
                .expect("the current request is last")
                .clone();
            log.lock().expect("answers lock").push(Answer {
                at: Instant::now(),
                request,
                status,
            });
            reply
        }
    }

    /// Every answer so far.
    fn all(&self) -> Vec<Answer> {
        self.0.lock().expect("answers lock").clone()
    }

    /// The requests answered with 2xx, in order.
    fn accepted(&self) -> Vec<Request> {
        self.all()
            .into_iter()
            .filter(|a| matches!(a.status, Some(200..=299)))
            .map(|a| a.request)
            .collect()
    }
}

/// `200 {}` after `delay`.
fn ok_after(delay: Duration) -> Reply {
    Reply::Respond {
        status: 200,
        content_type: Some("application/json"),
        body: "{}",
        delay,
    }
}

/// An address on 127.0.0.1 where nothing listens: a port that was bound, then released.
fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// The registration of `id` at `url` after it was re-registered with new tokens.
fn reregistration(id: &str, url: &str) -> Registration {
    let yaml = registration_yaml(id, Some(url))
        .replace("as_token: as-token-", "as_token: new-as-token-")
        .replace("hs_token: hs-token-", "hs_token: new-hs-token-");
    registration::parse(&yaml, Path::new(&format!("{id}-new.yaml")))
        .expect("the re-registration is valid")
}

/// The scheduler settings of [`fast_retries`] with every retry delay fixed at `ms`.
fn fixed_retries(ms: u64) -> SchedulerConfig {
    SchedulerConfig {
        retry_delay_ms_initial: ms,
        retry_delay_ms_max: ms,
        ..fast_retries()
    }
}

/// Polls the status of `appservice` until `ok` holds; panics after [`WAIT`] with the last one.
async fn wait_for_status(
    host: &TestHost,
    appservice: &str,
    what: &str,
    mut ok: impl FnMut(&AppserviceStatus) -> bool,
) -> AppserviceStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = host.status(appservice).await;
        if ok(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {appservice} to be {what}; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `appservice` has delivered `events` events since the host started and is idle
/// with nothing queued, so that the next enqueue starts a transaction of its own.
async fn wait_until_idle(host: &TestHost, appservice: &str, events: u64) -> AppserviceStatus {
    wait_for_status(host, appservice, "idle", |s| {
        s.delivered_events == events && !s.in_flight && s.backlog_events == 0
    })
    .await
}

/// The event ids of each request, in order.
fn batches(requests: &[Request]) -> Vec<Vec<String>> {
    requests.iter().map(|r| r.event_ids.clone()).collect()
}

/// The number of events of each request, in order.
fn batch_sizes(requests: &[Request]) -> Vec<usize> {
    requests.iter().map(|r| r.event_ids.len()).collect()
}

/// Removes the SQLite store of a stopped host: the database and its WAL and shared-memory files.
fn delete_store(dir: &Path) {
    let db = dir.join("scheduler.sqlite");
    std::fs::remove_file(&db).expect("the store existed");
    for extra in ["scheduler.sqlite-wal", "scheduler.sqlite-shm"] {
        match std::fs::remove_file(dir.join(extra)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot remove {extra}: {e}"),
        }
    }
}

/// The epoch part of a `{epoch}.{counter}` txn id.
fn epoch_of(txn_id: &str) -> &str {
    txn_id
        .split_once('.')
        .expect("txn ids are {epoch}.{counter}")
        .0
}

/// F3: a failed transaction is retried by its timer alone. The appservice refuses connections
/// when E1 is enqueued and comes up a second later on the same port; nothing else is ever
/// enqueued, so only the retry timer can deliver E1 (a scheduler that retried only when new
/// events arrive would keep E1 forever).
#[tokio::test(flavor = "multi_thread")]
async fn f3_failed_txn_is_retried_by_timer_without_new_traffic() {
    let addr = refused_addr();
    let dir = temp_dir("f3");
    let url = format!("http://{addr}");
    let host = TestHost::start(&dir, vec![registration("as1", Some(&url))], fast_retries());
    let started = Instant::now();
    host.enqueue_each("as1", [event(1)]).await;
    let down = wait_for_status(&host, "as1", "down", |s| s.failed_attempts >= 2).await;
    assert_eq!(down.state, "down");
    let why = down.last_error.clone().expect("a failure has a reason");
    assert!(why.starts_with("connection failed"), "{why}");
    assert_eq!(down.backlog_events, 1);
    let txn_id = down.current_txn_id.clone().expect("E1 is in a stored txn");

    tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    let receiver = Receiver::start_on(addr, |_| Reply::ok()).await;
    let seen = receiver.wait_for_events(1, Duration::from_secs(2)).await;
    assert_eq!(seen, ids(1, 1));
    let up = wait_for_status(&host, "as1", "up", |s| s.state == "up").await;
    assert_eq!(up.failed_attempts, 0);
    assert_eq!(up.last_error, None);
    assert_eq!(up.backlog_events, 0);
    assert_eq!(up.delivered_txns, 1);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].txn_id, txn_id);
    host.stop().await;
}

/// F5: after an outage the backlog drains in full transactions. The appservice answers 500
/// while 1000 events arrive one at a time; the first event was frozen alone in its
/// transaction when it first failed, so the accepted transactions are exactly [1, 100 × 9, 99]
/// and carry E1..E1000 in order (not a thousand one-event transactions, not a txn reformed).
#[tokio::test(flavor = "multi_thread")]
async fn f5_backlog_after_outage_drains_in_full_batches() {
    let down = Arc::new(AtomicBool::new(true));
    let answers = Answers::default();
    let flag = down.clone();
    let receiver = Receiver::start(answers.record(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }))
    .await;
    let dir = temp_dir("f5");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    host.enqueue_each("as1", (1..=1000).map(event)).await;
    let status = host.status("as1").await;
    assert_eq!(status.state, "down");
    assert_eq!(status.backlog_events, 1000);
    assert_eq!(status.backlog_txns, 1 + 10);
    down.store(false, Ordering::SeqCst);

    let seen = receiver.wait_for_events(1000, WAIT).await;
    assert_eq!(seen, ids(1, 1000));
    let mut expected = vec![1];
    expected.extend([100; 9]);
    expected.push(99);
    assert_eq!(batch_sizes(&answers.accepted()), expected);
    let mut txn_ids: Vec<String> = answers.accepted().into_iter().map(|r| r.txn_id).collect();
    txn_ids.sort();
    txn_ids.dedup();
    assert_eq!(txn_ids.len(), 11);
    let failed: Vec<Answer> = answers
        .all()
        .into_iter()
        .filter(|a| a.status == Some(500))
        .collect();
    assert!(!failed.is_empty());
    let first = &answers.accepted()[0];
    for attempt in &failed {
        assert_eq!(attempt.request.txn_id, first.txn_id);
        assert_eq!(attempt.request.body, first.body);
    }
    wait_for_status(&host, "as1", "up", |s| s.state == "up").await;
    host.stop().await;
}

/// F6: an appservice slower than the 1 s client timeout. Each timeout is a failure; the retry
/// reuses the txn id and the exact body bytes, and events enqueued meanwhile wait instead of
/// travelling in a parallel transaction. The appservice holds the first two attempts 1.3 s;
/// retries are 600 ms apart, so a retry arrives only after the appservice finished with the
/// abandoned attempt, and a second request at once could only come from a second send.
#[tokio::test(flavor = "multi_thread")]
async fn f6_timeout_is_a_failure_and_retry_reuses_txn_without_overlap() {
    let answers = Answers::default();
    let receiver = Receiver::start(answers.record(|requests| {
        if requests.len() <= 2 {
            ok_after(Duration::from_millis(1300))
        } else {
            Reply::ok()
        }
    }))
    .await;
    let dir = temp_dir("f6");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fixed_retries(600),
    );
    host.enqueue_each("as1", [event(1)]).await;
    receiver.wait_for_requests(1, WAIT).await;
    host.enqueue_each("as1", [event(2), event(3)]).await;
    let failed = wait_for_status(&host, "as1", "failed", |s| s.failed_attempts >= 1).await;
    assert_eq!(failed.state, "down");
    assert_eq!(failed.last_error.as_deref(), Some("timed out"));
    assert_eq!(failed.backlog_events, 3);

    let seen = receiver.wait_for_events(3, WAIT).await;
    assert_eq!(seen, ids(1, 3));
    let requests = receiver.requests();
    assert_eq!(
        batches(&requests),
        vec![ids(1, 1), ids(1, 1), ids(1, 1), ids(2, 3)]
    );
    for retry in &requests[1..3] {
        assert_eq!(retry.txn_id, requests[0].txn_id);
        assert_eq!(retry.body, requests[0].body);
    }
    assert_ne!(requests[3].txn_id, requests[0].txn_id);
    assert_eq!(receiver.max_concurrent(), 1);
    let times: Vec<Instant> = answers.all().iter().map(|a| a.at).collect();
    for pair in times[..3].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(1580), "retry after {gap:?}");
    }
    let up = wait_for_status(&host, "as1", "up", |s| s.state == "up").await;
    assert_eq!(up.failed_attempts, 0);
    host.stop().await;
}

/// F9: an appservice that accepts connections and never answers must not hold up another.
/// AS2 gets all its 10 events within 2 s while AS1 is still timing out on its first
/// transaction; AS1 shows DOWN with "timed out" and keeps all 10 of its events.
#[tokio::test(flavor = "multi_thread")]
async fn f9_hanging_appservice_does_not_delay_a_healthy_one() {
    let as1 = Receiver::start(|_| Reply::Hang).await;
    let as2 = Receiver::healthy().await;
    let dir = temp_dir("f9");
    let host = TestHost::start(
        &dir,
        vec![
            registration("as1", Some(&as1.url())),
            registration("as2", Some(&as2.url())),
        ],
        fast_retries(),
    );
    for n in 1..=10 {
        host.enqueue_each("as1", [event(n)]).await;
        host.enqueue_each("as2", [event(n)]).await;
    }
    let seen = as2.wait_for_events(10, Duration::from_secs(2)).await;
    assert_eq!(seen, ids(1, 10));
    let first_attempt = host.status("as1").await;
    assert!(first_attempt.in_flight);
    assert_eq!(
        first_attempt.failed_attempts, 0,
        "AS2 waited for AS1's timeout"
    );
    assert!(as1.processed_event_ids().is_empty());

    let down = wait_for_status(&host, "as1", "timed out", |s| s.failed_attempts >= 1).await;
    assert_eq!(down.state, "down");
    assert_eq!(down.last_error.as_deref(), Some("timed out"));
    assert_eq!(down.backlog_events, 10);
    assert_eq!(down.delivered_events, 0);
    let requests = as1.requests();
    assert!(requests.iter().all(|r| r.event_ids == ids(1, 1)));
    assert!(requests.iter().all(|r| r.txn_id == requests[0].txn_id));
    let healthy = host.status("as2").await;
    assert_eq!(healthy.state, "up");
    assert_eq!(healthy.delivered_events, 10);
    host.stop().await;
}

/// One slow appservice never stalls another. AS1 takes 1.2 s over every answer (inside a 3 s
/// timeout here, so these are successes, not failures); AS2 gets its 10 events while AS1's
/// first transaction is still unanswered, and AS1 then gets its own as [E1] and [E2..E10].
#[tokio::test(flavor = "multi_thread")]
async fn slow_appservice_never_stalls_another() {
    let as1 = Receiver::start(|_| ok_after(Duration::from_millis(1200))).await;
    let as2 = Receiver::healthy().await;
    let dir = temp_dir("slow");
    let registrations = vec![
        registration("as1", Some(&as1.url())),
        registration("as2", Some(&as2.url())),
    ];
    let host = TestHost::start_with(&dir, registrations, fast_retries(), |config| {
        config.http.total_timeout = Duration::from_secs(3);
    });
    for n in 1..=10 {
        host.enqueue_each("as1", [event(n)]).await;
        host.enqueue_each("as2", [event(n)]).await;
    }
    let seen = as2.wait_for_events(10, Duration::from_secs(2)).await;
    assert_eq!(seen, ids(1, 10));
    assert_eq!(as1.requests().len(), 1);
    let waiting = host.status("as1").await;
    assert!(waiting.in_flight);
    assert_eq!(waiting.delivered_events, 0, "AS2 waited for AS1's answer");
    assert_eq!(waiting.backlog_events, 10);

    let seen = as1.wait_for_events(10, WAIT).await;
    assert_eq!(seen, ids(1, 10));
    assert_eq!(batches(&as1.requests()), vec![ids(1, 1), ids(2, 10)]);
    let status = wait_until_idle(&host, "as1", 10).await;
    assert_eq!(status.state, "up");
    assert_eq!(status.failed_attempts, 0);
    host.stop().await;
}

/// F10: every transaction gets its own id. Three batches ([E1], [E2, E3], [E4..E6]) go out as
/// `{epoch}.1`, `{epoch}.2`, `{epoch}.3`, and an appservice that ignores txn ids it has seen
/// processes all six events.
#[tokio::test(flavor = "multi_thread")]
async fn f10_each_batch_gets_a_distinct_txn_id() {
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("f10");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    let mut delivered = 0;
    for batch in [vec![1], vec![2, 3], vec![4, 5, 6]] {
        delivered += batch.len() as u64;
        let events = batch.into_iter().map(event).collect();
        host.host.enqueue("as1", events).await.expect("accepted");
        wait_until_idle(&host, "as1", delivered).await;
    }
    assert_eq!(receiver.processed_event_ids(), ids(1, 6));
    let requests = receiver.requests();
    assert_eq!(batches(&requests), vec![ids(1, 1), ids(2, 3), ids(4, 6)]);
    let epoch = epoch_of(&requests[0].txn_id);
    let txn_ids: Vec<&str> = requests.iter().map(|r| r.txn_id.as_str()).collect();
    assert_eq!(
        txn_ids,
        vec![
            format!("{epoch}.1"),
            format!("{epoch}.2"),
            format!("{epoch}.3")
        ]
    );
    host.stop().await;
}

/// F11: txn ids never repeat, even when the store and its counter are lost. After T1..T100
/// (one event each), the host stops and its SQLite files are deleted; on restart E101's txn id
/// is none of the 100 earlier ones, so an appservice that dedupes by id processes it. Then a
/// restart with the appservice re-registered (same id, new tokens) keeps the counter going:
/// E102's id follows E101's and is new too.
#[tokio::test(flavor = "multi_thread")]
async fn f11_txn_ids_never_repeat_after_store_loss_or_reregistration() {
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("f11");
    let reg = || vec![registration("as1", Some(&receiver.url()))];
    let host = TestHost::start(&dir, reg(), fast_retries());
    for n in 1..=100 {
        host.enqueue_each("as1", [event(n)]).await;
        receiver.wait_for_events(n, WAIT).await;
    }
    let mut earlier: Vec<String> = receiver.requests().into_iter().map(|r| r.txn_id).collect();
    assert_eq!(earlier.len(), 100);
    let mut distinct = earlier.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 100);
    host.stop().await;

    delete_store(&dir);
    let host = TestHost::start(&dir, reg(), fast_retries());
    host.enqueue_each("as1", [event(101)]).await;
    let seen = receiver.wait_for_events(101, WAIT).await;
    assert_eq!(seen, ids(1, 101));
    let after_loss = receiver.requests()[100].clone();
    assert_eq!(after_loss.event_ids, ids(101, 101));
    assert!(
        !earlier.contains(&after_loss.txn_id),
        "{}",
        after_loss.txn_id
    );
    assert_ne!(epoch_of(&after_loss.txn_id), epoch_of(&earlier[0]));
    wait_until_idle(&host, "as1", 1).await;
    host.stop().await;
    earlier.push(after_loss.txn_id.clone());

    let host = TestHost::start(
        &dir,
        vec![reregistration("as1", &receiver.url())],
        fast_retries(),
    );
    host.enqueue_each("as1", [event(102)]).await;
    let seen = receiver.wait_for_events(102, WAIT).await;
    assert_eq!(seen, ids(1, 102));
    let after_reregistration = receiver.requests()[101].clone();
    assert_eq!(after_reregistration.event_ids, ids(102, 102));
    assert!(!earlier.contains(&after_reregistration.txn_id));
    let epoch = epoch_of(&after_loss.txn_id);
    assert_eq!(after_loss.txn_id, format!("{epoch}.1"));
    assert_eq!(after_reregistration.txn_id, format!("{epoch}.2"));
    assert_eq!(
        after_reregistration.authorization.as_deref(),
        Some("Bearer new-hs-token-as1")
    );
    wait_until_idle(&host, "as1", 1).await;
    host.stop().await;
}

/// F12: a poison transaction blocks only its own appservice, and nothing overtakes it. AS1
/// answers 500 to any txn holding $e7 until told otherwise; AS2 still gets all its 20 events.
/// AS1 shows DOWN with the backlog E7..E20 and a retry due within the 400 ms cap, E8..E20 are
/// not delivered before E7, and once AS1 is fixed a forced retry delivers E7..E20 in order.
#[tokio::test(flavor = "multi_thread")]
async fn f12_poison_txn_blocks_only_its_appservice_and_keeps_order() {
    let poisoned = Arc::new(AtomicBool::new(true));
    let flag = poisoned.clone();
    let answers = Answers::default();
    let as1 = Receiver::start(answers.record(move |requests| {
        let request = requests.last().expect("the current request is last");
        let has_e7 = request.event_ids.iter().any(|id| id == "$e7");
        if has_e7 && flag.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }))
    .await;
    let as2 = Receiver::healthy().await;
    let dir = temp_dir("f12");
    let host = TestHost::start(
        &dir,
        vec![
            registration("as1", Some(&as1.url())),
            registration("as2", Some(&as2.url())),
        ],
        fast_retries(),
    );
    for n in 1..=6 {
        host.enqueue_each("as1", [event(n)]).await;
        host.enqueue_each("as2", [event(n)]).await;
    }
    wait_until_idle(&host, "as1", 6).await;
    let before = answers.accepted().len();
    for n in 7..=20 {
        host.enqueue_each("as1", [event(n)]).await;
        host.enqueue_each("as2", [event(n)]).await;
    }
    assert_eq!(as2.wait_for_events(20, WAIT).await, ids(1, 20));

    let down = wait_for_status(&host, "as1", "down twice", |s| {
        s.failed_attempts >= 2 && !s.in_flight
    })
    .await;
    assert_eq!(down.state, "down");
    assert_eq!(down.last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(down.backlog_events, 14);
    let next = down.next_retry_in_ms.expect("a retry is scheduled");
    assert!(next <= 400, "next retry in {next} ms");
    assert_eq!(as1.processed_event_ids(), ids(1, 6));
    let poison = answers.all()[before].request.clone();
    assert_eq!(poison.event_ids, ids(7, 7));
    assert_eq!(down.current_txn_id.as_deref(), Some(poison.txn_id.as_str()));
    for attempt in answers.all().iter().filter(|a| a.status == Some(500)) {
        assert_eq!(attempt.request.txn_id, poison.txn_id);
        assert_eq!(attempt.request.body, poison.body);
    }

    poisoned.store(false, Ordering::SeqCst);
    host.host.force_retry("as1").await.expect("as1 is known");
    assert_eq!(as1.wait_for_events(20, WAIT).await, ids(1, 20));
    let accepted = answers.accepted();
    assert_eq!(batches(&accepted[before..]), vec![ids(7, 7), ids(8, 20)]);
    assert_eq!(accepted[before].txn_id, poison.txn_id);
    let up = wait_for_status(&host, "as1", "up", |s| s.state == "up").await;
    assert_eq!(up.failed_attempts, 0);
    assert_eq!(up.backlog_events, 0);
    host.stop().await;
}

/// F13: any 2xx is a success, whatever its body: `200` with an empty body and no content type,
/// `200 text/plain "ok"`, and `204`. Each advances the queue at the first attempt and the
/// appservice stays UP with no failures.
#[tokio::test(flavor = "multi_thread")]
async fn f13_any_2xx_is_success_whatever_the_body() {
    let receiver = Receiver::start(|requests| {
        let (status, content_type, body) = match requests.len() {
            1 => (200, None, ""),
            2 => (200, Some("text/plain"), "ok"),
            _ => (204, None, ""),
        };
        Reply::Respond {
            status,
            content_type,
            body,
            delay: Duration::ZERO,
        }
    })
    .await;
    let dir = temp_dir("f13");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    for n in 1..=3 {
        host.enqueue_each("as1", [event(n)]).await;
        let status = wait_until_idle(&host, "as1", n as u64).await;
        assert_eq!(status.state, "up");
        assert_eq!(status.failed_attempts, 0);
        assert_eq!(status.last_error, None);
        assert_eq!(status.delivered_txns, n as u64);
    }
    let requests = receiver.requests();
    assert_eq!(batches(&requests), vec![ids(1, 1), ids(2, 2), ids(3, 3)]);
    assert_ne!(requests[0].txn_id, requests[1].txn_id);
    assert_ne!(requests[1].txn_id, requests[2].txn_id);
    assert_ne!(requests[0].txn_id, requests[2].txn_id);
    host.stop().await;
}

/// F14: a bridge that reads the token only from `?access_token=`. Its 403 to header-only
/// requests is a failure with backoff (50, 100, 200 ms apart), and the events are kept. After a
/// restart with `legacy_query_auth` for it, the same txn and then the rest arrive in order, each
/// with the query token and still the Bearer header.
#[tokio::test(flavor = "multi_thread")]
async fn f14_403_is_retried_with_backoff_until_query_auth_is_enabled() {
    let answers = Answers::default();
    let receiver = Receiver::start(answers.record(|requests| {
        let request = requests.last().expect("the current request is last");
        if request.query.as_deref() == Some("access_token=hs-token-as1") {
            Reply::ok()
        } else {
            Reply::status(403)
        }
    }))
    .await;
    let dir = temp_dir("f14");
    let reg = || vec![registration("as1", Some(&receiver.url()))];
    let host = TestHost::start(&dir, reg(), fast_retries());
    host.enqueue_each("as1", (1..=5).map(event)).await;
    let down = wait_for_status(&host, "as1", "refused 4 times", |s| s.failed_attempts >= 4).await;
    assert_eq!(down.state, "down");
    assert_eq!(down.last_error.as_deref(), Some("HTTP 403"));
    assert_eq!(down.backlog_events, 5);
    host.stop().await;

    let refused = answers.all();
    let first = refused[0].request.clone();
    for attempt in &refused {
        assert_eq!(attempt.status, Some(403));
        assert_eq!(attempt.request.txn_id, first.txn_id);
        assert_eq!(attempt.request.body, first.body);
        assert_eq!(attempt.request.query, None);
    }
    assert_eq!(first.event_ids, ids(1, 1));
    for (pair, backoff_ms) in refused.windows(2).zip([50, 100, 200]) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(backoff_ms - 1),
            "retry {gap:?} after a 403, backoff is {backoff_ms} ms"
        );
    }

    let host = TestHost::start_with(&dir, reg(), fast_retries(), |config| {
        config.legacy_query_auth = vec!["as1".into()];
    });
    assert_eq!(receiver.wait_for_events(5, WAIT).await, ids(1, 5));
    let accepted = answers.accepted();
    assert_eq!(batches(&accepted), vec![ids(1, 1), ids(2, 5)]);
    assert_eq!(accepted[0].txn_id, first.txn_id);
    assert_eq!(accepted[0].body, first.body);
    for request in &accepted {
        assert_eq!(request.query.as_deref(), Some("access_token=hs-token-as1"));
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer hs-token-as1")
        );
    }
    let up = wait_for_status(&host, "as1", "up", |s| s.state == "up").await;
    assert_eq!(up.failed_attempts, 0);
    host.stop().await;
}

/// F16: the appservice read T(X) = [E1], processed it, and the connection dropped before the
/// answer. The retry must be X with exactly the same bytes (so the appservice can recognise
/// it), not X with E2 added (which it would ignore, losing E2); E2, enqueued right behind E1,
/// travels in a new txn id.
#[tokio::test(flavor = "multi_thread")]
async fn f16_retry_after_lost_answer_is_the_same_txn_and_new_events_get_a_new_id() {
    let receiver = Receiver::start(|requests| {
        if requests.len() == 1 {
            Reply::Drop
        } else {
            Reply::ok()
        }
    })
    .await;
    let dir = temp_dir("f16");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    host.enqueue_each("as1", [event(1)]).await;
    host.enqueue_each("as1", [event(2)]).await;
    let status = wait_until_idle(&host, "as1", 2).await;
    assert_eq!(status.state, "up");
    assert_eq!(status.delivered_txns, 2);
    let requests = receiver.requests();
    assert_eq!(batches(&requests), vec![ids(1, 1), ids(1, 1), ids(2, 2)]);
    assert_eq!(requests[1].txn_id, requests[0].txn_id);
    assert_eq!(requests[1].body, requests[0].body);
    assert_ne!(requests[2].txn_id, requests[0].txn_id);
    assert_eq!(receiver.processed_event_ids(), ids(1, 2));
    host.stop().await;
}

/// F1 (in process): the host stops while T(X) = [E1] is in flight (the appservice answers
/// after 5 s; the client timeout is raised to 10 s so the send is surely still running) and
/// E2, E3 wait. The stop is graceful, but the engine acknowledges an enqueue only once it is in
/// SQLite and keeps nothing else that a restart needs, so this stands for a crash (the SIGKILL
/// variant is in `crash.rs`). On restart against a healthy appservice, the first request is X
/// with exactly the bytes sent before, then [E2, E3] under a new id.
#[tokio::test(flavor = "multi_thread")]
async fn f1_stop_with_txn_in_flight_resends_same_txn_after_restart() {
    let slow = Receiver::start(|_| ok_after(Duration::from_secs(5))).await;
    let dir = temp_dir("f1");
    let registrations = vec![registration("as1", Some(&slow.url()))];
    let host = TestHost::start_with(&dir, registrations, fast_retries(), |config| {
        config.http.total_timeout = Duration::from_secs(10);
    });
    host.enqueue_each("as1", [event(1)]).await;
    let first = slow.wait_for_requests(1, WAIT).await[0].clone();
    host.enqueue_each("as1", [event(2), event(3)]).await;
    let status = host.status("as1").await;
    assert!(status.in_flight);
    assert_eq!(
        status.current_txn_id.as_deref(),
        Some(first.txn_id.as_str())
    );
    assert_eq!(status.backlog_events, 3);
    assert_eq!(status.failed_attempts, 0);
    host.stop().await;

    let healthy = Receiver::healthy().await;
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&healthy.url()))],
        fast_retries(),
    );
    assert_eq!(healthy.wait_for_events(3, WAIT).await, ids(1, 3));
    let requests = healthy.requests();
    assert_eq!(batches(&requests), vec![ids(1, 1), ids(2, 3)]);
    assert_eq!(requests[0].txn_id, first.txn_id);
    assert_eq!(requests[0].body, first.body);
    assert_ne!(requests[1].txn_id, first.txn_id);
    assert_eq!(slow.requests().len(), 1);
    wait_until_idle(&host, "as1", 3).await;
    host.stop().await;
}

/// What the status of a DOWN appservice says, field by field: after a 500 on [E1] and 250 more
/// events, 4 transactions and 251 events (with their exact bytes) are waiting, the oldest for
/// as long as E1 has, in the stored txn X, with a retry due; during a forced retry that hangs
/// it shows the send in flight and no timer; after that retry times out, two failures.
#[tokio::test(flavor = "multi_thread")]
async fn down_appservice_status_reports_backlog_txn_and_retry() {
    let receiver = Receiver::start(|requests| {
        if requests.len() == 1 {
            Reply::status(500)
        } else {
            Reply::Hang
        }
    })
    .await;
    let dir = temp_dir("status");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fixed_retries(2_000),
    );
    let before = Instant::now();
    host.enqueue_each("as1", [event(1)]).await;
    let acked = Instant::now();
    wait_for_status(&host, "as1", "failed", |s| s.failed_attempts == 1).await;
    host.host
        .enqueue("as1", (2..=251).map(event).collect())
        .await
        .expect("accepted");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let txn_id = receiver.requests()[0].txn_id.clone();
    let bytes: u64 = (1..=251).map(|n| event(n).len() as u64).sum();

    let (low, status, high) = (acked.elapsed(), host.status("as1").await, before.elapsed());
    assert_eq!(status.state, "down");
    assert_eq!(status.backlog_txns, 4);
    assert_eq!(status.backlog_events, 251);
    assert_eq!(status.backlog_bytes, bytes);
    let age = status.oldest_undelivered_age_ms.expect("E1 waits");
    let (low, high) = (low.as_millis() as u64, high.as_millis() as u64);
    assert!(
        low.saturating_sub(5) <= age && age <= high + 5,
        "age {age} ms, expected {low}..={high}"
    );
    assert_eq!(status.current_txn_id.as_deref(), Some(txn_id.as_str()));
    assert!(!status.in_flight);
    assert_eq!(status.failed_attempts, 1);
    assert_eq!(status.last_error.as_deref(), Some("HTTP 500"));
    let next = status.next_retry_in_ms.expect("a retry is scheduled");
    assert!((1_000..=2_000).contains(&next), "next retry in {next} ms");
    assert!(!status.paused_by_storage);
    assert_eq!((status.delivered_txns, status.delivered_events), (0, 0));

    host.host.force_retry("as1").await.expect("as1 is known");
    receiver.wait_for_requests(2, WAIT).await;
    let retrying = host.status("as1").await;
    assert_eq!(retrying.state, "down");
    assert!(retrying.in_flight);
    assert_eq!(retrying.next_retry_in_ms, None);
    assert_eq!(retrying.current_txn_id.as_deref(), Some(txn_id.as_str()));
    assert_eq!(retrying.failed_attempts, 1);
    assert_eq!(retrying.backlog_events, 251);

    let timed_out = wait_for_status(&host, "as1", "failed twice", |s| s.failed_attempts == 2).await;
    assert_eq!(timed_out.last_error.as_deref(), Some("timed out"));
    assert!(!timed_out.in_flight);
    assert!(timed_out.next_retry_in_ms.is_some_and(|ms| ms <= 2_000));
    assert_eq!(timed_out.backlog_txns, 4);
    assert_eq!(timed_out.current_txn_id.as_deref(), Some(txn_id.as_str()));
    let requests = receiver.requests();
    assert_eq!(batches(&requests), vec![ids(1, 1), ids(1, 1)]);
    assert_eq!(requests[1].txn_id, txn_id);
    host.stop().await;
}
