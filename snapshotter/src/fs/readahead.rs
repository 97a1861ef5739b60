//! Read-ahead by chunks for readers that stream through a large file.
//!
//! The kernel reads ahead at most `max_readahead` (128 KiB) at a time, all of it inside one
//! chunk, so a reader streaming a large file waits for each chunk in turn: one round trip per
//! chunk from the registry, one disk read and digest check per chunk from L2, none of them
//! overlapping. Once a reader has read far enough without a jump, the chunks ahead of it are
//! asked for before it reaches them, with a window that doubles each time the reader catches
//! up with half of it. Only the order of reads is watched: files read in pieces here and there
//! (libraries paged in by the loader, most start-up reads) never reach the threshold, so a
//! start fetches nothing it would not have read.

use std::collections::HashMap;
use std::ops::Range;

/// Bytes a reader must read one after another before read-ahead starts.
pub(crate) const START_AFTER: u64 = 4 << 20;
/// The first window, in bytes of the file past the read that started read-ahead.
const FIRST_WINDOW: u64 = 2 << 20;
/// The largest window: enough to keep a fast, distant link busy, small next to L1.
const MAX_WINDOW: u64 = 32 << 20;
/// Files watched at once; past this, watching starts over (a lost stream just restarts).
const MAX_STREAMS: usize = 512;

/// One file's current run of reads.
#[derive(Debug)]
struct Stream {
    /// Where the run started.
    start: u64,
    /// Where the next read continues the run.
    next: u64,
    /// Everything before this offset was asked for already.
    ahead: u64,
    window: u64,
}

impl Stream {
    fn new(offset: u64, end: u64) -> Self {
        Self {
            start: offset,
            next: end,
            ahead: end,
            window: FIRST_WINDOW,
        }
    }
}

/// The runs of reads of one mounted layer's files, by inode.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    by_inode: HashMap<u64, Stream>,
}

impl Streams {
    /// Notes a read of `len` bytes at `offset` of inode `ino`, a file of `size` bytes. Returns
    /// the part of the file to fetch ahead of the reader now, if any.
    pub fn note(&mut self, ino: u64, offset: u64, len: u64, size: u64) -> Option<Range<u64>> {
        let end = offset.saturating_add(len).min(size);
        if size <= START_AFTER || end <= offset {
            return None;
        }
        if self.by_inode.len() >= MAX_STREAMS && !self.by_inode.contains_key(&ino) {
            self.by_inode.clear();
        }
        let s = self
            .by_inode
            .entry(ino)
            .or_insert_with(|| Stream::new(offset, end));
        if offset < s.start || offset > s.next {
            // A jump: a new run starts here.
            *s = Stream::new(offset, end);
            return None;
        }
        if end <= s.next {
            // Inside what the run read already (the kernel asks for a page again).
            return None;
        }
        s.next = end;
        if s.next - s.start < START_AFTER || s.ahead.saturating_sub(end) >= s.window / 2 {
            return None;
        }
        let from = s.ahead.max(end);
        let to = end.saturating_add(s.window).min(size);
        s.window = (s.window * 2).min(MAX_WINDOW);
        (from < to).then(|| {
            s.ahead = to;
            from..to
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 200 << 20;
    const READ: u64 = 128 << 10;

    #[test]
    fn a_sequential_reader_gets_the_file_ahead_of_it_once() {
        let mut streams = Streams::default();
        let mut asked: Vec<Range<u64>> = Vec::new();
        for i in 0..SIZE / READ {
            let end = (i + 1) * READ;
            asked.extend(streams.note(1, i * READ, READ, SIZE));
            let covered = asked.last().map_or(0, |r| r.end);
            if end >= START_AFTER {
                // From the threshold on, the next read was asked for before it is made.
                assert!(covered >= (end + READ).min(SIZE), "at {end}: {covered}");
            } else {
                assert!(asked.is_empty(), "before the threshold: {asked:?}");
            }
        }
        // Windows that join up with no gap or overlap, from the threshold to the end.
        assert_eq!(asked[0], START_AFTER..START_AFTER + FIRST_WINDOW);
        for pair in asked.windows(2) {
            assert_eq!(pair[0].end, pair[1].start, "{asked:?}");
        }
        assert_eq!(asked.last().unwrap().end, SIZE);
        // Windows grow up to the largest, so a long file takes few requests.
        assert!(asked.iter().all(|r| r.end - r.start <= MAX_WINDOW));
        assert!(asked.len() < 20, "{} requests: {asked:?}", asked.len());
    }

    #[test]
    fn scattered_reads_fetch_nothing_ahead() {
        let mut streams = Streams::default();
        // Pages of a large library in the order a loader faults them in: short runs, jumps
        // forward and back.
        let mut at = 0u64;
        for i in 0..2000u64 {
            at = (at + 7 * READ + i * 4096) % (SIZE - READ);
            assert_eq!(streams.note(1, at, READ, SIZE), None, "read {i} at {at}");
        }
        // Small files are never watched.
        for i in 0..100 {
            assert_eq!(streams.note(2, i * READ, READ, START_AFTER), None);
        }
    }

    #[test]
    fn a_jump_starts_a_new_run_and_rereads_do_not_break_one() {
        let mut streams = Streams::default();
        for i in 0..START_AFTER / READ - 1 {
            assert_eq!(streams.note(1, i * READ, READ, SIZE), None);
            // The kernel asking for a page of the run again is not a jump.
            assert_eq!(streams.note(1, i * READ, 4096, SIZE), None);
        }
        let at = START_AFTER - READ;
        assert_eq!(
            streams.note(1, at, READ, SIZE),
            Some(START_AFTER..START_AFTER + FIRST_WINDOW)
        );
        // Far away: the run starts again, and read-ahead waits for a new threshold.
        let far = 100 << 20;
        for i in 0..START_AFTER / READ - 1 {
            assert_eq!(streams.note(1, far + i * READ, READ, SIZE), None);
        }
        assert!(streams
            .note(1, far + START_AFTER - READ, READ, SIZE)
            .is_some());
        // Other files keep their own runs.
        assert_eq!(streams.note(2, 0, READ, SIZE), None);
    }
}
