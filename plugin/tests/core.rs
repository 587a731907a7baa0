//! Native unit tests of the scheduler core against a deterministic, in-memory world.
//!
//! [`World`] implements [`Effects`]: an ordered store with atomic commits and fault injection,
//! virtual clocks, a seeded random source, a record of every send and timer, and the log. It
//! also checks the invariants every run must keep (at most one send in flight per appservice,
//! well-formed bodies within the byte cap, a txn id always sent with the same bytes) on every
//! send, so each test checks them too. [`Harness`] drives a [`Scheduler`] over a world: it
//! advances virtual time firing due timers in order, finishes sends, and crashes (drops the
//! scheduler and everything but the committed store) and restarts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use asched_plugin::scheduler::backoff_delay_ms;
use asched_plugin::{
    Config, Effects, EnqueueBatch, EnqueueError, InFlightSend, Item, LogLevel, Phase, Scheduler,
    SendOutcome, StartError, Status, StoreError, WriteOp,
};

// ---------------------------------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------------------------------

/// Where the monotonic clock starts; not zero, so that no test mistakes it for a duration.
const MONO0: u64 = 50_000;
/// Where the wall clock starts (ms since the Unix epoch).
const WALL0: u64 = 1_700_000_000_000;
/// The world's default random seed.
const SEED: u64 = 0x5eed_0000_0000_0001;

const AS1: &str = "as1";
const AS2: &str = "as2";

/// One `start_send` the scheduler made.
#[derive(Clone, Debug)]
struct Sent {
    id: u64,
    appservice: String,
    txn_id: String,
    body: Vec<u8>,
    at_ms: u64,
    open: bool,
    outcome: Option<SendOutcome>,
}

/// One `set_timer` the scheduler made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TimerSet {
    id: u64,
    delay_ms: u64,
    due_ms: u64,
}

/// One log line.
#[derive(Clone, Debug)]
struct Line {
    level: LogLevel,
    appservice: Option<String>,
    message: String,
}

/// Injected store faults. Numbered faults count operations of their kind since the world was
/// made (see [`World::fail_commit`]); flags fail every operation while set.
#[derive(Default)]
struct Faults {
    commit_nos: BTreeSet<u64>,
    get_nos: BTreeSet<u64>,
    scan_nos: BTreeSet<u64>,
    commits: bool,
    gets: bool,
    scans: bool,
    /// Keys whose `get` fails.
    unreadable: BTreeSet<String>,
    /// Makes the host refuse every send with this reason.
    refuse_sends: Option<String>,
}

struct World {
    store: BTreeMap<String, Vec<u8>>,
    /// The store as of the last effect let out (a send started, an enqueue answered): the host
    /// makes every commit before an effect durable first, so a machine crash loses at most what
    /// was committed since.
    durable: BTreeMap<String, Vec<u8>>,
    commits: u64,
    gets: u64,
    scans: u64,
    faults: Faults,
    mono_ms: u64,
    wall_ms: u64,
    rng: u64,
    scripted: VecDeque<u64>,
    draws: Vec<u64>,
    sends: Vec<Sent>,
    next_send_id: u64,
    /// The bytes each txn id was first sent with.
    bodies: BTreeMap<String, Vec<u8>>,
    max_body: usize,
    timers: BTreeMap<u64, TimerSet>,
    timers_set: Vec<TimerSet>,
    cancelled: Vec<u64>,
    next_timer_id: u64,
    logs: Vec<Line>,
}

impl World {
    fn new(seed: u64, config: &Config) -> Self {
        World {
            store: BTreeMap::new(),
            durable: BTreeMap::new(),
            commits: 0,
            gets: 0,
            scans: 0,
            faults: Faults::default(),
            mono_ms: MONO0,
            wall_ms: WALL0,
            rng: seed,
            scripted: VecDeque::new(),
            draws: Vec::new(),
            sends: Vec::new(),
            // Send and timer handles come from different ranges, so a mix-up shows.
            next_send_id: 1000,
            bodies: BTreeMap::new(),
            max_body: config.max_txn_body_bytes as usize,
            timers: BTreeMap::new(),
            timers_set: Vec::new(),
            cancelled: Vec::new(),
            next_timer_id: 1,
            logs: Vec::new(),
        }
    }

    /// Fails the `n`th commit from now (1 = the next one).
    fn fail_commit(&mut self, n: u64) {
        self.faults.commit_nos.insert(self.commits + n);
    }

    /// Fails the `n`th get from now.
    fn fail_get(&mut self, n: u64) {
        self.faults.get_nos.insert(self.gets + n);
    }

    /// Fails the `n`th scan from now.
    fn fail_scan(&mut self, n: u64) {
        self.faults.scan_nos.insert(self.scans + n);
    }

    /// Moves both clocks to monotonic time `t`.
    fn set_mono(&mut self, t: u64) {
        assert!(t >= self.mono_ms, "time never goes backwards");
        self.wall_ms += t - self.mono_ms;
        self.mono_ms = t;
    }

    /// The earliest pending timer due at or before `t`, ties broken by handle.
    fn next_due(&self, t: u64) -> Option<u64> {
        self.timers
            .values()
            .filter(|timer| timer.due_ms <= t)
            .min_by_key(|timer| (timer.due_ms, timer.id))
            .map(|timer| timer.id)
    }

    /// SplitMix64, after any scripted values.
    fn next_random(&mut self) -> u64 {
        if let Some(v) = self.scripted.pop_front() {
            return v;
        }
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::Unavailable(format!("injected {what} fault"))
}

/// Checks that a body is `{"events":[...]}` with at least one event and within the byte cap
/// unless it carries one event; returns the number of events.
fn check_body(body: &[u8], max_body: usize) -> usize {
    let value: serde_json::Value = serde_json::from_slice(body).expect("a body is JSON");
    let object = value.as_object().expect("a body is a JSON object");
    assert_eq!(object.len(), 1, "a body has only the events key");
    let events = object["events"].as_array().expect("events is an array");
    assert!(!events.is_empty(), "a body is never empty");
    assert!(
        events.len() == 1 || body.len() <= max_body,
        "a body of {} events has {} bytes, over the cap of {max_body}",
        events.len(),
        body.len()
    );
    assert!(
        body.starts_with(b"{\"events\":["),
        "bodies are built verbatim"
    );
    events.len()
}

impl Effects for World {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.gets += 1;
        if self.faults.get_nos.remove(&self.gets)
            || self.faults.gets
            || self.faults.unreadable.contains(key)
        {
            return Err(injected("get"));
        }
        Ok(self.store.get(key).cloned())
    }

