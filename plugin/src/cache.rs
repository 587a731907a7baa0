//! The most recently enqueued chunks, kept in memory up to a byte limit, so that forming a
//! transaction from events that were just enqueued does not read them back from the store.
//!
//! The store stays the truth: a chunk is cached only after the commit that stored it, it leaves
//! the cache when its events are delivered (or when newer chunks push it out), and a miss reads
//! the store. The limit keeps the plugin's memory flat however long a backlog grows.

use std::collections::{BTreeMap, VecDeque};

use crate::layout::chunk_events;

/// Recent chunks of every appservice, oldest pushed out first.
#[derive(Debug)]
pub struct ChunkCache {
    limit: usize,
    bytes: usize,
    chunks: BTreeMap<(String, u64), Vec<u8>>,
    /// Insertion order, for eviction; may name chunks already removed.
    order: VecDeque<(String, u64)>,
}

impl ChunkCache {
    /// An empty cache that holds at most `limit` bytes of chunks.
    pub fn new(limit: usize) -> ChunkCache {
        ChunkCache {
            limit,
            bytes: 0,
            chunks: BTreeMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keeps the chunk of `appservice` whose first event is `seq`; a chunk larger than the
    /// whole limit is not kept.
    pub fn insert(&mut self, appservice: &str, seq: u64, value: Vec<u8>) {
        if value.len() > self.limit {
            return;
        }
        while self.bytes + value.len() > self.limit {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.chunks.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
        let key = (appservice.to_owned(), seq);
        self.bytes += value.len();
        if let Some(old) = self.chunks.insert(key.clone(), value) {
            self.bytes -= old.len();
        }
        self.order.push_back(key);
        if self.order.len() > 2 * self.chunks.len() + 16 {
            let chunks = &self.chunks;
            self.order.retain(|key| chunks.contains_key(key));
        }
    }

    /// The chunk of `appservice` that starts at `seq`.
    pub fn get(&self, appservice: &str, seq: u64) -> Option<&[u8]> {
        self.chunks
            .get(&(appservice.to_owned(), seq))
            .map(Vec::as_slice)
    }

    /// The chunk of `appservice` that holds event `seq`, with its first sequence number.
    pub fn covering(&self, appservice: &str, seq: u64) -> Option<(u64, &[u8])> {
        let from = (appservice.to_owned(), 0);
        let to = (appservice.to_owned(), seq);
        let ((_, start), value) = self.chunks.range(from..=to).next_back()?;
        let count = chunk_events(value)?;
        (start + u64::from(count) > seq).then_some((*start, value.as_slice()))
    }

    /// Drops the chunks of `appservice` that start before `seq` (their events are delivered).
    pub fn remove_below(&mut self, appservice: &str, seq: u64) {
        let from = (appservice.to_owned(), 0);
        let to = (appservice.to_owned(), seq);
        let doomed: Vec<(String, u64)> = self
            .chunks
            .range(from..to)
            .map(|(k, _)| k.clone())
            .collect();
        for key in doomed {
            if let Some(gone) = self.chunks.remove(&key) {
                self.bytes -= gone.len();
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::encode_chunk;

    fn chunk(events: usize) -> Vec<u8> {
        let event: &[u8] = b"{}";
        encode_chunk(0, std::iter::repeat_n(event, events))
    }

    /// Lookups find the chunk holding an event, only for its own appservice.
    #[test]
    fn covering_finds_the_chunk_holding_an_event() {
        let mut cache = ChunkCache::new(1 << 20);
        cache.insert("a", 0, chunk(3));
        cache.insert("a", 3, chunk(2));
        cache.insert("b", 0, chunk(10));
        assert_eq!(cache.covering("a", 2).map(|(s, _)| s), Some(0));
        assert_eq!(cache.covering("a", 3).map(|(s, _)| s), Some(3));
        assert_eq!(cache.covering("a", 4).map(|(s, _)| s), Some(3));
        assert_eq!(cache.covering("a", 5), None);
        assert_eq!(cache.covering("c", 0), None);
        assert!(cache.get("a", 3).is_some());
        assert!(cache.get("a", 1).is_none());
        cache.remove_below("a", 3);
        assert_eq!(cache.covering("a", 2), None);
        assert_eq!(cache.covering("a", 4).map(|(s, _)| s), Some(3));
        assert_eq!(cache.covering("b", 9).map(|(s, _)| s), Some(0));
        assert_eq!(cache.bytes(), chunk(2).len() + chunk(10).len());
    }

    /// The oldest chunks go first when the limit is reached; the bytes never exceed it.
    #[test]
    fn the_oldest_chunks_are_pushed_out_at_the_limit() {
        let size = chunk(1).len();
        let mut cache = ChunkCache::new(3 * size);
        for seq in 0..10 {
            cache.insert("a", seq, chunk(1));
            assert!(cache.bytes() <= 3 * size);
        }
        assert_eq!(cache.bytes(), 3 * size);
        assert!(cache.get("a", 6).is_none());
        assert!(cache.get("a", 7).is_some() && cache.get("a", 9).is_some());
        cache.insert("a", 10, chunk(100));
        assert!(
            cache.get("a", 10).is_none(),
            "a chunk larger than the limit is not kept"
        );
        assert_eq!(cache.bytes(), 3 * size);
    }
}
