//! The engine: one thread that owns the plugin instance and feeds it every input in order.
//!
//! Requests (enqueue, force retry, status, swap), send outcomes and timers arrive on one
//! channel. The thread takes everything waiting (a round) and hands the plugin its send outcomes
//! first (an appservice that answered is the one waiting), then its enqueues, in one call (so
//! they share one commit) unless together they exceed [`MAX_ENQUEUE_BYTES_PER_CALL`], then the
//! other inputs, and ticks the plugin about once a second.
//! What a round decided (enqueue answers, the transactions it formed) is handed to the
//! releaser, which lets it out once an fsync has made the round's commits durable, while this
//! thread goes on with the next round (group commit; see [`crate::durable`]). When no input
//! waits and an fsync slot is free, this thread runs the round's fsync itself.
//!
//! The hot path crosses into the plugin per batch and per transaction, never per event: one
//! `enqueue` call carries every event of a round that arrived (or, beyond half a MiB, a call
//! per half a MiB of batches, a larger batch alone), one `start-send` carries a whole
//! transaction body, one `send-finished` reports its outcome.
//!
//! The instance is disposable; the store and the host's [`Io`] (sends in flight, timers) are
//! not:
//!
//! - **Traps.** If a call traps (a panic, a runaway loop stopped by the CPU deadline, memory
//!   exhausted), its callers get an error, never a false "stored"; the instance is dropped and a
//!   new one starts from the store, with the sends still in flight handed over. Outcomes that
//!   arrive meanwhile are kept and delivered to the new instance. A build that keeps failing is
//!   held back with a growing delay (visible in [`PluginStatus`]); enqueues are refused, not
//!   lost, while it is.
//! - **The store.** If an fsync fails, nothing more is acknowledged or sent and the instance
//!   is stopped for the rest of the process (status `stopped`): after a failed fsync the
//!   operating system may have dropped the unwritten pages, so no retry could be trusted.
//! - **Swaps.** A new component is compiled and type-checked by the caller's thread (off the
//!   engine's path), then cut over between two rounds: the old instance is dropped, the new one
//!   starts with the sends in flight. Enqueues that arrive during the swap wait in the channel.
//!   Backoffs are in the store, so retries stay due at the same time. If the new build fails to
//!   start, or traps within the probation period, the previous build is restored.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::oneshot;

use crate::durable::{self, PendingEnqueue, Releaser, Round};
use crate::http::{HttpConfig, Net};
use crate::registration::Registration;
use crate::runtime::{self, Instance, Io, LoadedPlugin, Sandbox, api};
use crate::store::{MemoryStore, SqliteStore, Store};

/// How often the plugin is ticked.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// The most inputs taken in one round, so replies keep flowing under a flood.
const MAX_INPUTS_PER_ROUND: usize = 4096;

/// The most event bytes one `enqueue` call hands the plugin; a batch larger than this goes in
/// a call of its own. The plugin holds a call's events in its memory at once, and copies of
/// them as it builds their chunks, so this bounds what a burst of large enqueues makes it
/// allocate: without it, one round of many large batches (the sidecar takes bodies of up to
/// 16 MiB) could need more than the plugin's memory limit and fail every batch in it, and the
/// plugin's high-water mark would depend on how many batches happened to wait together. The
/// calls of a round still share one fsync.
pub const MAX_ENQUEUE_BYTES_PER_CALL: usize = 512 * 1024;

/// The first delay before a repeatedly failing plugin is rebuilt; doubles per failure.
const REBUILD_DELAY_INITIAL: Duration = Duration::from_millis(100);

/// The longest delay between two attempts to rebuild a failing plugin.
const REBUILD_DELAY_MAX: Duration = Duration::from_secs(30);

/// Failures further apart than this do not count as "repeated".
const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// The plugin bundled with this host, built from `plugin/` for `wasm32-wasip2`.
pub static EMBEDDED_PLUGIN: &[u8] = include_bytes!(env!("ASCHED_PLUGIN_WASM"));

/// Everything the host needs to run.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The folder holding the SQLite store and the compiled-plugin cache.
    pub data_dir: PathBuf,
    /// The registered appservices.
    pub registrations: Vec<Registration>,
    /// A component file to use instead of the bundled plugin.
    pub plugin_path: Option<PathBuf>,
    /// The scheduler's limits and delays.
    pub scheduler: SchedulerConfig,
    /// HTTP timeouts.
    pub http: HttpConfig,
    /// Appservices that also get `?access_token=` on each request.
    pub legacy_query_auth: Vec<String>,
    /// The plugin's memory cap and CPU deadline per call.
    pub sandbox: Sandbox,
    /// How long a swapped-in build is watched; a trap within it restores the previous build.
    pub probation: Duration,
    /// Where the scheduler's state lives.
    pub store: StoreKind,
}

/// Where the scheduler's state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// `scheduler.sqlite` in the data folder: every acknowledged event survives a crash.
    #[default]
    File,
    /// The process's memory: nothing survives the process. For benchmarks that compare the
    /// scheduler with one that has no store.
    Memory,
}

/// The default probation of a swapped-in build.
pub const DEFAULT_PROBATION: Duration = Duration::from_secs(10);

