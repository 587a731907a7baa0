//! The WIT bindings: exports call into [`Scheduler`], imports implement [`Effects`].

use std::cell::RefCell;

use crate::effects::{Effects, LogLevel, SendOutcome, StoreError, WriteOp};
use crate::scheduler::{
    self, Config, EnqueueBatch, EnqueueError, InFlightSend, Item, Phase, Scheduler,
};

#[cfg(not(feature = "test-wrong-version"))]
wit_bindgen::generate!({ path: "../wit", world: "plugin" });

// A test build against another version of the contract, which hosts must refuse.
#[cfg(feature = "test-wrong-version")]
wit_bindgen::generate!({ path: env!("ASCHED_WRONG_VERSION_WIT"), world: "plugin" });

use asched::scheduler::{clock, http_send, log, random, store, timer, types};
use exports::asched::scheduler::scheduler as api;

// The component's one instance of the state machine; the component model runs one call at a
// time, so a thread-local cell is enough.
thread_local! {
    static SCHEDULER: RefCell<Option<Scheduler>> = const { RefCell::new(None) };
}

/// Test builds only: counts this instance's calls and traps on every call after the 25th.
fn count_call() {
    if cfg!(feature = "test-trap-after-n") {
        thread_local! {
            static CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let calls = CALLS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        assert!(
            calls <= 25,
            "test build: trapping on call {calls}, every call after the 25th"
        );
    }
}

/// Runs `f` on the started scheduler.
///
/// Calling an export before `start` is a host bug, so it traps.
fn with_scheduler<R>(f: impl FnOnce(&mut Scheduler, &mut Imports) -> R) -> R {
    count_call();
    SCHEDULER.with_borrow_mut(|s| {
        let scheduler = s
            .as_mut()
            .expect("the host must call start before any other export");
        f(scheduler, &mut Imports)
    })
}

/// [`Effects`] through the WIT imports.
struct Imports;

fn store_error(error: store::StoreError) -> StoreError {
    match error {
        store::StoreError::Unavailable(why) => StoreError::Unavailable(why),
        store::StoreError::Failed(why) => StoreError::Failed(why),
    }
}

impl Effects for Imports {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        store::get(key).map_err(store_error)
    }

    fn scan(
        &mut self,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let range = store::KeyRange {
            start: start.to_owned(),
            end: end.to_owned(),
        };
        let entries = store::scan(&range, limit).map_err(store_error)?;
        Ok(entries.into_iter().map(|e| (e.key, e.value)).collect())
    }

    fn commit(&mut self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let ops: Vec<store::WriteOp> = ops
            .into_iter()
            .map(|op| match op {
                WriteOp::Put(key, value) => store::WriteOp::Put(store::Entry { key, value }),
                WriteOp::Delete(key) => store::WriteOp::Delete(key),
                WriteOp::DeleteRange(start, end) => {
                    store::WriteOp::DeleteRange(store::KeyRange { start, end })
                }
            })
            .collect();
        store::commit(&ops).map_err(store_error)
    }

    fn start_send(&mut self, appservice: &str, txn_id: &str, body: &[u8]) -> Result<u64, String> {
        http_send::start_send(appservice, txn_id, body).map_err(|refused| match refused {
            http_send::SendRefused::UnknownAppservice => "unknown appservice".to_owned(),
            http_send::SendRefused::Other(why) => why,
        })
    }

    fn set_timer(&mut self, delay_ms: u64) -> u64 {
        timer::set_timer(delay_ms)
    }

    fn cancel_timer(&mut self, id: u64) {
        timer::cancel_timer(id);
    }

    fn monotonic_now_ms(&mut self) -> u64 {
        clock::monotonic_now_ms()
    }

    fn wall_clock_now_ms(&mut self) -> u64 {
        clock::wall_clock_now_ms()
    }

    fn random_u64(&mut self) -> u64 {
        random::random_u64()
    }

    fn log(&mut self, level: LogLevel, appservice: Option<&str>, message: &str) {
        let level = match level {
            LogLevel::Debug => types::LogLevel::Debug,
            LogLevel::Info => types::LogLevel::Info,
            LogLevel::Warn => types::LogLevel::Warn,
            LogLevel::Error => types::LogLevel::Error,
        };
        log::log(level, appservice, message);
    }
}

