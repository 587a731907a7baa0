//! The Matrix appservice transaction scheduler, as a plugin.
//!
//! It decides which room events go into which transaction for each appservice, when each
//! transaction is sent, and how delivery resumes after a failure, a restart or a swap of the
//! plugin. It runs inside a host (see the `asched:scheduler` WIT world in `wit/`) that supplies
//! storage, HTTP, timers, clocks and logs; the same code compiles natively so the logic can be
//! tested without WebAssembly.
//!
//! # A transaction's life
//!
//! ```text
//!  enqueue ──► queued (durable, per-appservice FIFO)
//!                 │ appservice idle
//!                 ▼
//!             stored txn: id and body fixed, persisted ──► in flight ──2xx──► delivered
//!                 ▲                                            │
//!                 │ retry timer: 2 s, 4 s, … capped, jittered  │ failure (non-2xx, timeout,
//!                 └──────────────── DOWN ◄─────────────────────┘   refused, reset)
//!
//!  DOWN ──retry succeeds──► RECOVERING (backlog sent back to back) ──empty──► UP
//! ```
//!
//! - At most one transaction is in flight per appservice; appservices never wait for each other.
//! - A transaction holds at most [`Config::max_events_per_txn`] events and
//!   [`Config::max_txn_body_bytes`] bytes. Events that arrive while a transaction is in flight
//!   or while the appservice is DOWN wait in the queue and are merged, up to those caps, into
//!   the next transaction.
//! - Once stored, a transaction's id and bytes never change; every retry resends them. Ids are
//!   `{epoch}.{counter}` with a random epoch per appservice record, so they never repeat, not
//!   even after the store is reset.
//! - A 413 answer retires the transaction's id and re-forms its events into smaller
//!   transactions with new ids; nothing is dropped.
//! - A storage error pauses the affected queue and retries with a growing delay; it never skips,
//!   reorders or drops.
//!
//! # Layout
//!
//! - [`scheduler`]: the state machine ([`Scheduler`]).
//! - [`effects`]: the [`Effects`] trait, everything the state machine asks of the world.
//! - [`layout`]: the keys and values it keeps in the store.
//! - `component` (only on `wasm32`): the WIT bindings that connect the two.
//!
//! Not yet handled: ephemeral events, to-device messages and device-list changes (the WIT
//! `item` variant leaves room for them), and an operator control to skip a transaction that an
//! appservice refuses forever.

pub mod cache;
pub mod effects;
pub mod layout;
pub mod scheduler;

#[cfg(target_arch = "wasm32")]
mod component;

pub use effects::{Effects, LogLevel, SendOutcome, StoreError, WriteOp};
pub use scheduler::{
    Config, EnqueueBatch, EnqueueError, InFlightSend, Item, Phase, Scheduler, StartError, Status,
};
