//! Loading the plugin component and supplying its imports.
//!
//! One wasmtime [`Engine`] per process compiles the component once; the compiled code is cached
//! on disk keyed by the component's SHA-256 and the engine's compatibility hash, so a restart
//! only maps it back in. The [`Linker`] holds exactly the imports a plugin may use: the
//! `asched:scheduler` interfaces and the parts of `wasi:cli`/`wasi:io` that Rust's standard
//! library needs for panics and prints. No filesystem, sockets, clocks or randomness from WASI
//! are linked, so a component that imports them fails before it runs.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasData, HasSelf, Linker, ResourceTable};
use wasmtime::error::Context as _;
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::engine::Input;
use crate::http::{Net, SendJob};
use crate::store::{Store as KeyStore, StoreError as SqlError, Write};

wasmtime::component::bindgen!({ path: "../wit", world: "plugin" });

pub use asched::scheduler::{clock, http_send, log, random, store, timer, types};
pub use exports::asched::scheduler::scheduler as api;

/// How often the epoch ticks; a call's CPU deadline is counted in these.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The most wall time one export call may take before it is interrupted: a plugin stuck in a
/// loop must not stall the host. Generous, because a commit may run a checkpoint, which
/// fsyncs.
pub const CALL_DEADLINE_TICKS: u64 = 1_000;

/// The most linear memory a plugin instance may use. The scheduler keeps its backlog in the
/// store, so its own memory stays small; this bounds a faulty build.
pub const PLUGIN_MEMORY_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Everything the imports act on. It outlives any one plugin instance: when an instance is
/// rebuilt, this moves into the new store.
pub struct Io {
    /// The durable store.
    pub store: KeyStore,
    /// HTTP sending.
    pub net: Arc<Net>,
    /// Where send outcomes and timers report back.
    pub inputs: std::sync::mpsc::Sender<Input>,
    /// The async runtime that runs timers (sends run on [`Net`]'s own).
    pub runtime: tokio::runtime::Handle,
    /// Sends started and not yet finished: handle → (appservice, txn id).
    pub in_flight: BTreeMap<u64, (String, String)>,
    /// Sends the plugin started in this round: they go out once the round's commits are
    /// durable ([`Io::take_pending_sends`]).
    pub pending_sends: Vec<(SendJob, String, String)>,
    /// Pending timers.
    pub timers: HashMap<u64, tokio::task::AbortHandle>,
    /// Handles given out so far (sends and timers share the counter).
    pub next_handle: u64,
    /// The origin of the plugin's monotonic clock.
    pub clock_origin: Instant,
}

impl Io {
    fn next_handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    /// The requests the plugin asked for since the last call, now counted as in flight. Send
    /// them only once the store's commits are durable: a request must never carry a
    /// transaction that a crash could lose.
    pub fn take_pending_sends(&mut self) -> Vec<SendJob> {
        let mut jobs = Vec::with_capacity(self.pending_sends.len());
        for (job, appservice, txn_id) in self.pending_sends.drain(..) {
            self.in_flight.insert(job.id, (appservice, txn_id));
            jobs.push(job);
        }
        jobs
    }

    /// Cancels every pending timer (used when an instance is replaced: the new one sets its own).
    pub fn cancel_all_timers(&mut self) {
        for (_, timer) in self.timers.drain() {
            timer.abort();
        }
    }
}

/// The data of one wasmtime store: WASI's minimal context, limits, and the [`Io`].
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryWatch,
    /// The imports' state.
    pub io: Io,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled plugin, ready to instantiate any number of times.
pub struct LoadedPlugin {
    engine: Engine,
    pre: PluginPre<HostState>,
    /// Hex SHA-256 of the component file.
    pub sha256: String,
}

/// The sandbox's limits, and the size the instance's memories have grown to.
struct MemoryWatch {
    limits: StoreLimits,
    memory_bytes: usize,
}

