//! What the core asks of the world, as one trait.
//!
//! The component glue implements [`Effects`] by calling the WIT imports; the unit tests implement
//! it with an in-memory world and virtual time. The core never reaches the world any other way, so
//! a run is a pure function of its inputs and of the answers these methods give.

/// Why a store operation failed. Every error is treated as temporary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached or is busy.
    Unavailable(String),
    /// The store answered but the operation failed.
    Failed(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Failed(why) => write!(f, "store operation failed: {why}"),
        }
    }
}

/// One write inside an atomic commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Store a value under a key.
    Put(String, Vec<u8>),
    /// Remove a key.
    Delete(String),
    /// Remove every key `k` with `start <= k < end`.
    DeleteRange(String, String),
}

/// How severe a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Detail for debugging.
    Debug,
    /// A change of state.
    Info,
    /// An outside failure being handled.
    Warn,
    /// Something that needs a person.
    Error,
}

/// How a send ended, as the host saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The appservice answered with a status code.
    Response {
        /// The HTTP status code.
        status: u16,
        /// Whether the body was a JSON document.
        body_is_json: bool,
    },
    /// No answer within the host's timeout.
    Timeout,
    /// The connection could not be made.
    ConnectFailed(String),
    /// The connection broke before a full answer.
    ConnectionLost(String),
}

/// Everything the scheduler core needs from outside: storage, sends, timers, clocks, randomness
/// and logging.
pub trait Effects {
    /// Reads the value under `key`.
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads up to `limit` entries with `start <= key < end`, in key order.
    fn scan(
        &mut self,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Applies `ops` atomically and durably.
    fn commit(&mut self, ops: Vec<WriteOp>) -> Result<(), StoreError>;

    /// Starts sending a transaction; returns the send's handle, or why the host refused.
    fn start_send(&mut self, appservice: &str, txn_id: &str, body: &[u8]) -> Result<u64, String>;

    /// Asks for [`crate::Scheduler::timer_fired`] after `delay_ms`; returns the timer's handle.
    fn set_timer(&mut self, delay_ms: u64) -> u64;

    /// Cancels a timer.
    fn cancel_timer(&mut self, id: u64);

    /// Monotonic milliseconds.
    fn monotonic_now_ms(&mut self) -> u64;

    /// Milliseconds since the Unix epoch.
    fn wall_clock_now_ms(&mut self) -> u64;

    /// 64 random bits.
    fn random_u64(&mut self) -> u64;

    /// Writes a log line.
    fn log(&mut self, level: LogLevel, appservice: Option<&str>, message: &str);
}
