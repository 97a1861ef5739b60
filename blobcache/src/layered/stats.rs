//! Per-level counters and the metrics they mirror: what each level served, missed, failed
//! or got wrong, for `brisk status`, `--stats` and Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

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
