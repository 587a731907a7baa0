//! The sidecar API: how a homeserver in any language hands events to the scheduler.
//!
//! It listens on a loopback TCP address or a Unix socket and requires
//! `Authorization: Bearer <secret>` on every request. Answers are JSON; errors carry a Matrix-style
//! `errcode` and a message that says what was wrong.
//!
//! | request | answer |
//! |---|---|
//! | `POST /_asched/v1/appservices/{id}/events` with `{"events": [<client-format event>, …]}` | `200 {"accepted": n}` once every event is durable |
//! | `POST /_asched/v1/appservices/{id}/retry` | `200 {}`: the appservice is retried now, skipping its backoff |
//! | `GET /_asched/v1/status` | `200 {"appservices": [<status>, …]}` |
//! | `GET /_asched/v1/appservices/{id}/status` | `200 <status>` |
//! | `POST /_asched/v1/plugin` with a component file as the body | `200 {"sha256", "previous_sha256", "pause_us"}` once the new build runs; `422 M_PLUGIN_REFUSED` with the reason, the old build still running |
//! | `GET /_asched/v1/plugin` | `200 <plugin status>`: build, state, swaps, rollbacks, rebuilds, failures |
//!
//! A request that is refused stores nothing, and never affects what was accepted before.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::engine::{EnqueueError, Host};

/// The default largest request body accepted: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The largest component file accepted for a swap: 64 MiB.
pub const MAX_PLUGIN_BYTES: usize = 64 * 1024 * 1024;

/// What the API serves with.
#[derive(Clone)]
struct Api {
    host: Host,
    secret: Arc<str>,
    max_body_bytes: usize,
}

/// The routes of the sidecar API, authenticated by `secret`.
pub fn router(host: Host, secret: &str, max_body_bytes: usize) -> Router {
    let api = Api {
        host,
        secret: secret.into(),
        max_body_bytes,
    };
    Router::new()
        .route("/_asched/v1/appservices/{id}/events", post(enqueue))
        .route("/_asched/v1/appservices/{id}/retry", post(retry))
        .route("/_asched/v1/appservices/{id}/status", get(one_status))
        .route("/_asched/v1/status", get(all_status))
        .route("/_asched/v1/plugin", get(plugin_status).post(swap_plugin))
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "this endpoint does not take this method".into(),
            )
        })
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "no such endpoint".into(),
            )
        })
        .with_state(api)
}

/// An error answer.
fn error(status: StatusCode, errcode: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({ "errcode": errcode, "error": message })),
    )
        .into_response()
}

impl Api {
    /// Checks the shared secret.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Response> {
        // No header, or one of another scheme (`Basic …`): no token was given at all.
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
        else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "M_MISSING_TOKEN",
                "missing `Authorization: Bearer <secret>`".into(),
            ));
        };
        if !constant_time_eq(given.as_bytes(), self.secret.as_bytes()) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "the secret is not the one this sidecar was started with".into(),
            ));
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct EventsBody<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

async fn enqueue(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refusal) = api.authorize(&headers) {
        return refusal;
    }
    let bytes = match axum::body::to_bytes(body, api.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let message = format!(
                "the request body is larger than {} bytes; send fewer events per request",
                api.max_body_bytes
            );
            return error(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", message);
        }
    };
    // serde would also read a struct from an array (`[[...]]` as `{"events": [...]}`), which
    // would accept a body sent in the wrong shape.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let message = "the body must be a JSON object {\"events\": [...]}, and it is not one";
        return error(StatusCode::BAD_REQUEST, "M_BAD_JSON", message.to_owned());
    }
    let parsed: EventsBody = match serde_json::from_slice(&bytes) {
        Ok(parsed) => parsed,
        Err(e) => {
            let message = format!("the body must be a JSON object {{\"events\": [...]}}: {e}");
            return error(StatusCode::BAD_REQUEST, "M_BAD_JSON", message);
        }
    };
    let events = parsed
        .events
        .iter()
        .map(|raw| raw.get().to_owned())
        .collect();
    match api.host.enqueue(&id, events).await {
        Ok(accepted) => axum::Json(json!({ "accepted": accepted })).into_response(),
        Err(e) => enqueue_error(&e),
    }
}

