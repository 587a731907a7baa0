//! How the scheduler lays its state out in the host's key-value store.
//!
//! Every appservice owns the keys under `as/{id}/`, where `{id}` has `%` and `/` percent-encoded
//! so that no appservice's keys can fall inside another's range:
//!
//! | key | value |
//! |---|---|
//! | `as/{id}/meta` | [`Record`] as JSON: txn-id epoch and counter, DOWN flag and backoff, queue bounds |
//! | `as/{id}/c/{seq}` | a chunk: the undelivered events `seq ..` of one enqueued batch (see [`encode_chunk`]) |
//! | `as/{id}/txn` | [`StoredTxn`] as JSON: the transaction being sent or retried |
//!
//! `{seq}` is 16 lowercase hex digits, so key order is enqueue order. Events are stored a batch
//! per key, not one per key: a batch of a hundred events costs the store one row to write and
//! one to delete, which is most of what makes a durable commit cheap per event. Chunks cover
//! `head..tail` without gaps; the first one may be partly delivered (its events before `head`).
//!
//! A transaction's body is not stored: it is the join of its events, which stay in their chunks
//! until it is delivered, so a resend rebuilds the same bytes. Stores written by earlier builds
//! have one event per `as/{id}/q/{seq}` key (8 bytes of enqueue time, then the JSON) and may
//! hold `as/{id}/txn-body`; the scheduler moves such events into chunks at start and sends such
//! a body as stored.

use serde::{Deserialize, Serialize};

/// What is persisted about one appservice besides its events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Random text that prefixes every txn id of this appservice. A new record (a reset store,
    /// a lost record) gets a new epoch, so ids never repeat even when the counter starts again.
    pub epoch: String,
    /// The counter of the next transaction id.
    pub next_txn: u64,
    /// Whether the appservice is DOWN (or recovering) rather than UP.
    pub down: bool,
    /// Sequence number of the oldest undelivered event.
    pub head: u64,
    /// Sequence number the next enqueued event gets. Events `head..tail` are undelivered.
    pub tail: u64,
    /// Total JSON bytes of the undelivered events.
    pub queued_bytes: u64,
    /// Failed attempts since the last success, so the backoff continues after a restart.
    #[serde(default)]
    pub failed_attempts: u32,
    /// When the next retry of a DOWN appservice is due, in ms since the Unix epoch, so a
    /// restart or a new plugin instance keeps the backoff instead of retrying at once.
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
}

impl Record {
    /// A record for an appservice seen for the first time.
    pub fn new(epoch: String) -> Self {
        Record {
            epoch,
            next_txn: 1,
            down: false,
            head: 0,
            tail: 0,
            queued_bytes: 0,
            failed_attempts: 0,
            retry_at_ms: None,
        }
    }
}

/// A transaction whose id and body are fixed: it was sent, or is about to be, and every retry
/// sends exactly these bytes under this id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTxn {
    /// The transaction id, `{epoch}.{counter}`.
    pub txn_id: String,
    /// Sequence number of its first event.
    pub first: u64,
    /// Sequence number after its last event.
    pub end: u64,
    /// JSON bytes of its events.
    pub event_bytes: u64,
    /// When its first event was enqueued, in ms since the Unix epoch.
    pub first_enqueued_at_ms: u64,
    /// The first chunk to keep once it is delivered: the chunk holding event `end`, or `end`
    /// itself when that starts a chunk. Absent in transactions of earlier builds, whose events
    /// are moved into chunks that end at `end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_from: Option<u64>,
}

impl StoredTxn {
    /// How many events it carries.
    pub fn events(&self) -> u64 {
        self.end - self.first
    }

    /// The first chunk that outlives its delivery.
    pub fn keep_from(&self) -> u64 {
        self.keep_from.unwrap_or(self.end)
    }
}

/// Length of the enqueue-time header in front of each queued event.
pub const QUEUED_HEADER_BYTES: usize = 8;

