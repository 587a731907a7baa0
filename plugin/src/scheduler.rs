//! The scheduler: a state machine over the appservices' queues.
//!
//! Inputs are the exports of the WIT world (start, enqueue, send outcomes, timers, ticks, forced
//! retries); everything it does to the world goes through [`Effects`]. It holds in memory only
//! what it can rebuild from the store at [`Scheduler::start`], plus counters for status.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::cache::ChunkCache;
use crate::effects::{Effects, LogLevel, SendOutcome, WriteOp};
use crate::layout::{self, Keys, Record, StoredTxn};

/// Limits and delays that apply to every appservice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The most room events one transaction carries.
    pub max_events_per_txn: u32,
    /// The most bytes a transaction body may have (a larger single event travels alone).
    pub max_txn_body_bytes: u32,
    /// The first retry delay after a failure.
    pub retry_delay_ms_initial: u64,
    /// The longest retry delay.
    pub retry_delay_ms_max: u64,
    /// Random share of each retry delay, in percent.
    pub retry_jitter_percent: u8,
    /// The first delay before a queue paused by a storage error is tried again.
    pub storage_retry_delay_ms: u64,
}

impl Default for Config {
    /// The values mature homeservers use: 100 events, 2 s doubling to 512 s.
    fn default() -> Self {
        Config {
            max_events_per_txn: 100,
            max_txn_body_bytes: DEFAULT_MAX_TXN_BODY_BYTES,
            retry_delay_ms_initial: 2_000,
            retry_delay_ms_max: 512_000,
            retry_jitter_percent: 20,
            storage_retry_delay_ms: 1_000,
        }
    }
}

/// Default byte cap of a transaction body: half a MiB keeps bodies well under the 1 MiB request
/// limit common in reverse proxies, while 100 events of typical size (about 1 KiB) fit easily.
pub const DEFAULT_MAX_TXN_BODY_BYTES: u32 = 512 * 1024;

/// The smallest byte cap accepted: below this, ordinary events would travel one per transaction.
pub const MIN_TXN_BODY_BYTES: u32 = 1024;

impl Config {
    /// Checks that the values make sense together; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_events_per_txn == 0 {
            return Err("max-events-per-txn must be at least 1".into());
        }
        if self.max_txn_body_bytes < MIN_TXN_BODY_BYTES {
            return Err(format!(
                "max-txn-body-bytes must be at least {MIN_TXN_BODY_BYTES}"
            ));
        }
        if self.retry_delay_ms_initial == 0 {
            return Err("retry-delay-ms-initial must be at least 1".into());
        }
        if self.retry_delay_ms_max < self.retry_delay_ms_initial {
            return Err("retry-delay-ms-max must not be below retry-delay-ms-initial".into());
        }
        if self.retry_jitter_percent > 100 {
            return Err("retry-jitter-percent must be at most 100".into());
        }
        if self.storage_retry_delay_ms == 0 {
            return Err("storage-retry-delay-ms must be at least 1".into());
        }
        Ok(())
    }
}

/// Whether an appservice is receiving transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sends as events arrive.
    Up,
    /// The last attempt failed; a timer will retry the oldest transaction.
    Down,
    /// A retry succeeded; the backlog drains back to back, then the appservice is UP.
    Recovering,
}

/// A send still running from an earlier instance, handed over at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlightSend {
    /// The send's handle.
    pub id: u64,
    /// Its appservice.
    pub appservice: String,
    /// Its transaction id.
    pub txn_id: String,
}

/// One item to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A room event as JSON text of one object.
    RoomEvent(String),
}

/// Items for one appservice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnqueueBatch {
    /// The appservice.
    pub appservice: String,
    /// The items, oldest first.
    pub items: Vec<Item>,
}

/// Why a batch was not accepted (nothing of it was stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnqueueError {
    /// No registered appservice has this id.
    UnknownAppservice(String),
    /// The item at this index is not acceptable.
    InvalidItem(u32, String),
    /// The store failed.
    Storage(String),
}

/// Why the scheduler could not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The store could not be read.
    Storage(String),
    /// The configuration is unusable.
    InvalidConfig(String),
}

/// What an operator sees about one appservice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The appservice.
    pub appservice: String,
    /// Its phase.
    pub phase: Phase,
    /// Undelivered transactions: the stored one plus those the queued events will form.
    pub backlog_txns: u64,
    /// Undelivered events.
    pub backlog_events: u64,
    /// Bytes of undelivered events.
    pub backlog_bytes: u64,
    /// Enqueue time of the oldest undelivered event, ms since the Unix epoch.
    pub oldest_enqueued_at_ms: Option<u64>,
    /// The stored transaction's id.
    pub current_txn_id: Option<String>,
    /// Whether a send is in flight.
    pub in_flight: bool,
    /// Failed attempts since the last success.
    pub failed_attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Milliseconds until the next retry.
    pub next_retry_in_ms: Option<u64>,
    /// Whether a storage error paused the queue.
    pub paused_by_storage: bool,
    /// Transactions delivered by this instance.
    pub delivered_txns: u64,
    /// Events delivered by this instance.
    pub delivered_events: u64,
}

/// Why a timer was set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerPurpose {
    /// Retry the appservice after a failed send.
    Retry,
    /// Try again after a storage error.
    Storage,
}

/// A pending timer of one appservice.
#[derive(Clone, Copy, Debug)]
struct Timer {
    id: u64,
    due_ms: u64,
    purpose: TimerPurpose,
}

/// Everything known about one appservice.
#[derive(Debug)]
struct Appservice {
    id: String,
    keys: Keys,
    record: Record,
    txn: Option<StoredTxn>,
    phase: Phase,
    in_flight: Option<u64>,
    timer: Option<Timer>,
    failed_attempts: u32,
    storage_failures: u32,
    last_error: Option<String>,
    /// A 2xx arrived for `txn` but recording it failed; the write must be retried before
    /// anything else is sent.
    unrecorded_success: bool,
    /// The event cap for new transactions; lowered when the appservice answers 413.
    cap_events: u32,
    delivered_txns: u64,
    delivered_events: u64,
}

impl Appservice {
    /// Whether undelivered events exist.
    fn has_backlog(&self) -> bool {
        self.txn.is_some() || self.record.head < self.record.tail
    }
}

/// A small, fast, well-mixed generator for retry jitter (SplitMix64). Seeded from the host's
/// randomness at start, so a run with the same seed makes the same choices.
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The retry delay after `failures` consecutive failures, before jitter: the initial delay,
/// doubled per further failure, capped.
pub fn backoff_delay_ms(config: &Config, failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(63);
    config
        .retry_delay_ms_initial
        .checked_shl(doublings)
        .filter(|d| d >> doublings == config.retry_delay_ms_initial)
        .map_or(config.retry_delay_ms_max, |d| {
            d.min(config.retry_delay_ms_max)
        })
}