/// The scheduler's limits and delays (see the WIT `config` record).
pub type SchedulerConfig = api::Config;

/// The defaults of mature homeservers: 100 events and 512 KiB per transaction, retries from 2 s
/// doubling to 512 s with 20 % jitter, storage retries from 1 s.
pub fn default_scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        max_events_per_txn: 100,
        max_txn_body_bytes: 512 * 1024,
        retry_delay_ms_initial: 2_000,
        retry_delay_ms_max: 512_000,
        retry_jitter_percent: 20,
        storage_retry_delay_ms: 1_000,
    }
}

/// Why an enqueue was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// No registration has this id.
    #[error("unknown appservice {0:?}")]
    UnknownAppservice(String),
    /// The registration says `url: null`: it receives no traffic.
    #[error("appservice {0:?} has `url: null` and receives no traffic")]
    NoTraffic(String),
    /// An item is not acceptable.
    #[error("event {index} is not acceptable: {why}")]
    InvalidItem {
        /// Its position in the request, from 0.
        index: u32,
        /// Why.
        why: String,
    },
    /// The store failed; nothing was stored.
    #[error("not stored: {0}")]
    Storage(String),
    /// The plugin failed or is not running; nothing was acknowledged. Safe to retry.
    #[error("the scheduler plugin failed: {0}")]
    PluginFailed(String),
    /// The host is shutting down.
    #[error("the host is shutting down")]
    ShuttingDown,
}

/// What an operator sees about one appservice.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AppserviceStatus {
    /// The appservice.
    pub appservice: String,
    /// `up`, `down`, `recovering`, `no-traffic` for `url: null`, or `unknown` while the plugin
    /// is not running.
    pub state: &'static str,
    /// Undelivered transactions (stored plus to be formed).
    pub backlog_txns: u64,
    /// Undelivered events.
    pub backlog_events: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// How long the oldest undelivered event has waited, in ms.
    pub oldest_undelivered_age_ms: Option<u64>,
    /// The stored transaction being sent or retried.
    pub current_txn_id: Option<String>,
    /// Whether a send is in flight.
    pub in_flight: bool,
    /// Failed attempts since the last success.
    pub failed_attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// In how many ms the next retry is due.
    pub next_retry_in_ms: Option<u64>,
    /// Whether a storage error paused the queue.
    pub paused_by_storage: bool,
    /// Transactions delivered by the running plugin instance.
    pub delivered_txns: u64,
    /// Events delivered by the running plugin instance.
    pub delivered_events: u64,
}

impl AppserviceStatus {
    /// A status with nothing known but the id and state.
    fn bare(appservice: &str, state: &'static str) -> AppserviceStatus {
        AppserviceStatus {
            appservice: appservice.to_owned(),
            state,
            backlog_txns: 0,
            backlog_events: 0,
            backlog_bytes: 0,
            oldest_undelivered_age_ms: None,
            current_txn_id: None,
            in_flight: false,
            failed_attempts: 0,
            last_error: None,
            next_retry_in_ms: None,
            paused_by_storage: false,
            delivered_txns: 0,
            delivered_events: 0,
        }
    }
}

/// What an operator sees about the plugin itself.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PluginStatus {
    /// SHA-256 of the running build.
    pub sha256: String,
    /// `running`, `probation` (swapped in recently, the previous build kept for rollback),
    /// `held-back` (failing repeatedly; rebuilt after `next_rebuild_in_ms`) or `stopped` (the
    /// store could not make its writes durable; see `last_failure`, restart the host).
    pub state: &'static str,
    /// Builds swapped in since the host started.
    pub swaps: u64,
    /// Swaps undone because the new build failed.
    pub rollbacks: u64,
    /// Instances rebuilt after a trap.
    pub rebuilds: u64,
    /// Failures in a row (traps or failed starts) that count towards holding back.
    pub consecutive_failures: u32,
    /// The last failure or rollback, in words.
    pub last_failure: Option<String>,
    /// While held back: when the next rebuild is tried.
    pub next_rebuild_in_ms: Option<u64>,
    /// Timers the host keeps for the plugin.
    pub timers_pending: usize,
    /// Sends the host has in flight for the plugin.
    pub sends_in_flight: usize,
    /// The running instance's linear memory, in bytes (it never shrinks while the instance
    /// lives).
    pub memory_bytes: usize,
}

/// A swap that took place.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwapReport {
    /// SHA-256 of the build now running.
    pub sha256: String,
    /// SHA-256 of the build it replaced.
    pub previous_sha256: String,
    /// How long the engine was busy with the cut-over (no enqueue answered, no send started),
    /// in microseconds.
    pub pause_us: u64,
}