    fn scan(
        &mut self,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scans += 1;
        if self.faults.scan_nos.remove(&self.scans) || self.faults.scans {
            return Err(injected("scan"));
        }
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .range::<str, _>((Bound::Included(start), Bound::Excluded(end)))
            .take(limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&mut self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        self.commits += 1;
        if self.faults.commit_nos.remove(&self.commits) || self.faults.commits {
            // All or nothing: a failed commit writes nothing.
            return Err(injected("commit"));
        }
        for op in ops {
            match op {
                WriteOp::Put(key, value) => {
                    self.store.insert(key, value);
                }
                WriteOp::Delete(key) => {
                    self.store.remove(&key);
                }
                WriteOp::DeleteRange(start, end) => {
                    self.store.retain(|k, _| !(start <= *k && *k < end));
                }
            }
        }
        Ok(())
    }

    fn start_send(&mut self, appservice: &str, txn_id: &str, body: &[u8]) -> Result<u64, String> {
        if let Some(why) = &self.faults.refuse_sends {
            return Err(why.clone());
        }
        assert!(
            !self
                .sends
                .iter()
                .any(|s| s.open && s.appservice == appservice),
            "a second send to {appservice} while one is in flight"
        );
        check_body(body, self.max_body);
        match self.bodies.get(txn_id) {
            Some(earlier) => assert_eq!(
                String::from_utf8_lossy(earlier),
                String::from_utf8_lossy(body),
                "txn {txn_id} resent with other bytes"
            ),
            None => {
                self.bodies.insert(txn_id.to_owned(), body.to_vec());
            }
        }
        self.durable = self.store.clone();
        self.next_send_id += 1;
        self.sends.push(Sent {
            id: self.next_send_id,
            appservice: appservice.to_owned(),
            txn_id: txn_id.to_owned(),
            body: body.to_vec(),
            at_ms: self.mono_ms,
            open: true,
            outcome: None,
        });
        Ok(self.next_send_id)
    }

    fn set_timer(&mut self, delay_ms: u64) -> u64 {
        let timer = TimerSet {
            id: self.next_timer_id,
            delay_ms,
            due_ms: self.mono_ms.saturating_add(delay_ms),
        };
        self.next_timer_id += 1;
        self.timers.insert(timer.id, timer);
        self.timers_set.push(timer);
        timer.id
    }

    fn cancel_timer(&mut self, id: u64) {
        self.cancelled.push(id);
        self.timers.remove(&id);
    }

    fn monotonic_now_ms(&mut self) -> u64 {
        self.mono_ms
    }

    fn wall_clock_now_ms(&mut self) -> u64 {
        self.wall_ms
    }

    fn random_u64(&mut self) -> u64 {
        let v = self.next_random();
        self.draws.push(v);
        v
    }

    fn log(&mut self, level: LogLevel, appservice: Option<&str>, message: &str) {
        self.logs.push(Line {
            level,
            appservice: appservice.map(str::to_owned),
            message: message.to_owned(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

struct Harness {
    world: World,
    sched: Option<Scheduler>,
    config: Config,
    appservices: Vec<String>,
}

impl Harness {
    /// A started scheduler over an empty store.
    fn new(config: Config, appservices: &[&str]) -> Self {
        let world = World::new(SEED, &config);
        Self::over(world, config, appservices)
    }

    /// A started scheduler over `world`.
    fn over(world: World, config: Config, appservices: &[&str]) -> Self {
        let mut h = Self::unstarted(world, config, appservices);
        h.start(&[]).expect("start");
        h
    }

    fn unstarted(world: World, config: Config, appservices: &[&str]) -> Self {
        Harness {
            world,
            sched: None,
            config,
            appservices: appservices.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn start(&mut self, in_flight: &[InFlightSend]) -> Result<(), StartError> {
        let sched = Scheduler::start(
            &mut self.world,
            self.config.clone(),
            &self.appservices,
            in_flight,
        )?;
        self.sched = Some(sched);
        Ok(())
    }

    /// Runs `f` on the scheduler and the world.
    fn with<R>(&mut self, f: impl FnOnce(&mut Scheduler, &mut World) -> R) -> R {
        let sched = self.sched.as_mut().expect("the scheduler is started");
        f(sched, &mut self.world)
    }

    /// The host process dies: the scheduler, its timers and its sends are gone; only what was
    /// committed survives.
    fn crash(&mut self) {
        self.sched = None;
        self.world.timers.clear();
        for s in &mut self.world.sends {
            s.open = false;
        }
    }

    /// The machine loses power: the process dies, and commits made since the last effect the
    /// host let out were never made durable.
    fn machine_crash(&mut self) {
        self.crash();
        self.world.store = self.world.durable.clone();
    }

    /// Crash, then start a new scheduler over the committed store.
    fn restart(&mut self) {
        self.crash();
        self.start(&[]).expect("restart");
    }

    /// The plugin is swapped while the host lives on: sends still running are handed over.
    fn swap(&mut self) {
        self.sched = None;
        self.world.timers.clear();
        let in_flight: Vec<InFlightSend> = self
            .world
            .sends
            .iter()
            .filter(|s| s.open)
            .map(|s| InFlightSend {
                id: s.id,
                appservice: s.appservice.clone(),
                txn_id: s.txn_id.clone(),
            })
            .collect();
        self.start(&in_flight).expect("swap");
    }

    fn enqueue(&mut self, batches: &[EnqueueBatch]) -> Vec<Result<u32, EnqueueError>> {
        let results = self.with(|s, w| s.enqueue(w, batches));
        self.world.durable = self.world.store.clone();
        results
    }

    fn enq(&mut self, appservice: &str, events: &[String]) -> Result<u32, EnqueueError> {
        let mut results = self.enqueue(&[batch(appservice, events)]);
        assert_eq!(results.len(), 1);
        results.remove(0)
    }

    /// Enqueues events that must be accepted.
    fn enq_ok(&mut self, appservice: &str, events: &[String]) {
        let n = u32::try_from(events.len()).expect("few events");
        assert_eq!(self.enq(appservice, events), Ok(n));
    }

    /// Enqueues `ev(n)` for each `n`, as one batch.
    fn enq_range(&mut self, appservice: &str, numbers: impl IntoIterator<Item = u32>) {
        let events: Vec<String> = numbers.into_iter().map(ev).collect();
        self.enq_ok(appservice, &events);
    }

    /// Moves time forward by `ms`, firing due timers in order of due time.
    fn advance(&mut self, ms: u64) {
        let target = self.world.mono_ms + ms;
        while let Some(id) = self.world.next_due(target) {
            let due = self.world.timers[&id].due_ms;
            self.world.set_mono(due);
            self.world.timers.remove(&id);
            self.with(|s, w| s.timer_fired(w, id));
        }
        self.world.set_mono(target);
    }

    fn tick(&mut self) {
        self.with(|s, w| s.tick(w));
    }

    fn force_retry(&mut self, appservice: &str) -> Result<(), EnqueueError> {
        self.with(|s, w| s.force_retry(w, appservice))
    }

    fn status_all(&mut self) -> Vec<Status> {
        self.with(|s, w| s.status(w))
    }

    fn status(&mut self, appservice: &str) -> Status {
        self.status_all()
            .into_iter()
            .find(|s| s.appservice == appservice)
            .expect("a registered appservice")
    }

    /// Every send to `appservice`, oldest first.
    fn sends(&self, appservice: &str) -> Vec<Sent> {
        self.world
            .sends
            .iter()
            .filter(|s| s.appservice == appservice)
            .cloned()
            .collect()
    }

    fn open_opt(&self, appservice: &str) -> Option<Sent> {
        let open: Vec<Sent> = self
            .sends(appservice)
            .into_iter()
            .filter(|s| s.open)
            .collect();
        assert!(open.len() <= 1, "at most one send in flight");
        open.into_iter().next()
    }

    /// The send in flight to `appservice`.
    fn open(&self, appservice: &str) -> Sent {
        self.open_opt(appservice)
            .unwrap_or_else(|| panic!("a send to {appservice} is in flight"))
    }

    /// Reports the outcome of send `id`.
    fn finish(&mut self, id: u64, outcome: SendOutcome) {
        if let Some(s) = self.world.sends.iter_mut().find(|s| s.id == id) {
            s.open = false;
            s.outcome = Some(outcome.clone());
        }
        self.with(|s, w| s.send_finished(w, id, &outcome));
    }

    /// Finishes the send in flight to `appservice` with `outcome`; returns it.
    fn finish_open(&mut self, appservice: &str, outcome: SendOutcome) -> Sent {
        let sent = self.open(appservice);
        self.finish(sent.id, outcome);
        sent
    }

    /// Answers the send in flight with 200 and a JSON body.
    fn ok(&mut self, appservice: &str) -> Sent {
        self.finish_open(appservice, http(200))
    }

    /// Answers every send with 200 until none is in flight; returns the event numbers of each.
    fn drain_ok(&mut self, appservice: &str) -> Vec<Vec<u32>> {
        let mut txns = Vec::new();
        while self.open_opt(appservice).is_some() {
            txns.push(numbers(&self.ok(appservice).body));
        }
        txns
    }

    /// The events the appservice accepted, in order, each txn id counted once (an appservice
    /// deduplicates by txn id).
    fn delivered(&self, appservice: &str) -> Vec<u32> {
        let mut seen = BTreeSet::new();
        let mut events = Vec::new();
        for s in self.sends(appservice) {
            let success = matches!(
                s.outcome,
                Some(SendOutcome::Response {
                    status: 200..=299,
                    ..
                })
            );
            if success && seen.insert(s.txn_id.clone()) {
                events.extend(numbers(&s.body));
            }
        }
        events
    }

    /// The stored record of `appservice`, as JSON.
    fn meta(&self, appservice: &str) -> serde_json::Value {
        let bytes = &self.world.store[&format!("as/{appservice}/meta")];
        serde_json::from_slice(bytes).expect("the record is JSON")
    }

    /// The id of the `n`th transaction of `appservice`'s current record.
    fn id(&self, appservice: &str, n: u64) -> String {
        let meta = self.meta(appservice);
        let epoch = meta["epoch"].as_str().expect("the epoch is text");
        format!("{epoch}.{n}")
    }

    /// Timers set so far, as delays.
    fn delays(&self) -> Vec<u64> {
        self.world.timers_set.iter().map(|t| t.delay_ms).collect()
    }

    fn logs(&self, level: LogLevel, containing: &str) -> Vec<Line> {
        self.world
            .logs
            .iter()
            .filter(|l| l.level == level && l.message.contains(containing))
            .cloned()
            .collect()
    }

    /// Keys of queued events in the store.
    fn queued_keys(&self) -> Vec<String> {
        self.world
            .store
            .keys()
            .filter(|k| k.contains("/c/"))
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The default configuration without jitter, so every delay is exact.
fn config() -> Config {
    Config {
        retry_jitter_percent: 0,
        ..Config::default()
    }
}

/// Room event number `n`.
fn ev(n: u32) -> String {
    format!(r#"{{"event_id":"$e{n}","type":"m.room.message"}}"#)
}

/// Room event number `n`, padded to exactly `size` bytes of JSON.
fn ev_sized(n: u32, size: usize) -> String {
    let base = format!(r#"{{"event_id":"$e{n}","pad":""}}"#).len();
    assert!(size >= base);
    let event = format!(
        r#"{{"event_id":"$e{n}","pad":"{}"}}"#,
        "x".repeat(size - base)
    );
    assert_eq!(event.len(), size);
    event
}

/// The exact body of a transaction of `events`.
fn body_of(events: &[String]) -> Vec<u8> {
    format!("{{\"events\":[{}]}}", events.join(",")).into_bytes()
}

/// The event numbers in a body.
fn numbers(body: &[u8]) -> Vec<u32> {
    let value: serde_json::Value = serde_json::from_slice(body).expect("a body is JSON");
    value["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            e["event_id"]
                .as_str()
                .and_then(|id| id.strip_prefix("$e"))
                .and_then(|n| n.parse().ok())
                .expect("test events have ids $e{n}")
        })
        .collect()
}

fn batch(appservice: &str, events: &[String]) -> EnqueueBatch {
    EnqueueBatch {
        appservice: appservice.to_owned(),
        items: events.iter().cloned().map(Item::RoomEvent).collect(),
    }
}

fn http(status: u16) -> SendOutcome {
    SendOutcome::Response {
        status,
        body_is_json: true,
    }
}

fn lost() -> SendOutcome {
    SendOutcome::ConnectionLost("connection reset by peer".into())
}

fn refused() -> SendOutcome {
    SendOutcome::ConnectFailed("connection refused".into())
}

fn range(a: u32, b: u32) -> Vec<u32> {
    (a..=b).collect()
}

// ---------------------------------------------------------------------------------------------
// Batching
// ---------------------------------------------------------------------------------------------

/// An event for an idle appservice goes out at once, alone, with the exact body bytes.
#[test]
fn first_event_to_idle_appservice_is_sent_at_once_alone() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let sends = h.sends(AS1);
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].at_ms, MONO0);
    assert_eq!(sends[0].txn_id, h.id(AS1, 1));
    assert_eq!(sends[0].body, body_of(&[ev(1)]));
    assert!(h.world.timers_set.is_empty(), "no timer is needed to send");
}

/// An idle appservice's first transaction is stored in the commit that stores its events:
/// one write and no read of the store before the send. Behind a transaction in flight, events
/// are stored alone. A machine crash after that resends the stored transaction under its id,
/// with the same body, and then the event that waited.
#[test]
fn an_idle_appservices_txn_is_stored_with_its_events_in_one_commit() {
    let mut h = Harness::new(config(), &[AS1]);
    let (commits, scans, gets) = (h.world.commits, h.world.scans, h.world.gets);
    h.enq_range(AS1, 1..=2);
    assert_eq!(
        (
            h.world.commits - commits,
            h.world.scans - scans,
            h.world.gets - gets
        ),
        (1, 0, 0)
    );
    let first = h.open(AS1);
    assert_eq!(h.meta(AS1)["next_txn"], 2);
    h.enq_ok(AS1, &[ev(3)]);
    assert_eq!(h.world.commits - commits, 2);
    assert_eq!(
        h.sends(AS1).len(),
        1,
        "nothing more is sent while one is in flight"
    );
    h.machine_crash();
    h.start(&[]).expect("restart");
    let resent = h.open(AS1);
    assert_eq!(
        (resent.txn_id.as_str(), resent.body),
        (first.txn_id.as_str(), body_of(&[ev(1), ev(2)]))
    );
    h.ok(AS1);
    let next = h.ok(AS1);
    assert_eq!((next.txn_id, next.body), (h.id(AS1, 2), body_of(&[ev(3)])));
    assert_eq!(h.delivered(AS1), range(1, 3));
}

/// The transaction after a delivered one is formed from the chunks kept in memory, and the
/// store is not read past the end of the queue to look for more.
#[test]
fn the_next_txn_from_recent_events_reads_nothing_from_the_store() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.enq_range(AS1, 2..=3);
    let (scans, gets) = (h.world.scans, h.world.gets);
    h.ok(AS1);
    assert_eq!(h.open(AS1).body, body_of(&[ev(2), ev(3)]));
    assert_eq!((h.world.scans - scans, h.world.gets - gets), (0, 0));
}

/// A batch enqueued in one call to an idle appservice travels as one transaction.
#[test]
fn batch_to_idle_appservice_travels_as_one_txn() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, 1..=3);
    assert_eq!(h.sends(AS1).len(), 1);
    assert_eq!(h.open(AS1).body, body_of(&[ev(1), ev(2), ev(3)]));
}

/// Events arriving while a transaction is in flight wait, then go together in the next one.
#[test]
fn events_arriving_in_flight_are_batched_behind_it() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    for n in 2..=5 {
        h.advance(7);
        h.enq_ok(AS1, &[ev(n)]);
    }
    assert_eq!(
        h.sends(AS1).len(),
        1,
        "nothing is sent while one is in flight"
    );
    h.ok(AS1);
    let next = h.open(AS1);
    assert_eq!(next.txn_id, h.id(AS1, 2));
    assert_eq!(next.body, body_of(&[ev(2), ev(3), ev(4), ev(5)]));
    assert_eq!(
        next.at_ms,
        MONO0 + 28,
        "sent as soon as the first was answered"
    );
    h.ok(AS1);
    assert_eq!(h.open_opt(AS1).map(|s| s.id), None);
    assert_eq!(h.delivered(AS1), range(1, 5));
    assert!(
        h.queued_keys().is_empty(),
        "delivered events leave the store"
    );
}

/// Never two transactions in flight to one appservice, however events arrive (the world
/// asserts it on every send; this drives many arrivals and answers).
#[test]
fn at_most_one_txn_in_flight_per_appservice() {
    let mut h = Harness::new(config(), &[AS1]);
    for n in 1..=30 {
        h.enq_ok(AS1, &[ev(n)]);
        if n % 7 == 0 {
            h.ok(AS1);
        }
        assert!(h.status(AS1).in_flight);
    }
    let txns = h.drain_ok(AS1);
    assert_eq!(txns, vec![range(22, 28), range(29, 30)]);
    assert_eq!(h.delivered(AS1), range(1, 30));
}

/// 250 events, the first in flight alone: the rest go as exactly 100, 100 and 49.
#[test]
fn event_cap_splits_backlog_into_100_100_49() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.enq_range(AS1, 2..=250);
    let txns = h.drain_ok(AS1);
    assert_eq!(
        txns,
        vec![vec![1], range(2, 101), range(102, 201), range(202, 250)]
    );
    let ids: Vec<String> = h.sends(AS1).into_iter().map(|s| s.txn_id).collect();
    let expected: Vec<String> = (1..=4).map(|n| h.id(AS1, n)).collect();
    assert_eq!(ids, expected);
}

/// The byte cap: a body may reach the cap exactly but never pass it; the bytes are exactly
/// `{"events":[a,b]}`.
#[test]
fn byte_cap_fills_body_up_to_the_exact_limit() {
    let config = Config {
        max_txn_body_bytes: 1024,
        ..config()
    };
    let mut h = Harness::new(config, &[AS1]);
    h.enq_ok(AS1, &[ev(0)]);
    // 11 (`{"events":[`) + 505 + 1 (`,`) + 505 + 2 (`]}`) = 1024.
    let fits: Vec<String> = (1..=4).map(|n| ev_sized(n, 505)).collect();
    h.enq_ok(AS1, &fits);
    h.ok(AS1);
    let two = h.ok(AS1);
    assert_eq!(two.body, body_of(&fits[0..2]));
    assert_eq!(two.body.len(), 1024);
    assert_eq!(h.ok(AS1).body, body_of(&fits[2..4]));

    // One byte more each and they no longer fit together.
    h.enq_ok(AS1, &[ev(10)]);
    let over: Vec<String> = (11..=12).map(|n| ev_sized(n, 506)).collect();
    h.enq_ok(AS1, &over);
    h.ok(AS1);
    let alone = h.ok(AS1);
    assert_eq!(alone.body, body_of(&over[0..1]));
    assert_eq!(alone.body.len(), 519);
    assert_eq!(h.ok(AS1).body, body_of(&over[1..2]));
    assert_eq!(h.open_opt(AS1).map(|s| s.id), None);
}

/// An event larger than the byte cap still travels, alone, and nothing is merged after it.
#[test]
fn oversized_single_event_travels_alone() {
    let config = Config {
        max_txn_body_bytes: 1024,
        ..config()
    };
    let mut h = Harness::new(config, &[AS1]);
    let big = ev_sized(1, 2000);
    h.enq_ok(AS1, &[big.clone(), ev(2), ev(3)]);
    let sent = h.ok(AS1);
    assert_eq!(sent.body, body_of(std::slice::from_ref(&big)));
    assert_eq!(sent.body.len(), 2013);
    assert_eq!(h.ok(AS1).body, body_of(&[ev(2), ev(3)]));

    // Also when it arrives behind small events: they go first, it goes alone.
    h.enq_ok(AS1, &[ev(4)]);
    h.enq_ok(AS1, &[ev(5), ev_sized(6, 3000), ev(7)]);
    assert_eq!(h.drain_ok(AS1), vec![vec![4], vec![5], vec![6], vec![7]]);
}

/// Events are stored and sent verbatim, without surrounding whitespace; the backlog counts the
/// trimmed bytes.
#[test]
fn event_json_is_sent_verbatim_without_outer_whitespace() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(0)]);
    let raw = "  {\"event_id\":\"$e1\",  \"body\":\"caf\\u00e9 \u{2615}\"}\n\t";
    let trimmed = "{\"event_id\":\"$e1\",  \"body\":\"caf\\u00e9 \u{2615}\"}";
    h.enq_ok(AS1, &[raw.to_owned()]);
    assert_eq!(
        h.status(AS1).backlog_bytes,
        (ev(0).len() + trimmed.len()) as u64
    );
    h.ok(AS1);
    assert_eq!(h.ok(AS1).body, body_of(&[trimmed.to_owned()]));
}

