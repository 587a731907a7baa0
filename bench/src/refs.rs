//! The references every figure is compared with, measured in the same invocation: Synapse's
//! own appservice scheduler (when a Python environment with `matrix-synapse` is available), the
//! machine's loopback HTTP rate and its SQLite commit rate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rusqlite::params;

use crate::control::Receiver;

/// What the Synapse driver printed for one run.
#[derive(Debug, Default, Clone)]
pub struct SynapseRun {
    pub events_per_s: f64,
    pub cpu_us_per_event: f64,
    pub lat_p50_ms: f64,
    pub lat_p99_ms: f64,
}

/// Where Synapse's driver and its Python are.
#[derive(Debug, Clone)]
pub struct SynapseSetup {
    pub python: PathBuf,
    pub script: PathBuf,
    /// `synapse.__version__`, as that Python printed it.
    pub version: String,
}

/// Finds the driver script and a Python that imports `synapse`, or says why not.
pub fn find_synapse(python: &Path, script: &Path) -> Result<SynapseSetup, String> {
    if python.components().count() > 1 && !python.exists() {
        return Err(format!(
            "{} does not exist (give a Python that can `import synapse` with --synapse-python, or add --install-synapse to create it)",
            python.display()
        ));
    }
    if !script.is_file() {
        return Err(format!(
            "the Synapse driver {} does not exist (give it with --synapse-driver)",
            script.display()
        ));
    }
    let check = Command::new(python)
        .args([
            "-c",
            "import synapse, sys; sys.stdout.write(synapse.__version__)",
        ])
        .output();
    // The version it prints is the proof: a program that exits 0 whatever it is asked (or a
    // Python whose `synapse` is some other module) is not a Synapse.
    let version = check
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let looks_like_one = version.split('.').count() >= 2
                && version.split('.').all(|part| {
                    !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric())
                });
            looks_like_one.then_some(version)
        });
    match version {
        Some(version) => Ok(SynapseSetup {
            python: python.to_owned(),
            script: script.to_owned(),
            version,
        }),
        None => Err(format!(
            "{python} cannot import synapse (install it with: {pip} install matrix-synapse==1.163.2, or add --install-synapse)",
            python = python.display(),
            pip = python.with_file_name("pip").display()
        )),
    }
}

/// Creates a virtualenv at `venv` and installs `matrix-synapse` into it.
pub fn install_synapse(venv: &Path) -> Result<(), String> {
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let status = Command::new(program)
            .args(args)
            .status()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} {} failed: {status}",
                program.display(),
                args.join(" ")
            ))
        }
    };
    let venv_text = venv.to_string_lossy().into_owned();
    run(Path::new("python3"), &["-m", "venv", &venv_text])?;
    run(
        &venv.join("bin/pip"),
        &["install", "--quiet", "matrix-synapse==1.163.2"],
    )
}

/// Runs Synapse's scheduler once on `workload` (`a`: 1 appservice, `events` events; `b`: 100
/// appservices; `c`: 200 events/s for 10 s) against `receiver`.
pub fn synapse_run(
    setup: &SynapseSetup,
    receiver: &Receiver,
    workload: &str,
    events: usize,
) -> Result<SynapseRun, String> {
    let mut command = Command::new(&setup.python);
    command
        .arg(&setup.script)
        .args(["--workload", workload])
        .args(["--port", &receiver.port.to_string()])
        .args(["--n-events", &events.to_string()])
        .args([
            "--tmpdir",
            &std::env::temp_dir()
                .join("asched-bench-synapse")
                .to_string_lossy(),
        ]);
    if workload == "b" {
        command.args(["--n-as", "100"]);
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run {}: {e}", setup.python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the Synapse driver failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("unreadable driver output {line:?}: {e}"))?;
    if let Some(error) = value.get("error") {
        return Err(format!("the Synapse run failed: {error}"));
    }
    let number = |key: &str| {
        value
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let events = number("n_events").max(1.0);
    Ok(SynapseRun {
        events_per_s: number("events_per_s"),
        cpu_us_per_event: number("driver_cpu_s") * 1e6 / events,
        lat_p50_ms: number("lat_p50_ms"),
        lat_p99_ms: number("lat_p99_ms"),
    })
}

/// Keep-alive PUTs of `body` on one connection for `duration`, one request in flight, against
/// the receiver: the most transactions per second loopback HTTP allows one appservice.
pub async fn http_limit(receiver: &Receiver, body: Vec<u8>, duration: Duration) -> f64 {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", receiver.port))
        .await
        .expect("the receiver accepts connections");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
    let task = tokio::spawn(connection);
    let body = Bytes::from(body);
    let mut done = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        let request = hyper::Request::put(format!("/_matrix/app/v1/transactions/limit{done}"))
            .header("host", "127.0.0.1")
            .header("authorization", "Bearer limit")
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .expect("a valid request");
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(request).await.expect("an answer");
        assert_eq!(response.status(), 200, "the receiver takes the body");
        response
            .into_body()
            .collect()
            .await
            .expect("the answer's body");
        done += 1;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    drop(sender);
    let _ = task.await;
    rate
}

/// Durable SQLite commits (WAL, `synchronous=FULL`) of `rows` 400-byte rows each, for
/// `duration`: returns rows per second.
pub fn sqlite_limit(dir: &Path, rows: usize, duration: Duration) -> f64 {
    let path = dir.join(format!("limit-{rows}.sqlite"));
    let _ = std::fs::remove_file(&path);
    let mut conn = rusqlite::Connection::open(&path).expect("a SQLite file");
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .expect("WAL");
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
    )
    .expect("the table");
    let value = vec![b'x'; 400];
    let mut written = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        let tx = conn.transaction().expect("a transaction");
        {
            let mut put = tx
                .prepare_cached("INSERT INTO kv (key, value) VALUES (?1, ?2)")
                .expect("the statement");
            for _ in 0..rows {
                put.execute(params![format!("q/{written:016x}"), value])
                    .expect("the insert");
                written += 1;
            }
        }
        tx.commit().expect("the commit");
    }
    let rate = written as f64 / started.elapsed().as_secs_f64();
    drop(conn);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    rate
}
