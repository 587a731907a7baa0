//! The engine: one thread that owns the plugin instance and feeds it every input in order.
//!
//! Requests (enqueue, force retry, status), send outcomes and timers arrive on one channel. The
//! thread takes everything waiting, hands all enqueues to the plugin in one call (so they share
//! one durable commit), then the other inputs, and ticks the plugin about once a second. If the
//! plugin traps, the instance is rebuilt from the store with the sends still in flight handed
//! over; callers of the failed call get an error, never a false "stored".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::oneshot;

use crate::http::{HttpConfig, Net};
use crate::registration::Registration;
use crate::runtime::{self, Instance, Io, LoadedPlugin, api};
use crate::store::SqliteStore;

/// How often the plugin is ticked.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// The most inputs taken in one round, so replies keep flowing under a flood.
const MAX_INPUTS_PER_ROUND: usize = 4096;

/// The first delay before a failed plugin instance is rebuilt; doubles per failure up to
/// [`REBUILD_DELAY_MAX`].
const REBUILD_DELAY_INITIAL: Duration = Duration::from_millis(100);

/// The longest delay between two attempts to rebuild a failed plugin instance.
const REBUILD_DELAY_MAX: Duration = Duration::from_secs(30);

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
}

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
    /// The plugin failed during the call; nothing was acknowledged. Safe to retry.
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
    /// `up`, `down`, `recovering`, or `no-traffic` for `url: null`.
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
    /// Transactions delivered since the host started.
    pub delivered_txns: u64,
    /// Events delivered since the host started.
    pub delivered_events: u64,
}

/// Inputs to the engine thread.
pub enum Input {
    /// Store events for one appservice.
    Enqueue {
        appservice: String,
        events: Vec<String>,
        reply: oneshot::Sender<Result<u32, EnqueueError>>,
    },
    /// A send ended.
    SendFinished { id: u64, outcome: api::SendOutcome },
    /// A timer is due.
    TimerFired { id: u64 },
    /// Retry an appservice now.
    ForceRetry {
        appservice: String,
        reply: oneshot::Sender<Result<(), EnqueueError>>,
    },
    /// Report status.
    Status {
        reply: oneshot::Sender<Vec<AppserviceStatus>>,
    },
    /// Stop the thread.
    Shutdown,
}

/// A handle to the running engine; cheap to clone.
#[derive(Clone, Debug)]
pub struct Host {
    inputs: Sender<Input>,
    no_traffic: Arc<Vec<String>>,
    known: Arc<Vec<String>>,
}