/// Inputs to the engine thread.
pub enum Input {
    /// Store events for one appservice.
    Enqueue {
        /// The appservice.
        appservice: String,
        /// The events' JSON.
        events: Vec<String>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<u32, EnqueueError>>,
    },
    /// A send ended.
    SendFinished {
        /// The send's handle.
        id: u64,
        /// How.
        outcome: api::SendOutcome,
    },
    /// A timer is due.
    TimerFired {
        /// The timer's handle.
        id: u64,
    },
    /// Retry an appservice now.
    ForceRetry {
        /// The appservice.
        appservice: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), EnqueueError>>,
    },
    /// Report status.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<(Vec<AppserviceStatus>, PluginStatus)>,
    },
    /// Cut over to a compiled build.
    Swap {
        /// The build.
        plugin: Box<LoadedPlugin>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<SwapReport, String>>,
    },
    /// The store could not make a round durable: nothing of it, or of any later round, is let
    /// out (see [`crate::durable`]).
    SyncFailed {
        /// Why.
        why: String,
        /// The sends that were dropped instead of started.
        dropped: Vec<u64>,
    },
    /// Stop the thread.
    Shutdown,
}

/// A handle to the running engine; cheap to clone.
#[derive(Clone)]
pub struct Host {
    inputs: Sender<Input>,
    no_traffic: Arc<HashSet<String>>,
    known: Arc<HashSet<String>>,
    compiler: Arc<Compiler>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("appservices", &self.known)
            .finish_non_exhaustive()
    }
}

/// Compiles and checks components, on the caller's thread.
struct Compiler {
    engine: wasmtime::Engine,
    cache_dir: PathBuf,
}

impl Compiler {
    fn load(&self, wasm: &[u8]) -> anyhow::Result<LoadedPlugin> {
        LoadedPlugin::load(&self.engine, wasm, &self.cache_dir).map_err(runtime::to_anyhow)
    }
}

impl Host {
    /// Opens the store, loads the plugin, starts it and the engine thread. Must be called
    /// inside a tokio runtime, which then runs the timers (sends have a runtime of their own).
    pub fn start(config: HostConfig) -> anyhow::Result<(Host, std::thread::JoinHandle<()>)> {
        anyhow::ensure!(
            !config.data_dir.exists() || config.data_dir.is_dir(),
            "the data folder {} is a file, not a folder",
            config.data_dir.display()
        );
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create the data folder {}",
                config.data_dir.display()
            )
        })?;
        let data_lock = lock_data_dir(&config.data_dir)?;
        let store = match config.store {
            StoreKind::File => Store::Sqlite(SqliteStore::open(
                &config.data_dir.join("scheduler.sqlite"),
            )?),
            StoreKind::Memory => Store::Memory(MemoryStore::default()),
        };
        let wasm = match &config.plugin_path {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("cannot read the plugin {}", path.display()))?,
            None => EMBEDDED_PLUGIN.to_vec(),
        };
        let engine = runtime::new_engine().map_err(runtime::to_anyhow)?;
        let compiler = Arc::new(Compiler {
            engine,
            cache_dir: config.data_dir.join("plugin-cache"),
        });
        let plugin = compiler.load(&wasm)?;
        tracing::info!(sha256 = %plugin.sha256, "plugin loaded");
        let net = Arc::new(Net::new(
            &config.http,
            &config.registrations,
            &config.legacy_query_auth,
        )?);
        let (inputs, receiver) = std::sync::mpsc::channel();
        let releaser = match store.wal_path() {
            Some(wal) => Some(Releaser::start(wal, net.clone(), inputs.clone())?),
            None => None,
        };
        let io = Io {
            store,
            net,
            inputs: inputs.clone(),
            runtime: tokio::runtime::Handle::current(),
            in_flight: BTreeMap::new(),
            pending_sends: Vec::new(),
            timers: Default::default(),
            next_handle: 0,
            clock_origin: Instant::now(),
        };
        let ids = |traffic: bool| -> Vec<String> {
            let regs = config
                .registrations
                .iter()
                .filter(|r| r.url.is_some() == traffic);
            regs.map(|r| r.id.clone()).collect()
        };
        let (traffic, no_traffic) = (ids(true), ids(false));
        let known = config.registrations.iter().map(|r| r.id.clone()).collect();
        let mut engine = EngineThread {
            status: PluginStatus {
                sha256: plugin.sha256.clone(),
                state: "running",
                ..PluginStatus::default()
            },
            running: Arc::new(plugin),
            previous: None,
            probation_until: None,
            probation: config.probation,
            scheduler: config.scheduler,
            sandbox: config.sandbox,
            appservices: traffic,
            no_traffic: no_traffic.clone(),
            instance: None,
            parked: None,
            held_outcomes: Vec::new(),
            last_failure_at: None,
            next_rebuild_at: None,
            replies: Vec::new(),
            releaser,
            store_failed: false,
            _data_lock: data_lock,
        };
        let instance = engine
            .start_instance(&engine.running.clone(), io)
            .map_err(|(error, _)| error)?;
        engine.instance = Some(instance);
        let thread = std::thread::Builder::new()
            .name("asched-engine".into())
            .spawn(move || engine.run(&receiver))?;
        let host = Host {
            inputs,
            no_traffic: Arc::new(no_traffic.iter().cloned().collect()),
            known: Arc::new(known),
            compiler,
        };
        Ok((host, thread))
    }

    /// Stores events for one appservice; returns once they are durable.
    pub async fn enqueue(
        &self,
        appservice: &str,
        events: Vec<String>,
    ) -> Result<u32, EnqueueError> {
        if self.no_traffic.contains(appservice) {
            return Err(EnqueueError::NoTraffic(appservice.to_owned()));
        }
        if !self.known.contains(appservice) {
            return Err(EnqueueError::UnknownAppservice(appservice.to_owned()));
        }
        let (reply, answer) = oneshot::channel();
        self.send(Input::Enqueue {
            appservice: appservice.to_owned(),
            events,
            reply,
        })?;
        answer.await.unwrap_or(Err(EnqueueError::ShuttingDown))
    }

    /// Retries an appservice now.
    pub async fn force_retry(&self, appservice: &str) -> Result<(), EnqueueError> {
        if self.no_traffic.contains(appservice) {
            return Err(EnqueueError::NoTraffic(appservice.to_owned()));
        }
        let (reply, answer) = oneshot::channel();
        self.send(Input::ForceRetry {
            appservice: appservice.to_owned(),
            reply,
        })?;
        answer.await.unwrap_or(Err(EnqueueError::ShuttingDown))
    }

    /// The status of every registered appservice, ordered by id.
    pub async fn status(&self) -> Vec<AppserviceStatus> {
        self.full_status()
            .await
            .map(|(appservices, _)| appservices)
            .unwrap_or_default()
    }

    /// The status of the plugin build and instance.
    pub async fn plugin_status(&self) -> Option<PluginStatus> {
        self.full_status().await.map(|(_, plugin)| plugin)
    }

    /// Both statuses, read in one round of the engine.
    pub async fn full_status(&self) -> Option<(Vec<AppserviceStatus>, PluginStatus)> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Status { reply }).ok()?;
        answer.await.ok()
    }

    /// Replaces the running plugin with the component `wasm` without stopping delivery. The
    /// component is compiled and checked on a blocking thread first; a component this host
    /// cannot run is refused with the reason, and the running build stays.
    pub async fn swap(&self, wasm: Vec<u8>) -> Result<SwapReport, String> {
        let compiler = self.compiler.clone();
        let loaded = tokio::task::spawn_blocking(move || compiler.load(&wasm))
            .await
            .map_err(|e| format!("the compile task failed: {e}"))?
            .map_err(|e| format!("{e:#}"))?;
        let (reply, answer) = oneshot::channel();
        self.send(Input::Swap {
            plugin: Box::new(loaded),
            reply,
        })
        .map_err(|e| e.to_string())?;
        answer
            .await
            .unwrap_or_else(|_| Err("the host is shutting down".into()))
    }

    /// Asks the engine thread to stop after the inputs already queued.
    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }

    fn send(&self, input: Input) -> Result<(), EnqueueError> {
        self.inputs
            .send(input)
            .map_err(|_| EnqueueError::ShuttingDown)
    }
}