/// The scheduler for every appservice of one host.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    appservices: BTreeMap<String, Appservice>,
    sends: BTreeMap<u64, String>,
    timers: BTreeMap<u64, String>,
    jitter: Jitter,
    /// The chunks enqueued last, so transactions of fresh events are formed without reading
    /// the store.
    cache: ChunkCache,
}

/// The most bytes of recently enqueued chunks kept in memory, over all appservices: enough for
/// a hundred busy appservices' next transactions, small enough to keep the plugin's memory flat.
pub const CHUNK_CACHE_BYTES: usize = 4 << 20;

/// How many transactions ahead of an appservice's head its new chunks are kept in memory.
const CACHED_TXNS_AHEAD: u64 = 4;

impl Scheduler {
    /// Loads every appservice's state from the store, adopts sends still in flight, and resumes
    /// delivery wherever events wait.
    pub fn start(
        fx: &mut impl Effects,
        config: Config,
        appservices: &[String],
        in_flight: &[InFlightSend],
    ) -> Result<Scheduler, StartError> {
        config.validate().map_err(StartError::InvalidConfig)?;
        let jitter = Jitter(fx.random_u64());
        let mut scheduler = Scheduler {
            config,
            appservices: BTreeMap::new(),
            sends: BTreeMap::new(),
            timers: BTreeMap::new(),
            jitter,
            cache: ChunkCache::new(CHUNK_CACHE_BYTES),
        };
        scheduler.load(fx, appservices)?;
        scheduler.adopt(fx, in_flight);
        scheduler.resume(fx);
        Ok(scheduler)
    }

    /// Reads (or creates) the record and stored transaction of each appservice.
    fn load(&mut self, fx: &mut impl Effects, ids: &[String]) -> Result<(), StartError> {
        let mut created = Vec::new();
        for id in ids {
            let keys = Keys::new(id);
            let stored = read_json::<Record>(fx, &keys.meta()).map_err(StartError::Storage)?;
            let txn = read_json::<StoredTxn>(fx, &keys.txn()).map_err(StartError::Storage)?;
            let moved = migrate_event_rows(fx, &keys, txn.as_ref()).map_err(StartError::Storage)?;
            if moved > 0 {
                let message = format!("moved {moved} queued events into the chunked layout");
                fx.log(LogLevel::Info, Some(id), &message);
            }
            let record = match stored {
                Some(record) => record,
                None => {
                    let mut record = Record::new(format!("{:016x}", fx.random_u64()));
                    rebuild_queue_bounds(fx, &keys, txn.as_ref(), &mut record)
                        .map_err(StartError::Storage)?;
                    if record.head < record.tail {
                        let message = format!(
                            "record lost; rebuilt it from {} stored events under a new txn-id epoch",
                            record.tail - record.head
                        );
                        fx.log(LogLevel::Warn, Some(id), &message);
                    }
                    created.push(WriteOp::Put(keys.meta(), to_json(&record)));
                    record
                }
            };
            let phase = if record.down { Phase::Down } else { Phase::Up };
            let failed_attempts = record.failed_attempts;
            let appservice = Appservice {
                id: id.clone(),
                keys,
                record,
                txn,
                phase,
                in_flight: None,
                timer: None,
                failed_attempts,
                storage_failures: 0,
                last_error: None,
                unrecorded_success: false,
                cap_events: self.config.max_events_per_txn,
                delivered_txns: 0,
                delivered_events: 0,
            };
            self.appservices.insert(id.clone(), appservice);
        }
        if !created.is_empty() {
            fx.commit(created)
                .map_err(|e| StartError::Storage(e.to_string()))?;
        }
        Ok(())
    }

    /// Waits for sends an earlier instance started, instead of sending their transactions again.
    fn adopt(&mut self, fx: &mut impl Effects, in_flight: &[InFlightSend]) {
        for send in in_flight {
            let Some(a) = self.appservices.get_mut(&send.appservice) else {
                continue;
            };
            let matches = a.txn.as_ref().is_some_and(|t| t.txn_id == send.txn_id);
            if matches && a.in_flight.is_none() {
                a.in_flight = Some(send.id);
                self.sends.insert(send.id, a.id.clone());
            } else {
                let message = format!("ignoring handed-over send of txn {}", send.txn_id);
                fx.log(LogLevel::Debug, Some(&send.appservice), &message);
            }
        }
    }

    /// Starts delivery for every appservice with a backlog; marks idle DOWN ones UP.
    fn resume(&mut self, fx: &mut impl Effects) {
        let ids: Vec<String> = self.appservices.keys().cloned().collect();
        for id in ids {
            let a = self
                .appservices
                .get_mut(&id)
                .expect("ids were just read from the map");
            if a.in_flight.is_some() {
                continue;
            }
            if a.has_backlog() {
                let message = format!(
                    "resuming delivery of {} queued events",
                    a.record.tail - a.record.head
                );
                fx.log(LogLevel::Info, Some(&id), &message);
                let wait = self.remaining_backoff_ms(fx, &id);
                match wait {
                    Some(delay) => self.set_timer(fx, &id, delay, TimerPurpose::Retry),
                    None => self.dispatch(fx, &id, true),
                }
            } else if a.phase != Phase::Up {
                self.finish_recovery(fx, &id);
            }
        }
    }

    /// How long a DOWN appservice still waits for its persisted retry, if it does (never more
    /// than the retry cap, whatever the clocks did).
    fn remaining_backoff_ms(&self, fx: &mut impl Effects, id: &str) -> Option<u64> {
        let a = &self.appservices[id];
        let due = a.record.retry_at_ms.filter(|_| a.phase == Phase::Down)?;
        let now_wall = fx.wall_clock_now_ms();
        (due > now_wall).then(|| (due - now_wall).min(self.config.retry_delay_ms_max))
    }