impl Host {
    /// Opens the store, loads the plugin, starts it and the engine thread. Must be called
    /// inside a tokio runtime, which then runs the sends and timers.
    pub fn start(config: HostConfig) -> anyhow::Result<(Host, std::thread::JoinHandle<()>)> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create the data folder {}",
                config.data_dir.display()
            )
        })?;
        let store = SqliteStore::open(&config.data_dir.join("scheduler.sqlite"))?;
        let wasm = match &config.plugin_path {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("cannot read the plugin {}", path.display()))?,
            None => EMBEDDED_PLUGIN.to_vec(),
        };
        let engine = runtime::new_engine().map_err(runtime::to_anyhow)?;
        let plugin = LoadedPlugin::load(&engine, &wasm, &config.data_dir.join("plugin-cache"))
            .map_err(runtime::to_anyhow)?;
        tracing::info!(sha256 = %plugin.sha256, "plugin loaded");
        let net = Arc::new(Net::new(
            &config.http,
            &config.registrations,
            &config.legacy_query_auth,
        )?);
        let (inputs, receiver) = std::sync::mpsc::channel();
        let io = Io {
            store,
            net,
            inputs: inputs.clone(),
            runtime: tokio::runtime::Handle::current(),
            in_flight: BTreeMap::new(),
            timers: Default::default(),
            next_handle: 0,
            clock_origin: Instant::now(),
        };
        let traffic: Vec<String> = config
            .registrations
            .iter()
            .filter(|r| r.url.is_some())
            .map(|r| r.id.clone())
            .collect();
        let no_traffic: Vec<String> = config
            .registrations
            .iter()
            .filter(|r| r.url.is_none())
            .map(|r| r.id.clone())
            .collect();
        let known = config.registrations.iter().map(|r| r.id.clone()).collect();
        let mut engine = EngineThread {
            plugin,
            scheduler: config.scheduler,
            appservices: traffic,
            instance: None,
        };
        engine.instance = Some(engine.start_instance(io).map_err(|(error, _)| error)?);
        let no_traffic_for_thread = no_traffic.clone();
        let thread = std::thread::Builder::new()
            .name("asched-engine".into())
            .spawn(move || engine.run(&receiver, &no_traffic_for_thread))?;
        let host = Host {
            inputs,
            no_traffic: Arc::new(no_traffic),
            known: Arc::new(known),
        };
        Ok((host, thread))
    }

    /// Stores events for one appservice; returns once they are durable.
    pub async fn enqueue(
        &self,
        appservice: &str,
        events: Vec<String>,
    ) -> Result<u32, EnqueueError> {
        if self.no_traffic.iter().any(|id| id == appservice) {
            return Err(EnqueueError::NoTraffic(appservice.to_owned()));
        }
        if !self.known.iter().any(|id| id == appservice) {
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
        if self.no_traffic.iter().any(|id| id == appservice) {
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
        let (reply, answer) = oneshot::channel();
        if self.send(Input::Status { reply }).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
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

/// The state of the engine thread.
struct EngineThread {
    plugin: LoadedPlugin,
    scheduler: SchedulerConfig,
    appservices: Vec<String>,
    instance: Option<Instance>,
}

/// A request waiting for the plugin's answer to a combined enqueue.
type PendingEnqueue = oneshot::Sender<Result<u32, EnqueueError>>;

impl EngineThread {
    /// Instantiates the plugin and calls its `start`, handing over the sends still in flight.
    fn start_instance(&self, mut io: Io) -> Result<Instance, (anyhow::Error, Io)> {
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
        let mut instance = self
            .plugin
            .instantiate(io)
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

    /// The main loop: take what is waiting, process it, tick when due.
    fn run(mut self, inputs: &Receiver<Input>, no_traffic: &[String]) {
        let mut next_tick = Instant::now() + TICK_INTERVAL;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut round = Vec::new();
            match inputs.recv_timeout(wait) {
                Ok(input) => round.push(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while round.len() < MAX_INPUTS_PER_ROUND {
                match inputs.try_recv() {
                    Ok(input) => round.push(input),
                    Err(_) => break,
                }
            }
            if !self.process(round, no_traffic) {
                tracing::info!("engine stopped");
                return;
            }
            if Instant::now() >= next_tick {
                self.call("tick", |api, store| api.call_tick(store));
                next_tick = Instant::now() + TICK_INTERVAL;
            }
        }
    }

    /// Processes one round of inputs; returns false when asked to stop.
    fn process(&mut self, round: Vec<Input>, no_traffic: &[String]) -> bool {
        let mut batches = Vec::new();
        let mut pending: Vec<PendingEnqueue> = Vec::new();
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
                other => others.push(other),
            }
        }
        if !batches.is_empty() {
            self.enqueue(&batches, pending);
        }
        for input in others {
            match input {
                Input::SendFinished { id, outcome } => {
                    if let Some(instance) = &mut self.instance {
                        instance.io().in_flight.remove(&id);
                    }
                    self.call("send-finished", |api, store| {
                        api.call_send_finished(store, id, &outcome)
                    });
                }
                Input::TimerFired { id } => {
                    if let Some(instance) = &mut self.instance {
                        instance.io().timers.remove(&id);
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
                        None => Err(EnqueueError::PluginFailed(
                            "the plugin trapped; it is being rebuilt".into(),
                        )),
                    };
                    let _ = reply.send(answer);
                }
                Input::Status { reply } => {
                    let statuses = self
                        .call("status", |api, store| api.call_status(store))
                        .unwrap_or_default();
                    let _ = reply.send(to_status(statuses, no_traffic));
                }
                Input::Enqueue { .. } => unreachable!("enqueues were separated above"),
                Input::Shutdown => return false,
            }
        }
        true
    }

    /// One plugin call for every enqueue of the round.
    fn enqueue(&mut self, batches: &[api::EnqueueBatch], pending: Vec<PendingEnqueue>) {
        let results = self.call("enqueue", |api, store| api.call_enqueue(store, batches));
        match results {
            Some(results) => {
                for (reply, result) in pending.into_iter().zip(results) {
                    let _ = reply.send(result.map_err(convert_enqueue_error));
                }
            }
            None => {
                for reply in pending {
                    let why = "the plugin trapped during the call; nothing was acknowledged, retry"
                        .to_owned();
                    let _ = reply.send(Err(EnqueueError::PluginFailed(why)));
                }
            }
        }
    }

    /// Calls an export; on a trap, rebuilds the instance and returns `None`.
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
                tracing::error!(export = name, error = ?trap, "the plugin trapped; rebuilding it from the store");
                let io = self
                    .instance
                    .take()
                    .expect("an instance was just used")
                    .into_io();
                self.rebuild(io);
                None
            }
        }
    }

    /// Rebuilds the instance after a trap, retrying with a growing delay until it starts.
    fn rebuild(&mut self, mut io: Io) {
        let mut delay = REBUILD_DELAY_INITIAL;
        loop {
            match self.start_instance(io) {
                Ok(instance) => {
                    tracing::info!("plugin instance rebuilt");
                    self.instance = Some(instance);
                    return;
                }
                Err((error, returned)) => {
                    tracing::error!(
                        ?error,
                        delay_ms = delay.as_millis() as u64,
                        "could not rebuild the plugin instance"
                    );
                    io = returned;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(REBUILD_DELAY_MAX);
                }
            }
        }
    }
}

fn convert_enqueue_error(error: api::EnqueueError) -> EnqueueError {
    match error {
        api::EnqueueError::UnknownAppservice(id) => EnqueueError::UnknownAppservice(id),
        api::EnqueueError::InvalidItem((index, why)) => EnqueueError::InvalidItem { index, why },
        api::EnqueueError::Storage(why) => EnqueueError::Storage(why),
    }
}

fn to_status(statuses: Vec<api::AppserviceStatus>, no_traffic: &[String]) -> Vec<AppserviceStatus> {
    let now_ms = runtime_wall_ms();
    let mut out: Vec<AppserviceStatus> = statuses
        .into_iter()
        .map(|s| AppserviceStatus {
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
        })
        .collect();
    for id in no_traffic {
        out.push(AppserviceStatus {
            appservice: id.clone(),
            state: "no-traffic",
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
        });
    }
    out.sort_by(|a, b| a.appservice.cmp(&b.appservice));
    out
}

fn runtime_wall_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}