/// Takes the data folder for this process, with an exclusive lock on `lock` in it (released by
/// the operating system when the process ends, however it ends). Two hosts on one store would
/// interleave their writes, lose acknowledged events and reuse txn ids.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write as _;
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "the data folder {} is in use by another asched host (pid {}); two hosts on one store would lose events",
                dir.display(),
                holder.trim()
            )
        }
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// The state of the engine thread.
struct EngineThread {
    running: Arc<LoadedPlugin>,
    /// The build before the last swap, kept during probation for a rollback.
    previous: Option<Arc<LoadedPlugin>>,
    probation_until: Option<Instant>,
    probation: Duration,
    scheduler: SchedulerConfig,
    sandbox: Sandbox,
    appservices: Vec<String>,
    no_traffic: Vec<String>,
    instance: Option<Instance>,
    /// The imports' state while no instance runs.
    parked: Option<Io>,
    /// Outcomes that arrived while no instance ran; delivered to the next one.
    held_outcomes: Vec<(u64, api::SendOutcome)>,
    last_failure_at: Option<Instant>,
    next_rebuild_at: Option<Instant>,
    status: PluginStatus,
    /// Enqueue answers of this round, sent once its commits are durable.
    replies: Vec<(PendingEnqueue, Result<u32, EnqueueError>)>,
    /// Lets rounds out once their commits are durable (`None` for the store in memory, whose
    /// rounds go out at once).
    releaser: Option<Releaser>,
    /// An fsync failed: the instance is stopped for the rest of the process's life.
    store_failed: bool,
    /// Held for the engine's life: no other host may use the same store meanwhile.
    _data_lock: std::fs::File,
}