    /// Stores each batch and starts sends for idle appservices. One commit covers every
    /// accepted batch, so many enqueues share one durable write. An appservice that is up with
    /// nothing queued or in flight gets its transaction formed from the new events and stored
    /// in that same commit, so a lone event costs one write before it is sent, not two.
    pub fn enqueue(
        &mut self,
        fx: &mut impl Effects,
        batches: &[EnqueueBatch],
    ) -> Vec<Result<u32, EnqueueError>> {
        let now_wall = fx.wall_clock_now_ms();
        let mut results = Vec::with_capacity(batches.len());
        let mut ops = Vec::new();
        let mut touched: BTreeMap<String, Record> = BTreeMap::new();
        let mut chunks = Vec::new();
        for batch in batches {
            let result = self.stage_batch(batch, now_wall, &mut ops, &mut touched, &mut chunks);
            results.push(result);
        }
        if touched.is_empty() {
            return results;
        }
        let mut staged_chunks: BTreeMap<&str, Vec<(u64, &[u8])>> = BTreeMap::new();
        for (id, seq, value) in &chunks {
            staged_chunks.entry(id).or_default().push((*seq, value));
        }
        let mut formed = BTreeMap::new();
        for (id, record) in &mut touched {
            let a = &self.appservices[id];
            let new_chunks = staged_chunks
                .get(id.as_str())
                .map_or(&[][..], Vec::as_slice);
            if let Some(next) = self.form_from_new_chunks(a, record, new_chunks) {
                ops.extend(next.ops(&a.keys));
                formed.insert(id.clone(), next);
            }
        }
        for (id, record) in &touched {
            let keys = &self.appservices[id].keys;
            ops.push(WriteOp::Put(keys.meta(), to_json(record)));
        }
        let committed = fx.commit(ops);
        // A deliberately broken build for the simulator's tests: it acknowledges batches whose
        // commit failed, so their events are lost.
        let committed = if cfg!(feature = "fault-ack-before-persist") {
            Ok(())
        } else {
            committed
        };
        if let Err(error) = committed {
            fx.log(
                LogLevel::Warn,
                None,
                &format!("enqueue not stored: {error}"),
            );
            for result in &mut results {
                if matches!(result, Ok(n) if *n > 0) {
                    *result = Err(EnqueueError::Storage(error.to_string()));
                }
            }
            return results;
        }
        let staged: Vec<String> = touched.keys().cloned().collect();
        for (id, record) in touched {
            self.appservices
                .get_mut(&id)
                .expect("staged ids are registered")
                .record = record;
        }
        // Only chunks that the next few transactions will carry are worth keeping: a backlog
        // (an appservice that is down or far behind) is read from the store when its turn comes.
        let near = u64::from(self.config.max_events_per_txn) * CACHED_TXNS_AHEAD;
        for (id, seq, value) in chunks {
            let a = &self.appservices[&id];
            if a.phase == Phase::Up && seq.saturating_sub(a.record.head) < near {
                self.cache.insert(&id, seq, value);
            }
        }
        for id in staged {
            match formed.remove(&id) {
                Some(next) => {
                    let a = self
                        .appservices
                        .get_mut(&id)
                        .expect("staged ids are registered");
                    a.txn = Some(next.txn);
                    self.start_send(fx, &id, &next.body);
                }
                None => self.dispatch(fx, &id, false),
            }
        }
        results
    }

    /// The transaction of an appservice that was idle with an empty queue, formed from the
    /// chunks just staged for it, in order (`record` is its record as the commit will leave it,
    /// and its next txn number is taken). `None` when the appservice is not idle and up, or had
    /// events queued before: then [`Scheduler::dispatch`] decides after the commit, as for any
    /// queue.
    fn form_from_new_chunks(
        &self,
        a: &Appservice,
        record: &mut Record,
        chunks: &[(u64, &[u8])],
    ) -> Option<NextTxn> {
        let idle = a.phase == Phase::Up
            && !a.has_backlog()
            && a.in_flight.is_none()
            && a.timer.is_none()
            && !a.unrecorded_success;
        if !idle {
            return None;
        }
        let mut builder = BodyBuilder::new(
            record.head,
            u64::from(a.cap_events),
            self.config.max_txn_body_bytes as usize,
        );
        for &(seq, value) in chunks {
            if builder.feed(seq, value).ok()?.is_none() {
                break;
            }
        }
        let built = builder.finish().ok()?;
        Some(NextTxn::take(record, built))
    }

    /// Validates one batch and adds its writes; `touched` holds each appservice's record as it
    /// will be after the commit, `chunks` every new chunk (kept in memory after the commit if it
    /// will soon be sent).
    fn stage_batch(
        &self,
        batch: &EnqueueBatch,
        now_wall: u64,
        ops: &mut Vec<WriteOp>,
        touched: &mut BTreeMap<String, Record>,
        chunks: &mut Vec<(String, u64, Vec<u8>)>,
    ) -> Result<u32, EnqueueError> {
        let Some(a) = self.appservices.get(&batch.appservice) else {
            return Err(EnqueueError::UnknownAppservice(batch.appservice.clone()));
        };
        let mut events = Vec::with_capacity(batch.items.len());
        for (index, item) in batch.items.iter().enumerate() {
            let Item::RoomEvent(json) = item;
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            events.push(validate_event(json).map_err(|why| EnqueueError::InvalidItem(index, why))?);
        }
        if events.is_empty() {
            return Ok(0);
        }
        let record = touched
            .entry(a.id.clone())
            .or_insert_with(|| a.record.clone());
        // A chunk holds at most one transaction's worth of events, so that forming a
        // transaction never reads (or copies) much more than it sends.
        let per_chunk = self.config.max_events_per_txn.max(1) as usize;
        for part in events.chunks(per_chunk) {
            let chunk = layout::encode_chunk(now_wall, part.iter().map(|e| e.as_bytes()));
            chunks.push((a.id.clone(), record.tail, chunk.clone()));
            ops.push(WriteOp::Put(a.keys.chunk(record.tail), chunk));
            record.tail += part.len() as u64;
            record.queued_bytes += part.iter().map(|e| e.len() as u64).sum::<u64>();
        }
        Ok(u32::try_from(events.len()).unwrap_or(u32::MAX))
    }

    /// Reports how a send ended.
    pub fn send_finished(&mut self, fx: &mut impl Effects, send_id: u64, outcome: &SendOutcome) {
        let Some(id) = self.sends.remove(&send_id) else {
            fx.log(
                LogLevel::Debug,
                None,
                &format!("ignoring outcome of unknown send {send_id}"),
            );
            return;
        };
        let a = self
            .appservices
            .get_mut(&id)
            .expect("sends map only to registered appservices");
        if a.in_flight != Some(send_id) {
            return;
        }
        a.in_flight = None;
        match outcome {
            SendOutcome::Response {
                status: 200..=299,
                body_is_json,
            } => {
                if !body_is_json && !matches!(outcome, SendOutcome::Response { status: 204, .. }) {
                    let txn_id = a.txn.as_ref().map_or("?", |t| t.txn_id.as_str());
                    let message = format!("txn {txn_id} accepted with a body that is not JSON");
                    fx.log(LogLevel::Warn, Some(&id), &message);
                }
                a.unrecorded_success = true;
                self.record_success(fx, &id);
            }
            SendOutcome::Response { status: 413, .. }
                if a.txn.as_ref().is_some_and(|t| t.events() > 1) =>
            {
                self.split_after_413(fx, &id);
            }
            outcome => {
                self.send_failed(fx, &id, describe_failure(outcome), is_auth_failure(outcome))
            }
        }
    }