fn enqueue_error(e: &EnqueueError) -> Response {
    let (status, errcode) = match e {
        EnqueueError::UnknownAppservice(_) => (StatusCode::NOT_FOUND, "M_UNKNOWN_APPSERVICE"),
        EnqueueError::NoTraffic(_) => (StatusCode::CONFLICT, "M_URL_NOT_SET"),
        EnqueueError::InvalidItem { .. } => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        EnqueueError::Storage(_) | EnqueueError::PluginFailed(_) | EnqueueError::ShuttingDown => {
            (StatusCode::SERVICE_UNAVAILABLE, "M_UNAVAILABLE")
        }
    };
    error(status, errcode, e.to_string())
}

async fn retry(State(api): State<Api>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(refusal) = api.authorize(&headers) {
        return refusal;
    }
    match api.host.force_retry(&id).await {
        Ok(()) => axum::Json(json!({})).into_response(),
        Err(e) => enqueue_error(&e),
    }
}

async fn all_status(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(refusal) = api.authorize(&headers) {
        return refusal;
    }
    match api.host.full_status().await {
        Some((appservices, plugin)) => {
            axum::Json(json!({ "appservices": appservices, "plugin": plugin })).into_response()
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNAVAILABLE",
            "the host is shutting down".into(),
        ),
    }
}

async fn one_status(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = api.authorize(&headers) {
        return refusal;
    }
    match api
        .host
        .status()
        .await
        .into_iter()
        .find(|s| s.appservice == id)
    {
        Some(status) => axum::Json(status).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "M_UNKNOWN_APPSERVICE",
            format!("unknown appservice {id:?}"),
        ),
    }
}

async fn plugin_status(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(refusal) = api.authorize(&headers) {
        return refusal;
    }
    match api.host.plugin_status().await {
        Some(status) => axum::Json(status).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNAVAILABLE",
            "the host is shutting down".into(),
        ),
    }
}

async fn swap_plugin(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    if let Err(refusal) = api.authorize(&headers) {
        return refusal;
    }
    let Ok(wasm) = axum::body::to_bytes(body, MAX_PLUGIN_BYTES).await else {
        let message = format!("the component is larger than {MAX_PLUGIN_BYTES} bytes");
        return error(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", message);
    };
    match api.host.swap(wasm.to_vec()).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(why) => error(StatusCode::UNPROCESSABLE_ENTITY, "M_PLUGIN_REFUSED", why),
    }
}

/// Where the sidecar listens.
#[derive(Clone, Debug)]
pub enum Listen {
    /// A TCP address; only loopback addresses are accepted.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    /// `127.0.0.1:PORT`, `[::1]:PORT` or `unix:/path/to/socket`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(path.into()));
        }
        let addr: std::net::SocketAddr = s
            .parse()
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:/path: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s:?} is not a loopback address; the sidecar API only listens on 127.0.0.1, ::1 or a Unix socket"
            ));
        }
        Ok(Listen::Tcp(addr))
    }
}

/// Serves the API until `shutdown` completes. Calls `ready` with the bound address once
/// listening.
pub async fn serve(
    router: Router,
    listen: &Listen,
    ready: impl FnOnce(String),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    match listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            ready(listener.local_addr()?.to_string());
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
            ready(format!("unix:{}", path.display()));
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
    }
    Ok(())
}

/// Removes the socket file a process that died left at `path`, so it can be bound again.
/// Refuses a path that is not a socket (it is not ours to delete) and a socket that another
/// process still serves (taking it over would cut that process off).
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    anyhow::ensure!(
        metadata.file_type().is_socket(),
        "cannot listen on {}: it exists and is not a socket",
        path.display()
    );
    anyhow::ensure!(
        std::os::unix::net::UnixStream::connect(path).is_err(),
        "cannot listen on {}: another process is listening on it",
        path.display()
    );
    std::fs::remove_file(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: cannot remove the stale socket: {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Bearer scheme is matched without regard to case, as HTTP defines auth schemes.
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("BEARER s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("Basic s3cret"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