impl EngineThread {
    /// Instantiates `plugin` and calls its `start`, handing over the sends still in flight.
    fn start_instance(
        &self,
        plugin: &LoadedPlugin,
        mut io: Io,
    ) -> Result<Instance, (anyhow::Error, Io)> {
        io.cancel_all_timers();
        let in_flight: Vec<api::InFlightSend> = io
            .in_flight
            .iter()
            .map(|(id, (appservice, txn_id))| api::InFlightSend {
                id: *id,
                appservice: appservice.clone(),
                txn_id: txn_id.clone(),
            })
            .collect();
        let mut instance = plugin
            .instantiate(io, &self.sandbox)
            .map_err(|(e, io)| (runtime::to_anyhow(e), io))?;
        let (api, store) = instance.call();
        let started = api.call_start(store, self.scheduler, &self.appservices, &in_flight);
        match started {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(error)) => Err((
                anyhow::anyhow!("the plugin could not start: {error:?}"),
                instance.into_io(),
            )),
            Err(trap) => Err((
                runtime::to_anyhow(trap).context("the plugin trapped while starting"),
                instance.into_io(),
            )),
        }
    }

    /// The main loop: take what is waiting, process it, rebuild or tick when due.
    fn run(mut self, inputs: &Receiver<Input>) {
        let mut next_tick = Instant::now() + TICK_INTERVAL;
        self.finish_round(false);
        // The first input of the next round, taken to see whether one was waiting.
        let mut next: Option<Input> = None;
        loop {
            let wake = self
                .next_rebuild_at
                .map_or(next_tick, |at| at.min(next_tick));
            let mut round = Vec::new();
            if let Some(input) = next.take() {
                round.push(input);
            } else {
                match inputs.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                    Ok(input) => round.push(input),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while round.len() < MAX_INPUTS_PER_ROUND {
                match inputs.try_recv() {
                    Ok(input) => round.push(input),
                    Err(_) => break,
                }
            }
            if self.next_rebuild_at.is_some_and(|at| Instant::now() >= at) {
                self.rebuild();
            }
            if !self.process(round) {
                self.finish_round(false);
                // Lets out every round handed over before the thread ends.
                self.releaser.take();
                tracing::info!("engine stopped");
                return;
            }
            self.end_probation_if_due();
            if Instant::now() >= next_tick {
                self.call("tick", |api, store| api.call_tick(store));
                next_tick = Instant::now() + TICK_INTERVAL;
            }
            next = inputs.try_recv().ok();
            self.finish_round(next.is_none());
        }
    }

    /// Ends a round: its enqueue answers and the transactions it formed go out once its
    /// commits are durable, through the releaser, while the engine goes on (see
    /// [`crate::durable`]). When the engine is `idle` (no input waits) it runs the round's
    /// fsync itself if a slot is free, which spares a lone event one hand-over between
    /// threads.
    fn finish_round(&mut self, idle: bool) {
        let replies = std::mem::take(&mut self.replies);
        let round = match self.io() {
            Some(io) => Round {
                sends: io.take_pending_sends(),
                replies,
                commits: io.store.take_unsynced(),
            },
            None => Round {
                replies,
                ..Round::default()
            },
        };
        if round.is_empty() {
            return;
        }
        if let Some(releaser) = &self.releaser {
            if let Err(round) = releaser.submit(round, idle) {
                let why = "the threads that make the store's writes durable have stopped; \
                           restart the host";
                let dropped = durable::fail(vec![round], why);
                self.sync_failed(why.to_owned(), dropped);
            }
        } else if let Some(io) = self.io() {
            durable::release(round, &io.net, &io.inputs);
        } else {
            for (reply, result) in round.replies {
                let _ = reply.send(result);
            }
        }
    }

    /// The releaser could not make rounds durable: forgets the sends it dropped and stops the
    /// instance for good. Nothing this process holds can be trusted to be on disk any more (see
    /// [`crate::durable`]); enqueues are refused until the host is restarted.
    fn sync_failed(&mut self, why: String, dropped: Vec<u64>) {
        if let Some(io) = self.io() {
            for id in dropped {
                io.in_flight.remove(&id);
            }
        }
        self.park_instance();
        if self.store_failed {
            return;
        }
        tracing::error!(error = %why, "the plugin is stopped until the host is restarted");
        self.store_failed = true;
        self.status.last_failure = Some(why);
        self.next_rebuild_at = None;
    }

    /// Processes one round of inputs; returns false when asked to stop.
    fn process(&mut self, round: Vec<Input>) -> bool {
        let mut batches = Vec::new();
        let mut pending: Vec<PendingEnqueue> = Vec::new();
        let mut outcomes = Vec::new();
        let mut others = Vec::new();
        for input in round {
            match input {
                Input::Enqueue {
                    appservice,
                    events,
                    reply,
                } => {
                    let items = events.into_iter().map(api::Item::RoomEvent).collect();
                    batches.push(api::EnqueueBatch { appservice, items });
                    pending.push(reply);
                }
                Input::SendFinished { id, outcome } => outcomes.push((id, outcome)),
                other => others.push(other),
            }
        }
        // Outcomes first, and their transactions on their way to the disk and the network
        // before the enqueues are stored: an appservice that answered is the one waiting.
        if !outcomes.is_empty() {
            for (id, outcome) in outcomes {
                self.send_finished(id, outcome);
            }
            if !batches.is_empty() {
                self.finish_round(false);
            }
        }
        let mut pending = pending.into_iter();
        for calls in enqueue_calls(&batches) {
            let replies = pending.by_ref().take(calls.len()).collect();
            self.enqueue(&batches[calls], replies);
        }
        for input in others {
            match input {
                Input::SendFinished { .. } => unreachable!("outcomes were separated above"),
                Input::TimerFired { id } => {
                    if let Some(io) = self.io() {
                        io.timers.remove(&id);
                    }
                    self.call("timer-fired", |api, store| api.call_timer_fired(store, id));
                }
                Input::ForceRetry { appservice, reply } => {
                    let result = self.call("force-retry", |api, store| {
                        api.call_force_retry(store, &appservice)
                    });
                    let answer = match result {
                        Some(Ok(())) => Ok(()),
                        Some(Err(error)) => Err(convert_enqueue_error(error)),
                        None => Err(self.not_running()),
                    };
                    let _ = reply.send(answer);
                }
                Input::Status { reply } => {
                    let statuses = self.call("status", |api, store| api.call_status(store));
                    let _ = reply.send((self.to_status(statuses), self.plugin_status()));
                }
                Input::Swap { plugin, reply } => {
                    let _ = reply.send(self.swap(Arc::from(plugin)));
                }
                Input::SyncFailed { why, dropped } => self.sync_failed(why, dropped),
                Input::Enqueue { .. } => unreachable!("enqueues were separated above"),
                Input::Shutdown => return false,
            }
        }
        true
    }

    /// The imports' state, wherever it is.
    fn io(&mut self) -> Option<&mut Io> {
        match &mut self.instance {
            Some(instance) => Some(instance.io()),
            None => self.parked.as_mut(),
        }
    }

    /// Delivers a send's outcome, or keeps it for the next instance.
    fn send_finished(&mut self, id: u64, outcome: api::SendOutcome) {
        if self.instance.is_none() {
            self.held_outcomes.push((id, outcome));
            return;
        }
        if let Some(io) = self.io() {
            io.in_flight.remove(&id);
        }
        self.call("send-finished", |api, store| {
            api.call_send_finished(store, id, &outcome)
        });
    }

    /// One plugin call for these enqueues of the round (see [`enqueue_calls`]). A trap here is
    /// blamed on the input (see [`EngineThread::call_blaming_input`]): the callers are told
    /// nothing was acknowledged, and the next round runs on a fresh instance. The requests are
    /// not retried here: a trap after the commit would have stored them already, and only the
    /// caller can decide to resend.
    fn enqueue(&mut self, batches: &[api::EnqueueBatch], pending: Vec<PendingEnqueue>) {
        let results =
            self.call_blaming_input("enqueue", |api, store| api.call_enqueue(store, batches));
        match results {
            Some(results) => {
                for (reply, result) in pending.into_iter().zip(results) {
                    self.replies
                        .push((reply, result.map_err(convert_enqueue_error)));
                }
            }
            None => {
                let error = self.not_running();
                for reply in pending {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// The error for a request the plugin could not answer.
    fn not_running(&self) -> EnqueueError {
        if self.store_failed {
            return EnqueueError::Storage(
                "the store could not make its writes durable; nothing is acknowledged until \
                 the host is restarted"
                    .into(),
            );
        }
        let why = match self.next_rebuild_at {
            Some(at) => format!(
                "the plugin is held back after repeated failures (next attempt in {} ms); nothing was stored, retry later",
                at.saturating_duration_since(Instant::now()).as_millis()
            ),
            None => {
                "the plugin trapped during the call; nothing was acknowledged, retry".to_owned()
            }
        };
        EnqueueError::PluginFailed(why)
    }

    /// Drops the running instance, keeping the imports' state for the next one.
    fn park_instance(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.parked = Some(instance.into_io());
        }
    }

    /// Calls an export; on a trap, replaces the instance and returns `None`.
    fn call<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&api::Guest, &mut wasmtime::Store<runtime::HostState>) -> wasmtime::Result<R>,
    ) -> Option<R> {
        let instance = self.instance.as_mut()?;
        let (api, store) = instance.call();
        match f(api, store) {
            Ok(value) => Some(value),
            Err(trap) => {
                let why = describe_trap(name, trap, self.sandbox.call_deadline);
                tracing::error!(export = name, error = %why, "the plugin failed; rebuilding it from the store");
                self.park_instance();
                self.failed(why);
                None
            }
        }
    }

    /// Calls an export whose failure is blamed on its input rather than on the build (a trap
    /// while storing particular events): the instance is rebuilt at once, and the failure does
    /// not count towards holding the build back, so one bad request repeated by its sender
    /// cannot stop delivery for everyone. During probation it still rolls the swap back.
    fn call_blaming_input<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&api::Guest, &mut wasmtime::Store<runtime::HostState>) -> wasmtime::Result<R>,
    ) -> Option<R> {
        let instance = self.instance.as_mut()?;
        let (api, store) = instance.call();
        let trap = match f(api, store) {
            Ok(value) => return Some(value),
            Err(trap) => trap,
        };
        let why = describe_trap(name, trap, self.sandbox.call_deadline);
        tracing::error!(export = name, error = %why, "the plugin failed on a request; rebuilding it from the store");
        self.park_instance();
        if self.in_probation() && self.previous.is_some() {
            self.failed(why);
        } else {
            self.status.last_failure = Some(why);
            self.rebuild();
        }
        None
    }

    /// Handles a failed instance: during probation, the previous build comes back at once;
    /// otherwise the same build is rebuilt, at once the first time and with a growing delay
    /// when failures repeat.
    fn failed(&mut self, why: String) {
        let now = Instant::now();
        if self.in_probation()
            && let Some(previous) = self.previous.take()
        {
            let message = format!(
                "rolled back from {} to {}: it {why} during probation",
                self.running.sha256, previous.sha256
            );
            tracing::error!(reason = %message, "plugin swap rolled back");
            self.running = previous;
            self.probation_until = None;
            self.status.rollbacks += 1;
            self.status.last_failure = Some(message);
            self.status.consecutive_failures = 0;
            self.rebuild();
            return;
        }
        let repeated = self
            .last_failure_at
            .is_some_and(|at| now.duration_since(at) < FAILURE_MEMORY);
        self.status.consecutive_failures = if repeated {
            self.status.consecutive_failures + 1
        } else {
            1
        };
        self.last_failure_at = Some(now);
        self.status.last_failure = Some(why);
        let failures = self.status.consecutive_failures;
        if failures <= 1 {
            self.rebuild();
            return;
        }
        let delay = REBUILD_DELAY_INITIAL
            .saturating_mul(1 << (failures - 2).min(16))
            .min(REBUILD_DELAY_MAX);
        tracing::warn!(
            failures,
            delay_ms = delay.as_millis() as u64,
            "the plugin keeps failing; holding it back"
        );
        self.next_rebuild_at = Some(now + delay);
    }

    /// Starts a new instance of the running build over the parked state; then delivers the
    /// outcomes that arrived meanwhile.
    fn rebuild(&mut self) {
        self.next_rebuild_at = None;
        if self.store_failed {
            return;
        }
        let Some(io) = self.parked.take() else { return };
        match self.start_instance(&self.running.clone(), io) {
            Ok(instance) => {
                tracing::info!(sha256 = %self.running.sha256, "plugin instance rebuilt");
                self.instance = Some(instance);
                self.status.rebuilds += 1;
                for (id, outcome) in std::mem::take(&mut self.held_outcomes) {
                    self.send_finished(id, outcome);
                }
            }
            Err((error, io)) => {
                self.parked = Some(io);
                self.failed(format!("{error:#}"));
            }
        }
    }

    /// Cuts over to `plugin`; restores the running build if the new one does not start.
    fn swap(&mut self, plugin: Arc<LoadedPlugin>) -> Result<SwapReport, String> {
        if self.store_failed {
            return Err("the store could not make its writes durable; restart the host".into());
        }
        let started = Instant::now();
        let io = match self.instance.take() {
            Some(instance) => instance.into_io(),
            None => self
                .parked
                .take()
                .ok_or("the engine has no state to hand over")?,
        };
        let previous_sha256 = self.running.sha256.clone();
        match self.start_instance(&plugin, io) {
            Ok(instance) => {
                let pause_us = started.elapsed().as_micros() as u64;
                self.instance = Some(instance);
                self.previous = Some(std::mem::replace(&mut self.running, plugin));
                self.probation_until = Some(Instant::now() + self.probation);
                self.next_rebuild_at = None;
                self.status.swaps += 1;
                self.status.consecutive_failures = 0;
                tracing::info!(sha256 = %self.running.sha256, previous = %previous_sha256, pause_us, "plugin swapped");
                for (id, outcome) in std::mem::take(&mut self.held_outcomes) {
                    self.send_finished(id, outcome);
                }
                Ok(SwapReport {
                    sha256: self.running.sha256.clone(),
                    previous_sha256,
                    pause_us,
                })
            }
            Err((error, io)) => {
                let message = format!(
                    "refused {}: {error:#}; {} keeps running",
                    plugin.sha256, previous_sha256
                );
                tracing::error!(reason = %message, "plugin swap refused");
                self.status.rollbacks += 1;
                self.status.last_failure = Some(message.clone());
                self.parked = Some(io);
                self.rebuild();
                Err(message)
            }
        }
    }

    fn in_probation(&self) -> bool {
        self.probation_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Lets go of the previous build once the new one has run through its probation.
    fn end_probation_if_due(&mut self) {
        if self.probation_until.is_some() && !self.in_probation() {
            self.probation_until = None;
            self.previous = None;
        }
    }

    fn plugin_status(&mut self) -> PluginStatus {
        let (timers_pending, sends_in_flight) = self
            .io()
            .map_or((0, 0), |io| (io.timers.len(), io.in_flight.len()));
        let state = match (self.instance.is_some(), self.in_probation()) {
            (false, _) if self.store_failed => "stopped",
            (false, _) => "held-back",
            (true, true) => "probation",
            (true, false) => "running",
        };
        PluginStatus {
            sha256: self.running.sha256.clone(),
            state,
            timers_pending,
            sends_in_flight,
            memory_bytes: self.instance.as_ref().map_or(0, Instance::memory_bytes),
            next_rebuild_in_ms: self
                .next_rebuild_at
                .map(|at| at.saturating_duration_since(Instant::now()).as_millis() as u64),
            ..self.status.clone()
        }
    }

    /// The host's view of every appservice: the plugin's status, or `unknown` while it does
    /// not run, plus the `url: null` ones.
    fn to_status(&self, statuses: Option<Vec<api::AppserviceStatus>>) -> Vec<AppserviceStatus> {
        let now_ms = wall_clock_ms();
        let mut out: Vec<AppserviceStatus> = match statuses {
            Some(statuses) => statuses
                .into_iter()
                .map(|s| from_plugin_status(s, now_ms))
                .collect(),
            None => self
                .appservices
                .iter()
                .map(|id| AppserviceStatus::bare(id, "unknown"))
                .collect(),
        };
        out.extend(
            self.no_traffic
                .iter()
                .map(|id| AppserviceStatus::bare(id, "no-traffic")),
        );
        out.sort_by(|a, b| a.appservice.cmp(&b.appservice));
        out
    }
}