    /// Reports that a timer is due.
    pub fn timer_fired(&mut self, fx: &mut impl Effects, timer_id: u64) {
        let Some(id) = self.timers.remove(&timer_id) else {
            return;
        };
        let a = self
            .appservices
            .get_mut(&id)
            .expect("timers map only to registered appservices");
        let Some(timer) = a.timer.take_if(|t| t.id == timer_id) else {
            return;
        };
        match timer.purpose {
            TimerPurpose::Retry => self.dispatch(fx, &id, true),
            TimerPurpose::Storage => {
                let retrying = a.phase == Phase::Down;
                self.dispatch(fx, &id, retrying);
            }
        }
    }

    /// Catches up on anything due: a timer the host missed is fired, a queue that is idle while
    /// it has work is started, a DOWN appservice without a retry timer gets one.
    pub fn tick(&mut self, fx: &mut impl Effects) {
        self.fire_overdue_timers(fx);
        let idle: Vec<(String, Phase)> = self
            .appservices
            .values()
            .filter(|a| a.in_flight.is_none() && a.timer.is_none())
            .filter(|a| a.has_backlog() || a.unrecorded_success || a.phase != Phase::Up)
            .map(|a| (a.id.clone(), a.phase))
            .collect();
        for (id, phase) in idle {
            if phase == Phase::Down {
                self.schedule_retry(fx, &id);
            } else {
                self.dispatch(fx, &id, false);
            }
        }
    }

    /// Fires every timer whose due time has passed, as if the host had reported it: a timer the
    /// host lost must not leave its queue idle for good. If the host reports it later, the
    /// handle is unknown by then and ignored.
    fn fire_overdue_timers(&mut self, fx: &mut impl Effects) {
        let now = fx.monotonic_now_ms();
        let overdue: Vec<u64> = self
            .appservices
            .values()
            .filter_map(|a| a.timer)
            .filter(|t| t.due_ms <= now)
            .map(|t| t.id)
            .collect();
        for timer_id in overdue {
            fx.cancel_timer(timer_id);
            self.timer_fired(fx, timer_id);
        }
    }

    /// Retries an appservice now, skipping the rest of its backoff.
    pub fn force_retry(&mut self, fx: &mut impl Effects, id: &str) -> Result<(), EnqueueError> {
        let Some(a) = self.appservices.get_mut(id) else {
            return Err(EnqueueError::UnknownAppservice(id.to_owned()));
        };
        if a.in_flight.is_some() {
            fx.log(
                LogLevel::Info,
                Some(id),
                "retry forced while a send is in flight; its outcome decides what follows",
            );
            return Ok(());
        }
        if let Some(timer) = a.timer.take() {
            self.timers.remove(&timer.id);
            fx.cancel_timer(timer.id);
        }
        fx.log(LogLevel::Info, Some(id), "retry forced");
        self.dispatch(fx, id, true);
        Ok(())
    }

    /// The status of every appservice, ordered by id.
    pub fn status(&self, fx: &mut impl Effects) -> Vec<Status> {
        let now = fx.monotonic_now_ms();
        let max = u64::from(self.config.max_events_per_txn);
        self.appservices
            .values()
            .map(|a| {
                let queued_after_txn =
                    a.record.tail - a.txn.as_ref().map_or(a.record.head, |t| t.end);
                Status {
                    appservice: a.id.clone(),
                    phase: a.phase,
                    backlog_txns: u64::from(a.txn.is_some()) + queued_after_txn.div_ceil(max),
                    backlog_events: a.record.tail - a.record.head,
                    backlog_bytes: a.record.queued_bytes,
                    oldest_enqueued_at_ms: oldest_enqueued_at(fx, a),
                    current_txn_id: a.txn.as_ref().map(|t| t.txn_id.clone()),
                    in_flight: a.in_flight.is_some(),
                    failed_attempts: a.failed_attempts,
                    last_error: a.last_error.clone(),
                    next_retry_in_ms: a.timer.map(|t| t.due_ms.saturating_sub(now)),
                    paused_by_storage: a.timer.is_some_and(|t| t.purpose == TimerPurpose::Storage),
                    delivered_txns: a.delivered_txns,
                    delivered_events: a.delivered_events,
                }
            })
            .collect()
    }

    /// Sends the next transaction of an idle appservice: the stored one, or a new one formed
    /// from the head of the queue. A DOWN appservice sends only when `retrying`.
    fn dispatch(&mut self, fx: &mut impl Effects, id: &str, retrying: bool) {
        let a = self
            .appservices
            .get_mut(id)
            .expect("dispatch is only called for registered ids");
        // A deliberately broken build for the simulator's tests ignores the send in flight.
        let busy = a.in_flight.is_some() && !cfg!(feature = "fault-double-send");
        if busy || a.timer.is_some() {
            return;
        }
        if a.unrecorded_success {
            // Recording the success dispatches the next transaction itself.
            self.record_success(fx, id);
            return;
        }
        if a.phase == Phase::Down && !retrying {
            return;
        }
        if a.txn.is_none() && a.record.head == a.record.tail {
            if a.phase != Phase::Up {
                self.finish_recovery(fx, id);
            }
            return;
        }
        let body = match a.txn {
            Some(_) => self.read_stored_body(fx, id),
            None => self.form_txn(fx, id),
        };
        if let Some(body) = body {
            self.start_send(fx, id, &body);
        }
    }

    /// The stored transaction's body: rebuilt from its events, which stay queued until it is
    /// delivered (or, for a transaction stored by an earlier build, the body it stored). A
    /// failure pauses the queue.
    fn read_stored_body(&mut self, fx: &mut impl Effects, id: &str) -> Option<Vec<u8>> {
        let a = &self.appservices[id];
        let txn = a.txn.as_ref().expect("only a stored transaction is resent");
        let stored = match fx.get(&a.keys.txn_body()) {
            Ok(stored) => stored,
            Err(error) => {
                self.pause_for_storage(fx, id, error.to_string());
                return None;
            }
        };
        if let Some(body) = stored {
            return Some(body);
        }
        let rebuilt = read_queue(
            fx,
            &mut self.cache,
            a,
            0,
            txn.first..txn.end,
            txn.events(),
            usize::MAX,
        )
        .map_err(|why| format!("stored txn {}: {why}", txn.txn_id))
        .and_then(|read| {
            if read.events == txn.events() {
                Ok(read.body)
            } else {
                Err(format!(
                    "queued event {} of stored txn {} is missing from the store",
                    txn.first + read.events,
                    txn.txn_id
                ))
            }
        });
        match rebuilt {
            Ok(body) => Some(body),
            Err(why) => {
                fx.log(LogLevel::Error, Some(id), &why);
                self.pause_for_storage(fx, id, why);
                None
            }
        }
    }