// ---------------------------------------------------------------------------------------------
// Transaction ids
// ---------------------------------------------------------------------------------------------

/// Ids are `{epoch}.{counter}`, the epoch being 16 hex digits of the first random value drawn
/// for the record (the draw before it seeds the jitter).
#[test]
fn txn_ids_are_epoch_dot_counter_from_the_records_random_draw() {
    let config = config();
    let mut world = World::new(SEED, &config);
    world.scripted = VecDeque::from([0x1111, 0xab, 0x0123_4567_89ab_cdef]);
    let mut h = Harness::over(world, config, &[AS1, AS2]);
    assert_eq!(h.world.draws, vec![0x1111, 0xab, 0x0123_4567_89ab_cdef]);
    assert_eq!(h.meta(AS1)["epoch"], "00000000000000ab");
    assert_eq!(h.meta(AS2)["epoch"], "0123456789abcdef");

    for n in 1..=3 {
        h.enq_ok(AS1, &[ev(n)]);
        h.ok(AS1);
    }
    h.enq_ok(AS2, &[ev(1)]);
    let ids: Vec<String> = h.world.sends.iter().map(|s| s.txn_id.clone()).collect();
    assert_eq!(
        ids,
        vec![
            "00000000000000ab.1",
            "00000000000000ab.2",
            "00000000000000ab.3",
            "0123456789abcdef.1"
        ]
    );
}

/// Ids never repeat across crashes: the counter is durable, and a resend after a crash reuses
/// only the id of the very transaction it resends.
#[test]
fn txn_ids_never_repeat_across_restarts() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.ok(AS1);
    h.enq_ok(AS1, &[ev(2)]);
    h.restart();
    assert_eq!(
        h.open(AS1).txn_id,
        h.id(AS1, 2),
        "the unanswered txn is resent"
    );
    h.ok(AS1);
    h.enq_ok(AS1, &[ev(3)]);
    h.ok(AS1);
    h.restart();
    h.restart();
    h.enq_ok(AS1, &[ev(4)]);
    h.ok(AS1);

    let sends = h.sends(AS1);
    let ids: Vec<&str> = sends.iter().map(|s| s.txn_id.as_str()).collect();
    let expected: Vec<String> = [1, 2, 2, 3, 4].iter().map(|n| h.id(AS1, *n)).collect();
    assert_eq!(ids, expected);
    assert_eq!(sends[1].body, sends[2].body);
    assert_eq!(h.delivered(AS1), range(1, 4));
    assert_eq!(h.meta(AS1)["next_txn"], 5);
}

/// A lost record (its meta key gone) gets a new epoch, so new ids differ from every earlier
/// one even though the counter starts again at 1.
#[test]
fn lost_record_gets_a_new_epoch_and_ids_never_collide() {
    let mut h = Harness::new(config(), &[AS1]);
    for n in 1..=3 {
        h.enq_ok(AS1, &[ev(n)]);
        h.ok(AS1);
    }
    let old_epoch = h.meta(AS1)["epoch"].as_str().map(str::to_owned);
    h.crash();
    h.world.store.remove("as/as1/meta");
    h.world.scripted = VecDeque::from([0x2222, 0xfeed]);
    h.start(&[]).expect("restart");
    assert_eq!(h.meta(AS1)["epoch"], "000000000000feed");
    assert_ne!(old_epoch.as_deref(), Some("000000000000feed"));
    for n in 4..=5 {
        h.enq_ok(AS1, &[ev(n)]);
        h.ok(AS1);
    }
    let ids: Vec<String> = h.sends(AS1).into_iter().map(|s| s.txn_id).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 5, "no id repeats: {ids:?}");
    assert_eq!(ids[3], "000000000000feed.1");
    assert_eq!(ids[4], "000000000000feed.2");
    assert_eq!(h.delivered(AS1), range(1, 5));
}