/// The keys of one appservice.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of appservice `id`.
    pub fn new(id: &str) -> Self {
        let mut prefix = String::with_capacity(id.len() + 4);
        prefix.push_str("as/");
        for c in id.chars() {
            match c {
                '%' => prefix.push_str("%25"),
                '/' => prefix.push_str("%2F"),
                c => prefix.push(c),
            }
        }
        prefix.push('/');
        Keys { prefix }
    }

    /// The key of the [`Record`].
    pub fn meta(&self) -> String {
        format!("{}meta", self.prefix)
    }

    /// The key of the [`StoredTxn`].
    pub fn txn(&self) -> String {
        format!("{}txn", self.prefix)
    }

    /// The key of the stored transaction's body.
    pub fn txn_body(&self) -> String {
        format!("{}txn-body", self.prefix)
    }

    /// The key of the chunk whose first event is `seq`.
    pub fn chunk(&self, seq: u64) -> String {
        format!("{}c/{seq:016x}", self.prefix)
    }

    /// The key after every chunk (`'0'` follows `'/'`).
    pub fn chunk_end(&self) -> String {
        format!("{}c0", self.prefix)
    }

    /// The first sequence number of a chunk's key, if the key is one.
    pub fn chunk_seq_of(&self, key: &str) -> Option<u64> {
        self.seq_after(key, "c/")
    }

    /// The sequence number in a key `{prefix}{kind}{16 hex digits}`.
    fn seq_after(&self, key: &str, kind: &str) -> Option<u64> {
        let hex = key.strip_prefix(&self.prefix)?.strip_prefix(kind)?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }

    /// The key of queued event `seq` in the layout of earlier builds.
    pub fn queued(&self, seq: u64) -> String {
        format!("{}q/{seq:016x}", self.prefix)
    }

    /// The key after every queued event of earlier builds (`'0'` follows `'/'`).
    pub fn queue_end(&self) -> String {
        format!("{}q0", self.prefix)
    }

    /// The sequence number in a queued event's key, if the key is one.
    pub fn seq_of(&self, key: &str) -> Option<u64> {
        self.seq_after(key, "q/")
    }
}

/// Length of a chunk's header: enqueue time (u64) and event count (u32), little endian.
pub const CHUNK_HEADER_BYTES: usize = 12;

/// A chunk's value: the enqueue time of its batch (ms since the Unix epoch) and the number of
/// events, then each event as its length (u32, little endian) and its JSON.
pub fn encode_chunk<'a>(
    enqueued_at_ms: u64,
    events: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
) -> Vec<u8> {
    let count = u32::try_from(events.len()).expect("a batch has fewer than 2^32 events");
    let bytes: usize = events.clone().map(|e| e.len() + 4).sum();
    let mut value = Vec::with_capacity(CHUNK_HEADER_BYTES + bytes);
    value.extend_from_slice(&enqueued_at_ms.to_le_bytes());
    value.extend_from_slice(&count.to_le_bytes());
    for event in events {
        let len = u32::try_from(event.len()).expect("an event is smaller than 4 GiB");
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(event);
    }
    value
}

/// The number of events a chunk's header announces, without reading the events.
pub fn chunk_events(value: &[u8]) -> Option<u32> {
    let count = value.get(8..CHUNK_HEADER_BYTES)?;
    Some(u32::from_le_bytes(count.try_into().ok()?))
}

/// A chunk read back: its enqueue time and its events' JSON, in order.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// When its batch was enqueued, in ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// The events' JSON.
    pub events: Vec<&'a [u8]>,
}

/// Splits a chunk's value; `None` when it is truncated or malformed.
pub fn decode_chunk(value: &[u8]) -> Option<Chunk<'_>> {
    let header = value.get(..CHUNK_HEADER_BYTES)?;
    let enqueued_at_ms = u64::from_le_bytes(header[..8].try_into().ok()?);
    let count = u32::from_le_bytes(header[8..].try_into().ok()?) as usize;
    let mut rest = &value[CHUNK_HEADER_BYTES..];
    let mut events = Vec::with_capacity(count.min(rest.len() / 4));
    for _ in 0..count {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let event = rest.get(4..4 + len)?;
        events.push(event);
        rest = &rest[4 + len..];
    }
    rest.is_empty().then_some(Chunk {
        enqueued_at_ms,
        events,
    })
}

