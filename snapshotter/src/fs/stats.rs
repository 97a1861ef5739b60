//! What a mounted layer's readers asked for and how long they waited: the bytes containers
//! read (and what those bytes weigh compressed, to set against what was fetched), and the time
//! reads spent waiting on zone peers or the registry (the on-demand stall).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use brisk_blobcache::toc::Chunk;
use serde::Serialize;

/// Counters of one mounted layer, shared with `brisk status`. Updated on the FUSE thread (the
/// bytes) and in read tasks (the waits); each update is one relaxed add.
#[derive(Debug, Default)]
pub struct ReadStats {
    reads: AtomicU64,
    bytes: AtomicU64,
    compressed: AtomicU64,
    stalled_reads: AtomicU64,
    stall_micros: AtomicU64,
    /// Open, opendir and flush requests that reached the daemon.
    opens: AtomicU64,
    /// Getxattr and listxattr requests that reached the daemon.
    xattrs: AtomicU64,
}

/// A layer's read counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReadReport {
    /// Reads that reached file content.
    pub reads: u64,
    /// Bytes those reads returned (the kernel's page cache answers repeats without asking).
    pub bytes: u64,
    /// The same bytes weighed as their chunks are compressed: a chunk's compressed size times
    /// the share of it read. What a perfect fetcher would have moved.
    pub compressed: u64,
    /// Reads that waited for a chunk from a zone peer or the registry, and how long they did.
    pub stalled_reads: u64,
    pub stall: Duration,
}

impl ReadReport {
    /// Adds another layer's counters (an image's layers summed).
    pub fn add(&mut self, other: &ReadReport) {
        self.reads += other.reads;
        self.bytes += other.bytes;
        self.compressed += other.compressed;
        self.stalled_reads += other.stalled_reads;
        self.stall += other.stall;
    }
}

impl ReadStats {
    /// Counts a read of `range` of the tar stream, held by `chunks`.
    pub(super) fn read(&self, chunks: &[Chunk], range: &Range<u64>) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(range.end.saturating_sub(range.start), Ordering::Relaxed);
        self.compressed
            .fetch_add(compressed_weight(chunks, range), Ordering::Relaxed);
    }

    /// Counts a read that waited `waited` on the network.
    pub(super) fn stalled(&self, waited: Duration) {
        self.stalled_reads.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.stall_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts an open, opendir or flush request.
    pub(super) fn opened(&self) {
        self.opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Open, opendir and flush requests so far: after the first of each, the kernel answers
    /// them itself.
    pub fn open_requests(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    /// Counts a getxattr or listxattr request.
    pub(super) fn asked_xattr(&self) {
        self.xattrs.fetch_add(1, Ordering::Relaxed);
    }

    /// Getxattr and listxattr requests so far.
    pub fn xattr_requests(&self) -> u64 {
        self.xattrs.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> ReadReport {
        ReadReport {
            reads: self.reads.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            compressed: self.compressed.load(Ordering::Relaxed),
            stalled_reads: self.stalled_reads.load(Ordering::Relaxed),
            stall: Duration::from_micros(self.stall_micros.load(Ordering::Relaxed)),
        }
    }
}

/// The compressed bytes `range` of the tar stream weighs: each chunk holding part of it
/// counts its compressed size in proportion to the part read.
fn compressed_weight(chunks: &[Chunk], range: &Range<u64>) -> u64 {
    chunks
        .iter()
        .map(|c| {
            let lo = range.start.max(c.tar_offset);
            let hi = range.end.min(c.tar_offset.saturating_add(c.tar_size));
            let read = hi.saturating_sub(lo);
            if c.tar_size == 0 {
                return 0;
            }
            // u128: a chunk's sizes are bounded by the TOC limits, but their product need not
            // fit in a u64.
            (u128::from(read) * u128::from(c.size) / u128::from(c.tar_size)) as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_blobcache::Digest;

    fn chunk(tar_offset: u64, tar_size: u64, size: u64) -> Chunk {
        Chunk {
            codec: Default::default(),
            offset: 0,
            size,
            tar_offset,
            tar_size,
            digest: Digest::sha256(b"c"),
        }
    }

    #[test]
    fn a_read_weighs_its_share_of_each_chunk_compressed() {
        // Two chunks of 1000 tar bytes, compressed to 100 and 500.
        let chunks = [chunk(0, 1000, 100), chunk(1000, 1000, 500)];
        assert_eq!(compressed_weight(&chunks[..1], &(0..1000)), 100);
        assert_eq!(compressed_weight(&chunks[..1], &(250..750)), 50);
        // Across the boundary: a tenth of the first, a fifth of the second.
        assert_eq!(compressed_weight(&chunks, &(900..1200)), 10 + 100);
        assert_eq!(compressed_weight(&[chunk(0, 0, 9)], &(0..0)), 0);
    }

    #[test]
    fn a_report_is_what_was_counted() {
        let stats = ReadStats::default();
        let chunks = [chunk(0, 1000, 100)];
        stats.read(&chunks, &(0..500));
        stats.read(&chunks, &(500..600));
        stats.stalled(Duration::from_millis(30));
        let mut r = stats.report();
        assert_eq!(
            r,
            ReadReport {
                reads: 2,
                bytes: 600,
                compressed: 60,
                stalled_reads: 1,
                stall: Duration::from_millis(30),
            }
        );
        r.add(&stats.report());
        assert_eq!(
            (r.reads, r.bytes, r.stall),
            (4, 1200, Duration::from_millis(60))
        );
    }
}