/// A lost record whose events are still stored is rebuilt from them: the stored txn goes
/// again under its old id, the queued events follow under the new epoch, and events enqueued
/// after the loss queue behind them. Nothing is dropped and status stays consistent.
#[test]
fn lost_record_with_stored_events_delivers_them_under_a_new_epoch() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.ok(AS1);
    h.enq_ok(AS1, &[ev(2)]);
    let x = h.open(AS1);
    h.enq_range(AS1, 3..=4);
    h.crash();
    h.world.store.remove("as/as1/meta");
    h.world.scripted = VecDeque::from([0x2222, 0xfeed]);
    h.start(&[]).expect("restart");
    let rebuilt = h.meta(AS1);
    assert_eq!(
        (
            &rebuilt["epoch"],
            &rebuilt["head"],
            &rebuilt["tail"],
            &rebuilt["next_txn"]
        ),
        (
            &serde_json::json!("000000000000feed"),
            &serde_json::json!(1),
            &serde_json::json!(4),
            &serde_json::json!(1)
        )
    );
    let st = h.status(AS1);
    assert_eq!((st.backlog_txns, st.backlog_events), (2, 3));
    assert_eq!(
        st.backlog_bytes,
        [2, 3, 4].map(|n| ev(n).len() as u64).iter().sum::<u64>()
    );
    assert_eq!(h.logs(LogLevel::Warn, "record lost").len(), 1);

    let resent = h.open(AS1);
    assert_eq!(
        (resent.txn_id.as_str(), &resent.body),
        (x.txn_id.as_str(), &x.body)
    );
    h.enq_ok(AS1, &[ev(5)]);
    assert_eq!(h.drain_ok(AS1), vec![vec![2], vec![3, 4, 5]]);
    assert_eq!(h.sends(AS1)[3].txn_id, "000000000000feed.1");
    assert_eq!(h.delivered(AS1), range(1, 5));
    assert_eq!(h.status(AS1).backlog_bytes, 0);
    assert!(h.queued_keys().is_empty());
}

/// Rebuilding a lost record reads the queue in pages, so a backlog longer than one page keeps
/// every event.
#[test]
fn lost_record_rebuild_reads_a_long_queue_in_pages() {
    let mut h = Harness::new(config(), &[AS1]);
    h.world.faults.refuse_sends = Some("not yet".into());
    for chunk in 0..25 {
        h.enq_range(AS1, chunk * 100 + 1..=chunk * 100 + 100);
    }
    h.crash();
    h.world.store.remove("as/as1/meta");
    h.world.faults.refuse_sends = None;
    h.start(&[]).expect("restart");
    assert_eq!(h.status(AS1).backlog_events, 2500);
    let txns = h.drain_ok(AS1);
    let expected: Vec<Vec<u32>> = (0..25).map(|c| range(c * 100 + 1, c * 100 + 100)).collect();
    assert_eq!(
        txns, expected,
        "the txn stored when the host refused, then 24 more"
    );
    assert_eq!(h.delivered(AS1), range(1, 2500));
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

/// A retry resends the same id with the same bytes, whatever failed.
#[test]
fn retry_resends_exactly_the_same_id_and_bytes() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, 1..=3);
    let first = h.finish_open(AS1, SendOutcome::Timeout);
    h.advance(2000);
    let second = h.finish_open(AS1, http(500));
    h.advance(4000);
    let third = h.finish_open(AS1, refused());
    h.advance(8000);
    let fourth = h.ok(AS1);
    for retry in [&second, &third, &fourth] {
        assert_eq!(retry.txn_id, first.txn_id);
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(first.body, body_of(&[ev(1), ev(2), ev(3)]));
    assert_eq!(h.sends(AS1).len(), 4);
}

/// F16: T(X)=[E1] loses its response; E2 arrives; the retry is X with exactly [E1] and E2
/// travels under a new id.
#[test]
fn f16_lost_response_retries_same_txn_and_new_event_gets_new_id() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, lost());
    h.enq_ok(AS1, &[ev(2)]);
    assert_eq!(
        h.sends(AS1).len(),
        1,
        "a DOWN appservice waits for its timer"
    );
    h.advance(2000);
    let retry = h.ok(AS1);
    assert_eq!(retry.txn_id, x.txn_id);
    assert_eq!(retry.body, body_of(&[ev(1)]));
    let next = h.ok(AS1);
    assert_eq!(next.txn_id, h.id(AS1, 2));
    assert_eq!(next.body, body_of(&[ev(2)]));
    assert_eq!(h.delivered(AS1), vec![1, 2]);
}

/// `backoff_delay_ms` doubles from 2 s per failure and stops at 512 s, without overflow.
#[test]
fn backoff_delay_doubles_from_2s_and_caps_at_512s() {
    let config = config();
    let delays: Vec<u64> = (0..=11).map(|f| backoff_delay_ms(&config, f)).collect();
    assert_eq!(
        delays,
        vec![
            2_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 512_000,
            512_000
        ]
    );
    assert_eq!(backoff_delay_ms(&config, u32::MAX), 512_000);
    let huge = Config {
        retry_delay_ms_initial: 1 << 62,
        retry_delay_ms_max: u64::MAX,
        ..config
    };
    assert_eq!(backoff_delay_ms(&huge, 1), 1 << 62);
    assert_eq!(backoff_delay_ms(&huge, 2), 1 << 63);
    assert_eq!(backoff_delay_ms(&huge, 3), u64::MAX);
    assert_eq!(backoff_delay_ms(&huge, 64), u64::MAX);
}

/// Fails the send in flight `failures` times, letting each retry timer fire; returns the
/// delays of the timers set.
fn retry_delays(seed: u64, jitter: u8, failures: usize) -> Vec<u64> {
    let config = Config {
        retry_jitter_percent: jitter,
        ..config()
    };
    let world = World::new(seed, &config);
    let mut h = Harness::over(world, config, &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    for _ in 0..failures {
        let failed_at = h.world.mono_ms;
        h.finish_open(AS1, SendOutcome::Timeout);
        let delay = *h.delays().last().expect("a retry timer");
        h.advance(delay);
        assert_eq!(h.open(AS1).at_ms, failed_at + delay, "retried when due");
    }
    h.delays()
}

/// Without jitter the retry timers are exactly 2 s, 4 s, 8 s, … and then 512 s each.
#[test]
fn backoff_timers_without_jitter_are_exact() {
    assert_eq!(
        retry_delays(SEED, 0, 11),
        vec![
            2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 512_000,
            512_000
        ]
    );
}

/// With 20 % jitter each delay lies in [0.8 d, d]; the same seed gives the same delays.
#[test]
fn backoff_jitter_stays_within_bounds_and_repeats_per_seed() {
    let config = config();
    let delays = retry_delays(SEED, 20, 12);
    assert_eq!(delays.len(), 12);
    for (i, delay) in delays.iter().enumerate() {
        let d = backoff_delay_ms(&config, u32::try_from(i + 1).expect("small"));
        assert!(
            d * 8 / 10 <= *delay && *delay <= d,
            "delay {delay} of failure {} outside [{}, {d}]",
            i + 1,
            d * 8 / 10
        );
    }
    let nominal: Vec<u64> = (1..=12).map(|f| backoff_delay_ms(&config, f)).collect();
    assert_ne!(delays, nominal, "jitter changes the delays");
    assert_eq!(retry_delays(SEED, 20, 12), delays);
    assert_ne!(retry_delays(SEED + 1, 20, 12), delays);
}

/// A success resets the backoff: the next failure waits 2 s again.
#[test]
fn backoff_resets_after_success() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.finish_open(AS1, SendOutcome::Timeout);
    h.advance(2000);
    h.finish_open(AS1, SendOutcome::Timeout);
    h.advance(4000);
    h.ok(AS1);
    assert_eq!(h.status(AS1).failed_attempts, 0);
    h.enq_ok(AS1, &[ev(2)]);
    h.finish_open(AS1, SendOutcome::Timeout);
    assert_eq!(h.delays(), vec![2000, 4000, 2000]);
}

/// After a retry succeeds the backlog drains back to back (no timers), RECOVERING, then UP
/// with the DOWN flag cleared in the store.
#[test]
fn recovery_drains_back_to_back_then_is_up() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.finish_open(AS1, refused());
    assert_eq!(h.status(AS1).phase, Phase::Down);
    assert_eq!(h.meta(AS1)["down"], true);
    h.enq_range(AS1, 2..=250);
    h.advance(2000);
    let retried_at = h.world.mono_ms;
    let mut phases = Vec::new();
    let mut sizes = Vec::new();
    while h.open_opt(AS1).is_some() {
        assert_eq!(h.open(AS1).at_ms, retried_at, "no pause between txns");
        sizes.push(numbers(&h.ok(AS1).body).len());
        phases.push(h.status(AS1).phase);
    }
    assert_eq!(sizes, vec![1, 100, 100, 49]);
    assert_eq!(
        phases,
        vec![
            Phase::Recovering,
            Phase::Recovering,
            Phase::Recovering,
            Phase::Up
        ]
    );
    assert_eq!(h.delays(), vec![2000], "no timer after the retry");
    assert_eq!(h.meta(AS1)["down"], false);
    assert_eq!(h.delivered(AS1), range(1, 250));
    assert_eq!(h.logs(LogLevel::Info, "appservice is up").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------

/// DOWN and its backoff are persisted: after a crash while DOWN, the new instance retries the
/// stored txn when the backoff that was running expires (not at once, which would hammer a
/// failing appservice on every restart), then recovers.
#[test]
fn down_and_backoff_survive_a_crash() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, SendOutcome::Timeout);
    assert_eq!(h.meta(AS1)["failed_attempts"], 1);
    h.enq_ok(AS1, &[ev(2)]);
    h.advance(500);
    h.restart();
    assert_eq!(
        h.sends(AS1).len(),
        1,
        "nothing is sent at start while the backoff runs"
    );
    assert_eq!(h.status(AS1).next_retry_in_ms, Some(1_500));
    assert_eq!(h.status(AS1).failed_attempts, 1);
    h.advance(1_500);
    let resent = h.open(AS1);
    assert_eq!(
        resent.at_ms,
        MONO0 + 2_000,
        "sent when the persisted retry is due"
    );
    assert_eq!(
        (resent.txn_id.as_str(), &resent.body),
        (x.txn_id.as_str(), &x.body)
    );
    assert_eq!(h.status(AS1).phase, Phase::Down);
    h.ok(AS1);
    assert_eq!(h.status(AS1).phase, Phase::Recovering);
    let next = h.ok(AS1);
    assert_eq!(next.body, body_of(&[ev(2)]));
    assert_eq!(next.txn_id, h.id(AS1, 2));
    assert_eq!(h.status(AS1).phase, Phase::Up);
    assert_eq!(h.meta(AS1)["down"], false);
    assert_eq!(h.meta(AS1)["failed_attempts"], 0);
}

/// F1: E1 in flight, E2 and E3 queued, crash: the new instance first resends the same id with
/// exactly [E1], then [E2, E3].
#[test]
fn f1_crash_with_txn_in_flight_resends_it_then_the_queue() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.open(AS1);
    h.enq_ok(AS1, &[ev(2)]);
    h.enq_ok(AS1, &[ev(3)]);
    h.restart();
    let resent = h.ok(AS1);
    assert_eq!(resent.txn_id, x.txn_id);
    assert_eq!(resent.body, body_of(&[ev(1)]));
    let next = h.ok(AS1);
    assert_eq!(next.txn_id, h.id(AS1, 2));
    assert_eq!(next.body, body_of(&[ev(2), ev(3)]));
    assert_eq!(h.sends(AS1).len(), 3);
    assert_eq!(h.delivered(AS1), vec![1, 2, 3]);
}

