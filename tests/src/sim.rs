//! Deterministic simulation of the real plugin component under wasmtime.
//!
//! One seed drives every choice: how many appservices, how each one's network behaves
//! (latency, refused and reset connections, timeouts, 5xx, 401/403, 413 above a body size, slow
//! answers, answers lost after the appservice processed the transaction), when the store fails
//! (single operations, windows of unavailability, slow commits), when the host crashes (the
//! instance and all host memory dropped, only the store kept; in a power loss, the store also
//! loses some or all of what was committed since the host last let an effect out, newest
//! first, as the host makes commits durable only before it starts a send or answers an
//! enqueue) and when the plugin traps.
//! Time is virtual: it jumps to the next timer or send completion.
//!
//! The store is the reference host's own [`SqliteStore`] (in memory, which survives a simulated
//! crash like a file would) behind a fault injector; the plugin is the same `.wasm` the host
//! embeds, or a test build of it (see [`Variant`]).
//!
//! The [`Checker`] is kept apart from the workload: it sees every request the appservices get
//! and every acknowledgement the plugin gives, checks them (nothing acknowledged is lost, each
//! event arrives once and in order, a txn id always carries the same bytes, no txn goes out
//! after a later one of the same epoch), and fails the run with the seed, every derived
//! parameter, the violation and the last steps. A run has a safety phase (faults on, checked
//! after every step) and a liveness phase (the world healed; every acknowledged event must be
//! delivered within a bound).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use asched_host::runtime::{
    Plugin, PluginImports, PluginPre, api, clock, http_send, log, plugin_linker, random, store,
    timer, to_wit_error, types, writes_from_wit,
};
use asched_host::store::{SqliteStore, Write};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::variants::Variant;

/// A small deterministic generator (SplitMix64) for every choice of a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }
}

/// How one appservice's network and server behave, in per-mille chances per request.
#[derive(Clone, Debug)]
pub struct NetProfile {
    /// Shortest and longest answer time, in ms.
    pub latency_ms: (u64, u64),
    /// Connection refused.
    pub refuse: u64,
    /// Connection reset before the request is processed.
    pub reset: u64,
    /// The request times out; half the time after the appservice processed it.
    pub timeout: u64,
    /// A 5xx answer.
    pub server_error: u64,
    /// A 401 or 403 answer.
    pub auth_error: u64,
    /// The appservice processes the transaction but the answer is lost.
    pub lost_answer: u64,
    /// Bodies larger than this get 413.
    pub max_body_bytes: Option<usize>,
}

impl NetProfile {
    /// Never fails, answers in 1–20 ms.
    pub fn healthy() -> NetProfile {
        NetProfile {
            latency_ms: (1, 20),
            refuse: 0,
            reset: 0,
            timeout: 0,
            server_error: 0,
            auth_error: 0,
            lost_answer: 0,
            max_body_bytes: None,
        }
    }

    fn random(rng: &mut Rng) -> NetProfile {
        let slow = rng.chance(200);
        NetProfile {
            latency_ms: if slow {
                (500, 30_000)
            } else {
                (1, rng.range(5, 400))
            },
            refuse: rng.range(0, 150),
            reset: rng.range(0, 60),
            timeout: rng.range(0, 60),
            server_error: rng.range(0, 150),
            auth_error: rng.range(0, 30),
            lost_answer: rng.range(0, 80),
            max_body_bytes: rng.chance(300).then(|| rng.range(2_000, 40_000) as usize),
        }
    }
}

/// How the store misbehaves, in per-mille chances per operation.
#[derive(Clone, Debug, Default)]
pub struct StoreFaults {
    /// A read (`get`, `scan`) fails.
    pub read_fail: u64,
    /// A commit fails (nothing of it applied).
    pub commit_fail: u64,
    /// A commit takes 1–200 ms of virtual time.
    pub slow_commit: u64,
    /// The store is unavailable until this virtual time.
    pub outage_until_ms: u64,
    /// The operation with this number (counting from 1) fails.
    pub fail_nth: Option<u64>,
}

/// Which store operation a [`StoreRule`] matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// `get`.
    Get,
    /// `scan`.
    Scan,
    /// `commit`.
    Commit,
}

/// A scripted store fault: the next `times` operations of kind `op` that touch a key containing
/// `key_contains` fail.
#[derive(Clone, Debug)]
pub struct StoreRule {
    /// The kind of operation.
    pub op: StoreOp,
    /// A part of a key the operation reads or writes.
    pub key_contains: String,
    /// How many more times it fails.
    pub times: u32,
}

/// A request an appservice got, as scenarios inspect them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentRequest {
    /// The appservice's index.
    pub appservice: usize,
    /// The txn id.
    pub txn_id: String,
    /// The events' sequence numbers.
    pub seqs: Vec<u64>,
    /// The exact body.
    pub body: Vec<u8>,
}

/// How a scripted appservice answers a request: whether it processes it, what the host is
/// told, and after how many ms.
pub type Planned = (bool, api::SendOutcome, u64);

/// A scripted appservice: given every request it got so far (the current one last).
pub type NetScript = Box<dyn FnMut(&[SentRequest]) -> Planned + Send>;

/// Everything a run is derived from; printed on failure.
#[derive(Clone, Debug)]
pub struct Params {
    /// The seed.
    pub seed: u64,
    /// The plugin build.
    pub variant: Variant,
    /// Steps of the safety phase.
    pub steps: u64,
    /// The scheduler's configuration.
    pub config: api::Config,
    /// One profile per appservice; the first is always healthy.
    pub net: Vec<NetProfile>,
    /// The store's faults during the safety phase.
    pub store: StoreFaults,
    /// Per-mille chance that a step crashes the host (half of the crashes are power losses).
    pub crash: u64,
    /// Per-mille chance that a step makes the plugin trap (test builds only).
    pub trap: u64,
    /// Per-mille chance that a step starts a store outage.
    pub outage: u64,
    /// Per-mille chance that a step swaps the plugin to the other build (runs with two builds).
    pub swap: u64,
}