/// Splits a round's batches into runs for one `enqueue` call each, in order: as many batches
/// as fit in [`MAX_ENQUEUE_BYTES_PER_CALL`] together, and at least one.
fn enqueue_calls(batches: &[api::EnqueueBatch]) -> Vec<std::ops::Range<usize>> {
    let bytes = |batch: &api::EnqueueBatch| -> usize {
        batch
            .items
            .iter()
            .map(|api::Item::RoomEvent(json)| json.len())
            .sum()
    };
    let mut calls = Vec::new();
    let mut start = 0;
    let mut held = 0;
    for (i, batch) in batches.iter().enumerate() {
        let size = bytes(batch);
        if i > start && held + size > MAX_ENQUEUE_BYTES_PER_CALL {
            calls.push(start..i);
            start = i;
            held = 0;
        }
        held += size;
    }
    if start < batches.len() {
        calls.push(start..batches.len());
    }
    calls
}

/// A plugin failure in words: a runaway call is named as such; otherwise the trap's first
/// line (the backtrace that follows it is for the log only).
fn describe_trap(export: &str, trap: wasmtime::Error, deadline: Duration) -> String {
    if trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
        return format!(
            "ran past its CPU deadline of {} ms in {export} and was stopped",
            deadline.as_millis()
        );
    }
    let text = format!("{:#}", runtime::to_anyhow(trap));
    tracing::debug!(export, trap = %text, "plugin trap in full");
    format!(
        "trapped in {export}: {}",
        text.lines().next().unwrap_or_default()
    )
}

