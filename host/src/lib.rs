//! The reference host of the appservice scheduler plugin.
//!
//! It loads the plugin component under wasmtime, supplies its imports with real parts (SQLite
//! for `store`, a pooled HTTP client for `http-send`, tokio timers and clocks, `tracing` for
//! logs), and offers it to a homeserver in two ways: as a Rust library ([`Host`]) and as a
//! sidecar process with a local HTTP API ([`sidecar`]).
//!
//! # Layout
//!
//! - [`registration`]: reading and checking appservice registration YAML files.
//! - [`store`]: the SQLite key-value store behind the `store` import.
//! - [`http`]: sending transactions, adding URLs and tokens the plugin never sees.
//! - [`runtime`]: compiling, caching and instantiating the component; the import bindings.
//! - [`engine`]: the thread that owns the instance and feeds it requests, outcomes and timers.
//! - [`durable`]: the thread that lets each round's answers and sends out once it is on disk.
//! - [`sidecar`]: the local HTTP API.
//! - [`routing`]: which appservices an event interests, from their namespaces.
//! - [`demo`]: the bundled end-to-end demonstration.
//! - [`cli`]: the `asched` command line.

pub mod cli;
pub mod demo;
pub mod durable;
pub mod engine;
pub mod http;
pub mod registration;
pub mod routing;
pub mod runtime;
pub mod sidecar;
pub mod store;

pub use engine::{AppserviceStatus, EnqueueError, Host, HostConfig, default_scheduler_config};