/// A restart over an idle, UP appservice sends nothing and sets no timer.
#[test]
fn restart_of_an_idle_appservice_does_nothing() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.ok(AS1);
    h.restart();
    h.tick();
    assert_eq!(h.sends(AS1).len(), 1);
    assert!(h.world.timers_set.is_empty());
    assert_eq!(h.status(AS1).phase, Phase::Up);
}

/// F5: the appservice is down while 1000 events arrive one by one; once healthy they travel
/// as [E1] (fixed at the first failure), then nine of 100, then 99.
#[test]
fn f5_thousand_events_while_down_drain_in_hundreds() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, refused());
    for n in 2..=1000 {
        h.enq_ok(AS1, &[ev(n)]);
        h.advance(10);
        if let Some(retry) = h.open_opt(AS1) {
            assert_eq!(
                (retry.txn_id.as_str(), &retry.body),
                (x.txn_id.as_str(), &x.body)
            );
            h.finish_open(AS1, refused());
        }
    }
    assert_eq!(
        h.sends(AS1).len(),
        3,
        "retries at 2 s and 6 s, each of [E1] only"
    );
    assert_eq!(h.status(AS1).backlog_events, 1000);
    h.advance(8000);
    let txns = h.drain_ok(AS1);
    let sizes: Vec<usize> = txns.iter().map(Vec::len).collect();
    let mut expected = vec![1];
    expected.extend([100; 9]);
    expected.push(99);
    assert_eq!(sizes, expected);
    assert_eq!(h.delivered(AS1), range(1, 1000));
    let ids: Vec<String> = h.sends(AS1).into_iter().map(|s| s.txn_id).collect();
    let expected_ids: Vec<String> = [1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        .iter()
        .map(|n| h.id(AS1, *n))
        .collect();
    assert_eq!(ids, expected_ids);
    assert_eq!(h.status(AS1).phase, Phase::Up);
}

// ---------------------------------------------------------------------------------------------
// Storage faults
// ---------------------------------------------------------------------------------------------

/// F7: a storage error while forming a txn pauses the queue on a storage timer (growing
/// delay) and never skips or reorders: E1, E2, E3 go out in order, E1 under id 1 and E2 with
/// E3 under id 2.
#[test]
fn f7_storage_error_forming_a_txn_pauses_without_skipping() {
    let mut h = Harness::new(config(), &[AS1]);
    // An idle appservice's transaction is stored in the commit that stores its events: when
    // that commit fails, the enqueue is refused and no id is used up.
    h.world.fail_commit(1);
    assert_eq!(
        h.enq(AS1, &[ev(1)]),
        Err(EnqueueError::Storage(
            "store unavailable: injected commit fault".into()
        ))
    );
    assert!(h.sends(AS1).is_empty());
    assert_eq!(h.status(AS1).backlog_events, 0);
    h.enq_ok(AS1, &[ev(1)]);
    assert_eq!(h.open(AS1).txn_id, h.id(AS1, 1));

    // E2 waits behind E1. A new instance holds no queued chunk in memory, so forming E2's
    // transaction after E1's success reads the store, which fails (and fails again when the
    // success, recorded alone, dispatches).
    h.enq_ok(AS1, &[ev(2)]);
    h.swap();
    h.world.fail_scan(1);
    h.world.fail_scan(2);
    h.ok(AS1);
    let st = h.status(AS1);
    assert!(st.paused_by_storage);
    assert_eq!(st.phase, Phase::Up);
    assert_eq!(st.next_retry_in_ms, Some(1000));
    assert_eq!(
        st.last_error.as_deref(),
        Some("store unavailable: injected scan fault")
    );
    assert_eq!(st.backlog_txns, 1);
    assert_eq!(st.current_txn_id, None);
    assert_eq!(st.oldest_enqueued_at_ms, Some(WALL0));

    h.enq_ok(AS1, &[ev(3)]);
    assert_eq!(h.sends(AS1).len(), 1, "a paused queue waits for its timer");
    // The next attempt scans fine but cannot store the txn.
    h.world.fail_commit(1);
    h.advance(1000);
    assert_eq!(h.sends(AS1).len(), 1);
    assert_eq!(h.meta(AS1)["next_txn"], 2, "no id is used up");
    assert_eq!(h.delays(), vec![1000, 2000]);
    h.advance(2000);
    let sent = h.ok(AS1);
    assert_eq!(sent.txn_id, h.id(AS1, 2));
    assert_eq!(sent.body, body_of(&[ev(2), ev(3)]));
    assert!(!h.status(AS1).paused_by_storage);

    // The same in the middle of a backlog: the txn after a delivered one cannot be stored.
    h.enq_ok(AS1, &[ev(4)]);
    h.enq_range(AS1, 5..=6);
    h.world.fail_commit(1); // Recording E4's success and storing [E5, E6]: one commit.
    h.ok(AS1);
    assert_eq!(h.open_opt(AS1).map(|s| s.id), None);
    assert_eq!(
        h.status(AS1).next_retry_in_ms,
        Some(1000),
        "storage delay reset"
    );
    h.advance(1000);
    let next = h.ok(AS1);
    assert_eq!(next.txn_id, h.id(AS1, 4));
    assert_eq!(next.body, body_of(&[ev(5), ev(6)]));
    assert_eq!(h.delivered(AS1), range(1, 6));
}

/// F8: when recording a 2xx fails the appservice stays UP, the write is retried on the storage
/// timer, and the delivered txn is neither resent nor renamed.
#[test]
fn f8_commit_failure_after_2xx_retries_the_write_without_new_id() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.open(AS1);
    h.world.fail_commit(1);
    h.ok(AS1);
    let st = h.status(AS1);
    assert_eq!(st.phase, Phase::Up);
    assert_eq!(st.failed_attempts, 0);
    assert!(st.paused_by_storage);
    assert_eq!(st.current_txn_id.as_deref(), Some(x.txn_id.as_str()));
    assert_eq!((st.delivered_txns, st.backlog_events), (0, 1));
    assert_eq!(h.meta(AS1)["down"], false);
    let warned = h.logs(LogLevel::Warn, "delivered but not recorded");
    assert_eq!(
        warned[0].message,
        format!(
            "txn {} delivered but not recorded: store unavailable: injected commit fault",
            x.txn_id
        )
    );

    h.enq_ok(AS1, &[ev(2)]);
    assert_eq!(
        h.sends(AS1).len(),
        1,
        "nothing is sent before the success is recorded"
    );
    h.advance(1000);
    let next = h.ok(AS1);
    assert_eq!(next.txn_id, h.id(AS1, 2));
    assert_eq!(next.body, body_of(&[ev(2)]));
    assert_eq!(h.sends(AS1).len(), 2, "the delivered txn is not resent");
    let st = h.status(AS1);
    assert_eq!((st.delivered_txns, st.delivered_events), (2, 2));
    assert!(h.queued_keys().is_empty());
}

/// F8 after a crash: a 2xx that was never recorded leads to a resend of the same txn (same id,
/// same bytes), which the appservice deduplicates.
#[test]
fn f8_crash_before_success_is_recorded_resends_the_same_txn() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.world.fail_commit(1);
    let x = h.ok(AS1);
    h.restart();
    let resent = h.ok(AS1);
    assert_eq!((resent.txn_id, resent.body), (x.txn_id, x.body));
    assert!(h.queued_keys().is_empty());
    assert_eq!(h.delivered(AS1), vec![1]);
}

/// F17: while the stored body cannot be read, a retry sends nothing (never a partial or empty
/// body), backs off 1 s, 2 s, 4 s, and sends the whole body once it is readable.
#[test]
fn f17_unreadable_body_during_recovery_is_never_sent_partial() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, SendOutcome::Timeout);
    h.enq_ok(AS1, &[ev(2)]);
    h.world.faults.unreadable.insert("as/as1/txn-body".into());
    h.advance(2000 + 1000 + 2000);
    assert_eq!(h.sends(AS1).len(), 1);
    assert_eq!(h.delays(), vec![2000, 1000, 2000, 4000]);
    let st = h.status(AS1);
    assert_eq!(st.phase, Phase::Down);
    assert!(st.paused_by_storage);
    assert_eq!(
        st.last_error.as_deref(),
        Some("store unavailable: injected get fault")
    );

    h.world.faults.unreadable.clear();
    h.advance(4000);
    let retry = h.ok(AS1);
    assert_eq!(
        (retry.txn_id.as_str(), &retry.body),
        (x.txn_id.as_str(), &x.body)
    );
    assert_eq!(retry.body, body_of(&[ev(1)]));
    assert_eq!(h.ok(AS1).body, body_of(&[ev(2)]));
    assert_eq!(h.status(AS1).phase, Phase::Up);
}

/// F17 at a restart: a body unreadable when the new instance starts is not sent until it can
/// be read, then it goes whole.
#[test]
fn f17_unreadable_body_at_restart_waits_and_is_sent_whole() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, 1..=2);
    let x = h.finish_open(AS1, SendOutcome::Timeout);
    h.world.faults.unreadable.insert("as/as1/txn-body".into());
    h.restart();
    h.advance(2_000);
    assert_eq!(h.sends(AS1).len(), 1);
    assert!(h.status(AS1).paused_by_storage);
    h.world.faults.unreadable.clear();
    h.advance(1000);
    let retry = h.ok(AS1);
    assert_eq!(
        (retry.txn_id, retry.body),
        (x.txn_id, body_of(&[ev(1), ev(2)]))
    );
}

/// A stored txn whose events are gone from the store is never replaced by a body formed anew
/// (it might differ): the queue stays paused and an error is logged.
#[test]
fn missing_body_is_never_replaced_by_another() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, SendOutcome::Timeout);
    h.enq_ok(AS1, &[ev(2)]);
    assert_eq!(h.queued_keys().len(), 2, "one chunk per enqueued batch");
    // A new instance, so no copy of the chunk is left in memory.
    h.restart();
    h.world.store.remove("as/as1/c/0000000000000000");
    h.advance(60_000);
    assert_eq!(h.sends(AS1).len(), 1);
    let errors = h.logs(LogLevel::Error, "is missing from the store");
    assert!(!errors.is_empty());
    assert!(errors[0].message.contains(&x.txn_id), "{:?}", errors[0]);
    assert_eq!(errors[0].appservice.as_deref(), Some(AS1));
    assert!(h.status(AS1).paused_by_storage);
}

// ---------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------