fn from_plugin_status(s: api::AppserviceStatus, now_ms: u64) -> AppserviceStatus {
    AppserviceStatus {
        appservice: s.appservice,
        state: match s.state {
            api::AppserviceState::Up => "up",
            api::AppserviceState::Down => "down",
            api::AppserviceState::Recovering => "recovering",
        },
        backlog_txns: s.backlog_txns,
        backlog_events: s.backlog_events,
        backlog_bytes: s.backlog_bytes,
        oldest_undelivered_age_ms: s.oldest_enqueued_at_ms.map(|at| now_ms.saturating_sub(at)),
        current_txn_id: s.current_txn_id,
        in_flight: s.in_flight,
        failed_attempts: s.failed_attempts,
        last_error: s.last_error,
        next_retry_in_ms: s.next_retry_in_ms,
        paused_by_storage: s.paused_by_storage,
        delivered_txns: s.delivered_txns,
        delivered_events: s.delivered_events,
    }
}

fn convert_enqueue_error(error: api::EnqueueError) -> EnqueueError {
    match error {
        api::EnqueueError::UnknownAppservice(id) => EnqueueError::UnknownAppservice(id),
        api::EnqueueError::InvalidItem((index, why)) => EnqueueError::InvalidItem { index, why },
        api::EnqueueError::Storage(why) => EnqueueError::Storage(why),
    }
}

