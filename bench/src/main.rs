//! Benchmarks that print their figures.
//!
//! ```text
//! cargo run --release -p asched-bench            # the whole suite (same as `-- suite`)
//! cargo run --release -p asched-bench -- swap    # the pause a hot swap causes
//! ```
//!
//! The suite measures the scheduler end to end (homeserver driver → reference host → a receiver
//! process on 127.0.0.1 that parses every body) and, in the same invocation, the references it
//! is judged against: Synapse's own appservice scheduler driven against the same receiver (when
//! a Python environment with `matrix-synapse` is present), the loopback HTTP rate and the SQLite
//! commit rate of the machine. Every figure is the median of `--runs` runs, with min and max.

mod control;
mod core;
mod receiver;
mod refs;
mod swap;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use asched_host::engine::StoreKind;
use clap::{Parser, Subcommand};

use crate::control::Receiver;
use crate::workloads::Bench;

#[derive(Parser)]
#[command(
    about = "Benchmarks of the asched scheduler, side by side with its references",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: the suite, with these options.
    #[command(flatten)]
    suite: SuiteArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Every figure, with the references measured in the same run (the default).
    Suite(SuiteArgs),
    /// The pause a hot swap causes under load.
    Swap,
    /// One end-to-end throughput run (or, with `--rate`, one latency run), for profiling
    /// (`perf record`).
    Once {
        /// The store: `file` (durable SQLite) or `memory`.
        #[arg(long, value_enum, default_value_t = OnceStore::File)]
        store: OnceStore,
        /// Events to deliver, enqueued in batches of 100.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
        events: u64,
        /// Appservices, each on its own receiver port.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
        appservices: u16,
        /// The receiver's first port.
        #[arg(long, default_value_t = 23100, value_parser = clap::value_parser!(u16).range(1024..=64_535))]
        port: u16,
        /// Instead of the throughput run: enqueue one event at a time at this many per second
        /// for 10 seconds, and print the enqueue → arrival latency.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        rate: Option<u32>,
    },
    /// The scheduler core alone, natively and as the component (CPU ns per event).
    Core {
        /// Events to deliver, in batches of 100.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
        events: u64,
    },
    /// The receiver process the suite starts (not for direct use).
    #[command(hide = true)]
    Receiver {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        ports: u16,
    },
}

/// A whole number from `MIN` to `MAX`.
fn count_between<const MIN: usize, const MAX: usize>(text: &str) -> Result<usize, String> {
    let n: usize = text
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if (MIN..=MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not between {MIN} and {MAX}"))
    }
}

/// The store of a `once` run.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnceStore {
    File,
    Memory,
}

#[derive(clap::Args, Clone)]
struct SuiteArgs {
    /// Runs of each figure; the table shows their median, min and max.
    #[arg(long, default_value_t = 3, value_parser = count_between::<1, 100>)]
    runs: usize,
    /// Events per throughput run (Synapse gets as many).
    #[arg(long, default_value_t = 100_000, value_parser = count_between::<1_000, 10_000_000>)]
    events: usize,
    /// The largest backlog measured (the memory and drain figures also use 10,000 and 100,000
    /// when they are smaller).
    #[arg(long, default_value_t = 1_000_000, value_parser = count_between::<10_000, 10_000_000>)]
    max_backlog: usize,
    /// The receiver's first port; it listens on 1,000 ports from here.
    #[arg(long, default_value_t = 23100, value_parser = clap::value_parser!(u16).range(1024..=64_535))]
    port: u16,
    /// A Python that can `import synapse` [default: /tmp/synvenv/bin/python]. When given and
    /// not usable, the suite stops at once; the default, when not usable, leaves Synapse out
    /// of the run (and the report says so).
    #[arg(long)]
    synapse_python: Option<PathBuf>,
    /// The driver that runs Synapse's `ApplicationServiceScheduler` against the receiver
    /// (`synapse_sched_bench.py` of the Synapse anchor measurements) [default: the anchor's,
    /// beside this checkout]. When given and not usable, the suite stops at once.
    #[arg(long)]
    synapse_driver: Option<PathBuf>,
    /// Create the Python environment of `--synapse-python` (a virtualenv two folders above it)
    /// and install matrix-synapse 1.163.2 into it first.
    #[arg(long, conflicts_with = "no_synapse")]
    install_synapse: bool,
    /// Skip Synapse even when it is available.
    #[arg(long)]
    no_synapse: bool,
}

/// The Python of `--synapse-python` when it is not given.
const DEFAULT_SYNAPSE_PYTHON: &str = "/tmp/synvenv/bin/python";