/// 401 and 403 are failures with backoff, logged as errors that point at the hs_token.
#[test]
fn auth_failure_backs_off_and_logs_an_hs_token_error() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, http(401));
    let st = h.status(AS1);
    assert_eq!(st.phase, Phase::Down);
    assert_eq!(st.last_error.as_deref(), Some("HTTP 401"));
    assert_eq!(st.next_retry_in_ms, Some(2000));
    h.advance(2000);
    h.finish_open(AS1, http(403));
    assert_eq!(h.delays(), vec![2000, 4000]);
    let errors = h.logs(LogLevel::Error, "hs_token");
    assert_eq!(errors.len(), 2);
    assert!(errors[0].message.contains("HTTP 401") && errors[0].message.contains(&x.txn_id));
    assert!(errors[1].message.contains("HTTP 403"));
    assert!(errors.iter().all(|l| l.appservice.as_deref() == Some(AS1)));
    h.advance(4000);
    assert_eq!(h.ok(AS1).txn_id, x.txn_id);
}

/// A 2xx whose body is not JSON counts as delivered, with a warning.
#[test]
fn non_json_2xx_is_success_with_a_warning() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(
        AS1,
        SendOutcome::Response {
            status: 200,
            body_is_json: false,
        },
    );
    let warned = h.logs(LogLevel::Warn, "not JSON");
    assert_eq!(warned.len(), 1);
    assert_eq!(
        warned[0].message,
        format!("txn {} accepted with a body that is not JSON", x.txn_id)
    );
    let st = h.status(AS1);
    assert_eq!(
        (st.phase, st.delivered_txns, st.backlog_events),
        (Phase::Up, 1, 0)
    );
}

/// 204 (no body) and 200 with JSON are successes without any warning.
#[test]
fn no_content_204_is_success_without_a_warning() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.finish_open(
        AS1,
        SendOutcome::Response {
            status: 204,
            body_is_json: false,
        },
    );
    h.enq_ok(AS1, &[ev(2)]);
    h.finish_open(AS1, http(200));
    assert!(h.world.logs.iter().all(|l| l.level < LogLevel::Warn));
    assert_eq!(h.status(AS1).delivered_txns, 2);
}

/// 413 retires the id and sends the events again in halves under new ids; nothing is dropped,
/// no failure is counted, and the full cap returns once the backlog is empty.
#[test]
fn too_large_413_splits_into_halves_with_new_ids() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.enq_range(AS1, 2..=11);
    h.ok(AS1);
    let big = h.finish_open(AS1, http(413));
    assert_eq!(numbers(&big.body), range(2, 11));
    let st = h.status(AS1);
    assert_eq!((st.phase, st.failed_attempts), (Phase::Up, 0));
    let warned = h.logs(LogLevel::Warn, "HTTP 413");
    assert_eq!(warned.len(), 1);
    assert!(warned[0].message.contains(&big.txn_id));

    let first_half = h.open(AS1);
    assert_eq!(first_half.at_ms, big.at_ms, "sent at once");
    assert_eq!(first_half.txn_id, h.id(AS1, 3));
    assert_eq!(h.drain_ok(AS1), vec![range(2, 6), range(7, 11)]);

    // Once drained the cap is back to 100.
    h.enq_ok(AS1, &[ev(12)]);
    h.enq_range(AS1, 13..=20);
    assert_eq!(h.drain_ok(AS1), vec![vec![12], range(13, 20)]);

    let ids: Vec<String> = h.sends(AS1).into_iter().map(|s| s.txn_id).collect();
    let expected: Vec<String> = (1..=6).map(|n| h.id(AS1, n)).collect();
    assert_eq!(ids, expected, "the refused id is never sent again");
    assert_eq!(h.delivered(AS1), range(1, 20));
    assert!(h.world.timers_set.is_empty());
}

/// 413 on a txn of a single event cannot be split: it is a failure and backs off.
#[test]
fn too_large_413_on_a_single_event_backs_off() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, http(413));
    let st = h.status(AS1);
    assert_eq!(st.phase, Phase::Down);
    assert_eq!(st.failed_attempts, 1);
    assert_eq!(st.last_error.as_deref(), Some("HTTP 413"));
    assert_eq!(h.delays(), vec![2000]);
    h.advance(2000);
    assert_eq!(h.open(AS1).txn_id, x.txn_id);
}

/// A send the host refuses to start counts as a failed attempt: DOWN, backoff, and the same
/// stored txn once the host accepts.
#[test]
fn host_refusing_a_send_is_a_failure_with_backoff() {
    let mut h = Harness::new(config(), &[AS1]);
    h.world.faults.refuse_sends = Some("no route to the appservice".into());
    h.enq_ok(AS1, &[ev(1)]);
    let st = h.status(AS1);
    assert_eq!(st.phase, Phase::Down);
    assert_eq!(
        st.last_error.as_deref(),
        Some("host refused the send: no route to the appservice")
    );
    assert_eq!(st.current_txn_id, Some(h.id(AS1, 1)));
    h.world.faults.refuse_sends = None;
    h.advance(2000);
    let sent = h.ok(AS1);
    assert_eq!((sent.txn_id, sent.body), (h.id(AS1, 1), body_of(&[ev(1)])));
}

// ---------------------------------------------------------------------------------------------
// Enqueue
// ---------------------------------------------------------------------------------------------

/// A batch for an appservice that is not registered is rejected and nothing is stored.
#[test]
fn enqueue_rejects_an_unknown_appservice() {
    let mut h = Harness::new(config(), &[AS1]);
    let before = h.world.store.clone();
    let commits = h.world.commits;
    assert_eq!(
        h.enq("nope", &[ev(1)]),
        Err(EnqueueError::UnknownAppservice("nope".into()))
    );
    assert_eq!(h.world.store, before);
    assert_eq!(h.world.commits, commits);
    assert!(h.world.sends.is_empty());
}

/// A batch with an item that is not JSON is rejected whole, naming the item; nothing stored.
#[test]
fn enqueue_rejects_invalid_json_naming_the_item() {
    let mut h = Harness::new(config(), &[AS1]);
    let before = h.world.store.clone();
    for bad in ["{not json", "{\"a\":1} trailing", ""] {
        match h.enq(AS1, &[ev(1), ev(2), bad.to_owned()]) {
            Err(EnqueueError::InvalidItem(2, why)) => {
                assert!(why.starts_with("not valid JSON: "), "{why}")
            }
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
    assert_eq!(h.world.store, before);
    assert!(h.world.sends.is_empty());
}

/// JSON that is not an object is rejected as not a room event; nothing stored.
#[test]
fn enqueue_rejects_json_that_is_not_an_object() {
    let mut h = Harness::new(config(), &[AS1]);
    let before = h.world.store.clone();
    for bad in ["[1,2]", "\"text\"", "42", "null", "true", " [{}] "] {
        assert_eq!(
            h.enq(AS1, &[bad.to_owned(), ev(1)]),
            Err(EnqueueError::InvalidItem(
                0,
                "a room event must be a JSON object".into()
            )),
            "{bad}"
        );
    }
    assert_eq!(h.world.store, before);
    assert!(h.world.sends.is_empty());
}

/// When the one commit of an enqueue call fails, every batch of the call fails with Storage
/// and nothing is stored; later events get the sequence numbers the lost ones would have had.
#[test]
fn enqueue_commit_failure_fails_every_batch_and_stores_nothing() {
    let mut h = Harness::new(config(), &[AS1, AS2]);
    let before = h.world.store.clone();
    h.world.faults.commits = true;
    let results = h.enqueue(&[
        batch(AS1, &[ev(1)]),
        batch(AS2, &[ev(1), ev(2)]),
        batch(AS1, &[ev(3)]),
        batch("nope", &[ev(4)]),
    ]);
    let storage = || {
        Err(EnqueueError::Storage(
            "store unavailable: injected commit fault".into(),
        ))
    };
    assert_eq!(
        results,
        vec![
            storage(),
            storage(),
            storage(),
            Err(EnqueueError::UnknownAppservice("nope".into()))
        ]
    );
    assert_eq!(h.world.store, before);
    assert!(h.world.sends.is_empty());
    assert_eq!(h.logs(LogLevel::Warn, "enqueue not stored").len(), 1);

    h.world.faults.commits = false;
    h.enq_ok(AS1, &[ev(5)]);
    assert_eq!(h.open(AS1).body, body_of(&[ev(5)]));
    assert_eq!(
        h.queued_keys(),
        vec!["as/as1/c/0000000000000000".to_owned()]
    );
    let st = h.status(AS1);
    assert_eq!(
        (st.backlog_events, st.backlog_bytes),
        (1, ev(5).len() as u64)
    );
}

/// Good batches are accepted next to rejected ones in the same call, in one commit, and each
/// appservice starts its own send.
#[test]
fn enqueue_accepts_good_batches_next_to_rejected_ones() {
    let mut h = Harness::new(config(), &[AS1, AS2]);
    let commits = h.world.commits;
    let results = h.enqueue(&[
        batch(AS1, &[ev(1)]),
        batch(AS1, &["[]".to_owned()]),
        batch("nope", &[ev(9)]),
        batch(AS2, &[ev(2)]),
        batch(AS1, &[ev(3)]),
        batch(AS2, &[]),
    ]);
    assert_eq!(
        results,
        vec![
            Ok(1),
            Err(EnqueueError::InvalidItem(
                0,
                "a room event must be a JSON object".into()
            )),
            Err(EnqueueError::UnknownAppservice("nope".into())),
            Ok(1),
            Ok(1),
            Ok(0),
        ]
    );
    assert_eq!(
        h.world.commits,
        commits + 1,
        "one commit stores the batches and each idle appservice's new txn"
    );
    assert_eq!(h.open(AS1).body, body_of(&[ev(1), ev(3)]));
    assert_eq!(h.open(AS2).body, body_of(&[ev(2)]));
}

// ---------------------------------------------------------------------------------------------
// Operator controls and ticks
// ---------------------------------------------------------------------------------------------

/// force_retry cancels the backoff timer and resends at once; the cancelled timer firing
/// late changes nothing, and the backoff keeps growing.
#[test]
fn force_retry_cancels_the_backoff_and_sends_at_once() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, refused());
    let timer = h.world.timers_set[0];
    assert_eq!(timer.delay_ms, 2000);
    h.advance(500);
    assert_eq!(h.force_retry(AS1), Ok(()));
    assert_eq!(h.world.cancelled, vec![timer.id]);
    assert!(h.world.timers.is_empty());
    let retry = h.open(AS1);
    assert_eq!(retry.at_ms, MONO0 + 500);
    assert_eq!(
        (retry.txn_id.as_str(), &retry.body),
        (x.txn_id.as_str(), &x.body)
    );
    assert_eq!(h.logs(LogLevel::Info, "retry forced").len(), 1);
    assert_eq!(h.status(AS1).next_retry_in_ms, None);

    // The host fires the cancelled timer anyway: ignored. Forcing while in flight: no-op.
    h.with(|s, w| s.timer_fired(w, timer.id));
    assert_eq!(h.force_retry(AS1), Ok(()));
    assert_eq!(h.sends(AS1).len(), 2);

    h.finish_open(AS1, refused());
    assert_eq!(h.delays(), vec![2000, 4000]);
}

