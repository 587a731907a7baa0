//! The scheduler core alone, compiled natively and as the component under wasmtime, driven
//! through the same workload against the same in-memory world (an ordered map for the store,
//! sends answered 200 at once, no timers), so the difference between the two is the cost of
//! running the core as a sandboxed component: the copies across the boundary and wasm code.

use std::collections::BTreeMap;

use asched_host::runtime::{
    Plugin, PluginImports, api, clock, http_send, log, plugin_linker, random, store, timer, types,
};
use asched_plugin::{Effects, LogLevel, SendOutcome, StoreError, WriteOp};
use wasmtime::Store;
use wasmtime::component::{Component, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::thread_cpu_ns;

/// The world both builds act on.
#[derive(Default)]
pub struct World {
    kv: BTreeMap<String, Vec<u8>>,
    next_handle: u64,
    /// Sends started and not yet answered.
    sent: Vec<u64>,
    clock_ms: u64,
}

impl World {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.kv.get(key).cloned()
    }

    fn scan(&self, start: &str, end: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        if start >= end {
            return Vec::new();
        }
        self.kv
            .range(start.to_owned()..end.to_owned())
            .take(limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn put(&mut self, key: String, value: Vec<u8>) {
        self.kv.insert(key, value);
    }

    fn delete(&mut self, key: &str) {
        self.kv.remove(key);
    }

    fn delete_range(&mut self, start: &str, end: &str) {
        if start >= end {
            return;
        }
        let doomed: Vec<String> = self
            .kv
            .range(start.to_owned()..end.to_owned())
            .map(|(k, _)| k.clone())
            .collect();
        for key in doomed {
            self.kv.remove(&key);
        }
    }

    fn send(&mut self) -> u64 {
        self.next_handle += 1;
        self.sent.push(self.next_handle);
        self.next_handle
    }
}

impl Effects for World {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(World::get(self, key))
    }

    fn scan(
        &mut self,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(World::scan(self, start, end, limit))
    }

    fn commit(&mut self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        for op in ops {
            match op {
                WriteOp::Put(k, v) => self.put(k, v),
                WriteOp::Delete(k) => self.delete(&k),
                WriteOp::DeleteRange(s, e) => self.delete_range(&s, &e),
            }
        }
        Ok(())
    }

    fn start_send(&mut self, _: &str, _: &str, _: &[u8]) -> Result<u64, String> {
        Ok(self.send())
    }

    fn set_timer(&mut self, _: u64) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn cancel_timer(&mut self, _: u64) {}

    fn monotonic_now_ms(&mut self) -> u64 {
        self.clock_ms
    }

    fn wall_clock_now_ms(&mut self) -> u64 {
        1_764_000_000_000 + self.clock_ms
    }

    fn random_u64(&mut self) -> u64 {
        0x5eed
    }

    fn log(&mut self, _: LogLevel, _: Option<&str>, _: &str) {}
}

/// The data of the wasmtime store for the component build.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    world: World,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginImports for State {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl types::Host for State {}

impl store::Host for State {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, store::StoreError> {
        Ok(self.world.get(&key))
    }

    fn scan(
        &mut self,
        range: store::KeyRange,
        limit: u32,
    ) -> Result<Vec<store::Entry>, store::StoreError> {
        let entries = self.world.scan(&range.start, &range.end, limit);
        Ok(entries
            .into_iter()
            .map(|(key, value)| store::Entry { key, value })
            .collect())
    }

    fn commit(&mut self, ops: Vec<store::WriteOp>) -> Result<(), store::StoreError> {
        for op in ops {
            match op {
                store::WriteOp::Put(e) => self.world.put(e.key, e.value),
                store::WriteOp::Delete(k) => self.world.delete(&k),
                store::WriteOp::DeleteRange(r) => self.world.delete_range(&r.start, &r.end),
            }
        }
        Ok(())
    }
}

impl http_send::Host for State {
    fn start_send(
        &mut self,
        _: String,
        _: String,
        _: Vec<u8>,
    ) -> Result<u64, http_send::SendRefused> {
        Ok(self.world.send())
    }
}

impl timer::Host for State {
    fn set_timer(&mut self, _: u64) -> u64 {
        self.world.next_handle += 1;
        self.world.next_handle
    }

    fn cancel_timer(&mut self, _: u64) {}
}

impl clock::Host for State {
    fn monotonic_now_ms(&mut self) -> u64 {
        self.world.clock_ms
    }

    fn wall_clock_now_ms(&mut self) -> u64 {
        1_764_000_000_000 + self.world.clock_ms
    }
}

impl random::Host for State {
    fn random_u64(&mut self) -> u64 {
        0x5eed
    }
}

impl log::Host for State {
    fn log(&mut self, _: types::LogLevel, _: Option<String>, _: String) {}
}

const APPSERVICE: &str = "bench";

/// The scheduler's defaults: 100 events per transaction.
fn config() -> asched_plugin::Config {
    asched_plugin::Config::default()
}

/// CPU ns per event for `events` (enqueued `batch` at a time, each batch answered at once),
/// natively.
pub fn native(events: &[String], batch: usize) -> f64 {
    let mut world = World::default();
    let ids = [APPSERVICE.to_owned()];
    let mut scheduler =
        asched_plugin::Scheduler::start(&mut world, config(), &ids, &[]).expect("the core starts");
    let batches: Vec<asched_plugin::EnqueueBatch> = events
        .chunks(batch)
        .map(|chunk| asched_plugin::EnqueueBatch {
            appservice: APPSERVICE.to_owned(),
            items: chunk
                .iter()
                .cloned()
                .map(asched_plugin::Item::RoomEvent)
                .collect(),
        })
        .collect();
    let ok = SendOutcome::Response {
        status: 200,
        body_is_json: true,
    };
    let started = thread_cpu_ns();
    for b in batches {
        let results = scheduler.enqueue(&mut world, std::slice::from_ref(&b));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        while let Some(id) = world.sent.pop() {
            scheduler.send_finished(&mut world, id, &ok);
        }
    }
    let cpu = thread_cpu_ns() - started;
    let delivered: u64 = scheduler
        .status(&mut world)
        .iter()
        .map(|s| s.delivered_events)
        .sum();
    assert_eq!(
        delivered,
        events.len() as u64,
        "the native core delivered every event"
    );
    cpu as f64 / events.len() as f64
}

/// The same as [`native`], with the bundled component under wasmtime.
pub fn component(events: &[String], batch: usize) -> f64 {
    // The host's engine configuration (epoch interruption on, so the code carries the same
    // deadline checks as in the host).
    let engine = asched_host::runtime::new_engine().expect("the engine starts");
    let component = Component::new(&engine, asched_host::engine::EMBEDDED_PLUGIN)
        .expect("the bundled plugin compiles");
    let linker = plugin_linker::<State>(&engine).expect("the linker is complete");
    let state = State {
        wasi: WasiCtx::builder().build(),
        table: ResourceTable::new(),
        world: World::default(),
    };
    let mut store = Store::new(&engine, state);
    store.set_epoch_deadline(1 << 40);
    let plugin = Plugin::instantiate(&mut store, &component, &linker).expect("it instantiates");
    let guest = plugin.asched_scheduler_scheduler();
    let config = api::Config {
        max_events_per_txn: 100,
        max_txn_body_bytes: asched_plugin::scheduler::DEFAULT_MAX_TXN_BODY_BYTES,
        retry_delay_ms_initial: 2_000,
        retry_delay_ms_max: 512_000,
        retry_jitter_percent: 20,
        storage_retry_delay_ms: 1_000,
    };
    guest
        .call_start(&mut store, config, &[APPSERVICE.to_owned()], &[])
        .expect("no trap")
        .expect("the component starts");
    let batches: Vec<api::EnqueueBatch> = events
        .chunks(batch)
        .map(|chunk| api::EnqueueBatch {
            appservice: APPSERVICE.to_owned(),
            items: chunk.iter().cloned().map(api::Item::RoomEvent).collect(),
        })
        .collect();
    let ok = api::SendOutcome::Response(api::Response {
        status: 200,
        body_is_json: true,
    });
    let started = thread_cpu_ns();
    for b in batches {
        let results = guest
            .call_enqueue(&mut store, std::slice::from_ref(&b))
            .expect("no trap");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        while let Some(id) = store.data_mut().world.sent.pop() {
            guest
                .call_send_finished(&mut store, id, &ok)
                .expect("no trap");
        }
    }
    let cpu = thread_cpu_ns() - started;
    let delivered: u64 = guest
        .call_status(&mut store)
        .expect("no trap")
        .iter()
        .map(|s| s.delivered_events)
        .sum();
    assert_eq!(
        delivered,
        events.len() as u64,
        "the component delivered every event"
    );
    cpu as f64 / events.len() as f64
}

/// The lowest CPU ns per event of `tries` alternating runs of [`native`] and [`component`].
pub fn best_of(events: &[String], tries: usize) -> (f64, f64) {
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..tries {
        best.0 = best.0.min(native(events, 100));
        best.1 = best.1.min(component(events, 100));
    }
    best
}