fn wall_clock_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `events` events of `bytes` bytes each.
    fn batch(events: usize, bytes: usize) -> api::EnqueueBatch {
        api::EnqueueBatch {
            appservice: "as1".into(),
            items: (0..events)
                .map(|_| api::Item::RoomEvent("x".repeat(bytes)))
                .collect(),
        }
    }

    /// Batches go to the plugin in order, as many per call as fit in the limit together; a
    /// batch larger than the limit goes alone; a round of small batches stays one call.
    #[test]
    fn a_rounds_batches_are_split_into_calls_by_their_bytes() {
        const KIB: usize = 1024;
        let small: Vec<_> = (0..12).map(|_| batch(100, 400)).collect();
        assert_eq!(enqueue_calls(&small), vec![0..12]);
        let large = vec![
            batch(1000, 410),
            batch(1000, 410),
            batch(1, 100),
            batch(1, 2048 * KIB),
            batch(1, 100),
            batch(2, 256 * KIB),
            batch(1, 1),
        ];
        assert_eq!(
            enqueue_calls(&large),
            vec![0..1, 1..3, 3..4, 4..5, 5..6, 6..7]
        );
        let exact = vec![batch(1, 256 * KIB), batch(1, 256 * KIB), batch(1, 1)];
        assert_eq!(enqueue_calls(&exact), vec![0..2, 2..3]);
        assert_eq!(enqueue_calls(&[]), Vec::<std::ops::Range<usize>>::new());
    }
}