    /// Fixes a new transaction from the head of the queue, up to the caps, and stores it with
    /// its id and body before it is sent.
    fn form_txn(&mut self, fx: &mut impl Effects, id: &str) -> Option<Vec<u8>> {
        let mut record = self.appservices[id].record.clone();
        let next = match self.prepare_txn(fx, id, &mut record, 0) {
            Ok(next) => next,
            Err(why) => {
                self.pause_for_storage(fx, id, why);
                return None;
            }
        };
        let a = &self.appservices[id];
        let mut ops = next.ops(&a.keys);
        ops.push(WriteOp::Put(a.keys.meta(), to_json(&record)));
        if let Err(error) = fx.commit(ops) {
            self.pause_for_storage(fx, id, error.to_string());
            return None;
        }
        let a = self
            .appservices
            .get_mut(id)
            .expect("the id was found above");
        a.record = record;
        a.txn = Some(next.txn);
        Some(next.body)
    }

    /// Reads the head of the queue from `record.head` and builds the next transaction, up to
    /// the caps; advances `record.next_txn` past its id. Nothing is written: the caller commits
    /// [`NextTxn::ops`] with the record, alone or together with other writes.
    fn prepare_txn(
        &mut self,
        fx: &mut impl Effects,
        id: &str,
        record: &mut Record,
        first_chunk: u64,
    ) -> Result<NextTxn, String> {
        let a = &self.appservices[id];
        let head = record.head;
        let built = read_queue(
            fx,
            &mut self.cache,
            a,
            first_chunk,
            head..record.tail,
            u64::from(a.cap_events),
            self.config.max_txn_body_bytes as usize,
        )
        .inspect_err(|why| fx.log(LogLevel::Error, Some(id), why))?;
        Ok(NextTxn::take(record, built))
    }

    /// Hands the stored transaction to the host.
    fn start_send(&mut self, fx: &mut impl Effects, id: &str, body: &[u8]) {
        let a = self
            .appservices
            .get_mut(id)
            .expect("start_send is only called for registered ids");
        let txn_id = a
            .txn
            .as_ref()
            .expect("a transaction is stored before it is sent")
            .txn_id
            .clone();
        match fx.start_send(id, &txn_id, body) {
            Ok(send_id) => {
                a.in_flight = Some(send_id);
                a.storage_failures = 0;
                self.sends.insert(send_id, id.to_owned());
            }
            Err(why) => self.send_failed(fx, id, format!("host refused the send: {why}"), false),
        }
    }

    /// Records a delivered transaction: its events leave the queue, and the next transaction
    /// is dispatched. When events wait behind it, the next transaction is formed and stored in
    /// the same commit (one durable write per delivered transaction), and sent at once. If the
    /// write fails, the queue pauses and the write is retried; nothing else is sent meanwhile,
    /// and a crash resends the same transaction under the same id.
    fn record_success(&mut self, fx: &mut impl Effects, id: &str) {
        let a = &self.appservices[id];
        let txn = a
            .txn
            .clone()
            .expect("a success is recorded only for a stored transaction");
        let mut record = a.record.clone();
        record.head = txn.end;
        record.queued_bytes -= txn.event_bytes;
        let drained = record.head == record.tail;
        record.down = a.phase != Phase::Up && !drained;
        record.failed_attempts = 0;
        record.retry_at_ms = None;
        let mut ops = vec![
            WriteOp::DeleteRange(a.keys.chunk(0), a.keys.chunk(txn.keep_from())),
            WriteOp::Delete(a.keys.txn()),
            WriteOp::Delete(a.keys.txn_body()),
        ];
        // The next transaction goes into the same commit when it can be formed now; any
        // problem forming it is left to `dispatch`, after this success is recorded.
        let next = if drained || a.timer.is_some() {
            None
        } else {
            // The chunks left in the store start where the delivered transaction's last chunk
            // does (unknown for a transaction stored by an earlier build).
            let first_chunk = txn.keep_from.unwrap_or(0);
            self.prepare_txn(fx, id, &mut record, first_chunk).ok()
        };
        let a = &self.appservices[id];
        if let Some(next) = &next {
            ops.extend(next.ops(&a.keys));
        }
        ops.push(WriteOp::Put(a.keys.meta(), to_json(&record)));
        if let Err(error) = fx.commit(ops) {
            let why = format!("txn {} delivered but not recorded: {error}", txn.txn_id);
            fx.log(LogLevel::Warn, Some(id), &why);
            self.pause_for_storage(fx, id, why);
            return;
        }
        self.cache.remove_below(id, txn.keep_from());
        let a = self
            .appservices
            .get_mut(id)
            .expect("the id was found above");
        a.record = record;
        a.txn = None;
        a.unrecorded_success = false;
        a.failed_attempts = 0;
        a.storage_failures = 0;
        a.last_error = None;
        a.delivered_txns += 1;
        a.delivered_events += txn.events();
        if drained {
            a.cap_events = self.config.max_events_per_txn;
        }
        match (a.phase, drained) {
            (Phase::Up, _) => {}
            (_, true) => {
                a.phase = Phase::Up;
                fx.log(
                    LogLevel::Info,
                    Some(id),
                    "backlog delivered; appservice is up",
                );
            }
            (_, false) => a.phase = Phase::Recovering,
        }
        match next {
            Some(next) => {
                a.txn = Some(next.txn);
                self.start_send(fx, id, &next.body);
            }
            None => self.dispatch(fx, id, false),
        }
    }