impl Params {
    /// Derives every parameter of a run from its seed.
    pub fn from_seed(seed: u64, steps: u64, variant: Variant) -> Params {
        let mut rng = Rng::new(seed);
        let appservices = rng.range(2, 5) as usize;
        let retry_delay_ms_initial = rng.range(50, 2_000);
        let config = api::Config {
            max_events_per_txn: rng.range(1, 100) as u32,
            max_txn_body_bytes: rng.range(1_024, 64 * 1024) as u32,
            retry_delay_ms_initial,
            retry_delay_ms_max: retry_delay_ms_initial * rng.range(1, 64),
            retry_jitter_percent: rng.range(0, 50) as u8,
            storage_retry_delay_ms: rng.range(20, 2_000),
        };
        let mut net = vec![NetProfile::healthy()];
        net.extend((1..appservices).map(|_| NetProfile::random(&mut rng)));
        let store = StoreFaults {
            read_fail: rng.range(0, 20),
            commit_fail: rng.range(0, 40),
            slow_commit: rng.range(0, 50),
            outage_until_ms: 0,
            fail_nth: rng.chance(500).then(|| rng.range(1, 500)),
        };
        Params {
            seed,
            variant,
            steps,
            config,
            net,
            store,
            crash: rng.range(0, 8),
            trap: if variant.traps_on_demand() {
                rng.range(0, 8)
            } else {
                0
            },
            outage: rng.range(0, 10),
            swap: 0,
        }
    }
}

/// The appservice ids of a run.
pub fn appservice_id(index: usize) -> String {
    format!("as{index}")
}

/// A send in flight, as the simulated network sees it.
#[derive(Clone, Debug)]
struct InFlight {
    appservice: usize,
    txn_id: String,
    body: Vec<u8>,
    /// What will happen: whether the appservice processes it, and what the host is told.
    processed: bool,
    outcome: api::SendOutcome,
}

/// Something due at a virtual time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    SendDone(u64),
    Timer(u64),
    Tick,
}

/// The simulated host: what the plugin's imports act on. Dropped entirely on a crash, except the
/// store, which the world keeps.
struct Host {
    in_flight: BTreeMap<u64, InFlight>,
    timers: BTreeSet<u64>,
    /// Appservices a send was started for during the current call.
    sends_started: Vec<usize>,
}

/// The store data of the simulated wasmtime store.
pub struct SimState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryWatch,
    world: World,
}

/// Everything that outlives a plugin instance.
struct World {
    params: Params,
    rng: Rng,
    now_ms: u64,
    store: SqliteStore,
    faults: StoreFaults,
    faults_on: bool,
    store_ops: u64,
    /// A fault was injected during the current call.
    fault_injected: bool,
    /// What each commit since the host last let an effect out overwrote, oldest first. The
    /// host makes commits durable only before it lets an effect out (starts a send, answers an
    /// enqueue), so a power loss undoes these.
    undo: Vec<Vec<(String, Option<Vec<u8>>)>>,
    host: Host,
    due: BTreeSet<(u64, u64, Due)>,
    due_seq: u64,
    next_handle: u64,
    checker: Checker,
    appservices: Vec<String>,
    store_rules: Vec<StoreRule>,
    scripts: BTreeMap<usize, NetScript>,
    sent: Vec<SentRequest>,
}