/// force_retry of an appservice that is not registered is an error.
#[test]
fn force_retry_of_an_unknown_appservice_errors() {
    let mut h = Harness::new(config(), &[AS1]);
    assert_eq!(
        h.force_retry("nope"),
        Err(EnqueueError::UnknownAppservice("nope".into()))
    );
}

/// A DOWN appservice whose retry timer the host lost is retried by the next tick after the
/// timer was due, not before: a missed timer never leaves a queue idle for good.
#[test]
fn tick_retries_a_down_appservice_whose_timer_was_lost() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.finish_open(AS1, SendOutcome::Timeout);
    h.world.timers.clear(); // The host lost the timer.
    h.advance(1999);
    h.tick();
    assert_eq!(h.sends(AS1).len(), 1, "not before the retry is due");
    h.advance(5000);
    assert_eq!(h.sends(AS1).len(), 1);
    h.tick();
    let retry = h.open(AS1);
    assert_eq!(retry.txn_id, x.txn_id);
    assert_eq!(retry.at_ms, MONO0 + 6999);
    h.ok(AS1);
    assert_eq!(h.status(AS1).phase, Phase::Up);
}

/// A storage pause whose timer the host lost resumes at the next tick as well.
#[test]
fn tick_resumes_a_storage_pause_whose_timer_was_lost() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    h.enq_ok(AS1, &[ev(2)]);
    // A new instance reads E2 from the store to form its transaction, and that read fails
    // (twice: with the success, and when the success recorded alone dispatches).
    h.swap();
    h.world.fail_scan(1);
    h.world.fail_scan(2);
    h.ok(AS1);
    assert!(h.status(AS1).paused_by_storage);
    h.world.timers.clear();
    h.advance(3000);
    assert_eq!(h.sends(AS1).len(), 1, "the lost timer resumes nothing");
    h.tick();
    assert_eq!(h.ok(AS1).body, body_of(&[ev(2)]));
}

/// Ticks on healthy, idle or busy appservices change nothing.
#[test]
fn tick_without_anything_due_does_nothing() {
    let mut h = Harness::new(config(), &[AS1, AS2]);
    h.enq_ok(AS1, &[ev(1)]);
    h.enq_ok(AS2, &[ev(1)]);
    h.finish_open(AS2, SendOutcome::Timeout);
    for _ in 0..3 {
        h.advance(500);
        h.tick();
    }
    assert_eq!(h.world.sends.len(), 2);
    assert_eq!(h.delays(), vec![2000]);
}

/// One appservice that never answers or keeps failing does not delay another.
#[test]
fn slow_or_failing_appservice_never_blocks_another() {
    let mut h = Harness::new(config(), &[AS1, AS2, "as3"]);
    h.enq_ok(AS1, &[ev(1)]); // In flight forever.
    h.enq_ok("as3", &[ev(1)]);
    h.finish_open("as3", refused()); // DOWN, backing off.
    for n in 1..=5 {
        h.advance(100);
        let results = h.enqueue(&[
            batch(AS1, &[ev(n + 1)]),
            batch("as3", &[ev(n + 1)]),
            batch(AS2, &[ev(n)]),
        ]);
        assert_eq!(results, vec![Ok(1), Ok(1), Ok(1)]);
        let sent = h.open(AS2);
        assert_eq!(sent.at_ms, h.world.mono_ms, "sent the moment it arrived");
        assert_eq!(sent.body, body_of(&[ev(n)]));
        h.ok(AS2);
    }
    assert_eq!(h.delivered(AS2), range(1, 5));
    assert_eq!(h.sends(AS1).len(), 1);
    assert_eq!(h.status(AS1).backlog_events, 6);
}

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

/// Every status field has the exact value through a failure, a retry and recovery.
#[test]
fn status_reports_exact_backlog_and_retry_fields() {
    let mut h = Harness::new(config(), &[AS1, AS2]);
    let bytes = |ns: &[u32]| ns.iter().map(|n| ev(*n).len() as u64).sum::<u64>();
    let idle = Status {
        appservice: AS1.into(),
        phase: Phase::Up,
        backlog_txns: 0,
        backlog_events: 0,
        backlog_bytes: 0,
        oldest_enqueued_at_ms: None,
        current_txn_id: None,
        in_flight: false,
        failed_attempts: 0,
        last_error: None,
        next_retry_in_ms: None,
        paused_by_storage: false,
        delivered_txns: 0,
        delivered_events: 0,
    };
    let all = h.status_all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], idle);
    assert_eq!(all[1].appservice, AS2);

    h.enq_ok(AS1, &[ev(1)]);
    h.advance(10);
    h.enq_range(AS1, 2..=3);
    let x1 = h.id(AS1, 1);
    let in_flight = Status {
        backlog_txns: 2,
        backlog_events: 3,
        backlog_bytes: bytes(&[1, 2, 3]),
        oldest_enqueued_at_ms: Some(WALL0),
        current_txn_id: Some(x1.clone()),
        in_flight: true,
        ..idle.clone()
    };
    assert_eq!(h.status(AS1), in_flight);

    h.finish_open(AS1, SendOutcome::Timeout);
    let down = Status {
        phase: Phase::Down,
        in_flight: false,
        failed_attempts: 1,
        last_error: Some("timed out".into()),
        next_retry_in_ms: Some(2000),
        ..in_flight.clone()
    };
    assert_eq!(h.status(AS1), down);
    h.advance(500);
    assert_eq!(h.status(AS1).next_retry_in_ms, Some(1500));

    h.advance(1500);
    let retrying = Status {
        in_flight: true,
        next_retry_in_ms: None,
        ..down.clone()
    };
    assert_eq!(h.status(AS1), retrying);

    h.ok(AS1);
    let recovering = Status {
        phase: Phase::Recovering,
        backlog_txns: 1,
        backlog_events: 2,
        backlog_bytes: bytes(&[2, 3]),
        oldest_enqueued_at_ms: Some(WALL0 + 10),
        current_txn_id: Some(h.id(AS1, 2)),
        in_flight: true,
        failed_attempts: 0,
        last_error: None,
        next_retry_in_ms: None,
        delivered_txns: 1,
        delivered_events: 1,
        ..idle.clone()
    };
    assert_eq!(h.status(AS1), recovering);

    h.ok(AS1);
    let done = Status {
        delivered_txns: 2,
        delivered_events: 3,
        ..idle.clone()
    };
    assert_eq!(h.status(AS1), done);
}

/// Queued events without a stored txn count as the transactions of 100 they will form; the
/// oldest enqueue time is read from the store.
#[test]
fn status_counts_queued_events_as_future_txns() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, 1..=150);
    // After a swap the queued events are read from the store, which fails: the transaction
    // after the first one cannot be formed, and the queue pauses with none stored.
    h.swap();
    h.world.faults.scans = true;
    h.ok(AS1);
    h.world.faults.scans = false;
    h.advance(30);
    h.enq_range(AS1, 151..=201);
    let st = h.status(AS1);
    assert_eq!(st.backlog_txns, 2);
    assert_eq!(st.backlog_events, 101);
    assert_eq!(
        st.backlog_bytes,
        (101..=201).map(|n| ev(n).len() as u64).sum::<u64>()
    );
    assert_eq!(st.oldest_enqueued_at_ms, Some(WALL0));
    assert_eq!(st.current_txn_id, None);
    assert!(st.paused_by_storage);
    h.advance(100_000);
    let sizes: Vec<usize> = h.drain_ok(AS1).iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![100, 1]);
}

// ---------------------------------------------------------------------------------------------
// Start and hand-over
// ---------------------------------------------------------------------------------------------

/// Sends handed over at start are adopted: no duplicate send, and their outcome is processed.
#[test]
fn handed_over_send_is_adopted_and_its_outcome_processed() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.open(AS1);
    h.enq_ok(AS1, &[ev(2)]);
    h.swap();
    assert_eq!(h.sends(AS1).len(), 1, "no second send of the same txn");
    let st = h.status(AS1);
    assert!(st.in_flight);
    assert_eq!(st.current_txn_id.as_deref(), Some(x.txn_id.as_str()));
    h.tick();
    assert_eq!(h.sends(AS1).len(), 1);

    h.finish(x.id, http(200));
    let next = h.ok(AS1);
    assert_eq!(next.txn_id, h.id(AS1, 2));
    assert_eq!(next.body, body_of(&[ev(2)]));
    assert_eq!(h.delivered(AS1), vec![1, 2]);
}

/// A handed-over send that fails puts the appservice DOWN with the usual backoff.
#[test]
fn handed_over_send_failure_backs_off() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_ok(AS1, &[ev(1)]);
    let x = h.open(AS1);
    h.swap();
    h.finish(x.id, lost());
    assert_eq!(h.status(AS1).phase, Phase::Down);
    assert_eq!(h.delays(), vec![2000]);
    h.advance(2000);
    let retry = h.ok(AS1);
    assert_eq!((retry.txn_id, retry.body), (x.txn_id, x.body));
}

/// A handed-over send of an unknown appservice is ignored, as are outcomes and timers with
/// unknown handles: nothing is sent, no timer is set.
#[test]
fn unknown_handles_are_ignored() {
    let mut h = Harness::unstarted(World::new(SEED, &config()), config(), &[AS1]);
    let gone = InFlightSend {
        id: 77,
        appservice: "gone".into(),
        txn_id: "abc.1".into(),
    };
    h.start(&[gone]).expect("start");
    h.finish(77, http(200));
    h.finish(12345, http(500));
    h.with(|s, w| s.timer_fired(w, 999));
    assert_eq!(
        h.logs(LogLevel::Debug, "ignoring outcome of unknown send")
            .len(),
        2
    );
    let st = h.status(AS1);
    assert_eq!(
        (st.phase, st.in_flight, st.backlog_events),
        (Phase::Up, false, 0)
    );
    assert!(h.world.sends.is_empty() && h.world.timers_set.is_empty());
}

/// start refuses an unusable configuration, naming the field.
#[test]
fn start_rejects_an_invalid_config() {
    let cases = [
        (
            Config {
                max_events_per_txn: 0,
                ..config()
            },
            "max-events-per-txn must be at least 1",
        ),
        (
            Config {
                max_txn_body_bytes: 1023,
                ..config()
            },
            "max-txn-body-bytes must be at least 1024",
        ),
        (
            Config {
                retry_delay_ms_max: 1999,
                ..config()
            },
            "retry-delay-ms-max must not be below retry-delay-ms-initial",
        ),
        (
            Config {
                retry_jitter_percent: 101,
                ..config()
            },
            "retry-jitter-percent must be at most 100",
        ),
    ];
    for (config, why) in cases {
        let mut h = Harness::unstarted(World::new(SEED, &config), config, &[AS1]);
        assert_eq!(h.start(&[]), Err(StartError::InvalidConfig(why.into())));
    }
}