    /// A 413 answer: the transaction is too large for the appservice. Its id is retired (never
    /// used again) and its events are sent again in transactions of half the size.
    fn split_after_413(&mut self, fx: &mut impl Effects, id: &str) {
        let a = &self.appservices[id];
        let txn = a
            .txn
            .clone()
            .expect("a 413 is handled only for a stored transaction");
        let ops = vec![
            WriteOp::Delete(a.keys.txn()),
            WriteOp::Delete(a.keys.txn_body()),
        ];
        if let Err(error) = fx.commit(ops) {
            self.pause_for_storage(fx, id, error.to_string());
            return;
        }
        let half = u32::try_from(txn.events() / 2).unwrap_or(u32::MAX).max(1);
        let message = format!(
            "txn {} of {} events refused as too large (HTTP 413); splitting into transactions of at most {half}",
            txn.txn_id,
            txn.events()
        );
        fx.log(LogLevel::Warn, Some(id), &message);
        let a = self
            .appservices
            .get_mut(id)
            .expect("the id was found above");
        a.txn = None;
        a.cap_events = half;
        let retrying = a.phase == Phase::Down;
        self.dispatch(fx, id, retrying);
    }

    /// A failed attempt: the appservice is DOWN until a retry succeeds.
    fn send_failed(&mut self, fx: &mut impl Effects, id: &str, why: String, auth: bool) {
        let a = self
            .appservices
            .get_mut(id)
            .expect("send_failed is only called for registered ids");
        a.failed_attempts = a.failed_attempts.saturating_add(1);
        let txn_id = a.txn.as_ref().map_or("?", |t| t.txn_id.as_str()).to_owned();
        if auth {
            let message = format!(
                "the appservice rejected the hs_token ({why}) for txn {txn_id}; check its registration, will retry"
            );
            fx.log(LogLevel::Error, Some(id), &message);
        } else {
            fx.log(
                LogLevel::Warn,
                Some(id),
                &format!("txn {txn_id} failed: {why}; will retry"),
            );
        }
        a.last_error = Some(why);
        if a.phase != Phase::Down {
            a.phase = Phase::Down;
            fx.log(LogLevel::Info, Some(id), "appservice is down");
        }
        let delay = self.schedule_retry(fx, id);
        self.persist_backoff(fx, id, delay);
    }

    /// Persists the DOWN flag, the failure count and when the retry is due, so that a restart
    /// or another plugin instance continues the backoff. A failure is only logged: a start
    /// without it retries at once, which is safe.
    fn persist_backoff(&mut self, fx: &mut impl Effects, id: &str, delay_ms: u64) {
        let now_wall = fx.wall_clock_now_ms();
        let a = self
            .appservices
            .get_mut(id)
            .expect("persist_backoff is only called for registered ids");
        let mut record = a.record.clone();
        record.down = true;
        record.failed_attempts = a.failed_attempts;
        record.retry_at_ms = Some(now_wall.saturating_add(delay_ms));
        match fx.commit(vec![WriteOp::Put(a.keys.meta(), to_json(&record))]) {
            Ok(()) => a.record = record,
            Err(error) => {
                let message = format!("could not persist the backoff: {error}");
                fx.log(LogLevel::Warn, Some(id), &message);
            }
        }
    }

    /// Sets the retry timer after a failure, with backoff and jitter; returns its delay.
    fn schedule_retry(&mut self, fx: &mut impl Effects, id: &str) -> u64 {
        let failures = self.appservices[id].failed_attempts.max(1);
        let delay = backoff_delay_ms(&self.config, failures);
        // `delay * percent / 100` without overflow, for delays up to u64::MAX.
        let percent = u64::from(self.config.retry_jitter_percent);
        let spread = delay / 100 * percent + delay % 100 * percent / 100;
        let random = self.jitter.next();
        let cut = spread.checked_add(1).map_or(random, |range| random % range);
        self.set_timer(fx, id, delay - cut, TimerPurpose::Retry);
        delay - cut
    }

    /// Pauses a queue after a storage error; it is tried again after a growing delay.
    fn pause_for_storage(&mut self, fx: &mut impl Effects, id: &str, why: String) {
        let a = self
            .appservices
            .get_mut(id)
            .expect("pause_for_storage is only called for registered ids");
        a.storage_failures = a.storage_failures.saturating_add(1);
        let doublings = a.storage_failures.saturating_sub(1).min(20);
        let delay = self
            .config
            .storage_retry_delay_ms
            .saturating_mul(1 << doublings)
            .min(self.config.retry_delay_ms_max);
        let message = format!("queue paused by a storage error, retrying in {delay} ms: {why}");
        fx.log(LogLevel::Warn, Some(id), &message);
        a.last_error = Some(why);
        self.set_timer(fx, id, delay, TimerPurpose::Storage);
    }

    fn set_timer(&mut self, fx: &mut impl Effects, id: &str, delay_ms: u64, purpose: TimerPurpose) {
        let now = fx.monotonic_now_ms();
        let timer_id = fx.set_timer(delay_ms);
        let a = self
            .appservices
            .get_mut(id)
            .expect("timers are only set for registered ids");
        if let Some(old) = a.timer.replace(Timer {
            id: timer_id,
            due_ms: now.saturating_add(delay_ms),
            purpose,
        }) {
            self.timers.remove(&old.id);
            fx.cancel_timer(old.id);
        }
        self.timers.insert(timer_id, id.to_owned());
    }

    /// Marks an appservice without backlog UP.
    fn finish_recovery(&mut self, fx: &mut impl Effects, id: &str) {
        let a = self
            .appservices
            .get_mut(id)
            .expect("finish_recovery is only called for registered ids");
        a.phase = Phase::Up;
        a.cap_events = self.config.max_events_per_txn;
        fx.log(LogLevel::Info, Some(id), "appservice is up");
        self.persist_down_flag(fx, id, false);
    }

    /// Persists the DOWN flag. A failure is only logged: the flag is advice for the next start,
    /// which resumes every appservice with a backlog anyway.
    fn persist_down_flag(&mut self, fx: &mut impl Effects, id: &str, down: bool) {
        let a = self
            .appservices
            .get_mut(id)
            .expect("persist_down_flag is only called for registered ids");
        if a.record.down == down {
            return;
        }
        let mut record = a.record.clone();
        record.down = down;
        match fx.commit(vec![WriteOp::Put(a.keys.meta(), to_json(&record))]) {
            Ok(()) => a.record = record,
            Err(error) => {
                let message = format!("could not persist the down flag: {error}");
                fx.log(LogLevel::Warn, Some(id), &message);
            }
        }
    }
}

/// How many chunks one scan reads while a lost record is rebuilt.
const REBUILD_PAGE: u32 = 16;

/// How many chunks one scan reads while a transaction is formed: a transaction of the default
/// 100 events usually spans one or two.
const FORM_PAGE: u32 = 4;

/// How many events of the earlier one-event-per-key layout one commit moves into chunks.
const MIGRATE_PAGE: u32 = 1000;