impl World {
    /// The values `writes` will replace or remove, for [`World::lose_power`].
    fn overwritten(
        &self,
        writes: &[Write],
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, asched_host::store::StoreError> {
        let mut before = Vec::new();
        for write in writes {
            match write {
                Write::Put(key, _) | Write::Delete(key) => {
                    before.push((key.clone(), self.store.get(key)?));
                }
                Write::DeleteRange(start, end) => {
                    for (key, value) in self.store.scan(start, end, u32::MAX)? {
                        before.push((key, Some(value)));
                    }
                }
            }
        }
        Ok(before)
    }

    /// The host let an effect out: every commit so far is durable.
    fn effect_let_out(&mut self) {
        self.undo.clear();
    }

    /// The machine loses power: of the commits made since the host last let an effect out,
    /// only the oldest `kept` survive (the store keeps its commits in order, up to some point);
    /// the others are undone, newest first.
    fn lose_power(&mut self, kept: usize) {
        let undo = std::mem::take(&mut self.undo);
        let restore: Vec<Write> = undo
            .into_iter()
            .skip(kept)
            .rev()
            .flat_map(|before| before.into_iter().rev())
            .map(|(key, value)| match value {
                Some(value) => Write::Put(key, value),
                None => Write::Delete(key),
            })
            .collect();
        self.store
            .commit(&restore)
            .expect("the simulated disk restores what it had");
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn schedule(&mut self, at_ms: u64, due: Due) {
        self.due_seq += 1;
        self.due.insert((at_ms, self.due_seq, due));
    }

    fn index_of(&self, appservice: &str) -> Option<usize> {
        self.appservices.iter().position(|a| a == appservice)
    }

    /// Whether a scripted rule fails this operation.
    fn scripted_fault(&mut self, op: StoreOp, keys: &[&str]) -> Option<store::StoreError> {
        let rule = self.store_rules.iter_mut().find(|r| {
            r.op == op && r.times > 0 && keys.iter().any(|k| k.contains(&r.key_contains))
        })?;
        rule.times -= 1;
        self.fault_injected = true;
        Some(store::StoreError::Failed(format!(
            "scripted {op:?} fault on a key containing {:?}",
            rule.key_contains
        )))
    }

    /// Whether the next store operation fails.
    fn store_fault(&mut self, commit: bool) -> Option<store::StoreError> {
        self.store_ops += 1;
        if !self.faults_on {
            return None;
        }
        let nth = self.faults.fail_nth == Some(self.store_ops);
        let outage = self.now_ms < self.faults.outage_until_ms;
        let chance = if commit {
            self.faults.commit_fail
        } else {
            self.faults.read_fail
        };
        if nth || outage || self.rng.chance(chance) {
            self.fault_injected = true;
            let why = format!("injected fault on store operation {}", self.store_ops);
            return Some(if outage {
                store::StoreError::Unavailable(why)
            } else {
                store::StoreError::Failed(why)
            });
        }
        None
    }

    /// Decides how a new send will end.
    fn plan_send(&mut self, appservice: usize, body_len: usize) -> Planned {
        if let Some(script) = self.scripts.get_mut(&appservice) {
            return script(&self.sent);
        }
        let profile = if self.faults_on {
            self.params.net[appservice].clone()
        } else {
            NetProfile::healthy()
        };
        let latency = self.rng.range(profile.latency_ms.0, profile.latency_ms.1);
        let ok = api::SendOutcome::Response(api::Response {
            status: 200,
            body_is_json: true,
        });
        let status = |status| {
            api::SendOutcome::Response(api::Response {
                status,
                body_is_json: true,
            })
        };
        let rng = &mut self.rng;
        if profile.max_body_bytes.is_some_and(|max| body_len > max) {
            return (false, status(413), latency);
        }
        if rng.chance(profile.refuse) {
            return (
                false,
                api::SendOutcome::ConnectFailed("connection refused".into()),
                latency.min(5),
            );
        }
        if rng.chance(profile.reset) {
            return (
                false,
                api::SendOutcome::ConnectionLost("connection reset".into()),
                latency,
            );
        }
        if rng.chance(profile.timeout) {
            return (rng.chance(500), api::SendOutcome::Timeout, 60_000);
        }
        if rng.chance(profile.server_error) {
            return (false, status(500 + rng.range(0, 3) as u16), latency);
        }
        if rng.chance(profile.auth_error) {
            return (
                false,
                status(if rng.chance(500) { 401 } else { 403 }),
                latency,
            );
        }
        if rng.chance(profile.lost_answer) {
            return (
                true,
                api::SendOutcome::ConnectionLost("answer lost".into()),
                latency,
            );
        }
        let status_ok = match rng.range(0, 9) {
            0 => api::SendOutcome::Response(api::Response {
                status: 200,
                body_is_json: false,
            }),
            1 => api::SendOutcome::Response(api::Response {
                status: 204,
                body_is_json: false,
            }),
            _ => ok,
        };
        (true, status_ok, latency)
    }
}

/// A broken invariant.
#[derive(Debug)]
pub struct Violation(pub String);

/// The invariants, checked against what the appservices and callers observe.
#[derive(Default)]
pub struct Checker {
    /// Per appservice: events whose enqueue was acknowledged, by sequence number.
    acked: Vec<BTreeSet<u64>>,
    /// Per appservice: events whose enqueue was attempted.
    attempted: Vec<BTreeSet<u64>>,
    /// Per appservice: the last event processed.
    last_processed: Vec<Option<u64>>,
    /// Per appservice: every event processed.
    processed: Vec<BTreeSet<u64>>,
    /// Per appservice: acknowledged events not processed yet.
    undelivered: Vec<BTreeSet<u64>>,
    /// Per appservice: txn ids the appservice processed.
    processed_txns: Vec<BTreeSet<String>>,
    /// Per appservice: the body each txn id was sent with.
    bodies: Vec<BTreeMap<String, Vec<u8>>>,
    /// Per appservice: the highest txn counter sent so far, per txn-id epoch.
    highest_sent: Vec<BTreeMap<String, u64>>,
    /// The first violation seen.
    violation: Option<String>,
    /// Requests sent, per appservice.
    pub requests: Vec<u64>,
}

impl Checker {
    fn new(appservices: usize) -> Checker {
        Checker {
            acked: vec![BTreeSet::new(); appservices],
            attempted: vec![BTreeSet::new(); appservices],
            last_processed: vec![None; appservices],
            processed: vec![BTreeSet::new(); appservices],
            undelivered: vec![BTreeSet::new(); appservices],
            processed_txns: vec![BTreeSet::new(); appservices],
            bodies: vec![BTreeMap::new(); appservices],
            highest_sent: vec![BTreeMap::new(); appservices],
            violation: None,
            requests: vec![0; appservices],
        }
    }

    fn fail(&mut self, why: String) {
        self.violation.get_or_insert(why);
    }

    /// A send starts: one in flight per appservice, one body per txn id.
    fn on_send(&mut self, appservice: usize, txn_id: &str, body: &[u8], others_in_flight: usize) {
        self.requests[appservice] += 1;
        if others_in_flight > 0 {
            self.fail(format!("two requests in flight to as{appservice} (txn {txn_id} started while another was in flight)"));
        }
        match self.bodies[appservice].get(txn_id) {
            Some(earlier) if earlier != body => self.fail(format!(
                "txn {txn_id} to as{appservice} was sent with different bodies:\n  first: {}\n  now:   {}",
                String::from_utf8_lossy(earlier),
                String::from_utf8_lossy(body)
            )),
            Some(_) => {}
            None => {
                self.bodies[appservice].insert(txn_id.to_owned(), body.to_vec());
            }
        }
        if event_seqs(body).is_empty() {
            self.fail(format!("txn {txn_id} to as{appservice} carries no events"));
        }
        let Some((epoch, counter)) = txn_id
            .split_once('.')
            .and_then(|(epoch, counter)| Some((epoch, counter.parse::<u64>().ok()?)))
        else {
            self.fail(format!(
                "txn id {txn_id} to as{appservice} is not epoch.counter"
            ));
            return;
        };
        let highest = self.highest_sent[appservice]
            .entry(epoch.to_owned())
            .or_insert(counter);
        if counter < *highest {
            let later = format!("{epoch}.{highest}");
            self.fail(format!(
                "txn {txn_id} to as{appservice} was sent after the later txn {later}: an appservice that remembers only its last txn id would process it again, out of order"
            ));
        } else {
            *highest = counter;
        }
    }

    /// The appservice processes a transaction (it ignores txn ids it has processed).
    fn on_processed(&mut self, appservice: usize, txn_id: &str, body: &[u8]) {
        if !self.processed_txns[appservice].insert(txn_id.to_owned()) {
            return;
        }
        for seq in event_seqs(body) {
            self.on_event(appservice, txn_id, seq);
        }
    }

    fn on_event(&mut self, appservice: usize, txn_id: &str, seq: u64) {
        let last = self.last_processed[appservice];
        if self.processed[appservice].contains(&seq) {
            self.fail(format!(
                "event {seq} reached as{appservice} twice, the second time in txn {txn_id}"
            ));
            return;
        }
        if last.is_some_and(|last| seq < last) {
            self.fail(format!(
                "event {seq} reached as{appservice} after event {} (txn {txn_id})",
                last.unwrap_or(0)
            ));
        }
        if !self.attempted[appservice].contains(&seq) {
            self.fail(format!(
                "event {seq} reached as{appservice} but was never enqueued"
            ));
        }
        let floor = last.map_or(0, |l| l + 1);
        if let Some(skipped) = self.acked[appservice].range(floor..seq).next() {
            self.fail(format!("acknowledged event {skipped} was skipped: as{appservice} got {seq} first (txn {txn_id})"));
        }
        self.processed[appservice].insert(seq);
        self.undelivered[appservice].remove(&seq);
        self.last_processed[appservice] = Some(seq);
    }

    /// An enqueue was acknowledged.
    fn on_acked(&mut self, appservice: usize, seqs: &[u64]) {
        for &seq in seqs {
            self.acked[appservice].insert(seq);
            if !self.processed[appservice].contains(&seq) {
                self.undelivered[appservice].insert(seq);
            }
        }
    }

    /// Acknowledged events not yet processed.
    fn undelivered(&self, appservice: usize) -> Vec<u64> {
        self.undelivered[appservice].iter().copied().collect()
    }
}

/// The sequence numbers of the events in a body (`"seq": N` in each event).
fn event_seqs(body: &[u8]) -> Vec<u64> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    value["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["seq"].as_u64())
        .collect()
}

/// An event for appservice `appservice` with sequence number `seq`; sometimes large, and
/// sometimes (in test builds) asking the plugin to trap.
fn sim_event(rng: &mut Rng, appservice: usize, seq: u64, trap: bool) -> String {
    let padding = if rng.chance(30) {
        rng.range(5_000, 30_000)
    } else {
        rng.range(20, 400)
    };
    let mut content = serde_json::json!({ "msgtype": "m.text", "seq": seq, "body": "x".repeat(padding as usize) });
    if trap {
        content["asched_test_trap"] = serde_json::Value::Bool(true);
    }
    serde_json::json!({
        "type": "m.room.message",
        "event_id": format!("$as{appservice}-{seq}"),
        "room_id": "!sim:example.org",
        "sender": format!("@as{appservice}_user:example.org"),
        "origin_server_ts": 1_764_000_000_000u64 + seq,
        "content": content,
    })
    .to_string()
}

impl WasiView for SimState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginImports for SimState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl types::Host for SimState {}

impl store::Host for SimState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, store::StoreError> {
        if let Some(error) = self.world.scripted_fault(StoreOp::Get, &[&key]) {
            return Err(error);
        }
        if let Some(error) = self.world.store_fault(false) {
            return Err(error);
        }
        self.world.store.get(&key).map_err(to_wit_error)
    }

    fn scan(
        &mut self,
        range: store::KeyRange,
        limit: u32,
    ) -> Result<Vec<store::Entry>, store::StoreError> {
        if let Some(error) = self.world.store_fault(false) {
            return Err(error);
        }
        let entries = self
            .world
            .store
            .scan(&range.start, &range.end, limit)
            .map_err(to_wit_error)?;
        Ok(entries
            .into_iter()
            .map(|(key, value)| store::Entry { key, value })
            .collect())
    }

    fn commit(&mut self, ops: Vec<store::WriteOp>) -> Result<(), store::StoreError> {
        let keys: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                store::WriteOp::Put(e) => e.key.as_str(),
                store::WriteOp::Delete(key) => key.as_str(),
                store::WriteOp::DeleteRange(r) => r.start.as_str(),
            })
            .collect();
        if let Some(error) = self.world.scripted_fault(StoreOp::Commit, &keys) {
            return Err(error);
        }
        if let Some(error) = self.world.store_fault(true) {
            return Err(error);
        }
        let world = &mut self.world;
        if world.faults_on && world.rng.chance(world.faults.slow_commit) {
            world.now_ms += world.rng.range(1, 200);
        }
        let writes = writes_from_wit(ops);
        let before = world.overwritten(&writes).map_err(to_wit_error)?;
        world.store.commit(&writes).map_err(to_wit_error)?;
        world.undo.push(before);
        Ok(())
    }
}