/// Prepends the enqueue-time header to an event's JSON (the layout of earlier builds).
pub fn encode_queued(enqueued_at_ms: u64, json: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(QUEUED_HEADER_BYTES + json.len());
    value.extend_from_slice(&enqueued_at_ms.to_le_bytes());
    value.extend_from_slice(json.as_bytes());
    value
}

/// Splits a queued value into its enqueue time and JSON bytes.
pub fn decode_queued(value: &[u8]) -> Option<(u64, &[u8])> {
    if value.len() < QUEUED_HEADER_BYTES {
        return None;
    }
    let (header, json) = value.split_at(QUEUED_HEADER_BYTES);
    let enqueued_at_ms = u64::from_le_bytes(header.try_into().ok()?);
    Some((enqueued_at_ms, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids with `/` or `%` must not produce keys inside another appservice's range.
    #[test]
    fn ids_with_separators_get_disjoint_prefixes() {
        let a = Keys::new("a");
        let b = Keys::new("a/q");
        assert_eq!(a.queued(1), "as/a/q/0000000000000001");
        assert_eq!(b.meta(), "as/a%2Fq/meta");
        assert_eq!(Keys::new("50%").meta(), "as/50%25/meta");
        assert!(!(a.queued(0) <= b.meta() && b.meta() < a.queue_end()));
    }

    /// Queue keys sort in sequence order and parse back.
    #[test]
    fn queue_keys_sort_by_sequence_and_parse_back() {
        let k = Keys::new("bridge");
        assert!(k.queued(9) < k.queued(10));
        assert!(k.queued(u64::MAX) < k.queue_end());
        assert_eq!(k.seq_of(&k.queued(0xabc)), Some(0xabc));
        assert_eq!(k.seq_of(&k.meta()), None);
    }

    /// Chunk keys sort by sequence, stay inside the appservice's range and parse back.
    #[test]
    fn chunk_keys_sort_by_sequence_and_parse_back() {
        let k = Keys::new("bridge");
        assert_eq!(k.chunk(0x1f), "as/bridge/c/000000000000001f");
        assert!(k.chunk(9) < k.chunk(10));
        assert!(k.chunk(u64::MAX) < k.chunk_end());
        assert_eq!(k.chunk_seq_of(&k.chunk(0xabc)), Some(0xabc));
        assert_eq!(k.chunk_seq_of(&k.queued(0xabc)), None);
        assert_eq!(k.chunk_seq_of(&k.meta()), None);
        assert!(!(k.chunk(0) <= k.meta() && k.meta() < k.chunk_end()));
        assert!(!(k.chunk(0) <= k.txn() && k.txn() < k.chunk_end()));
    }

    /// A chunk round-trips; a truncated or padded one is refused.
    #[test]
    fn chunk_round_trips_and_damage_is_detected() {
        let events: [&[u8]; 3] = [b"{\"a\":1}", b"{}", b"{\"b\":\"two\"}"];
        let value = encode_chunk(1_700_000_000_123, events.iter().copied());
        assert_eq!(value.len(), CHUNK_HEADER_BYTES + 3 * 4 + 7 + 2 + 11);
        assert_eq!(
            decode_chunk(&value),
            Some(Chunk {
                enqueued_at_ms: 1_700_000_000_123,
                events: events.to_vec(),
            })
        );
        assert_eq!(decode_chunk(&value[..value.len() - 1]), None);
        let mut padded = value.clone();
        padded.push(b' ');
        assert_eq!(decode_chunk(&padded), None);
        assert_eq!(decode_chunk(&value[..5]), None);
    }

    /// The enqueue-time header round-trips.
    #[test]
    fn queued_value_round_trips() {
        let v = encode_queued(1_700_000_000_123, "{\"a\":1}");
        assert_eq!(
            decode_queued(&v),
            Some((1_700_000_000_123, &b"{\"a\":1}"[..]))
        );
        assert_eq!(decode_queued(b"short"), None);
    }
}