/// start fails with Storage when the store cannot be read or the new records not written.
#[test]
fn start_fails_when_the_store_fails() {
    let mut world = World::new(SEED, &config());
    world.fail_get(1);
    let mut h = Harness::unstarted(world, config(), &[AS1]);
    assert_eq!(
        h.start(&[]),
        Err(StartError::Storage(
            "reading as/as1/meta: store unavailable: injected get fault".into()
        ))
    );
    h.world.fail_commit(1);
    assert_eq!(
        h.start(&[]),
        Err(StartError::Storage(
            "store unavailable: injected commit fault".into()
        ))
    );
    assert!(h.world.store.is_empty());
    h.start(&[]).expect("start once the store works");
}

/// Absurd but valid delays (up to u64::MAX) neither overflow nor collapse to zero.
#[test]
fn huge_delays_neither_overflow_nor_collapse() {
    let config = Config {
        retry_delay_ms_initial: 1 << 62,
        retry_delay_ms_max: u64::MAX,
        retry_jitter_percent: 20,
        storage_retry_delay_ms: 1 << 62,
        ..config()
    };
    let mut h = Harness::new(config.clone(), &[AS1, AS2]);
    h.enq_ok(AS1, &[ev(1)]);
    for failures in 1..=4 {
        h.finish_open(AS1, SendOutcome::Timeout);
        let d = backoff_delay_ms(&config, failures);
        let delay = *h.delays().last().expect("a timer");
        assert!(
            d - d / 5 <= delay && delay <= d,
            "{delay} not within 20 % of {d}"
        );
        assert!(h.status(AS1).next_retry_in_ms.is_some());
        h.force_retry(AS1).expect("registered");
    }

    // Recording AS2's delivery fails on every try, on the storage timer.
    h.enq_ok(AS2, &[ev(1)]);
    h.world.faults.commits = true;
    h.ok(AS2);
    for _ in 0..3 {
        h.force_retry(AS2).expect("registered");
    }
    let storage: Vec<u64> = h.delays()[4..].to_vec();
    assert_eq!(storage, vec![1 << 62, 1 << 63, u64::MAX, u64::MAX]);
}

// ---------------------------------------------------------------------------------------------
// Chunked queue layout
// ---------------------------------------------------------------------------------------------

/// A batch is stored in chunks of at most one transaction's worth of events. A transaction
/// that takes only part of a chunk (here after a 413 halves the size) leaves the chunk in
/// place; the chunk goes once its last event is delivered, and nothing is stored for a
/// transaction but its record: a resend, even by a new instance, rebuilds the same body.
#[test]
fn a_chunk_outlives_partial_delivery_and_goes_with_its_last_event() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, 1..=150);
    let c0 = "as/as1/c/0000000000000000";
    let c100 = "as/as1/c/0000000000000064";
    assert_eq!(h.queued_keys(), [c0, c100]);
    let too_large = SendOutcome::Response {
        status: 413,
        body_is_json: true,
    };
    let refused = h.finish_open(AS1, too_large);
    assert_eq!(numbers(&refused.body), range(1, 100));
    let first = h.ok(AS1);
    assert_eq!(numbers(&first.body), range(1, 50));
    assert_eq!(
        h.queued_keys(),
        [c0, c100],
        "50 events of the first chunk wait"
    );
    let second = h.finish_open(AS1, SendOutcome::Timeout);
    assert_eq!(numbers(&second.body), range(51, 100));
    assert!(!h.world.store.contains_key("as/as1/txn-body"));
    h.restart();
    h.advance(2_000);
    let resent = h.ok(AS1);
    assert_eq!(
        (&resent.txn_id, &resent.body),
        (&second.txn_id, &second.body)
    );
    assert_eq!(h.queued_keys(), [c100]);
    let third = h.ok(AS1);
    assert_eq!(numbers(&third.body), range(101, 150));
    assert_eq!(h.queued_keys(), Vec::<String>::new());
    assert_eq!(h.meta(AS1)["head"], 150);
    assert_eq!(h.delivered(AS1), range(1, 150));
}

/// A store written by an earlier build (one event per key, the stored txn's body under its own
/// key) is moved into chunks at start: the stored txn goes out with its stored body and id,
/// the other events follow in order, and the old keys are gone.
#[test]
fn events_of_the_one_event_per_key_layout_are_moved_into_chunks() {
    let mut world = World::new(SEED, &config());
    let put = |world: &mut World, key: &str, value: Vec<u8>| {
        world.store.insert(key.to_owned(), value);
    };
    put(
        &mut world,
        "as/as1/meta",
        serde_json::to_vec(&serde_json::json!({
            "epoch": "0123456789abcdef", "next_txn": 8, "down": true, "head": 5, "tail": 1010,
            "queued_bytes": (5..1010).map(|n| ev(n).len() as u64).sum::<u64>(),
        }))
        .unwrap(),
    );
    for n in 5..1010u32 {
        let value = asched_plugin::layout::encode_queued(WALL0 + u64::from(n), &ev(n));
        put(&mut world, &format!("as/as1/q/{:016x}", n), value);
    }
    put(
        &mut world,
        "as/as1/txn",
        serde_json::to_vec(&serde_json::json!({
            "txn_id": "0123456789abcdef.7", "first": 5, "end": 8,
            "event_bytes": (5..8).map(|n| ev(n).len() as u64).sum::<u64>(),
            "first_enqueued_at_ms": WALL0 + 5,
        }))
        .unwrap(),
    );
    let stored_body = body_of(&[ev(5), ev(6), ev(7)]);
    put(&mut world, "as/as1/txn-body", stored_body.clone());
    let mut h = Harness::unstarted(world, config(), &[AS1]);
    h.start(&[]).expect("start");
    assert_eq!(h.logs(LogLevel::Info, "moved 1005 queued events").len(), 1);
    assert!(h.world.store.keys().all(|k| !k.contains("/q/")));
    assert_eq!(
        h.queued_keys(),
        [
            "as/as1/c/0000000000000005",
            "as/as1/c/0000000000000008",
            "as/as1/c/00000000000003ed",
        ],
        "the stored txn's events in a chunk of their own, then pages of 1000"
    );
    assert_eq!(h.status(AS1).oldest_enqueued_at_ms, Some(WALL0 + 5));
    h.advance(600_000);
    let stored = h.ok(AS1);
    assert_eq!(stored.txn_id, "0123456789abcdef.7");
    assert_eq!(stored.body, stored_body);
    assert!(!h.world.store.contains_key("as/as1/txn-body"));
    let rest = h.drain_ok(AS1);
    assert_eq!(rest.len(), 11, "1002 events in txns of 100");
    assert_eq!(h.delivered(AS1), range(5, 1009));
    assert_eq!(h.id(AS1, 8), "0123456789abcdef.8");
    assert_eq!(h.queued_keys(), Vec::<String>::new());
}

/// A backlog longer than the cache of recent chunks is read from the store a page of chunks
/// at a time, each chunk once: the chunks a scan brings beyond the transaction being formed
/// are kept for the next ones.
#[test]
fn a_backlog_beyond_the_cache_is_read_a_page_at_a_time() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, [0]);
    for batch in 0..12 {
        h.enq_range(AS1, batch * 100 + 1..=batch * 100 + 100);
    }
    let scans_before = h.world.scans;
    let txns = h.drain_ok(AS1);
    let mut expected = vec![vec![0]];
    expected.extend((0..12).map(|batch| range(batch * 100 + 1, batch * 100 + 100)));
    assert_eq!(txns, expected);
    // Chunks 1 to 301 were cached when they were enqueued, within four transactions of the
    // head; 401 to 1101 come from two scans of four chunks each.
    assert_eq!(h.world.scans - scans_before, 2);
}

/// A retry forced while a send is in flight sends nothing more (one send at a time), but the
/// operator's request is logged.
#[test]
fn force_retry_while_a_send_is_in_flight_only_logs() {
    let mut h = Harness::new(config(), &[AS1]);
    h.enq_range(AS1, [1]);
    assert_eq!(h.force_retry(AS1), Ok(()));
    assert_eq!(h.sends(AS1).len(), 1);
    let logged = h.logs(LogLevel::Info, "retry forced while a send is in flight");
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].appservice.as_deref(), Some(AS1));
    h.ok(AS1);
    assert_eq!(h.delivered(AS1), vec![1]);
}

/// A machine crash at any point (commits since the last send or enqueue answer lost) never
/// makes a transaction go out again after a later one: the counters of the txn ids sent, in
/// the order sent, never decrease, so an appservice that remembers only its last txn id still
/// sees every event once and in order. Nothing acknowledged is lost either. The script has
/// steps after which nothing was let out since the last commit (a delivery that empties the
/// queue, a failure that stores its backoff), so some crashes do lose commits.
#[test]
fn a_machine_crash_never_resends_an_older_txn_after_a_newer_one() {
    #[derive(Clone, Copy)]
    enum Step {
        Enqueue,
        Ok,
        Fail,
        Wait,
    }
    use Step::{Enqueue, Fail, Ok, Wait};
    let script = [
        Enqueue, Enqueue, Enqueue, Ok, Ok, Ok, Enqueue, Fail, Wait, Enqueue, Ok, Ok,
    ];
    let mut lost_commits = Vec::new();
    for crash_after in 0..=script.len() {
        let mut h = Harness::new(config(), &[AS1]);
        let mut next_event = 1;
        let mut crash_here = |h: &mut Harness, index: usize| {
            if index == crash_after {
                if h.world.store != h.world.durable {
                    lost_commits.push(index);
                }
                h.machine_crash();
                h.start(&[]).expect("restart");
            }
        };
        for (index, step) in script.iter().enumerate() {
            crash_here(&mut h, index);
            let open = h.open_opt(AS1).is_some();
            match step {
                Enqueue => {
                    h.enq_range(AS1, next_event..next_event + 60);
                    next_event += 60;
                }
                Ok if open => drop(h.ok(AS1)),
                Fail if open => drop(h.finish_open(AS1, SendOutcome::Timeout)),
                Wait => h.advance(3_000),
                Ok | Fail => {}
            }
        }
        crash_here(&mut h, script.len());
        h.advance(600_000);
        h.drain_ok(AS1);
        let counters: Vec<u64> = h
            .sends(AS1)
            .iter()
            .map(|s| s.txn_id.rsplit('.').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            counters.windows(2).all(|w| w[0] <= w[1]),
            "crash after {crash_after} steps: txns sent in the order {counters:?}"
        );
        assert_eq!(
            h.delivered(AS1),
            range(1, next_event - 1),
            "crash after {crash_after} steps"
        );
    }
    // Before the first step (the new record), after a delivery that empties the queue (steps
    // 5 and 11) and after a failure (step 7), something committed was not yet let out.
    assert_eq!(lost_commits, [0, 6, 8, 12]);
}