fn enqueue_error(error: EnqueueError) -> api::EnqueueError {
    match error {
        EnqueueError::UnknownAppservice(id) => api::EnqueueError::UnknownAppservice(id),
        EnqueueError::InvalidItem(index, why) => api::EnqueueError::InvalidItem((index, why)),
        EnqueueError::Storage(why) => api::EnqueueError::Storage(why),
    }
}

struct Component;

impl api::Guest for Component {
    fn start(
        config: api::Config,
        appservices: Vec<String>,
        in_flight: Vec<api::InFlightSend>,
    ) -> Result<(), api::StartError> {
        count_call();
        // A test build that reaches for the filesystem, which hosts must refuse to link.
        #[cfg(feature = "test-imports-fs")]
        let _ = std::fs::metadata("/");
        let config = Config {
            max_events_per_txn: config.max_events_per_txn,
            max_txn_body_bytes: config.max_txn_body_bytes,
            retry_delay_ms_initial: config.retry_delay_ms_initial,
            retry_delay_ms_max: config.retry_delay_ms_max,
            retry_jitter_percent: config.retry_jitter_percent,
            storage_retry_delay_ms: config.storage_retry_delay_ms,
        };
        let in_flight: Vec<InFlightSend> = in_flight
            .into_iter()
            .map(|s| InFlightSend {
                id: s.id,
                appservice: s.appservice,
                txn_id: s.txn_id,
            })
            .collect();
        let scheduler = Scheduler::start(&mut Imports, config, &appservices, &in_flight).map_err(
            |e| match e {
                scheduler::StartError::Storage(why) => api::StartError::Storage(why),
                scheduler::StartError::InvalidConfig(why) => api::StartError::InvalidConfig(why),
            },
        )?;
        SCHEDULER.with_borrow_mut(|s| *s = Some(scheduler));
        Ok(())
    }

    fn enqueue(batches: Vec<api::EnqueueBatch>) -> Vec<Result<u32, api::EnqueueError>> {
        let batches: Vec<EnqueueBatch> = batches
            .into_iter()
            .map(|b| EnqueueBatch {
                appservice: b.appservice,
                items: b
                    .items
                    .into_iter()
                    .map(|api::Item::RoomEvent(json)| Item::RoomEvent(json))
                    .collect(),
            })
            .collect();
        with_scheduler(|s, fx| s.enqueue(fx, &batches))
            .into_iter()
            .map(|r| r.map_err(enqueue_error))
            .collect()
    }

    fn send_finished(id: u64, outcome: api::SendOutcome) {
        let outcome = match outcome {
            api::SendOutcome::Response(r) => SendOutcome::Response {
                status: r.status,
                body_is_json: r.body_is_json,
            },
            api::SendOutcome::Timeout => SendOutcome::Timeout,
            api::SendOutcome::ConnectFailed(why) => SendOutcome::ConnectFailed(why),
            api::SendOutcome::ConnectionLost(why) => SendOutcome::ConnectionLost(why),
        };
        with_scheduler(|s, fx| s.send_finished(fx, id, &outcome));
    }

    fn timer_fired(id: u64) {
        with_scheduler(|s, fx| s.timer_fired(fx, id));
    }

    fn tick() {
        with_scheduler(|s, fx| s.tick(fx));
    }

    fn force_retry(appservice: String) -> Result<(), api::EnqueueError> {
        with_scheduler(|s, fx| s.force_retry(fx, &appservice)).map_err(enqueue_error)
    }

    fn status() -> Vec<api::AppserviceStatus> {
        with_scheduler(|s, fx| s.status(fx))
            .into_iter()
            .map(|st| api::AppserviceStatus {
                appservice: st.appservice,
                state: match st.phase {
                    Phase::Up => api::AppserviceState::Up,
                    Phase::Down => api::AppserviceState::Down,
                    Phase::Recovering => api::AppserviceState::Recovering,
                },
                backlog_txns: st.backlog_txns,
                backlog_events: st.backlog_events,
                backlog_bytes: st.backlog_bytes,
                oldest_enqueued_at_ms: st.oldest_enqueued_at_ms,
                current_txn_id: st.current_txn_id,
                in_flight: st.in_flight,
                failed_attempts: st.failed_attempts,
                last_error: st.last_error,
                next_retry_in_ms: st.next_retry_in_ms,
                paused_by_storage: st.paused_by_storage,
                delivered_txns: st.delivered_txns,
                delivered_events: st.delivered_events,
            })
            .collect()
    }
}

export!(Component);
