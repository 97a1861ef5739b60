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
        let mut seen = HashSet::new();
        self.files = files
            .into_iter()
            .filter(|f| seen.insert(f.path.clone()))
            .collect();
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