impl http_send::Host for SimState {
    fn start_send(
        &mut self,
        appservice: String,
        txn_id: String,
        body: Vec<u8>,
    ) -> Result<u64, http_send::SendRefused> {
        let world = &mut self.world;
        let index = world
            .index_of(&appservice)
            .ok_or(http_send::SendRefused::UnknownAppservice)?;
        let others = world
            .host
            .in_flight
            .values()
            .filter(|f| f.appservice == index)
            .count();
        world.effect_let_out();
        world.checker.on_send(index, &txn_id, &body, others);
        let seqs = event_seqs(&body);
        world.sent.push(SentRequest {
            appservice: index,
            txn_id: txn_id.clone(),
            seqs,
            body: body.clone(),
        });
        let (processed, outcome, latency) = world.plan_send(index, body.len());
        let id = world.handle();
        world.host.in_flight.insert(
            id,
            InFlight {
                appservice: index,
                txn_id,
                body,
                processed,
                outcome,
            },
        );
        world.host.sends_started.push(index);
        let at = world.now_ms + latency;
        world.schedule(at, Due::SendDone(id));
        Ok(id)
    }
}

impl timer::Host for SimState {
    fn set_timer(&mut self, delay_ms: u64) -> u64 {
        let world = &mut self.world;
        let cap = world.params.config.retry_delay_ms_max;
        if delay_ms > cap {
            world.checker.fail(format!(
                "a timer of {delay_ms} ms exceeds the retry cap of {cap} ms"
            ));
        }
        let id = world.handle();
        world.host.timers.insert(id);
        let at = world.now_ms + delay_ms;
        world.schedule(at, Due::Timer(id));
        id
    }