/// Sets a new record's queue bounds and bytes from the chunks still stored under its keys.
/// When a record is lost but its events are not, they are still delivered (the stored txn
/// first, under its old id) and new events queue behind them instead of below the head, where
/// they would never be sent. The head is the stored transaction's first event, or else the
/// first stored event. For an appservice seen for the first time the queue is empty and the
/// record stays as it is.
fn rebuild_queue_bounds(
    fx: &mut impl Effects,
    keys: &Keys,
    txn: Option<&StoredTxn>,
    record: &mut Record,
) -> Result<(), String> {
    let mut chunks: Vec<(u64, u64, Vec<u64>)> = Vec::new();
    let mut start = keys.chunk(0);
    loop {
        let page = fx
            .scan(&start, &keys.chunk_end(), REBUILD_PAGE)
            .map_err(|e| format!("scanning the queue of a lost record: {e}"))?;
        for (key, value) in &page {
            let Some(seq) = keys.chunk_seq_of(key) else {
                continue;
            };
            let chunk = layout::decode_chunk(value)
                .ok_or_else(|| format!("queued chunk {seq} is truncated in the store"))?;
            let lens = chunk.events.iter().map(|e| e.len() as u64).collect();
            let end = seq
                .checked_add(chunk.events.len() as u64)
                .ok_or_else(|| format!("queued chunk {seq} runs past the last sequence number"))?;
            chunks.push((seq, end, lens));
            start = keys.chunk(end);
        }
        if page.len() < REBUILD_PAGE as usize {
            break;
        }
    }
    let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
        return Ok(());
    };
    record.head = txn.map_or(first.0, |t| t.first.clamp(first.0, last.1));
    record.tail = last.1;
    record.queued_bytes = chunks
        .iter()
        .flat_map(|(seq, _, lens)| {
            lens.iter()
                .enumerate()
                .map(move |(i, len)| (seq + i as u64, *len))
        })
        .filter(|(seq, _)| *seq >= record.head)
        .map(|(_, len)| len)
        .sum();
    Ok(())
}

/// Moves events stored one per key by earlier builds into chunks, a page per commit, and
/// returns how many moved. A chunk never spans the end of the stored transaction, so the
/// chunks it leaves behind once delivered are exactly those of later events.
fn migrate_event_rows(
    fx: &mut impl Effects,
    keys: &Keys,
    txn: Option<&StoredTxn>,
) -> Result<u64, String> {
    let mut moved = 0;
    loop {
        let page = fx
            .scan(&keys.queued(0), &keys.queue_end(), MIGRATE_PAGE)
            .map_err(|e| format!("reading events of an earlier layout: {e}"))?;
        let Some((last_key, _)) = page.last() else {
            return Ok(moved);
        };
        let last = keys
            .seq_of(last_key)
            .ok_or_else(|| format!("unexpected key {last_key} among queued events"))?;
        let mut ops = Vec::new();
        let mut run: Vec<(u64, u64, &[u8])> = Vec::new();
        let flush = |run: &mut Vec<(u64, u64, &[u8])>, ops: &mut Vec<WriteOp>| {
            if let Some(&(first, at, _)) = run.first() {
                let events = run.iter().map(|(_, _, json)| *json).collect::<Vec<_>>();
                ops.push(WriteOp::Put(
                    keys.chunk(first),
                    layout::encode_chunk(at, events.iter().copied()),
                ));
                run.clear();
            }
        };
        for (key, value) in &page {
            let seq = keys
                .seq_of(key)
                .ok_or_else(|| format!("unexpected key {key} among queued events"))?;
            let (at, json) = layout::decode_queued(value)
                .ok_or_else(|| format!("queued event {seq} is truncated in the store"))?;
            let contiguous = run.last().is_some_and(|&(prev, _, _)| prev + 1 == seq);
            let at_txn_end = txn.is_some_and(|t| t.end == seq);
            if !contiguous || at_txn_end {
                flush(&mut run, &mut ops);
            }
            run.push((seq, at, json));
        }
        flush(&mut run, &mut ops);
        ops.push(WriteOp::DeleteRange(keys.queued(0), keys.queued(last + 1)));
        fx.commit(ops)
            .map_err(|e| format!("moving events of an earlier layout into chunks: {e}"))?;
        moved += page.len() as u64;
    }
}

/// A transaction formed from the head of a queue, not yet stored.
struct NextTxn {
    txn: StoredTxn,
    body: Vec<u8>,
}

impl NextTxn {
    /// The transaction of the events `built` from the head of the queue, under the next id of
    /// `record`, which moves past it.
    fn take(record: &mut Record, built: Gathered) -> NextTxn {
        let head = record.head;
        let txn = StoredTxn {
            txn_id: format!("{}.{}", record.epoch, record.next_txn),
            first: head,
            end: head + built.events,
            event_bytes: built.event_bytes,
            first_enqueued_at_ms: built.first_enqueued_at_ms,
            keep_from: Some(built.keep_from),
        };
        // A deliberately broken build for the simulator's tests reuses the id for new content.
        if !cfg!(feature = "fault-reuse-txn-id") {
            record.next_txn += 1;
        }
        NextTxn {
            txn,
            body: built.body,
        }
    }

    /// The write that stores it.
    fn ops(&self, keys: &Keys) -> Vec<WriteOp> {
        vec![WriteOp::Put(keys.txn(), to_json(&self.txn))]
    }
}

/// A transaction body read from the queue.
struct Gathered {
    body: Vec<u8>,
    events: u64,
    event_bytes: u64,
    first_enqueued_at_ms: u64,
    /// The first chunk to keep once these events are delivered.
    keep_from: u64,
}

/// Joins queued events into a transaction body as chunks are fed to it.
struct BodyBuilder {
    from: u64,
    max_events: u64,
    max_body_bytes: usize,
    read: Gathered,
}

impl BodyBuilder {
    const OPEN: &[u8] = b"{\"events\":[";
    const CLOSE: &[u8] = b"]}";

    fn new(from: u64, max_events: u64, max_body_bytes: usize) -> BodyBuilder {
        let mut body = Vec::with_capacity(max_body_bytes.min(64 * 1024));
        body.extend_from_slice(Self::OPEN);
        BodyBuilder {
            from,
            max_events,
            max_body_bytes,
            read: Gathered {
                body,
                events: 0,
                event_bytes: 0,
                first_enqueued_at_ms: 0,
                keep_from: from,
            },
        }
    }

