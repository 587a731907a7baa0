//! The appservice side of every benchmark: a receiver that parses each transaction body and
//! answers `200 {}`, run as a child process so that its CPU is not counted as the scheduler's.
//!
//! It listens on `port .. port + ports` (one port per appservice, so each appservice has its own
//! connections, as with real bridges) and answers, on any of its ports:
//!
//! * `PUT …/_matrix/app/v1/transactions/{txn_id}`: reads the whole body, parses it with serde_json,
//!   logs the arrival time (wall clock, ns, when the last byte arrived), the path before
//!   `/_matrix`, the number of events and, when asked, their ids; answers `200 {}` or, while
//!   failing is switched on, `503`.
//! * `GET /stats`: `{"txns":…,"events":…,"bytes":…,"no_auth":…,"conns":…}`.
//! * `POST /reset[?ids=0|1]`: clears counters and the arrival log; `ids` says whether event ids
//!   are logged (default: yes).
//! * `GET /dump`: the arrival log, one transaction per line:
//!   `{arrival_ns}\t{prefix}\t{events}\t{id,id,…}`.
//! * `POST /fail?status={code}`: answer every transaction with `code` from now on (`0`: succeed
//!   again).
//!
//! The runtime has one thread, so the receiver uses at most one of the machine's cores.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::now_ns;

/// The part of a transaction body the receiver reads.
#[derive(Deserialize)]
struct Txn<'a> {
    #[serde(default, borrow)]
    events: Vec<Event<'a>>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event_id: std::borrow::Cow<'a, str>,
}

/// One transaction as it arrived.
struct Arrival {
    ns: u64,
    prefix: String,
    events: usize,
    ids: Vec<String>,
}

#[derive(Default)]
struct Counters {
    txns: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    no_auth: AtomicU64,
    conns: AtomicU64,
    log_ids: AtomicBool,
    fail_status: AtomicU16,
    log: Mutex<Vec<Arrival>>,
}

const TXN_PATH: &str = "/_matrix/app/v1/transactions/";

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("a static response is valid")
}

fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

async fn handle(
    state: Arc<Counters>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    match (request.method(), path.as_str()) {
        (&Method::GET, "/stats") => {
            let stats = format!(
                "{{\"txns\":{},\"events\":{},\"bytes\":{},\"no_auth\":{},\"conns\":{}}}",
                state.txns.load(Relaxed),
                state.events.load(Relaxed),
                state.bytes.load(Relaxed),
                state.no_auth.load(Relaxed),
                state.conns.load(Relaxed)
            );
            return Ok(reply(StatusCode::OK, stats));
        }
        (&Method::POST, "/reset") => {
            for counter in [
                &state.txns,
                &state.events,
                &state.bytes,
                &state.no_auth,
                &state.conns,
            ] {
                counter.store(0, Relaxed);
            }
            let ids = query_value(query.as_deref(), "ids") != Some("0");
            state.log_ids.store(ids, Relaxed);
            state.fail_status.store(0, Relaxed);
            state.log.lock().expect("the log lock").clear();
            return Ok(reply(StatusCode::OK, "{}"));
        }
        (&Method::POST, "/fail") => {
            let status = query_value(query.as_deref(), "status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            state.fail_status.store(status, Relaxed);
            return Ok(reply(StatusCode::OK, "{}"));
        }
        (&Method::GET, "/dump") => {
            let log = state.log.lock().expect("the log lock");
            let mut out = String::with_capacity(log.len() * 64);
            for arrival in log.iter() {
                out.push_str(&format!(
                    "{}\t{}\t{}\t{}\n",
                    arrival.ns,
                    arrival.prefix,
                    arrival.events,
                    arrival.ids.join(",")
                ));
            }
            return Ok(reply(StatusCode::OK, out));
        }
        _ => {}
    }
    let Some(at) = path.find(TXN_PATH) else {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            r#"{"errcode":"M_UNRECOGNIZED"}"#,
        ));
    };
    if request.method() != Method::PUT {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "{}"));
    }
    if !request.headers().contains_key("authorization") {
        state.no_auth.fetch_add(1, Relaxed);
    }
    let prefix = path[..at].to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return Ok(reply(StatusCode::BAD_REQUEST, "{}"));
    };
    let body = body.to_bytes();
    let ns = now_ns();
    let fail = state.fail_status.load(Relaxed);
    if fail != 0 {
        let status = StatusCode::from_u16(fail).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Ok(reply(status, r#"{"errcode":"M_UNKNOWN"}"#));
    }
    let Ok(txn) = serde_json::from_slice::<Txn>(&body) else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            r#"{"errcode":"M_NOT_JSON"}"#,
        ));
    };
    let ids = if state.log_ids.load(Relaxed) {
        txn.events.iter().map(|e| e.event_id.to_string()).collect()
    } else {
        Vec::new()
    };
    state.txns.fetch_add(1, Relaxed);
    state.events.fetch_add(txn.events.len() as u64, Relaxed);
    state.bytes.fetch_add(body.len() as u64, Relaxed);
    state.log.lock().expect("the log lock").push(Arrival {
        ns,
        prefix,
        events: txn.events.len(),
        ids,
    });
    Ok(reply(StatusCode::OK, "{}"))
}

/// Runs the receiver until the process is killed.
pub fn run(port: u16, ports: u16) -> anyhow::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no other effect: the
    // receiver is killed when the suite that started it ends, however it ends.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let state = Arc::new(Counters::default());
    state.log_ids.store(true, Relaxed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for p in port..port + ports {
            let listener = TcpListener::bind(("127.0.0.1", p))
                .await
                .map_err(|e| anyhow::anyhow!("the receiver cannot listen on 127.0.0.1:{p}: {e}"))?;
            listeners.push(tokio::spawn(accept(listener, state.clone())));
        }
        println!("ready");
        for listener in listeners {
            let _ = listener.await;
        }
        Ok(())
    })
}

async fn accept(listener: TcpListener, state: Arc<Counters>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        state.conns.fetch_add(1, Relaxed);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
