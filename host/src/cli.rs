//! The `asched` command line: `demo`, `serve`, `swap` and `check-registrations`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::engine::{HostConfig, SchedulerConfig, default_scheduler_config};
use crate::http::HttpConfig;
use crate::runtime::Sandbox;
use crate::sidecar::{self, Listen};
use crate::{Host, registration};

/// The Matrix appservice transaction scheduler, hosted under wasmtime.
#[derive(Parser, Debug)]
#[command(name = "asched", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the bundled demonstration: bundled registrations and events, delivered over real HTTP
    /// to a local receiver, with a summary at the end.
    Demo {
        /// The folder for the demo's SQLite store (emptied at start).
        #[arg(long, default_value = "demo-data")]
        data_dir: PathBuf,
        /// A second plugin build to swap to and back, again and again, while events are
        /// delivered (what the appservices see must not change).
        #[arg(long)]
        swap_to: Option<PathBuf>,
    },
    /// Runs the scheduler as a sidecar: a local HTTP API takes events and delivers them to the
    /// registered appservices.
    Serve(ServeArgs),
    /// Replaces the plugin of a running sidecar with a component file, without a restart.
    Swap {
        /// The sidecar's API: `http://127.0.0.1:8785`, or `unix:/path/to/socket`.
        #[arg(long, default_value = "http://127.0.0.1:8785", env = "ASCHED_API")]
        api: String,
        /// The file holding the sidecar's shared secret.
        #[arg(long, env = "ASCHED_SECRET_FILE")]
        secret_file: PathBuf,
        /// The component file (`.wasm`).
        plugin: PathBuf,
    },
    /// Checks registration files and prints what they define.
    CheckRegistrations {
        /// Registration YAML files or folders of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The folder for the SQLite store and the compiled-plugin cache.
    #[arg(long, env = "ASCHED_DATA_DIR")]
    data_dir: PathBuf,
    /// A registration YAML file, or a folder of them; repeat for more.
    #[arg(
        long = "registration",
        required = true,
        env = "ASCHED_REGISTRATIONS",
        value_delimiter = ','
    )]
    registrations: Vec<PathBuf>,
    /// Where the API listens: `127.0.0.1:PORT`, `[::1]:PORT` or `unix:/path`.
    #[arg(long, default_value = "127.0.0.1:8785", env = "ASCHED_LISTEN")]
    listen: Listen,
    /// A file whose content (trimmed) is the shared secret callers send as a Bearer token.
    #[arg(long, env = "ASCHED_SECRET_FILE")]
    secret_file: PathBuf,
    /// A plugin component to run instead of the bundled one.
    #[arg(long, env = "ASCHED_PLUGIN")]
    plugin: Option<PathBuf>,
    /// An appservice id that also gets `?access_token=` (for bridges that only check that).
    #[arg(long = "legacy-query-auth")]
    legacy_query_auth: Vec<String>,
    /// The largest body of an events request, in bytes (a plugin upload may be up to 64 MiB).
    #[arg(long, default_value_t = sidecar::DEFAULT_MAX_BODY_BYTES)]
    max_request_bytes: usize,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// Limits of the plugin's sandbox.
#[derive(Args, Debug)]
struct SandboxArgs {
    /// The most linear memory a plugin instance may use, in MiB.
    #[arg(long, default_value_t = 256)]
    plugin_memory_mib: usize,
    /// The most time one plugin call may run before it is interrupted, in ms.
    #[arg(long, default_value_t = 10_000)]
    plugin_call_deadline_ms: u64,
    /// How long a swapped-in plugin is watched; a failure within it restores the previous one.
    #[arg(long, default_value_t = 10_000)]
    probation_ms: u64,
}

impl SandboxArgs {
    fn sandbox(&self) -> Sandbox {
        Sandbox {
            memory_bytes_max: self.plugin_memory_mib.saturating_mul(1024 * 1024),
            call_deadline: Duration::from_millis(self.plugin_call_deadline_ms),
        }
    }
}

/// Delivery limits and delays; the defaults are those of mature homeservers.
#[derive(Args, Debug)]
struct Tuning {
    /// The most events per transaction.
    #[arg(long, default_value_t = 100)]
    max_events_per_txn: u32,
    /// The most bytes per transaction body.
    #[arg(long, default_value_t = 512 * 1024)]
    max_txn_body_bytes: u32,
    /// The first retry delay after a failure, in ms; it doubles per failure.
    #[arg(long, default_value_t = 2_000)]
    retry_delay_ms_initial: u64,
    /// The longest retry delay, in ms.
    #[arg(long, default_value_t = 512_000)]
    retry_delay_ms_max: u64,
    /// The random share of each retry delay, in percent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=100))]
    retry_jitter_percent: u8,
    /// How long a connect may take, in ms.
    #[arg(long, default_value_t = 15_000)]
    connect_timeout_ms: u64,
    /// How long a whole transaction request may take, in ms.
    #[arg(long, default_value_t = 60_000)]
    request_timeout_ms: u64,
}