    fn cancel_timer(&mut self, id: u64) {
        self.world.host.timers.remove(&id);
    }
}

impl clock::Host for SimState {
    fn monotonic_now_ms(&mut self) -> u64 {
        self.world.now_ms
    }

    fn wall_clock_now_ms(&mut self) -> u64 {
        1_764_000_000_000 + self.world.now_ms
    }
}

impl random::Host for SimState {
    fn random_u64(&mut self) -> u64 {
        self.world.rng.next_u64()
    }
}

impl log::Host for SimState {
    fn log(&mut self, _level: types::LogLevel, _appservice: Option<String>, _message: String) {}
}

/// A compiled plugin build, shared by every run of a process.
pub struct Compiled {
    engine: Engine,
    pre: PluginPre<SimState>,
    /// The build.
    pub variant: Variant,
}

impl Compiled {
    /// Compiles `variant` (building it first if needed).
    pub fn new(variant: Variant) -> Compiled {
        let engine = Engine::default();
        let component = Component::new(&engine, variant.wasm()).expect("the plugin compiles");
        let linker = plugin_linker::<SimState>(&engine).expect("the linker is complete");
        let pre = PluginPre::new(
            linker
                .instantiate_pre(&component)
                .expect("the imports resolve"),
        )
        .expect("the exports match");
        Compiled {
            engine,
            pre,
            variant,
        }
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct Report {
    /// Steps taken, both phases.
    pub steps: u64,
    /// Events acknowledged.
    pub acked: u64,
    /// Requests sent.
    pub requests: u64,
    /// Crashes and traps survived.
    pub restarts: u64,
    /// The largest linear memory the plugin had, in bytes.
    pub max_memory_bytes: usize,
    /// Swaps between builds.
    pub swaps: u64,
}

/// A run that broke an invariant: everything needed to understand and replay it.
#[derive(Debug)]
pub struct Failure {
    /// The parameters (seed first).
    pub params: Params,
    /// The step it happened at.
    pub step: u64,
    /// What broke.
    pub violation: String,
    /// The last steps before it.
    pub recent: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation failed at step {} of seed {} ({})",
            self.step,
            self.params.seed,
            self.params.variant.name()
        )?;
        writeln!(f, "violation: {}", self.violation)?;
        writeln!(f, "parameters: {:#?}", self.params)?;
        writeln!(f, "last steps:")?;
        for line in &self.recent {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: cargo run -p asched-tests --bin asched-sim -- --variant {} --seed {} --steps {}{}",
            self.params.variant.name(),
            self.params.seed,
            self.params.steps,
            if self.params.swap > 0 { " --swaps" } else { "" }
        )
    }
}

/// Records the largest linear memory the instance asks for.
#[derive(Default)]
struct MemoryWatch {
    max_bytes: usize,
}

impl wasmtime::ResourceLimiter for MemoryWatch {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.max_bytes = self.max_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

/// One simulated run.
pub struct Sim<'c> {
    compiled: &'c Compiled,
    /// The build a swap switches to (it becomes `compiled`, and `compiled` becomes this).
    other: Option<&'c Compiled>,
    swaps: u64,
    store: Option<Store<SimState>>,
    plugin: Option<Plugin>,
    next_seq: Vec<u64>,
    step: u64,
    recent: VecDeque<String>,
    restarts: u64,
    max_memory_bytes: usize,
    world_parked: Option<World>,
}

/// How many recent steps a failure shows.
const RECENT_STEPS: usize = 40;

/// The most virtual time the liveness phase may take, beyond the retry cap, in ms.
const LIVENESS_SLACK_MS: u64 = 120_000;

impl<'c> Sim<'c> {
    /// A run with `params`, not yet started.
    pub fn new(compiled: &'c Compiled, params: Params) -> Sim<'c> {
        let appservices: Vec<String> = (0..params.net.len()).map(appservice_id).collect();
        let world = World {
            rng: Rng::new(params.seed.rotate_left(17) ^ 0xA5A5),
            now_ms: 0,
            store: SqliteStore::open_in_memory().expect("an in-memory SQLite opens"),
            faults: params.store.clone(),
            faults_on: true,
            store_ops: 0,
            fault_injected: false,
            undo: Vec::new(),
            host: Host {
                in_flight: BTreeMap::new(),
                timers: BTreeSet::new(),
                sends_started: Vec::new(),
            },
            due: BTreeSet::new(),
            due_seq: 0,
            next_handle: 0,
            checker: Checker::new(appservices.len()),
            appservices: appservices.clone(),
            store_rules: Vec::new(),
            scripts: BTreeMap::new(),
            sent: Vec::new(),
            params,
        };
        Sim {
            compiled,
            other: None,
            swaps: 0,
            store: None,
            plugin: None,
            next_seq: vec![1; appservices.len()],
            step: 0,
            recent: VecDeque::new(),
            restarts: 0,
            max_memory_bytes: 0,
            world_parked: Some(world),
        }
    }

    fn world(&mut self) -> &mut World {
        match &mut self.store {
            Some(store) => &mut store.data_mut().world,
            None => self
                .world_parked
                .as_mut()
                .expect("the world is parked while no instance runs"),
        }
    }

    fn note(&mut self, what: String) {
        let now = self.world().now_ms;
        let line = format!("step {} t={now}ms {what}", self.step);
        if std::env::var_os("ASCHED_SIM_TRACE").is_some() {
            eprintln!("{line}");
        }
        self.recent.push_back(line);
        if self.recent.len() > RECENT_STEPS {
            self.recent.pop_front();
        }
    }

    /// Instantiates the plugin over the world and calls `start`, handing over the sends the
    /// host still has in flight. A failed start is retried later by [`Sim::ensure_running`].
    fn boot(&mut self) {
        let world = self
            .world_parked
            .take()
            .expect("boot only runs with the world parked");
        let state = SimState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory: MemoryWatch::default(),
            world,
        };
        let mut store = Store::new(&self.compiled.engine, state);
        store.limiter(|s| &mut s.memory);
        let plugin = match self.compiled.pre.instantiate(&mut store) {
            Ok(plugin) => plugin,
            Err(error) => panic!("instantiation failed: {error:?}"),
        };
        let world = &mut store.data_mut().world;
        world.host.timers.clear();
        let in_flight: Vec<api::InFlightSend> = world
            .host
            .in_flight
            .iter()
            .map(|(id, f)| api::InFlightSend {
                id: *id,
                appservice: appservice_id(f.appservice),
                txn_id: f.txn_id.clone(),
            })
            .collect();
        let config = world.params.config;
        let appservices = world.appservices.clone();
        let started = plugin.asched_scheduler_scheduler().call_start(
            &mut store,
            config,
            &appservices,
            &in_flight,
        );
        match started {
            Ok(Ok(())) => {
                self.store = Some(store);
                self.plugin = Some(plugin);
                self.note("started".into());
            }
            Ok(Err(error)) => {
                self.park(store);
                self.note(format!("start failed: {error:?}"));
            }
            Err(trap) => {
                self.park(store);
                self.note(format!("start trapped: {trap}"));
            }
        }
    }