impl SuiteArgs {
    fn synapse_python(&self) -> PathBuf {
        self.synapse_python
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SYNAPSE_PYTHON))
    }

    fn synapse_driver(&self) -> PathBuf {
        self.synapse_driver
            .clone()
            .unwrap_or_else(|| PathBuf::from(default_synapse_driver()))
    }
}

/// Synapse for this run, or why it is left out. A Python or driver the user named that cannot
/// be used, or an install they asked for that failed, is an error: the run would otherwise go
/// on for minutes without the comparison they asked for.
fn choose_synapse(args: &SuiteArgs) -> anyhow::Result<Result<refs::SynapseSetup, String>> {
    if args.no_synapse {
        return Ok(Err("skipped (--no-synapse)".to_owned()));
    }
    let python = args.synapse_python();
    if args.install_synapse {
        let venv = python
            .parent()
            .and_then(|bin| bin.parent())
            .ok_or_else(|| anyhow::anyhow!("--synapse-python must be <venv>/bin/python"))?;
        eprintln!("installing matrix-synapse into {}", venv.display());
        refs::install_synapse(venv)
            .map_err(|why| anyhow::anyhow!("--install-synapse failed: {why}"))?;
    }
    let found = refs::find_synapse(&python, &args.synapse_driver());
    match found {
        Err(why) if args.synapse_python.is_some() || args.synapse_driver.is_some() => {
            anyhow::bail!("Synapse cannot be run as given: {why} (or add --no-synapse)")
        }
        found => Ok(found),
    }
}