impl Tuning {
    fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_events_per_txn: self.max_events_per_txn,
            max_txn_body_bytes: self.max_txn_body_bytes,
            retry_delay_ms_initial: self.retry_delay_ms_initial,
            retry_delay_ms_max: self.retry_delay_ms_max,
            retry_jitter_percent: self.retry_jitter_percent,
            ..default_scheduler_config()
        }
    }

    fn http(&self) -> HttpConfig {
        HttpConfig {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            total_timeout: Duration::from_millis(self.request_timeout_ms),
        }
    }
}

/// Runs the command line; returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Demo { .. }));
    let result = match cli.command {
        Command::CheckRegistrations { paths } => check_registrations(&paths),
        Command::Demo { data_dir, swap_to } => {
            runtime().and_then(|rt| rt.block_on(crate::demo::run(&data_dir, swap_to.as_deref())))
        }
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(serve(args))),
        Command::Swap {
            api,
            secret_file,
            plugin,
        } => runtime().and_then(|rt| rt.block_on(swap(&api, &secret_file, &plugin))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Logs to stderr, in colour only when it is a terminal; `RUST_LOG` overrides the default
/// filter.
fn init_logging(demo: bool) {
    let default = if demo {
        "warn,asched::plugin=info"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn check_registrations(paths: &[PathBuf]) -> anyhow::Result<()> {
    let registrations = registration::load(paths)?;
    for r in &registrations {
        let url = r.url.as_deref().unwrap_or("null (no traffic)");
        println!(
            "{}: id {:?}, url {url}, {} user / {} alias / {} room namespaces",
            r.source.display(),
            r.id,
            r.namespaces.users.len(),
            r.namespaces.aliases.len(),
            r.namespaces.rooms.len()
        );
    }
    println!("{} registrations, all valid", registrations.len());
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let secret = read_secret(&args.secret_file)?;
    let config = HostConfig {
        data_dir: args.data_dir,
        registrations: registration::load(&args.registrations)?,
        plugin_path: args.plugin,
        scheduler: args.tuning.scheduler(),
        http: args.tuning.http(),
        legacy_query_auth: args.legacy_query_auth,
        sandbox: args.sandbox.sandbox(),
        probation: Duration::from_millis(args.sandbox.probation_ms),
        store: Default::default(),
    };
    let count = config.registrations.len();
    let (host, engine) = Host::start(config)?;
    let router = sidecar::router(host.clone(), &secret, args.max_request_bytes);
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    };
    sidecar::serve(
        router,
        &args.listen,
        |addr| {
            tracing::info!(%addr, appservices = count, "sidecar API listening");
            println!("listening on {addr}");
        },
        shutdown,
    )
    .await?;
    host.shutdown();
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    Ok(())
}

/// Sends a component to a running sidecar's swap endpoint and prints the outcome.
async fn swap(
    api: &str,
    secret_file: &std::path::Path,
    plugin: &std::path::Path,
) -> anyhow::Result<()> {
    let secret = read_secret(secret_file)?;
    let wasm = std::fs::read(plugin)
        .map_err(|e| anyhow::anyhow!("cannot read the plugin {}: {e}", plugin.display()))?;
    crate::http::install_crypto_provider();
    let mut client = reqwest::Client::builder().no_proxy();
    let base = match api.strip_prefix("unix:") {
        Some(socket) => {
            client = client.unix_socket(std::path::PathBuf::from(socket));
            "http://localhost".to_owned()
        }
        None => api.trim_end_matches('/').to_owned(),
    };
    let response = client
        .build()?
        .post(format!("{base}/_asched/v1/plugin"))
        .bearer_auth(secret)
        .header(reqwest::header::CONTENT_TYPE, "application/wasm")
        .body(wasm)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the sidecar at {api}: {e}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "the sidecar refused the plugin ({status}): {body}"
    );
    println!("{body}");
    Ok(())
}

/// Reads a secret file: its content, trimmed, at least 16 characters.
fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let secret = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the secret file {}: {e}", path.display()))?;
    let secret = secret.trim().to_owned();
    anyhow::ensure!(
        secret.len() >= 16,
        "{}: the secret must be at least 16 characters",
        path.display()
    );
    Ok(secret)
}