    /// Keeps the world of a store that is being dropped, and the memory it reached.
    fn park(&mut self, store: Store<SimState>) -> &mut World {
        let state = store.into_data();
        self.max_memory_bytes = self.max_memory_bytes.max(state.memory.max_bytes);
        self.world_parked.insert(state.world)
    }

    /// Boots the plugin if no instance runs.
    fn ensure_running(&mut self) {
        if self.store.is_none() {
            self.boot();
        }
    }

    /// Drops the instance; with `crash`, all host memory too (sends in flight end, and whether
    /// the appservice processed them is decided now).
    fn stop_instance(&mut self, crash: bool) {
        let Some(store) = self.store.take() else {
            return;
        };
        self.plugin = None;
        let world = self.park(store);
        if crash {
            let in_flight = std::mem::take(&mut world.host.in_flight);
            for (_, f) in in_flight {
                // The connection dies with the host; a request the appservice would process may
                // or may not have been processed by then.
                if f.processed && world.rng.chance(500) {
                    world.checker.on_processed(f.appservice, &f.txn_id, &f.body);
                }
            }
            world.host.timers.clear();
            world.due.retain(|(_, _, d)| *d == Due::Tick);
        }
        self.restarts += 1;
    }

    /// Runs one export call; a trap rebuilds the instance (host memory kept, like the engine).
    fn call<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&api::Guest, &mut Store<SimState>) -> wasmtime::Result<R>,
    ) -> Option<R> {
        self.ensure_running();
        let (Some(store), Some(plugin)) = (self.store.as_mut(), self.plugin.as_ref()) else {
            return None;
        };
        store.data_mut().world.host.sends_started.clear();
        store.data_mut().world.fault_injected = false;
        let result = f(plugin.asched_scheduler_scheduler(), store);
        match result {
            Ok(value) => Some(value),
            Err(trap) => {
                self.note(format!(
                    "{name} trapped: {}",
                    trap.to_string().lines().next().unwrap_or("")
                ));
                self.stop_instance(false);
                self.boot();
                None
            }
        }
    }

    /// Calls `enqueue`; its answers leave the host, so every commit so far is durable (unless
    /// the call trapped: then nothing was answered).
    fn call_enqueue(
        &mut self,
        batches: &[api::EnqueueBatch],
    ) -> Option<Vec<Result<u32, api::EnqueueError>>> {
        let results = self.call("enqueue", |api, store| api.call_enqueue(store, batches));
        if results.is_some() {
            self.world().effect_let_out();
        }
        results
    }

    fn enqueue(&mut self) {
        let (batches, trap) = {
            let world = self.world();
            let count = world.rng.range(1, 3);
            let trap_chance = world.params.trap;
            let trap = world.faults_on && world.rng.chance(trap_chance);
            let picks: Vec<(usize, u64)> = (0..count)
                .map(|_| {
                    (
                        world.rng.range(0, world.appservices.len() as u64 - 1) as usize,
                        world.rng.range(1, 4),
                    )
                })
                .collect();
            (picks, trap)
        };
        let mut api_batches = Vec::new();
        let mut seqs = Vec::new();
        for (i, (appservice, n)) in batches.iter().enumerate() {
            let mut items = Vec::new();
            let mut these = Vec::new();
            for k in 0..*n {
                let seq = self.next_seq[*appservice];
                self.next_seq[*appservice] += 1;
                let trap_here = trap && i == 0 && k == 0;
                let json = sim_event(&mut self.world().rng, *appservice, seq, trap_here);
                items.push(api::Item::RoomEvent(json));
                these.push(seq);
            }
            self.world().checker.attempted[*appservice].extend(these.iter().copied());
            api_batches.push(api::EnqueueBatch {
                appservice: appservice_id(*appservice),
                items,
            });
            seqs.push((*appservice, these));
        }
        let healthy_idle = !self
            .world()
            .host
            .in_flight
            .values()
            .any(|f| f.appservice == 0);
        let results = self.call_enqueue(&api_batches);
        let summary: Vec<String> = seqs.iter().map(|(a, s)| format!("as{a}:{s:?}")).collect();
        let Some(results) = results else { return };
        let mut outcome = Vec::new();
        for ((appservice, these), result) in seqs.iter().zip(&results) {
            match result {
                Ok(_) => {
                    self.world().checker.on_acked(*appservice, these);
                    outcome.push("ok".to_owned());
                }
                Err(error) => outcome.push(format!("{error:?}")),
            }
        }
        self.note(format!(
            "enqueue {} -> {}",
            summary.join(" "),
            outcome.join(", ")
        ));
        self.check_healthy_not_delayed(&seqs, &results, healthy_idle);
    }

    /// The healthy appservice, idle and not paused, starts a send in the same call as an
    /// acknowledged enqueue, whatever the other appservices do.
    fn check_healthy_not_delayed(
        &mut self,
        seqs: &[(usize, Vec<u64>)],
        results: &[Result<u32, api::EnqueueError>],
        idle: bool,
    ) {
        let acked_for_healthy = seqs
            .iter()
            .zip(results)
            .any(|((a, _), r)| *a == 0 && r.is_ok());
        let world = self.world();
        if !acked_for_healthy || !idle || world.fault_injected || !world.faults_on {
            return;
        }
        let paused = self
            .call("status", |api, store| api.call_status(store))
            .and_then(|s| s.into_iter().find(|s| s.appservice == "as0"))
            .is_some_and(|s| s.next_retry_in_ms.is_some() || s.state != api::AppserviceState::Up);
        let world = self.world();
        if !paused
            && !world.host.sends_started.contains(&0)
            && !world.host.in_flight.values().any(|f| f.appservice == 0)
        {
            world.checker.fail("the healthy appservice as0 was idle but its acknowledged events were not sent in the same step".into());
        }
    }

    /// Advances virtual time to the next due thing and delivers it.
    fn advance(&mut self) -> bool {
        let Some(&(at, seq, due)) = self.world().due.iter().next() else {
            return false;
        };
        self.world().due.remove(&(at, seq, due));
        let world = self.world();
        world.now_ms = world.now_ms.max(at);
        match due {
            Due::Tick => {
                let next = world.now_ms + 1_000;
                world.schedule(next, Due::Tick);
                self.call("tick", |api, store| api.call_tick(store));
                self.check_no_stall();
            }
            Due::Timer(id) => {
                if self.world().host.timers.remove(&id) {
                    self.note(format!("timer {id} fired"));
                    self.call("timer-fired", |api, store| api.call_timer_fired(store, id));
                }
            }
            Due::SendDone(id) => {
                let Some(f) = self.world().host.in_flight.remove(&id) else {
                    return true;
                };
                if f.processed {
                    self.world()
                        .checker
                        .on_processed(f.appservice, &f.txn_id, &f.body);
                }
                let seqs = event_seqs(&f.body);
                let span = format!("{:?}..={:?}", seqs.first(), seqs.last());
                self.note(format!(
                    "send {id} as{} txn {} {span} -> {:?} (processed: {})",
                    f.appservice, f.txn_id, f.outcome, f.processed
                ));
                let outcome = f.outcome.clone();
                self.call("send-finished", |api, store| {
                    api.call_send_finished(store, id, &outcome)
                });
            }
        }
        true
    }

    /// After a tick, every appservice with undelivered events has a send in flight or a retry
    /// due.
    fn check_no_stall(&mut self) {
        let Some(statuses) = self.call("status", |api, store| api.call_status(store)) else {
            return;
        };
        for s in statuses {
            if s.backlog_events > 0 && !s.in_flight && s.next_retry_in_ms.is_none() {
                let message = format!(
                    "{} has {} undelivered events but no send in flight and no retry due",
                    s.appservice, s.backlog_events
                );
                self.world().checker.fail(message);
            }
        }
    }

    /// Swaps to the other build as the engine does: the instance goes, the host's memory (sends
    /// in flight) stays and is handed to the new instance.
    fn swap(&mut self) {
        let Some(other) = self.other.replace(self.compiled) else {
            return;
        };
        self.note(format!("swap to {}", other.variant.name()));
        self.stop_instance(false);
        self.compiled = other;
        self.swaps += 1;
        self.boot();
    }

    /// One step of the safety phase: enqueue, deliver something due, crash, trap or a fault.
    fn safety_step(&mut self) {
        let (crash, outage, swap) = {
            let world = self.world();
            let p = (world.params.crash, world.params.outage, world.params.swap);
            (
                world.rng.chance(p.0),
                world.rng.chance(p.1),
                world.rng.chance(p.2),
            )
        };
        if swap {
            self.swap();
            return;
        }
        if crash {
            let power = self.world().rng.chance(500);
            self.note(if power { "power loss" } else { "crash" }.into());
            self.stop_instance(true);
            if power {
                let world = self.world();
                let kept = world.rng.range(0, world.undo.len() as u64) as usize;
                world.lose_power(kept);
            }
            self.boot();
            return;
        }
        if outage {
            let world = self.world();
            let until = world.now_ms + world.rng.range(100, 20_000);
            world.faults.outage_until_ms = until;
            self.note(format!("store unavailable until t={until}ms"));
        }
        let enqueue = self.world().rng.chance(450);
        if enqueue {
            self.enqueue();
        } else if !self.advance() {
            self.enqueue();
        }
    }

    fn violation(&mut self) -> Option<String> {
        self.world().checker.violation.clone()
    }

    fn failure(&mut self, violation: String) -> Failure {
        let params = self.world().params.clone();
        Failure {
            params,
            step: self.step,
            violation,
            recent: self.recent.iter().cloned().collect(),
        }
    }

    /// Runs both phases.
    pub fn run(mut self) -> Result<Report, Failure> {
        self.world().schedule(1_000, Due::Tick);
        self.boot();
        let steps = self.world().params.steps;
        while self.step < steps {
            self.step += 1;
            self.ensure_running();
            self.safety_step();
            if let Some(violation) = self.violation() {
                return Err(self.failure(violation));
            }
        }
        self.heal_and_drain()
    }

    /// The liveness phase: faults off, then every acknowledged event must arrive within the
    /// retry cap plus slack.
    fn heal_and_drain(mut self) -> Result<Report, Failure> {
        let world = self.world();
        world.faults_on = false;
        world.faults.outage_until_ms = 0;
        let deadline =
            world.now_ms + world.params.config.retry_delay_ms_max * 2 + LIVENESS_SLACK_MS;
        self.note("healed".into());
        loop {
            self.step += 1;
            self.ensure_running();
            if let Some(violation) = self.violation() {
                return Err(self.failure(violation));
            }
            if self
                .world()
                .checker
                .undelivered
                .iter()
                .all(BTreeSet::is_empty)
            {
                break;
            }
            if self.world().now_ms > deadline || !self.advance() {
                let appservices = self.world().appservices.len();
                let undelivered: Vec<(usize, Vec<u64>)> = (0..appservices)
                    .map(|a| (a, self.world().checker.undelivered(a)))
                    .filter(|(_, u)| !u.is_empty())
                    .collect();
                let mut why =
                    String::from("liveness: acknowledged events not delivered after healing:");
                for (a, u) in undelivered {
                    let _ = write!(
                        why,
                        " as{a}: {} events (first {:?})",
                        u.len(),
                        &u[..u.len().min(5)]
                    );
                }
                return Err(self.failure(why));
            }
        }
        if let Some(store) = self.store.take() {
            self.plugin = None;
            self.park(store);
        }
        let checker = &self.world().checker;
        let acked = checker.acked.iter().map(|s| s.len() as u64).sum();
        let requests = checker.requests.iter().sum();
        Ok(Report {
            steps: self.step,
            acked,
            requests,
            restarts: self.restarts,
            max_memory_bytes: self.max_memory_bytes,
            swaps: self.swaps,
        })
    }
}