/// The Synapse anchor lives beside this repository's checkout in the shared workspace.
const fn default_synapse_driver() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/bench/synapse-anchor/synapse_sched_bench.py"
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Receiver { port, ports }) => match receiver::run(port, ports) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{error:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Swap) => {
            runtime().block_on(swap::swap_pause());
            ExitCode::SUCCESS
        }
        Some(Command::Suite(args)) => suite(args),
        Some(Command::Core { events: count }) => {
            let events = events(count as usize, "ev");
            let (native, component) = core::best_of(&events, 3);
            println!(
                "native {native:.0} ns/event, component {component:.0} ns/event, ratio {:.2}",
                component / native
            );
            ExitCode::SUCCESS
        }
        Some(Command::Once {
            store,
            events: count,
            appservices,
            port,
            rate,
        }) => {
            let store = match store {
                OnceStore::File => StoreKind::File,
                OnceStore::Memory => StoreKind::Memory,
            };
            let work = WorkDir::create();
            let result = runtime().block_on(async {
                let receiver = Receiver::start(port, appservices)?;
                let n = usize::from(appservices);
                let bench = Bench::start(&work.0, &receiver, n, n, store);
                if let Some(rate) = rate {
                    let l = workloads::latency(
                        &bench.host,
                        &receiver,
                        rate,
                        Duration::from_secs(10),
                        n,
                    )
                    .await;
                    bench.stop();
                    println!(
                        "{rate} events/s to {appservices} appservice(s), {store:?} store: enqueue -> arrival p50 {:.3} ms, p99 {:.3} ms",
                        l.p50_ms, l.p99_ms
                    );
                    return anyhow::Ok(());
                }
                let t = workloads::throughput(
                    &bench.host,
                    &receiver,
                    events(count as usize, "ev"),
                    n,
                    100,
                )
                .await;
                bench.stop();
                println!(
                    "{count} events to {appservices} appservice(s), {store:?} store: {:.0} events/s, {:.2} us CPU per event, {} transactions",
                    t.events_per_s, t.cpu_us_per_event, t.txns
                );
                anyhow::Ok(())
            });
            drop(work);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("asched-bench: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        None => suite(cli.suite),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// Wall clock, ns since the Unix epoch (the receiver stamps arrivals with the same clock).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

/// CPU time of the calling thread, ns.
pub fn thread_cpu_ns() -> u64 {
    cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of this process (all its threads), ns.
pub fn process_cpu_ns() -> u64 {
    cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write into.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime works");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU seconds used so far by process `pid` (user + system, from `/proc`).
pub fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

/// The id of event `n` of a workload tagged `tag`: 44 characters, like a room v4+ event id.
pub fn event_id(n: usize, tag: &str) -> String {
    let mut id = format!("${tag}{n:08}");
    while id.len() < 44 {
        id.push('x');
    }
    id
}

/// A client-format `m.room.message` of 408 bytes, the shape Synapse sends.
pub fn event(n: usize, tag: &str) -> String {
    let ts = 1_700_000_000_000u64 + n as u64;
    format!(
        concat!(
            r#"{{"age":96293221441,"content":{{"body":"Benchmark message {n:08}: the quick brown fox jumps over the lazy dog.","msgtype":"m.text"}},"#,
            r#""event_id":"{id}","origin_server_ts":{ts},"room_id":"!benchroom0001abcdefgh:bench.local","#,
            r#""sender":"@alice_bench_user:bench.local","type":"m.room.message","unsigned":{{"age":96293221441}},"#,
            r#""user_id":"@alice_bench_user:bench.local"}}"#
        ),
        n = n,
        id = event_id(n, tag),
        ts = ts
    )
}

fn events(count: usize, tag: &str) -> Arc<Vec<String>> {
    Arc::new((0..count).map(|n| event(n, tag)).collect())
}

/// Median, min and max of some runs.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    Some(Spread {
        median,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
    })
}

/// Every run's values, by figure name.
#[derive(Default)]
struct Samples(std::collections::BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    fn add(&mut self, name: &'static str, value: f64) {
        eprintln!("  {name}: {value:.3}");
        self.0.entry(name).or_default().push(value);
    }

    fn get(&self, name: &str) -> Option<Spread> {
        spread(self.0.get(name).map_or(&[][..], Vec::as_slice))
    }

    fn median(&self, name: &str) -> Option<f64> {
        self.get(name).map(|s| s.median)
    }
}

fn fmt_value(value: f64, unit: &str) -> String {
    match unit {
        "ev/s" | "rows/s" | "req/s" => format!("{:.1}k", value / 1e3),
        "µs" => format!("{value:.2}"),
        "ms" => format!("{value:.3}"),
        "MiB" => format!("{:.2}", value / (1024.0 * 1024.0)),
        "×" => format!("{value:.2}"),
        _ => format!("{value:.1}"),
    }
}

fn fmt_spread(s: Option<Spread>, unit: &str) -> String {
    match s {
        Some(s) => format!(
            "{} [{}–{}] {unit}",
            fmt_value(s.median, unit),
            fmt_value(s.min, unit),
            fmt_value(s.max, unit)
        ),
        None => "not measured".to_owned(),
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {:.1} GiB memory",
        memory_kib as f64 / 1024.0 / 1024.0
    )
}

/// The workloads of Synapse's driver run once per suite run: one appservice, 100 appservices,
/// latency.
const SYNAPSE_WORKLOADS: [&str; 3] = ["a", "b", "c"];

/// The folder a run keeps its stores and the compiled plugin in; removed when the run ends,
/// also when it panics.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> WorkDir {
        let dir = std::env::temp_dir().join(format!("asched-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the temp folder is writable");
        WorkDir(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn suite(args: SuiteArgs) -> ExitCode {
    let runtime = runtime();
    let work = WorkDir::create();
    let result = runtime.block_on(run_suite(&args, &work.0));
    drop(work);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("asched-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Appservice counts of the growth table.
const GROWTH_APPSERVICES: [usize; 4] = [1, 10, 100, 1000];

async fn run_suite(args: &SuiteArgs, work: &std::path::Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let synapse = choose_synapse(args)?;
    let ports = 1000;
    let receiver = Receiver::start(args.port, ports)?;
    eprintln!(
        "receiver on 127.0.0.1:{}..{} (pid-separate, 1 thread)",
        args.port,
        args.port + ports - 1
    );
    if let Err(why) = &synapse {
        eprintln!("Synapse is not measured in this run: {why}");
    }

    let mut s = Samples::default();
    let mut synapse_failures: Vec<String> = Vec::new();
    let load = |n: usize, tag: &str| events(n, tag);
    let main_events = load(args.events, "ev");
    let txn_body = format!("{{\"events\":[{}]}}", main_events[..100].join(",")).into_bytes();
    let backlogs: Vec<usize> = [10_000, 100_000, args.max_backlog]
        .into_iter()
        .filter(|&b| b <= args.max_backlog)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let backlog_events = load(*backlogs.last().unwrap_or(&10_000), "bl");
    let core_events: Vec<String> = main_events.iter().take(100_000).cloned().collect();

    for run in 0..args.runs {
        eprintln!(
            "run {}/{} ({:.0} s so far)",
            run + 1,
            args.runs,
            started.elapsed().as_secs_f64()
        );
        // References.
        let limit_dir = work.join("limits");
        std::fs::create_dir_all(&limit_dir)?;
        s.add(
            "sqlite 1",
            refs::sqlite_limit(&limit_dir, 1, Duration::from_secs(2)),
        );
        s.add(
            "sqlite 100",
            refs::sqlite_limit(&limit_dir, 100, Duration::from_secs(2)),
        );
        receiver.reset(false);
        s.add(
            "http limit",
            refs::http_limit(&receiver, txn_body.clone(), Duration::from_secs(3)).await * 100.0,
        );
        if let Ok(setup) = &synapse {
            for workload in SYNAPSE_WORKLOADS {
                let setup = setup.clone();
                let result = tokio::task::block_in_place(|| {
                    refs::synapse_run(&setup, &receiver, workload, args.events)
                });
                match result {
                    Ok(r) if workload == "c" => {
                        s.add("synapse c p50", r.lat_p50_ms);
                        s.add("synapse c p99", r.lat_p99_ms);
                    }
                    Ok(r) if workload == "a" => {
                        s.add("synapse a", r.events_per_s);
                        s.add("synapse a cpu", r.cpu_us_per_event);
                    }
                    Ok(r) => s.add("synapse b", r.events_per_s),
                    Err(error) => {
                        eprintln!("synapse {workload}: {error}");
                        synapse_failures.push(format!("{workload}: {error}"));
                    }
                }
            }
        }

        // The core alone, natively and as the component: the best of 3 alternating tries of
        // each, so a page fault or a neighbour's burst does not decide the ratio.
        let (native, component) = core::best_of(&core_events, 3);
        s.add("core native", native / 1e3);
        s.add("core wasm", component / 1e3);
        s.add("core ratio", component / native);

        // End to end.
        for &appservices in &GROWTH_APPSERVICES {
            let receiver_cpu = receiver.cpu_s();
            let bench = Bench::start(work, &receiver, appservices, appservices, StoreKind::File);
            let t = workloads::throughput(
                &bench.host,
                &receiver,
                main_events.clone(),
                appservices,
                100,
            )
            .await;
            bench.stop();
            let (rate, cpu): (&'static str, &'static str) = match appservices {
                1 => ("e2e 1", "e2e 1 cpu"),
                10 => ("e2e 10", "e2e 10 cpu"),
                100 => ("e2e 100", "e2e 100 cpu"),
                _ => ("e2e 1000", "e2e 1000 cpu"),
            };
            s.add(rate, t.events_per_s);
            s.add(cpu, t.cpu_us_per_event);
            eprintln!(
                "    {} events in {} transactions; the receiver used {:.2} s of CPU",
                args.events,
                t.txns,
                receiver.cpu_s() - receiver_cpu
            );
        }
        let bench = Bench::start(work, &receiver, 1, 1, StoreKind::Memory);
        let t = workloads::throughput(&bench.host, &receiver, main_events.clone(), 1, 100).await;
        bench.stop();
        s.add("mem 1", t.events_per_s);
        s.add("mem 1 cpu", t.cpu_us_per_event);

        let bench = Bench::start(work, &receiver, 1, 1, StoreKind::File);
        let l = workloads::latency(&bench.host, &receiver, 200, Duration::from_secs(10), 1).await;
        bench.stop();
        s.add("lat p50", l.p50_ms);
        s.add("lat p99", l.p99_ms);

        // 100 active among 100 and among 10,000 registered. The latency is measured first, on
        // the fresh host, not behind a flood whose writes the kernel may still be flushing; the
        // two hosts take turns going first, so neither always follows the other.
        let order = if run % 2 == 0 {
            [100, 10_000]
        } else {
            [10_000, 100]
        };
        for registered in order {
            let bench = Bench::start(work, &receiver, registered, 100, StoreKind::File);
            let l =
                workloads::latency(&bench.host, &receiver, 200, Duration::from_secs(5), 100).await;
            let t =
                workloads::throughput(&bench.host, &receiver, main_events.clone(), 100, 100).await;
            bench.stop();
            if registered == 100 {
                s.add("reg100 cpu", t.cpu_us_per_event);
                s.add("reg100 p50", l.p50_ms);
                s.add("reg100 p99", l.p99_ms);
            } else {
                s.add("reg10k cpu", t.cpu_us_per_event);
                s.add("reg10k p50", l.p50_ms);
                s.add("reg10k p99", l.p99_ms);
                s.add("reg10k rate", t.events_per_s);
            }
        }

        // Backlogs: memory while down, then the drain.
        for &size in &backlogs {
            let bench = Bench::start(work, &receiver, 1, 1, StoreKind::File);
            let events = Arc::new(backlog_events[..size].to_vec());
            let b = workloads::backlog(&bench.host, &receiver, events).await;
            bench.stop();
            let (mem, rate, cpu) = backlog_keys(size);
            s.add(mem, b.memory_with_backlog as f64);
            s.add(rate, b.drain.events_per_s);
            s.add(cpu, b.drain.cpu_us_per_event);
            s.add("backlog empty mem", b.memory_before as f64);
        }

        // The sidecar's HTTP API.
        let bench = Bench::start(work, &receiver, 1, 1, StoreKind::File);
        let (accepted, delivered) =
            workloads::sidecar(&bench.host, &receiver, main_events.clone(), 100).await;
        bench.stop();
        s.add("sidecar accepted", accepted);
        s.add("sidecar e2e", delivered);
    }

    print_report(
        args,
        &s,
        synapse.as_ref(),
        &synapse_failures,
        &backlogs,
        started.elapsed(),
    );
    Ok(())
}

fn print_report(
    args: &SuiteArgs,
    s: &Samples,
    synapse: Result<&refs::SynapseSetup, &String>,
    synapse_failures: &[String],
    backlogs: &[usize],
    took: Duration,
) {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("# asched benchmark suite");
    println!();
    println!("- date: {date}");
    println!("- machine: {}", machine());
    let given: Vec<String> = std::env::args().skip(1).collect();
    if given.is_empty() {
        println!("- command: `cargo run --release -p asched-bench`");
    } else {
        println!(
            "- command: `cargo run --release -p asched-bench -- {}`",
            given.join(" ")
        );
    }
    println!(
        "- every figure: median [min–max] of {} run{}; took {:.0} s",
        args.runs,
        if args.runs == 1 { "" } else { "s" },
        took.as_secs_f64()
    );
    match synapse {
        Ok(setup) => println!(
            "- Synapse: its real ApplicationServiceScheduler (matrix-synapse {} from {}), in-memory store, same receiver, same run",
            setup.version,
            setup.python.display()
        ),
        Err(why) => println!("- Synapse: NOT measured in this run: {why}"),
    }
    if let Some(first) = synapse_failures.first() {
        let attempted = SYNAPSE_WORKLOADS.len() * args.runs;
        let (failed, figures) = if synapse_failures.len() >= attempted {
            ("every one".to_owned(), "no Synapse figure was measured")
        } else {
            (
                synapse_failures.len().to_string(),
                "its figures are of the runs that did not",
            )
        };
        println!(
            "- Synapse: {failed} of its {attempted} workload runs ({} workloads × {} runs) FAILED (the first: {first}); {figures}",
            SYNAPSE_WORKLOADS.len(),
            args.runs
        );
    }
    println!();
    println!("## References measured in this run");
    println!();
    println!("| reference | measured |");
    println!("|---|---|");
    let refs = [
        (
            "Synapse, 1 appservice, as many events as asched gets",
            "synapse a",
            "ev/s",
        ),
        (
            "Synapse, CPU per event (1 appservice)",
            "synapse a cpu",
            "µs",
        ),
        (
            "Synapse, 100 appservices, as many events, round-robin",
            "synapse b",
            "ev/s",
        ),
        (
            "Synapse, 200 events/s, enqueue → arrival p50",
            "synapse c p50",
            "ms",
        ),
        (
            "Synapse, 200 events/s, enqueue → arrival p99",
            "synapse c p99",
            "ms",
        ),
        (
            "loopback HTTP/1.1 PUT of 100 events, 1 connection (events/s)",
            "http limit",
            "ev/s",
        ),
        (
            "SQLite WAL synchronous=FULL, commits of 1 row (rows/s)",
            "sqlite 1",
            "rows/s",
        ),
        (
            "SQLite WAL synchronous=FULL, commits of 100 rows (rows/s)",
            "sqlite 100",
            "rows/s",
        ),
    ];
    for (name, key, unit) in refs {
        println!("| {name} | {} |", fmt_spread(s.get(key), unit));
    }
    println!();
    println!("## Figures and targets");
    println!();
    println!("| figure | target | measured | against the reference | verdict |");
    println!("|---|---|---|---|---|");
    // `phrase` follows the ratio ("Synapse", "less than Synapse"); without the reference the
    // text says which is missing.
    let ratio =
        |ours: &str, reference: &str, invert: bool, phrase: &str| -> (Option<f64>, String) {
            match (s.median(ours), s.median(reference)) {
                (Some(o), Some(r)) if o > 0.0 && r > 0.0 => {
                    let x = if invert { r / o } else { o / r };
                    (Some(x), format!("{x:.2}× {phrase}"))
                }
                _ if reference.starts_with("synapse") => (None, "Synapse not measured".to_owned()),
                _ => (None, "reference not measured".to_owned()),
            }
        };
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    let at_least = |key: &str, floor: f64| s.median(key).map(|v| v >= floor);
    let at_most = |key: &str, ceiling: f64| s.median(key).map(|v| v <= ceiling);
    let both = |a: Option<bool>, b: Option<bool>| match (a, b) {
        (Some(x), Some(y)) => Some(x && y),
        (Some(false), None) | (None, Some(false)) => Some(false),
        _ => None,
    };

    let (r, text) = ratio("e2e 1", "synapse a", false, "Synapse");
    println!(
        "| end to end, 1 appservice, durable SQLite | ≥ 200k ev/s, ≥ 3× Synapse | {} | {text} | {} |",
        fmt_spread(s.get("e2e 1"), "ev/s"),
        verdict(both(at_least("e2e 1", 200e3), r.map(|x| x >= 3.0)))
    );
    let (_, text) = ratio("e2e 100", "synapse b", false, "Synapse");
    println!(
        "| end to end, 100 appservices, durable SQLite | ≥ 200k ev/s | {} | {text} | {} |",
        fmt_spread(s.get("e2e 100"), "ev/s"),
        verdict(at_least("e2e 100", 200e3))
    );
    let (r, text) = ratio("mem 1", "synapse a", false, "Synapse");
    println!(
        "| end to end, 1 appservice, in-memory store | ≥ 500k ev/s, ≥ 8× Synapse | {} | {text} | {} |",
        fmt_spread(s.get("mem 1"), "ev/s"),
        verdict(both(at_least("mem 1", 500e3), r.map(|x| x >= 8.0)))
    );
    let (r, text) = ratio("mem 1 cpu", "synapse a cpu", true, "less than Synapse");
    println!(
        "| CPU per delivered event, in-memory store (driver + host) | ≤ 1.5 µs, 10× less than Synapse | {} | {text} | {} |",
        fmt_spread(s.get("mem 1 cpu"), "µs"),
        verdict(both(at_most("mem 1 cpu", 1.5), r.map(|x| x >= 10.0)))
    );
    let (_, text) = ratio("lat p50", "synapse c p50", false, "Synapse's");
    println!(
        "| enqueue → arrival p50 at 200 ev/s, durable | ≤ 0.4 ms | {} | {text} | {} |",
        fmt_spread(s.get("lat p50"), "ms"),
        verdict(at_most("lat p50", 0.4))
    );
    let (_, text) = ratio("lat p99", "synapse c p99", false, "Synapse's");
    println!(
        "| enqueue → arrival p99 at 200 ev/s, durable | ≤ 1 ms | {} | {text} | {} |",
        fmt_spread(s.get("lat p99"), "ms"),
        verdict(at_most("lat p99", 1.0))
    );
    println!(
        "| core CPU per event, component under wasmtime ÷ native | ≤ 1.3× | {} | native {}, component {} | {} |",
        fmt_spread(s.get("core ratio"), "×"),
        fmt_spread(s.get("core native"), "µs"),
        fmt_spread(s.get("core wasm"), "µs"),
        verdict(at_most("core ratio", 1.3))
    );
    let (small, large) = (backlogs[0], backlogs[backlogs.len() - 1]);
    let (small_mem, large_mem) = (backlog_keys(small).0, backlog_keys(large).0);
    let peak = |key: &str| s.get(key).map(|v| v.max);
    let flat = match (s.get(small_mem), s.get(large_mem)) {
        (Some(a), Some(b)) if large > small => Some(memory_is_flat(a, b)),
        _ => None,
    };
    println!(
        "| plugin memory, {}-event backlog of a DOWN appservice | ≤ 16 MiB, flat | {} | {} with {}; {} | {} |",
        thousands(large),
        fmt_spread(s.get(large_mem), "MiB"),
        fmt_spread(s.get(small_mem), "MiB"),
        thousands(small),
        match flat {
            Some(true) => "flat",
            Some(false) => "grows",
            None => "flatness needs two backlog sizes",
        },
        verdict(both(
            peak(large_mem).map(|m| m <= 16.0 * 1024.0 * 1024.0),
            flat
        ))
    );
    let within = |a: &str, b: &str| match (s.median(a), s.median(b)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    // Three decimals: a ratio of 1.097 is within 10 %, and 1.10 would not show that.
    let cpu_ratio = within("reg10k cpu", "reg100 cpu");
    let p50_ratio = within("reg10k p50", "reg100 p50");
    println!(
        "| 10,000 registered, 100 active: CPU per event | within 10 % of 100 registered | {} | {} with 100 registered ({}) | {} |",
        fmt_spread(s.get("reg10k cpu"), "µs"),
        fmt_spread(s.get("reg100 cpu"), "µs"),
        cpu_ratio.map_or("-".into(), |x| format!("{x:.3}×")),
        verdict(cpu_ratio.map(|x| x <= 1.10))
    );
    println!(
        "| 10,000 registered, 100 active: latency p50 at 200 ev/s | within 10 % of 100 registered | {} | {} with 100 registered ({}) | {} |",
        fmt_spread(s.get("reg10k p50"), "ms"),
        fmt_spread(s.get("reg100 p50"), "ms"),
        p50_ratio.map_or("-".into(), |x| format!("{x:.3}×")),
        verdict(p50_ratio.map(|x| x <= 1.10))
    );
    let drain_size = backlogs
        .iter()
        .copied()
        .find(|&b| b >= 100_000)
        .unwrap_or(large);
    let drain_rate = backlog_keys(drain_size).1;
    let drain = within(drain_rate, "e2e 1");
    println!(
        "| drain of a {}-event backlog after recovery | ≥ 80 % of 1-appservice rate | {} | {} of the 1-appservice rate | {} |",
        thousands(drain_size),
        fmt_spread(s.get(drain_rate), "ev/s"),
        drain.map_or("-".into(), |x| format!("{:.0} %", x * 100.0)),
        verdict(drain.map(|x| x >= 0.8))
    );
    println!(
        "| sidecar API: enqueue over HTTP, batches of 100, durable | ≥ 150k ev/s | {} | end to end {} | {} |",
        fmt_spread(s.get("sidecar accepted"), "ev/s"),
        fmt_spread(s.get("sidecar e2e"), "ev/s"),
        verdict(at_least("sidecar accepted", 150e3))
    );
    let (_, http) = ratio("e2e 1", "http limit", false, "of");
    let (_, sqlite) = ratio("e2e 1", "sqlite 100", false, "of");
    println!();
    println!(
        "End to end with 1 appservice runs at {http} the loopback HTTP limit for 100-event transactions on one connection, and stores events at {sqlite} the rate SQLite commits 100-row batches durably."
    );
    println!();
    println!("## How cost grows");
    println!();
    println!(
        "| appservices ({} events in batches of 100, round-robin; durable) | events/s | CPU µs per event |",
        thousands(args.events)
    );
    println!("|---|---|---|");
    for (n, rate, cpu) in [
        (1, "e2e 1", "e2e 1 cpu"),
        (10, "e2e 10", "e2e 10 cpu"),
        (100, "e2e 100", "e2e 100 cpu"),
        (1000, "e2e 1000", "e2e 1000 cpu"),
    ] {
        println!(
            "| {n} | {} | {} |",
            fmt_spread(s.get(rate), "ev/s"),
            fmt_spread(s.get(cpu), "µs")
        );
    }
    println!();
    println!(
        "| backlog of a DOWN appservice | drain events/s | drain CPU µs per event | plugin memory |"
    );
    println!("|---|---|---|---|");
    for &size in backlogs {
        let (mem, rate, cpu) = backlog_keys(size);
        println!(
            "| {} | {} | {} | {} |",
            thousands(size),
            fmt_spread(s.get(rate), "ev/s"),
            fmt_spread(s.get(cpu), "µs"),
            fmt_spread(s.get(mem), "MiB")
        );
    }
    println!(
        "| none (each run's instance before its backlog) | | | {} |",
        fmt_spread(s.get("backlog empty mem"), "MiB")
    );
}

/// The sample names of the backlog figures of `size` events.
fn backlog_keys(size: usize) -> (&'static str, &'static str, &'static str) {
    let leak = |what: &str| -> &'static str {
        Box::leak(format!("backlog {size} {what}").into_boxed_str())
    };
    (leak("mem"), leak("rate"), leak("cpu"))
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether the plugin's memory with the largest backlog (`large`) is flat against that with
/// the smallest (`small`): the median is within 10 % of it, as every other verdict compares
/// medians. A run's figure is its instance's high-water mark, which grows in steps of about
/// 1.2 MiB when an allocation does not fit in what the allocator holds; a run of any backlog
/// size takes that step now and then (the maximum is shown beside the median), while a plugin
/// that kept anything per queued event would move the median of every large run.
fn memory_is_flat(small: Spread, large: Spread) -> bool {
    large.median <= small.median * 1.10
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Python or driver named on the command line that cannot be used stops the suite with
    /// an error that names it; `--no-synapse` leaves Synapse out.
    #[test]
    fn a_named_synapse_that_cannot_run_is_an_error() {
        let args = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["asched-bench"].iter().chain(extra)).expect("parses");
            cli.suite
        };
        let missing_python = "/nonexistent/asched-bench-test/bin/python";
        let error = choose_synapse(&args(&["--synapse-python", missing_python]))
            .expect_err("a missing Python is an error");
        assert_eq!(
            error.to_string(),
            format!(
                "Synapse cannot be run as given: {missing_python} does not exist (give a Python that can `import synapse` with --synapse-python, or add --install-synapse to create it) (or add --no-synapse)"
            )
        );
        let error = choose_synapse(&args(&[
            "--synapse-python",
            "python3",
            "--synapse-driver",
            "/nonexistent/driver.py",
        ]))
        .expect_err("a missing driver is an error");
        assert_eq!(
            error.to_string(),
            "Synapse cannot be run as given: the Synapse driver /nonexistent/driver.py does not exist (give it with --synapse-driver) (or add --no-synapse)"
        );
        // A program that exits 0 whatever it is asked prints no version: not a Synapse.
        let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/src/main.rs");
        let error = choose_synapse(&args(&[
            "--synapse-python",
            "/bin/true",
            "--synapse-driver",
            driver,
        ]))
        .expect_err("a program that is not Python is an error");
        assert_eq!(
            error.to_string(),
            "Synapse cannot be run as given: /bin/true cannot import synapse (install it with: /bin/pip install matrix-synapse==1.163.2, or add --install-synapse) (or add --no-synapse)"
        );
        let skipped = choose_synapse(&args(&["--no-synapse", "--synapse-python", missing_python]))
            .expect("no error");
        assert_eq!(skipped.err().as_deref(), Some("skipped (--no-synapse)"));
    }

    /// Memory is flat when the medians agree, whatever step one run took; a median that grows
    /// is not.
    #[test]
    fn flat_memory_compares_medians() {
        let mib = |median: f64, min: f64, max: f64| Spread {
            median: median * 1048576.0,
            min: min * 1048576.0,
            max: max * 1048576.0,
        };
        let small = mib(4.81, 4.81, 4.88);
        assert!(memory_is_flat(small, mib(4.81, 4.81, 6.00)));
        assert!(memory_is_flat(small, mib(5.29, 4.81, 6.00)));
        assert!(!memory_is_flat(small, mib(5.30, 5.30, 5.30)));
        assert!(!memory_is_flat(small, mib(9.6, 9.5, 9.7)));
    }

    /// The workload's events have the size and shape of those Synapse sends: 408 bytes
    /// of client-format JSON with a 44-character event id.
    #[test]
    fn events_look_like_synapse_client_events() {
        let e = event(7, "ev");
        let value: serde_json::Value = serde_json::from_str(&e).expect("valid JSON");
        assert_eq!(
            value["event_id"],
            "$ev00000007xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        );
        assert_eq!(event_id(7, "ev").len(), 44);
        assert_eq!(value["type"], "m.room.message");
        assert_eq!(e.len(), 408, "Synapse's sample event is 408 bytes");
        assert_eq!(event(12_345_678, "ev").len(), 408);
    }

    /// A run that panics still removes its work folder.
    #[test]
    fn the_work_folder_is_removed_when_a_run_panics() {
        let mut kept = None;
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let work = WorkDir::create();
            std::fs::write(work.0.join("scheduler.sqlite"), b"x").unwrap();
            kept = Some(work.0.clone());
            panic!("a run fails");
        }));
        assert!(unwound.is_err());
        let kept = kept.expect("the run made its folder");
        assert!(!kept.exists(), "{} is left behind", kept.display());
    }

    /// Installing Synapse and skipping it contradict each other; the suite refuses both.
    #[test]
    fn install_synapse_conflicts_with_no_synapse() {
        use clap::Parser as _;
        let error = Cli::try_parse_from(["asched-bench", "--install-synapse", "--no-synapse"])
            .err()
            .expect("refused");
        assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(Cli::try_parse_from(["asched-bench", "--install-synapse"]).is_ok());
    }

    /// Median, min and max of an odd and an even number of runs.
    #[test]
    fn spread_takes_median_min_and_max() {
        let odd = spread(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = spread(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        assert!(spread(&[]).is_none());
        assert_eq!(
            fmt_spread(spread(&[1500.0, 2500.0, 2000.0]), "ev/s"),
            "2.0k [1.5k–2.5k] ev/s"
        );
        assert_eq!(fmt_spread(None, "µs"), "not measured");
    }
}
