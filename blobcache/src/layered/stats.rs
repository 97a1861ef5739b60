//! Counters and the metrics they mirror: what each level served, missed, failed or got
//! wrong, and what was fetched from off the host, in all and per layer blob, for
//! `brisk status`, `--stats` and Prometheus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::Role;
use crate::chunk::ChunkRef;
use crate::Digest;

/// Layer blobs whose fetches are counted one by one: a host holds far fewer lazy layers, and
/// a blob past the bound is still counted in the totals.
pub(super) const MAX_BLOBS_COUNTED: usize = 4096;

/// Chunks the origin served while a reader waited, and ahead of any reader (how much of a
/// start prefetch covered), and the compressed bytes each layer blob cost off the host.
#[derive(Default)]
pub(super) struct Counters {
    origin_on_demand: AtomicU64,
    origin_prefetch: AtomicU64,
    /// A std mutex: held only to add to one entry.
    by_blob: Mutex<HashMap<Digest, BlobFetched>>,
}

/// What one layer blob's chunks cost: compressed bytes and chunks fetched from the origin
/// (the registry) and from zone peers, on demand and by prefetch alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlobFetched {
    pub origin_bytes: u64,
    pub origin_chunks: u64,
    pub peer_bytes: u64,
    pub peer_chunks: u64,
}

impl Counters {
    pub(super) fn origin_fetch(&self, on_demand: bool) {
        match on_demand {
            true => &self.origin_on_demand,
            false => &self.origin_prefetch,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn origin_fetches(&self) -> (u64, u64) {
        (
            self.origin_on_demand.load(Ordering::Relaxed),
            self.origin_prefetch.load(Ordering::Relaxed),
        )
    }

    /// Counts `chunk` as fetched from a level with `role` (peer or origin).
    pub(super) fn fetched(&self, chunk: &ChunkRef, role: Role) {
        let bytes = chunk.compressed.end.saturating_sub(chunk.compressed.start);
        let mut by_blob = self.by_blob.lock().expect("not poisoned");
        if by_blob.len() >= MAX_BLOBS_COUNTED && !by_blob.contains_key(&chunk.blob) {
            return;
        }
        let entry = by_blob.entry(chunk.blob).or_default();
        match role {
            Role::Origin => {
                entry.origin_bytes += bytes;
                entry.origin_chunks += 1;
            }
            _ => {
                entry.peer_bytes += bytes;
                entry.peer_chunks += 1;
            }
        }
    }

    pub(super) fn fetched_for(&self, blob: &Digest) -> BlobFetched {
        let by_blob = self.by_blob.lock().expect("not poisoned");
        by_blob.get(blob).copied().unwrap_or_default()
    }

    pub(super) fn forget(&self, blob: &Digest) {
        self.by_blob.lock().expect("not poisoned").remove(blob);
    }
}

#[derive(Default)]
pub(super) struct LevelStats {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    corrupt: AtomicU64,
    timeouts: AtomicU64,
    bytes: AtomicU64,
}

/// A level's counters at one moment, for `--stats` and tests.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LevelReport {
    pub level: &'static str,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub corrupt: u64,
    pub timeouts: u64,
    /// Uncompressed bytes this level served.
    pub bytes: u64,
}

impl LevelStats {
    pub(super) fn hit(&self, level: &'static str, bytes: u64) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!("brisk_cache_hits_total", "level" => level).increment(1);
        metrics::counter!("brisk_cache_bytes_total", "level" => level).increment(bytes);
    }

    pub(super) fn misses(&self, level: &'static str, n: u64) {
        self.misses.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("brisk_cache_misses_total", "level" => level).increment(n);
    }

    pub(super) fn error(&self, level: &'static str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("brisk_cache_errors_total", "level" => level).increment(1);
    }

    pub(super) fn corrupt(&self, level: &'static str) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("brisk_cache_corrupt_total", "level" => level).increment(1);
    }

    pub(super) fn timeout(&self, level: &'static str) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("brisk_cache_timeouts_total", "level" => level).increment(1);
    }

    pub(super) fn latency(&self, level: &'static str, seconds: f64) {
        metrics::histogram!("brisk_cache_latency_seconds", "level" => level).record(seconds);
    }

    pub(super) fn report(&self, level: &'static str) -> LevelReport {
        LevelReport {
            level,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(blob: Digest, len: u64) -> ChunkRef {
        ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(b"chunk"),
            blob,
            compressed: 100..100 + len,
            uncompressed_len: 4 * len,
        }
    }

    #[test]
    fn fetches_are_counted_per_blob_by_compressed_bytes_and_level() {
        let counters = Counters::default();
        let (a, b) = (Digest::sha256(b"a"), Digest::sha256(b"b"));
        counters.fetched(&chunk(a, 10), Role::Origin);
        counters.fetched(&chunk(a, 5), Role::Origin);
        counters.fetched(&chunk(a, 7), Role::Peer);
        counters.fetched(&chunk(b, 3), Role::Origin);
        let expect_a = BlobFetched {
            origin_bytes: 15,
            origin_chunks: 2,
            peer_bytes: 7,
            peer_chunks: 1,
        };
        assert_eq!(counters.fetched_for(&a), expect_a);
        assert_eq!(counters.fetched_for(&b).origin_bytes, 3);
        counters.forget(&a);
        assert_eq!(counters.fetched_for(&a), BlobFetched::default());
        assert_eq!(counters.fetched_for(&b).origin_chunks, 1);
    }

    #[test]
    fn blobs_past_the_bound_are_not_counted_one_by_one() {
        let counters = Counters::default();
        for i in 0..MAX_BLOBS_COUNTED as u32 {
            counters.fetched(&chunk(Digest::sha256(&i.to_le_bytes()), 1), Role::Origin);
        }
        let first = Digest::sha256(&0u32.to_le_bytes());
        let late = Digest::sha256(b"one too many");
        counters.fetched(&chunk(late, 1), Role::Origin);
        assert_eq!(counters.fetched_for(&late), BlobFetched::default());
        // Blobs already counted go on being counted.
        counters.fetched(&chunk(first, 1), Role::Origin);
        assert_eq!(counters.fetched_for(&first).origin_chunks, 2);
        assert_eq!(counters.by_blob.lock().unwrap().len(), MAX_BLOBS_COUNTED);
    }

    #[test]
    fn a_report_is_what_was_counted() {
        let stats = LevelStats::default();
        stats.hit("memory", 10);
        stats.hit("memory", 5);
        stats.misses("memory", 3);
        stats.error("memory");
        stats.corrupt("memory");
        stats.timeout("memory");
        assert_eq!(
            stats.report("memory"),
            LevelReport {
                level: "memory",
                hits: 2,
                misses: 3,
                errors: 1,
                corrupt: 1,
                timeouts: 1,
                bytes: 15,
            }
        );
    }
}