/// Scripted runs: named scenarios drive the world step by step, with the checkers on.
impl<'c> Sim<'c> {
    /// A run with `appservices` healthy appservices, no random faults, and `config`.
    pub fn scripted(compiled: &'c Compiled, appservices: usize, config: api::Config) -> Sim<'c> {
        let params = Params {
            seed: 0,
            variant: compiled.variant,
            steps: 0,
            config,
            net: vec![NetProfile::healthy(); appservices],
            store: StoreFaults::default(),
            crash: 0,
            trap: 0,
            outage: 0,
            swap: 0,
        };
        let mut sim = Sim::new(compiled, params);
        sim.world().schedule(1_000, Due::Tick);
        sim.boot();
        sim
    }

    /// Makes appservice `appservice` answer by `script`.
    pub fn script(
        &mut self,
        appservice: usize,
        script: impl FnMut(&[SentRequest]) -> Planned + Send + 'static,
    ) {
        self.world().scripts.insert(appservice, Box::new(script));
    }

    /// Lets appservice `appservice` answer like a healthy one again.
    pub fn unscript(&mut self, appservice: usize) {
        self.world().scripts.remove(&appservice);
    }

    /// Adds a scripted store fault.
    pub fn store_rule(&mut self, op: StoreOp, key_contains: &str, times: u32) {
        let rule = StoreRule {
            op,
            key_contains: key_contains.to_owned(),
            times,
        };
        self.world().store_rules.push(rule);
    }

    /// Enqueues one event for `appservice` in its own call; returns its sequence number and
    /// whether it was acknowledged.
    pub fn enqueue_one(&mut self, appservice: usize) -> (u64, bool) {
        let seq = self.next_seq[appservice];
        self.next_seq[appservice] += 1;
        let json = sim_event(&mut self.world().rng, appservice, seq, false);
        self.world().checker.attempted[appservice].insert(seq);
        let batch = [api::EnqueueBatch {
            appservice: appservice_id(appservice),
            items: vec![api::Item::RoomEvent(json)],
        }];
        let results = self.call_enqueue(&batch);
        let acked = matches!(results.as_deref(), Some([Ok(_)]));
        if acked {
            self.world().checker.on_acked(appservice, &[seq]);
        }
        self.note(format!(
            "enqueue as{appservice}:[{seq}] -> {}",
            if acked { "ok" } else { "refused" }
        ));
        (seq, acked)
    }

    /// Delivers everything due in the next `ms` of virtual time.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.world().now_ms + ms;
        while self
            .world()
            .due
            .iter()
            .next()
            .is_some_and(|(at, _, _)| *at <= until)
        {
            self.step += 1;
            self.ensure_running();
            self.advance();
        }
        let world = self.world();
        world.now_ms = world.now_ms.max(until);
    }

