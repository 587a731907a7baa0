//! Sending transactions over HTTP.
//!
//! One pooled HTTP/1.1 client (keep-alive, so each appservice reuses its connection) with a
//! connect timeout and a total timeout per request. The plugin names an appservice and a txn id;
//! this module adds the URL and the `hs_token`, which the plugin never sees.
//!
//! The client runs on a runtime of its own whose threads log nothing: the HTTP libraries' own
//! debug lines name the appservice's address ("connecting to 10.0.0.5:9000", "pooling idle
//! connection for …"), and some are written by tasks they spawn, so only the threads they run on
//! can keep them out of the application's logs. Every failure still reaches the plugin (and its
//! logs) as an outcome, without the URL.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::registration::Registration;
use crate::runtime::api::{Response, SendOutcome};

/// Timeouts for transaction requests.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// How long a TCP (and TLS) connect may take.
    pub connect_timeout: Duration,
    /// How long a whole request may take, from connect to the end of the answer.
    pub total_timeout: Duration,
}

impl Default for HttpConfig {
    /// 15 s to connect and 60 s in all, as mature homeservers use.
    fn default() -> Self {
        HttpConfig {
            connect_timeout: Duration::from_secs(15),
            total_timeout: Duration::from_secs(60),
        }
    }
}

/// Where and how an appservice is reached.
#[derive(Clone, Debug)]
struct Endpoint {
    url: String,
    hs_token: String,
    legacy_query_auth: bool,
}

/// A request about to be sent: the full URL and the token.
#[derive(Clone)]
pub struct Target {
    url: String,
    bearer: String,
}

#[cfg(test)]
impl Target {
    /// A request no test sends.
    pub(crate) fn unused() -> Target {
        Target {
            url: "http://127.0.0.1:9/".into(),
            bearer: "Bearer unused".into(),
        }
    }
}

/// A send started by the plugin.
pub struct SendJob {
    /// Its handle.
    pub id: u64,
    /// Where it goes.
    pub target: Target,
    /// The exact body bytes.
    pub body: Vec<u8>,
}

/// The HTTP client and the appservices it may reach.
///
/// One client serves every appservice; it keeps idle HTTP/1.1 connections alive per host and
/// port (90 s), so an appservice's transactions, which go one at a time, reuse one connection
/// instead of paying a TCP handshake each.
#[derive(Debug)]
pub struct Net {
    client: reqwest::Client,
    endpoints: BTreeMap<String, Endpoint>,
    runtime: QuietRuntime,
}

/// The runtime every request runs on; its threads have a subscriber that drops every event
/// (`log` records included).
#[derive(Debug)]
struct QuietRuntime(Option<tokio::runtime::Runtime>);

impl QuietRuntime {
    fn new() -> std::io::Result<QuietRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("asched-http")
            .on_thread_start(|| {
                let silent = tracing::dispatcher::set_default(&tracing::Dispatch::none());
                // The thread keeps the silent subscriber for its whole life.
                std::mem::forget(silent);
            })
            .enable_all()
            .build()?;
        Ok(QuietRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives until the Net is dropped")
            .handle()
    }
}

impl Drop for QuietRuntime {
    /// Stops without waiting: the last reference may go away inside an async task, where a
    /// runtime must not block.
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Net {
    /// A client for the registrations that have a URL. Appservices listed in `legacy_query_auth`
    /// also get the token as `?access_token=`, for bridges that only read that.
    pub fn new(
        config: &HttpConfig,
        registrations: &[Registration],
        legacy_query_auth: &[String],
    ) -> anyhow::Result<Net> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.total_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("asched/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut endpoints = BTreeMap::new();
        for r in registrations {
            let Some(url) = &r.url else { continue };
            let legacy_query_auth = legacy_query_auth.contains(&r.id);
            endpoints.insert(
                r.id.clone(),
                Endpoint {
                    url: url.clone(),
                    hs_token: r.hs_token.clone(),
                    legacy_query_auth,
                },
            );
        }
        for id in legacy_query_auth {
            anyhow::ensure!(
                registrations.iter().any(|r| &r.id == id),
                "--legacy-query-auth names {id:?}, which no registration file defines"
            );
        }
        Ok(Net {
            client,
            endpoints,
            runtime: QuietRuntime::new()?,
        })
    }

    /// The request for a transaction, or why it may not be sent: `None` for an unknown
    /// appservice, `Some(reason)` for an unusable txn id.
    pub fn target(&self, appservice: &str, txn_id: &str) -> Result<Target, Option<String>> {
        let endpoint = self.endpoints.get(appservice).ok_or(None)?;
        if txn_id.is_empty()
            || !txn_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            return Err(Some(format!("txn id {txn_id:?} is not URL-safe")));
        }
        let mut url = format!("{}/_matrix/app/v1/transactions/{txn_id}", endpoint.url);
        if endpoint.legacy_query_auth {
            url.push_str("?access_token=");
            url.extend(form_urlencoded_byte(&endpoint.hs_token));
        }
        Ok(Target {
            url,
            bearer: format!("Bearer {}", endpoint.hs_token),
        })
    }

    /// Sends one transaction on the HTTP runtime and hands how it ended to `done`, on that
    /// runtime too: the request and its report cost no hop through another thread. Never
    /// fails: every failure is an outcome the plugin handles.
    pub fn start(
        &self,
        target: Target,
        body: Vec<u8>,
        done: impl FnOnce(SendOutcome) + Send + 'static,
    ) {
        let request = self
            .client
            .put(&target.url)
            .header(reqwest::header::AUTHORIZATION, &target.bearer)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let runtime = self.runtime.handle().clone();
        runtime.clone().spawn(async move {
            // A panic in the HTTP stack ends only the inner task; the send still reports.
            let outcome = match runtime.spawn(exchange(request)).await {
                Ok(outcome) => outcome,
                Err(error) => SendOutcome::ConnectionLost(format!("the HTTP task ended: {error}")),
            };
            done(outcome);
        });
    }
}

/// Sends a request and classifies how it ended.
async fn exchange(request: reqwest::RequestBuilder) -> SendOutcome {
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return classify(error),
    };
    let status = response.status().as_u16();
    match response.bytes().await {
        Ok(bytes) => {
            let body_is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
            SendOutcome::Response(Response {
                status,
                body_is_json,
            })
        }
        Err(error) => classify(error),
    }
}

/// Percent-encodes a query value (tokens are usually plain, but need not be).
fn form_urlencoded_byte(value: &str) -> impl Iterator<Item = String> + '_ {
    value.bytes().map(|b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            (b as char).to_string()
        } else {
            format!("%{b:02X}")
        }
    })
}

/// Maps a client error to the plugin's outcome kinds, with the chain of causes in words. The
/// URL is removed first: it can carry the token (`?access_token=`), and neither the plugin nor
/// the logs may see it.
fn classify(error: reqwest::Error) -> SendOutcome {
    let error = error.without_url();
    let mut why = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        why.push_str(": ");
        why.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_timeout() {
        SendOutcome::Timeout
    } else if error.is_connect() {
        SendOutcome::ConnectFailed(why)
    } else {
        SendOutcome::ConnectionLost(why)
    }
}

/// Selects `ring` as the one TLS crypto backend of the process.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is what is wanted.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
