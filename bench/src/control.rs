//! Starts the receiver process and talks to its control endpoints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The receiver's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub txns: u64,
    pub events: u64,
    pub no_auth: u64,
}

/// One transaction in the arrival log.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub ns: u64,
    pub ids: Vec<String>,
}

/// The receiver child process, killed when dropped.
pub struct Receiver {
    child: Child,
    /// Its first port; appservice `i` is served on `port + i`.
    pub port: u16,
    /// How many ports it listens on.
    pub ports: u16,
}

impl Receiver {
    /// Starts `asched-bench receiver` on `port .. port + ports`.
    pub fn start(port: u16, ports: u16) -> anyhow::Result<Receiver> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                "receiver",
                "--port",
                &port.to_string(),
                "--ports",
                &ports.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start the receiver process: {e}"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            anyhow::bail!(
                "the receiver did not start on 127.0.0.1:{port}..{} (ports in use? choose others with --port)",
                port + ports - 1
            );
        }
        Ok(Receiver { child, port, ports })
    }

    /// The URL of appservice `index`.
    pub fn url(&self, index: usize) -> String {
        assert!(
            index < usize::from(self.ports),
            "the receiver has a port per appservice"
        );
        format!("http://127.0.0.1:{}", self.port + index as u16)
    }

    fn request(&self, method: &str, path: &str) -> String {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).expect("the receiver is listening");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .expect("the control request is written");
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .expect("the control answer is read");
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {head}");
        body.to_owned()
    }

    /// Clears the counters and log; `ids` says whether event ids are logged.
    pub fn reset(&self, ids: bool) {
        self.request("POST", if ids { "/reset?ids=1" } else { "/reset?ids=0" });
    }

    /// Makes every transaction fail with `status` (0: succeed again).
    pub fn fail_with(&self, status: u16) {
        self.request("POST", &format!("/fail?status={status}"));
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let value: serde_json::Value =
            serde_json::from_str(&self.request("GET", "/stats")).expect("JSON stats");
        let n = |k: &str| value[k].as_u64().unwrap_or(0);
        Stats {
            txns: n("txns"),
            events: n("events"),
            no_auth: n("no_auth"),
        }
    }

    /// Waits until `events` events have arrived (polling every 10 ms); false on timeout.
    pub fn wait_for(&self, events: u64, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.stats().events >= events {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The arrival log.
    pub fn dump(&self) -> Vec<Arrival> {
        self.request("GET", "/dump")
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('\t');
                let ns = fields.next()?.parse().ok()?;
                // The path before `/_matrix` and the event count; the ids say more.
                fields.next()?;
                fields.next()?;
                let ids = fields
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect();
                Some(Arrival { ns, ids })
            })
            .collect()
    }

    /// CPU seconds the receiver has used so far.
    pub fn cpu_s(&self) -> f64 {
        crate::process_cpu_s(self.child.id())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