    /// Crashes the host: the instance and all host memory are dropped; the store is kept.
    pub fn crash(&mut self) {
        self.note("crash".into());
        self.stop_instance(true);
        self.boot();
    }

    /// The machine loses power: as [`Sim::crash`], and the store loses every commit made since
    /// the host last let an effect out.
    pub fn lose_power(&mut self) {
        self.note("power loss".into());
        self.stop_instance(true);
        self.world().lose_power(0);
        self.boot();
    }

    /// The largest linear memory the plugin has had so far, in bytes.
    pub fn memory_bytes(&mut self) -> usize {
        let running = self
            .store
            .as_ref()
            .map_or(0, |store| store.data().memory.max_bytes);
        running.max(self.max_memory_bytes)
    }

    /// Every request the appservices got so far.
    pub fn sent(&mut self) -> Vec<SentRequest> {
        self.world().sent.clone()
    }

    /// The plugin's status of `appservice`.
    pub fn status(&mut self, appservice: usize) -> Option<api::AppserviceStatus> {
        let id = appservice_id(appservice);
        self.call("status", |api, store| api.call_status(store))?
            .into_iter()
            .find(|s| s.appservice == id)
    }

    /// The first violation so far, as a full failure report.
    pub fn check(&mut self) -> Result<(), Failure> {
        match self.violation() {
            Some(violation) => Err(self.failure(violation)),
            None => Ok(()),
        }
    }

    /// Heals the world and checks that every acknowledged event is delivered.
    pub fn finish(mut self) -> Result<Report, Failure> {
        self.world().scripts.clear();
        self.world().store_rules.clear();
        self.heal_and_drain()
    }
}

/// Runs one seed with swaps between two builds at random steps (1–3 % of them).
pub fn run_seed_with_swaps(
    first: &Compiled,
    second: &Compiled,
    seed: u64,
    steps: u64,
) -> Result<Report, Failure> {
    let mut params = Params::from_seed(seed, steps, first.variant);
    params.swap = Rng::new(seed ^ 0x5A5A_5A5A).range(10, 30);
    let mut sim = Sim::new(first, params);
    sim.other = Some(second);
    sim.run()
}

/// Runs one seed.
pub fn run_seed(compiled: &Compiled, seed: u64, steps: u64) -> Result<Report, Failure> {
    Sim::new(compiled, Params::from_seed(seed, steps, compiled.variant)).run()
}