impl wasmtime::ResourceLimiter for MemoryWatch {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_bytes += desired - current;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A running plugin instance.
pub struct Instance {
    store: Store<HostState>,
    plugin: Plugin,
    deadline_ticks: u64,
}

/// The process-wide engine, with epoch interruption driven by a background thread.
pub fn new_engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    let engine = Engine::new(&config)?;
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("asched-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(engine)
}

/// The limits every plugin instance runs under.
#[derive(Clone, Copy, Debug)]
pub struct Sandbox {
    /// The most linear memory an instance may use, in bytes.
    pub memory_bytes_max: usize,
    /// The most time one export call may run before it is interrupted.
    pub call_deadline: Duration,
}

impl Default for Sandbox {
    /// 256 MiB and 10 s: the scheduler needs a few MiB and milliseconds; these bound a faulty
    /// build without hurting a working one.
    fn default() -> Self {
        Sandbox {
            memory_bytes_max: PLUGIN_MEMORY_BYTES_MAX,
            call_deadline: EPOCH_TICK * CALL_DEADLINE_TICKS as u32,
        }
    }
}

impl Sandbox {
    fn deadline_ticks(&self) -> u64 {
        (self.call_deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

/// The import namespaces a plugin may use: the scheduler's own interfaces, and the parts of
/// WASI that Rust's standard library needs to print a panic.
const ALLOWED_IMPORTS: [&str; 3] = ["asched:scheduler/", "wasi:cli/", "wasi:io/"];

/// The interface a plugin must export.
const SCHEDULER_EXPORT: &str = "asched:scheduler/scheduler@0.1.";

impl LoadedPlugin {
    /// Compiles `wasm` (or maps a cached compilation from `cache_dir`) and checks its imports
    /// and exports against what this host provides. The error says what does not fit.
    pub fn load(engine: &Engine, wasm: &[u8], cache_dir: &Path) -> wasmtime::Result<LoadedPlugin> {
        let sha256 = hex(&Sha256::digest(wasm));
        let component = compile_cached(engine, wasm, &sha256, cache_dir)?;
        check_world(engine, &component)?;
        let linker = plugin_linker::<HostState>(engine)?;
        let pre = linker
            .instantiate_pre(&component)
            .context("the plugin's imports do not match the asched:scheduler@0.1 interfaces this host provides")?;
        let pre = PluginPre::new(pre).context(
            "the plugin's exports do not match the asched:scheduler@0.1 world this host drives",
        )?;
        Ok(LoadedPlugin {
            engine: engine.clone(),
            pre,
            sha256,
        })
    }

    /// Creates a new instance whose imports act on `io`, under `sandbox`'s limits.
    pub fn instantiate(
        &self,
        io: Io,
        sandbox: &Sandbox,
    ) -> Result<Instance, (wasmtime::Error, Io)> {
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .inherit_stderr()
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(sandbox.memory_bytes_max)
            .instances(16)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits: MemoryWatch {
                limits,
                memory_bytes: 0,
            },
            io,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let ticks = sandbox.deadline_ticks();
        store.set_epoch_deadline(ticks);
        match self.pre.instantiate(&mut store) {
            Ok(plugin) => Ok(Instance {
                store,
                plugin,
                deadline_ticks: ticks,
            }),
            Err(error) => Err((error, store.into_data().io)),
        }
    }
}

/// Refuses a component that imports anything outside [`ALLOWED_IMPORTS`] or does not export
/// the scheduler interface, naming the import or export.
fn check_world(engine: &Engine, component: &Component) -> wasmtime::Result<()> {
    let ty = component.component_type();
    let refused: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| {
            !ALLOWED_IMPORTS
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .map(|name| format!("`{name}`"))
        .collect();
    if !refused.is_empty() {
        wasmtime::bail!(
            "the plugin imports {}, which this host does not provide: a plugin may import only {}",
            refused.join(", "),
            ALLOWED_IMPORTS.map(|p| format!("{p}*")).join(", ")
        );
    }
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    if !exports
        .iter()
        .any(|name| name.starts_with(SCHEDULER_EXPORT))
    {
        wasmtime::bail!(
            "the plugin does not export `{SCHEDULER_EXPORT}x` (it exports: {}); this host drives asched:scheduler@0.1",
            if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            }
        );
    }
    Ok(())
}

impl Instance {
    /// The plugin's exports, with a fresh CPU deadline for the call about to be made.
    pub fn call(&mut self) -> (&api::Guest, &mut Store<HostState>) {
        self.store.set_epoch_deadline(self.deadline_ticks);
        (self.plugin.asched_scheduler_scheduler(), &mut self.store)
    }

    /// The size of the instance's linear memories, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limits.memory_bytes
    }

    /// The imports' state.
    pub fn io(&mut self) -> &mut Io {
        &mut self.store.data_mut().io
    }

    /// Ends the instance and gives back the imports' state.
    /// Ends the instance. Sends it asked for that have not gone out are dropped: the next
    /// instance finds their transactions in the store and sends them itself.
    pub fn into_io(self) -> Io {
        let mut io = self.store.into_data().io;
        io.pending_sends.clear();
        io
    }
}

/// Compiles the component, or reuses the compilation cached by an earlier run.
pub fn compile_cached(
    engine: &Engine,
    wasm: &[u8],
    sha256: &str,
    cache_dir: &Path,
) -> wasmtime::Result<Component> {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let path: PathBuf = cache_dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
    if path.exists() {
        // SAFETY: the file was written by `precompile_component` of an engine with the same
        // compatibility hash (it is in the name), into the host's own data folder.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(error) => {
                tracing::warn!(?error, path = %path.display(), "ignoring unusable compiled-plugin cache")
            }
        }
    }
    let compiled = engine.precompile_component(wasm).map_err(|error| {
        // The parser's own message can run to a dump of bytes; its first line says enough.
        let text = format!("{error:#}");
        let first = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches(" - expected=[");
        wasmtime::format_err!("the plugin is not a valid WebAssembly component: {first}")
    })?;
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, &compiled)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path)?;
    // SAFETY: the bytes were produced just above by `precompile_component` of this engine.
    unsafe { Component::deserialize(engine, &compiled) }
}

