//! The trace format: for one image (by manifest digest), the chunks its start read, in
//! first-touch order, with the time of the first touch. Small, versioned JSON.

use std::collections::HashSet;

use brisk_blobcache::Digest;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const TRACE_VERSION: u32 = 1;

/// Media type of a trace blob (and the artifact type of its manifest in a registry).
pub const MEDIA_TYPE: &str = "application/vnd.brisk.trace.v1+json";

/// A trace larger than this is refused rather than parsed.
pub const MAX_TRACE_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub version: u32,
    /// Manifest digest of the image the trace belongs to.
    pub image: Digest,
    /// How many recorded starts were merged into this trace.
    pub starts: u32,
    pub entries: Vec<TraceEntry>,
    /// Every file the start read, in first-read order (several files can share a chunk, so
    /// this is more than the chunk entries' paths).
    #[serde(default)]
    pub files: Vec<FileTouch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTouch {
    pub path: String,
    pub at_ms: u64,
    /// The byte ranges of the file the start read (`[start, end)`, sorted, neighbours closer
    /// than [`RANGE_GAP`] joined). Empty in traces from before ranges were recorded: then the
    /// whole file counts as read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<[u64; 2]>,
}

/// Read ranges of one file closer than this are kept as one: finer detail would only cost
/// chunks that are too small to be worth a request of their own.
pub const RANGE_GAP: u64 = 64 * 1024;