    /// Takes the events it wants from the chunk that starts at `seq`; returns where the next
    /// chunk must start, or `None` when the transaction is complete or `seq` leaves a gap.
    fn feed(&mut self, seq: u64, value: &[u8]) -> Result<Option<u64>, String> {
        let read = &mut self.read;
        let expected = self.from + read.events;
        let chunk = layout::decode_chunk(value)
            .ok_or_else(|| format!("queued chunk {seq} is truncated in the store"))?;
        let end = seq + chunk.events.len() as u64;
        if end <= expected {
            return Ok(Some(end));
        }
        if seq > expected {
            return Ok(None);
        }
        read.keep_from = seq;
        let skip = usize::try_from(expected - seq).unwrap_or(usize::MAX);
        for json in &chunk.events[skip..] {
            let comma = usize::from(read.events > 0);
            let full = read.events == self.max_events
                || (read.events > 0
                    && read.body.len() + comma + json.len() + Self::CLOSE.len()
                        > self.max_body_bytes);
            if full {
                return Ok(None);
            }
            if read.events == 0 {
                read.first_enqueued_at_ms = chunk.enqueued_at_ms;
            } else {
                read.body.push(b',');
            }
            read.body.extend_from_slice(json);
            read.events += 1;
            read.event_bytes += json.len() as u64;
        }
        read.keep_from = end;
        Ok((read.events < self.max_events).then_some(end))
    }

    fn finish(mut self) -> Result<Gathered, String> {
        if self.read.events == 0 {
            return Err(format!(
                "queued event {} is missing from the store",
                self.from
            ));
        }
        self.read.body.extend_from_slice(Self::CLOSE);
        Ok(self.read)
    }
}

/// Joins up to `max_events` of the queued events `queued` of `a` (from the first one on; the
/// range ends where the queue does) into `{"events":[...]}` without parsing them again,
/// stopping before the byte cap (the first event always goes in). No chunk at or past the end
/// of the range is looked up or taken, so a transaction that takes the whole queue reads no
/// further.
/// Chunks come from the cache of recent ones when they are there, else from the store; a scan
/// of the store reads a few chunks at once, and while `a` is not down those that the next
/// transactions will carry go into the cache, so a backlog is read once, a page at a time.
/// Errors when the chunks do not cover `from` or leave a gap, which would mean the store lost
/// events. No chunk before `first_chunk` is read (0 when the caller knows no better; a success
/// knows where the chunks it leaves in the store start).
fn read_queue(
    fx: &mut impl Effects,
    cache: &mut ChunkCache,
    a: &Appservice,
    first_chunk: u64,
    queued: std::ops::Range<u64>,
    max_events: u64,
    max_body_bytes: usize,
) -> Result<Gathered, String> {
    let from = queued.start;
    let mut builder = BodyBuilder::new(from, max_events, max_body_bytes);
    let mut next: Option<u64> = None;
    loop {
        if next.is_some_and(|seq| seq >= queued.end) {
            break;
        }
        let cached = match next {
            None => cache.covering(&a.id, from),
            Some(seq) => cache.get(&a.id, seq).map(|value| (seq, value)),
        };
        if let Some((seq, value)) = cached {
            match builder.feed(seq, value)? {
                Some(end) => {
                    next = Some(end);
                    continue;
                }
                None => break,
            }
        }
        let start = a.keys.chunk(next.unwrap_or(first_chunk));
        let page = fx
            .scan(&start, &a.keys.chunk_end(), FORM_PAGE)
            .map_err(|e| e.to_string())?;
        let last_page = page.len() < FORM_PAGE as usize;
        let mut done = false;
        let mut read = Vec::with_capacity(page.len());
        for (key, value) in page {
            let seq = a
                .keys
                .chunk_seq_of(&key)
                .ok_or_else(|| format!("unexpected key {key} among queued chunks"))?;
            if !done {
                if seq >= queued.end || next.is_some_and(|expected| seq != expected) {
                    done = true;
                } else {
                    match builder.feed(seq, &value)? {
                        Some(end) => next = Some(end),
                        None => done = true,
                    }
                }
            }
            read.push((seq, value));
        }
        if a.phase != Phase::Down {
            for (seq, value) in read {
                if seq + u64::from(layout::chunk_events(&value).unwrap_or(0)) > from {
                    cache.insert(&a.id, seq, value);
                }
            }
        }
        if done || last_page {
            break;
        }
    }
    builder.finish()
}

/// Test builds only: traps, loops forever or exhausts memory when an item asks for it, so hosts
/// can show they contain each.
fn misbehave_on_request(text: &str) {
    if text.contains("\"asched_test_trap\"") {
        panic!("test trap requested by an enqueued item");
    }
    if text.contains("\"asched_test_loop\"") {
        loop {
            std::hint::spin_loop();
        }
    }
    if text.contains("\"asched_test_hog\"") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

/// Checks that an item is one JSON object and returns it without surrounding whitespace.
fn validate_event(json: &str) -> Result<&str, String> {
    let raw: &RawValue = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let text = raw.get();
    // A test build traps on demand, so hosts and simulators can exercise their recovery.
    if cfg!(feature = "test-traps") {
        misbehave_on_request(text);
    }
    if !text.starts_with('{') {
        return Err("a room event must be a JSON object".into());
    }
    Ok(text)
}

/// The status of an appservice's oldest undelivered event, read from the store when no stored
/// transaction holds it.
fn oldest_enqueued_at(fx: &mut impl Effects, a: &Appservice) -> Option<u64> {
    if let Some(txn) = &a.txn {
        return Some(txn.first_enqueued_at_ms);
    }
    if a.record.head == a.record.tail {
        return None;
    }
    let first = fx
        .scan(&a.keys.chunk(0), &a.keys.chunk_end(), 1)
        .ok()?
        .into_iter()
        .next()?;
    layout::decode_chunk(&first.1).map(|chunk| chunk.enqueued_at_ms)
}

/// A failed outcome in words, for logs and status.
fn describe_failure(outcome: &SendOutcome) -> String {
    match outcome {
        SendOutcome::Response { status, .. } => format!("HTTP {status}"),
        SendOutcome::Timeout => "timed out".into(),
        SendOutcome::ConnectFailed(why) => format!("connection failed: {why}"),
        SendOutcome::ConnectionLost(why) => format!("connection lost: {why}"),
    }
}

/// Whether the appservice refused our credentials.
fn is_auth_failure(outcome: &SendOutcome) -> bool {
    matches!(
        outcome,
        SendOutcome::Response {
            status: 401 | 403,
            ..
        }
    )
}

fn read_json<T: serde::de::DeserializeOwned>(
    fx: &mut impl Effects,
    key: &str,
) -> Result<Option<T>, String> {
    let Some(bytes) = fx.get(key).map_err(|e| format!("reading {key}: {e}"))? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("{key} is corrupt: {e}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records are plain structs of strings and numbers")
}