/// What a store's data must provide to back a plugin: the six `asched:scheduler` imports and
/// WASI's context (only `wasi:cli` and `wasi:io` are linked from it). The reference host's
/// [`HostState`] is one; a simulator can bring its own.
pub trait PluginImports:
    WasiView
    + types::Host
    + store::Host
    + http_send::Host
    + timer::Host
    + clock::Host
    + random::Host
    + log::Host
    + 'static
{
    /// The resource table used by `wasi:io` streams.
    fn table(&mut self) -> &mut ResourceTable;
}

impl PluginImports for HostState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

/// The imports a plugin may use, and nothing else.
pub fn plugin_linker<T: PluginImports>(engine: &Engine) -> wasmtime::Result<Linker<T>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::p2::bindings::cli;
    use wasmtime_wasi::p2::bindings::sync::io;

    let mut linker = Linker::new(engine);
    Plugin::add_to_linker::<T, HasSelf<T>>(&mut linker, |s| s)?;
    let l = &mut linker;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<T, Table>(l, T::table)?;
    io::poll::add_to_linker::<T, Table>(l, T::table)?;
    io::streams::add_to_linker::<T, Table>(l, T::table)?;
    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    Ok(linker)
}

/// Access to the resource table for the `wasi:io` interfaces.
struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl types::Host for HostState {}

impl store::Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, store::StoreError> {
        self.io.store.get(&key).map_err(to_wit_error)
    }

    fn scan(
        &mut self,
        range: store::KeyRange,
        limit: u32,
    ) -> Result<Vec<store::Entry>, store::StoreError> {
        let entries = self
            .io
            .store
            .scan(&range.start, &range.end, limit)
            .map_err(to_wit_error)?;
        Ok(entries
            .into_iter()
            .map(|(key, value)| store::Entry { key, value })
            .collect())
    }

    fn commit(&mut self, ops: Vec<store::WriteOp>) -> Result<(), store::StoreError> {
        self.io
            .store
            .commit(writes_from_wit(ops))
            .map_err(to_wit_error)
    }
}

/// The plugin's writes in the store's terms.
pub fn writes_from_wit(ops: Vec<store::WriteOp>) -> Vec<Write> {
    ops.into_iter()
        .map(|op| match op {
            store::WriteOp::Put(e) => Write::Put(e.key, e.value),
            store::WriteOp::Delete(key) => Write::Delete(key),
            store::WriteOp::DeleteRange(r) => Write::DeleteRange(r.start, r.end),
        })
        .collect()
}

/// A store error in the plugin's terms.
pub fn to_wit_error(error: SqlError) -> store::StoreError {
    match error {
        SqlError::Unavailable(why) => store::StoreError::Unavailable(why),
        SqlError::Failed(why) => store::StoreError::Failed(why),
    }
}

impl http_send::Host for HostState {
    fn start_send(
        &mut self,
        appservice: String,
        txn_id: String,
        body: Vec<u8>,
    ) -> Result<u64, http_send::SendRefused> {
        let io = &mut self.io;
        let target = io
            .net
            .target(&appservice, &txn_id)
            .map_err(|refusal| match refusal {
                None => http_send::SendRefused::UnknownAppservice,
                Some(why) => http_send::SendRefused::Other(why),
            })?;
        let id = io.next_handle();
        let job = SendJob { id, target, body };
        io.pending_sends.push((job, appservice, txn_id));
        Ok(id)
    }
}

impl timer::Host for HostState {
    fn set_timer(&mut self, delay_ms: u64) -> u64 {
        let io = &mut self.io;
        let id = io.next_handle();
        let inputs = io.inputs.clone();
        let task = io.runtime.spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let _ = inputs.send(Input::TimerFired { id });
        });
        io.timers.insert(id, task.abort_handle());
        id
    }

    fn cancel_timer(&mut self, id: u64) {
        if let Some(task) = self.io.timers.remove(&id) {
            task.abort();
        }
    }
}

impl clock::Host for HostState {
    fn monotonic_now_ms(&mut self) -> u64 {
        u64::try_from(self.io.clock_origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn wall_clock_now_ms(&mut self) -> u64 {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
    }
}

impl random::Host for HostState {
    fn random_u64(&mut self) -> u64 {
        random_u64()
    }
}

/// Converts wasmtime's error type into the host's, keeping the chain of causes.
pub fn to_anyhow(error: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{error:#}")
}

/// 64 bits from the operating system's randomness.
pub fn random_u64() -> u64 {
    getrandom::u64().expect("the operating system's random source is available")
}

impl log::Host for HostState {
    fn log(&mut self, level: types::LogLevel, appservice: Option<String>, message: String) {
        let appservice = appservice.as_deref().unwrap_or("-");
        match level {
            types::LogLevel::Debug => {
                tracing::debug!(target: "asched::plugin", appservice, "{message}")
            }
            types::LogLevel::Info => {
                tracing::info!(target: "asched::plugin", appservice, "{message}")
            }
            types::LogLevel::Warn => {
                tracing::warn!(target: "asched::plugin", appservice, "{message}")
            }
            types::LogLevel::Error => {
                tracing::error!(target: "asched::plugin", appservice, "{message}")
            }
        }
    }
}