impl FileTouch {
    /// Adds a read of `range` to the file's ranges.
    pub fn add_range(&mut self, range: std::ops::Range<u64>) {
        if range.is_empty() {
            return;
        }
        self.ranges.push([range.start, range.end]);
        self.ranges.sort_unstable();
        let mut joined: Vec<[u64; 2]> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges.drain(..) {
            match joined.last_mut() {
                Some(last) if r[0] <= last[1].saturating_add(RANGE_GAP) => {
                    last[1] = last[1].max(r[1]);
                }
                _ => joined.push(r),
            }
        }
        self.ranges = joined;
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The layer blob the chunk belongs to.
    pub layer: Digest,
    /// Index of the chunk in the layer's TOC.
    pub chunk: u32,
    /// The chunk's digest, so a stale trace (the layer changed) is detected.
    pub digest: Digest,
    /// Milliseconds from the first read of the start to this chunk's first read.
    pub at_ms: u64,
    /// The file whose read touched the chunk first (a path inside the layer).
    pub path: String,
}

impl Trace {
    pub fn new(image: Digest) -> Self {
        Self {
            version: TRACE_VERSION,
            image,
            starts: 0,
            entries: Vec::new(),
            files: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a trace always serializes")
    }

    /// Parses and checks a trace; with `image`, it must belong to that image.
    pub fn decode(bytes: &[u8], image: Option<&Digest>) -> Result<Self> {
        if bytes.len() > MAX_TRACE_BYTES {
            return Err(Error::Invalid(format!(
                "{} bytes is more than a trace can be",
                bytes.len()
            )));
        }
        let trace: Trace = serde_json::from_slice(bytes).map_err(Error::Format)?;
        if trace.version != TRACE_VERSION {
            return Err(Error::Version(trace.version));
        }
        if let Some(image) = image {
            if trace.image != *image {
                return Err(Error::WrongImage {
                    expected: image.to_string(),
                    found: trace.image.to_string(),
                });
            }
        }
        let mut seen = HashSet::new();
        for e in &trace.entries {
            if !seen.insert((e.layer, e.chunk)) {
                return Err(Error::Invalid(format!(
                    "chunk {} of {} is listed twice",
                    e.chunk, e.layer
                )));
            }
        }
        Ok(trace)
    }

    /// Merges another start's trace: the union, in first-touch order. Chunks both touched keep
    /// the earlier time, so the order improves with every start instead of freezing the first
    /// one's quirks.
    pub fn merge(&mut self, other: &Trace) {
        let mut all: Vec<TraceEntry> = self
            .entries
            .drain(..)
            .chain(other.entries.iter().cloned())
            .collect();
        all.sort_by_key(|e| e.at_ms);
        let mut seen = HashSet::new();
        self.entries = all
            .into_iter()
            .filter(|e| seen.insert((e.layer, e.chunk)))
            .collect();
        let mut files: Vec<FileTouch> = self
            .files
            .drain(..)
            .chain(other.files.iter().cloned())
            .collect();
        files.sort_by_key(|f| f.at_ms);
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        let mut merged: Vec<FileTouch> = Vec::new();
        for f in files {
            match index.get(&f.path) {
                // A file one start read whole (no ranges) stays whole.
                Some(&i) if merged[i].ranges.is_empty() => {}
                Some(&i) if f.ranges.is_empty() => merged[i].ranges.clear(),
                Some(&i) => {
                    for r in &f.ranges {
                        merged[i].add_range(r[0]..r[1]);
                    }
                }
                None => {
                    index.insert(f.path.clone(), merged.len());
                    merged.push(f);
                }
            }
        }
        self.files = merged;
        self.starts += other.starts.max(1);
    }

    /// Files in the order the start first read them.
    pub fn files(&self) -> Vec<&str> {
        if !self.files.is_empty() {
            return self.files.iter().map(|f| f.path.as_str()).collect();
        }
        // Traces without a file list: the first reader of each chunk.
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .map(|e| e.path.as_str())
            .filter(|p| seen.insert(*p))
            .collect()
    }

    /// The read ranges of every file that has them, by path.
    pub fn file_ranges(&self) -> std::collections::HashMap<String, Vec<std::ops::Range<u64>>> {
        self.files
            .iter()
            .filter(|f| !f.ranges.is_empty())
            .map(|f| {
                (
                    f.path.clone(),
                    f.ranges.iter().map(|r| r[0]..r[1]).collect(),
                )
            })
            .collect()
    }

    pub fn duration_ms(&self) -> u64 {
        self.entries.iter().map(|e| e.at_ms).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(layer: &[u8], chunk: u32, at_ms: u64, path: &str) -> TraceEntry {
        TraceEntry {
            layer: Digest::sha256(layer),
            chunk,
            digest: Digest::sha256(&chunk.to_le_bytes()),
            at_ms,
            path: path.into(),
        }
    }

    #[test]
    fn read_ranges_join_when_close_and_merge_across_starts() {
        let touch = |ranges: &[(u64, u64)]| {
            let mut f = FileTouch {
                path: "/usr/bin/python3".into(),
                at_ms: 0,
                ranges: Vec::new(),
            };
            for &(a, b) in ranges {
                f.add_range(a..b);
            }
            f
        };
        let f = touch(&[
            (0, 4096),
            (4096 + RANGE_GAP, 2 * RANGE_GAP),
            (1 << 20, (1 << 20) + 10),
        ]);
        assert_eq!(
            f.ranges,
            vec![[0, 2 * RANGE_GAP], [1 << 20, (1 << 20) + 10]]
        );
        let image = Digest::sha256(b"image");
        let mut a = Trace {
            files: vec![touch(&[(0, 10)])],
            ..Trace::new(image)
        };
        let b = Trace {
            files: vec![touch(&[(1 << 30, (1 << 30) + 1)])],
            ..Trace::new(image)
        };
        a.merge(&b);
        assert_eq!(a.files[0].ranges, vec![[0, 10], [1 << 30, (1 << 30) + 1]]);
        assert_eq!(
            a.file_ranges()["/usr/bin/python3"],
            vec![0..10, (1 << 30)..(1 << 30) + 1]
        );
        // A start that read the file without ranges (an older trace) means the whole file.
        let whole = Trace {
            files: vec![FileTouch {
                ranges: Vec::new(),
                ..touch(&[])
            }],
            ..Trace::new(image)
        };
        a.merge(&whole);
        assert!(a.files[0].ranges.is_empty());
        assert!(a.file_ranges().is_empty());
    }

    #[test]
    fn merge_is_a_union_in_first_touch_order() {
        let image = Digest::sha256(b"image");
        let mut a = Trace {
            starts: 1,
            entries: vec![entry(b"l", 0, 0, "/bin/sh"), entry(b"l", 5, 40, "/lib/x")],
            ..Trace::new(image)
        };
        let b = Trace {
            starts: 1,
            entries: vec![entry(b"l", 5, 10, "/lib/x"), entry(b"l", 7, 20, "/etc/y")],
            ..Trace::new(image)
        };
        a.merge(&b);
        let order: Vec<u32> = a.entries.iter().map(|e| e.chunk).collect();
        assert_eq!(order, [0, 5, 7]);
        assert_eq!(a.entries[1].at_ms, 10);
        assert_eq!(a.starts, 2);
        assert_eq!(a.files(), ["/bin/sh", "/lib/x", "/etc/y"]);
    }

    #[test]
    fn decode_rejects_garbage_truncation_versions_and_other_images() {
        let image = Digest::sha256(b"image");
        let t = Trace {
            starts: 1,
            entries: vec![entry(b"l", 0, 0, "/a")],
            ..Trace::new(image)
        };
        let bytes = t.encode();
        assert_eq!(Trace::decode(&bytes, Some(&image)).unwrap(), t);
        assert!(matches!(
            Trace::decode(b"\x00garbage", None),
            Err(Error::Format(_))
        ));
        assert!(matches!(
            Trace::decode(&bytes[..bytes.len() / 2], None),
            Err(Error::Format(_))
        ));
        let other = Digest::sha256(b"other");
        assert!(matches!(
            Trace::decode(&bytes, Some(&other)),
            Err(Error::WrongImage { .. })
        ));
        let mut v2 = t.clone();
        v2.version = 2;
        assert!(matches!(
            Trace::decode(&v2.encode(), None),
            Err(Error::Version(2))
        ));
        let mut dup = t;
        dup.entries.push(dup.entries[0].clone());
        assert!(matches!(
            Trace::decode(&dup.encode(), None),
            Err(Error::Invalid(_))
        ));
    }
}
