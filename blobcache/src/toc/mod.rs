//! The lazy layer format: a `tar+zstd` blob whose frames are independently decodable chunks,
//! with a table of contents (TOC) and a fixed-size footer in zstd skippable frames at the end.
//!
//! `docs/format.md` is the specification; this module is its only implementation. The writer
//! (`writer`) turns a tar stream into such a blob, the rest of this module reads and checks one.
//! Nothing here does I/O against a registry: callers fetch bytes and hand them in.

mod error;
pub mod estargz;
mod footer;
mod foreign;
mod limits;
mod path;
mod tar_guard;
mod writer;
pub mod zstd_chunked;

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::short;
use crate::{Digest, Error, Limit, Result};

pub use error::TocError;
pub use footer::{Footer, TocPosition, FOOTER_SIZE};
pub use limits::{
    compressed_bound, worst_case_toc_memory, MAX_CHUNKS, MAX_CHUNK_COMPRESSED_SIZE, MAX_CHUNK_SIZE,
    MAX_ENTRIES, MAX_LINK_LEN, MAX_NAME_LEN, MAX_PATH_DEPTH, MAX_PATH_LEN, MAX_PREFETCH,
    MAX_PREFETCH_SPANS, MAX_TAR_METADATA, MAX_TOC_COMPRESSED_SIZE, MAX_TOC_SIZE, MAX_TOC_XATTRS,
    MAX_XATTRS, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_SIZE,
};
pub use path::normalize_name;
pub use tar_guard::TarGuard;
pub use writer::{
    convert_layer, ConvertOptions, ConvertedLayer, Scattered, DEFAULT_PREFETCH_CHUNK_SIZE,
    DEFAULT_PREFETCH_LEVEL, DEFAULT_SCATTERED,
};

/// The TOC format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Layer annotation: sha256 of the compressed TOC bytes (the TOC skippable frame's payload).
/// The manifest vouches for it, so the TOC, and through it every chunk, is authenticated.
pub const ANNOTATION_TOC_DIGEST: &str = "dev.brisk.toc.digest";

/// Layer annotation: `<offset>:<length>:<uncompressed length>:<version>` of the compressed TOC,
/// so a reader that has the manifest can fetch the TOC with one range read, without the footer.
pub const ANNOTATION_TOC_POSITION: &str = "dev.brisk.toc.position";

/// Layer annotation: the compressed byte ranges holding the chunks the TOC lists for prefetch,
/// as `start-end` pairs (end exclusive, neighbours closer than 64 KiB joined), comma separated.
/// A reader may start fetching them as soon as it has the manifest, before the TOC arrives; the
/// bytes are only used once the TOC's chunk digests have checked them.
pub const ANNOTATION_PREFETCH_SPANS: &str = "dev.brisk.prefetch.spans";

/// containerd's unpacker hands a layer descriptor's annotations under this prefix to the
/// snapshotter's `Prepare` as labels, and drops the others.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// Label copies of the TOC digest, TOC position and prefetch span annotations, written beside
/// them so that they reach `Prepare` and a snapshotter can start on a layer without fetching
/// its manifest first.
pub const LABEL_TOC_DIGEST: &str = "containerd.io/snapshot/brisk.toc.digest";
pub const LABEL_TOC_POSITION: &str = "containerd.io/snapshot/brisk.toc.position";
pub const LABEL_PREFETCH_SPANS: &str = "containerd.io/snapshot/brisk.prefetch.spans";

/// containerd refuses a label whose key and value together pass this many bytes (and with it
/// the whole unpack, whatever the snapshotter), so no label copy may be longer.
pub const MAX_LABEL_BYTES: usize = 4096;

/// The annotations of a converted layer's descriptor: the TOC digest and position, the
/// prefetch spans if any, and their label copies (the spans' copy keeps the leading spans that
/// fit in one label).
pub fn layer_annotations(
    toc_digest: &crate::Digest,
    toc_position: &str,
    prefetch_spans: &[std::ops::Range<u64>],
) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for (key, label, value) in [
        (
            ANNOTATION_TOC_DIGEST,
            LABEL_TOC_DIGEST,
            toc_digest.to_string(),
        ),
        (
            ANNOTATION_TOC_POSITION,
            LABEL_TOC_POSITION,
            toc_position.to_owned(),
        ),
    ] {
        out.insert(label.to_owned(), value.clone());
        out.insert(key.to_owned(), value);
    }
    if !prefetch_spans.is_empty() {
        out.insert(
            ANNOTATION_PREFETCH_SPANS.to_owned(),
            format_spans(prefetch_spans),
        );
        let budget = MAX_LABEL_BYTES - LABEL_PREFETCH_SPANS.len();
        let mut fit = prefetch_spans.len();
        while fit > 0 && format_spans(&prefetch_spans[..fit]).len() > budget {
            fit -= 1;
        }
        if fit > 0 {
            out.insert(
                LABEL_PREFETCH_SPANS.to_owned(),
                format_spans(&prefetch_spans[..fit]),
            );
        }
    }
    out
}

/// The prefetch annotation's value for `spans`.
pub fn format_spans(spans: &[std::ops::Range<u64>]) -> String {
    spans
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a prefetch annotation, keeping only well-formed spans inside a blob of `size` bytes,
/// at most `MAX_PREFETCH_SPANS` of them (the rest is read, to see that it is well-formed,
/// but not kept). A malformed value yields nothing: the annotation is an optimization, never
/// a reason to refuse a layer.
pub fn parse_spans(value: &str, size: u64) -> Vec<std::ops::Range<u64>> {
    let mut spans = Vec::new();
    for s in value.split(',').filter(|s| !s.is_empty()) {
        let span = s.split_once('-').and_then(|(a, b)| {
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a < b && b <= size).then_some(a..b)
        });
        match span {
            Some(span) if spans.len() < MAX_PREFETCH_SPANS => spans.push(span),
            Some(_) => {}
            None => return Vec::new(),
        }
    }
    spans
}

/// zstd level of the TOC: every cold mount fetches the TOC before the layer can be used, so it
/// is compressed hard once, at conversion (the Python image's 1.4 MiB TOC: 166 KiB at level 3,
/// 124 KiB at 19, for 0.6 s more).
const TOC_LEVEL: i32 = 19;

/// Chunk size the converter aims for; see `docs/format.md` for how it was chosen.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// The table of contents of one converted layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    /// Length of the uncompressed tar stream; the chunks tile `0..tar_size` exactly.
    pub tar_size: u64,
    pub chunks: Vec<Chunk>,
    pub entries: Vec<Entry>,
    /// Chunks to fetch as soon as the layer is mounted, in order: a start-up trace baked in
    /// by `brisk convert --trace` (the traced files were also moved to the front of the tar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<u32>,
    /// The format the TOC was read from: set by its reader, never by the TOC's JSON.
    #[serde(skip)]
    pub format: LayerFormat,
}

/// The lazy formats a layer's TOC can come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerFormat {
    /// Brisk's own: the chunks tile the layer's tar stream, so reading them in order hashes
    /// to its diff_id.
    #[default]
    Brisk,
    /// eStargz (`estargz`): the chunks tile the files' contents only, and lie in gzip
    /// members with tar headers between them.
    Estargz,
    /// zstd:chunked (containers/storage), or stargz-snapshotter's zstd variant of eStargz:
    /// like eStargz, in zstd frames.
    ZstdChunked,
}

impl LayerFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            LayerFormat::Brisk => "brisk",
            LayerFormat::Estargz => "estargz",
            LayerFormat::ZstdChunked => "zstd-chunked",
        }
    }

    /// The format's name for people.
    pub fn title(&self) -> &'static str {
        match self {
            LayerFormat::Brisk => "Brisk",
            LayerFormat::Estargz => "eStargz",
            LayerFormat::ZstdChunked => "zstd:chunked",
        }
    }

    /// Whether reading the chunks in order yields the layer's tar stream (and so its
    /// diff_id).
    pub fn chunks_tile_the_tar(&self) -> bool {
        *self == LayerFormat::Brisk
    }
}

/// One independently decodable zstd frame of the layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Offset of the frame in the compressed blob.
    pub offset: u64,
    /// Length of the frame in the compressed blob.
    pub size: u64,
    /// Offset of the frame's decoded bytes in the uncompressed tar stream.
    pub tar_offset: u64,
    /// Length of the frame's decoded bytes.
    pub tar_size: u64,
    /// sha256 of the decoded bytes: the chunk's identity in every cache level.
    pub digest: Digest,
    /// How the compressed bytes decode: set by the reader of the layer's format, never read
    /// from a TOC (a Brisk TOC cannot claim another codec for its frames).
    #[serde(skip)]
    pub codec: crate::chunk::Codec,
}

impl Chunk {
    pub fn compressed_range(&self) -> Range<u64> {
        self.offset..self.offset + self.size
    }

    pub fn tar_range(&self) -> Range<u64> {
        self.tar_offset..self.tar_offset + self.tar_size
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// A `.wh.<name>` tar entry: `name` is the path it deletes from lower layers.
    Whiteout,
    /// A `.wh..wh..opq` tar entry: `name` is the directory whose lower contents are hidden.
    Opaque,
}

/// One tar entry, with its name normalized (no leading `/`, no `.` or empty components).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Path inside the layer; the root directory is the empty string.
    pub name: String,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u64,
    #[serde(default)]
    pub gid: u64,
    /// Content length for regular files, zero otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Modification time in whole seconds since the epoch.
    #[serde(default)]
    pub mtime: i64,
    /// Symlink target (verbatim) or hardlink target (a normalized layer path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Offset of the content in the uncompressed tar stream (regular files with content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_major: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_minor: Option<u32>,
    /// Extended attributes, values base64-encoded (they are arbitrary bytes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Entry {
    /// The content's range in the uncompressed tar stream, if it has content.
    pub fn tar_range(&self) -> Option<Range<u64>> {
        self.offset.map(|o| o..o + self.size)
    }
}

impl Toc {
    /// Serializes and compresses the TOC; the result is the payload of the TOC frame.
    pub fn encode(&self) -> Result<(Vec<u8>, u64)> {
        let json = serde_json::to_vec(self).map_err(|e| Error::json("TOC", e))?;
        let compressed =
            zstd::bulk::compress(&json, TOC_LEVEL).map_err(|e| Error::Toc(TocError::Write(e)))?;
        Ok((compressed, json.len() as u64))
    }

    /// Decodes the compressed TOC payload. When `expected` is given (the manifest annotation),
    /// the bytes are checked before they are decompressed, so unauthenticated input never
    /// reaches the decoder. Sizes and counts are bounded (`limits`) before anything is
    /// allocated from them.
    pub fn decode(
        payload: &[u8],
        uncompressed_len: u64,
        expected: Option<&Digest>,
    ) -> Result<Self> {
        let toc = || "TOC".to_owned();
        Error::check_limit(
            toc,
            Limit::TocCompressedSize,
            payload.len() as u64,
            MAX_TOC_COMPRESSED_SIZE,
        )?;
        if let Some(expected) = expected {
            let actual = Digest::sha256(payload);
            if actual != *expected {
                return Err(Error::Toc(TocError::DigestMismatch {
                    expected: *expected,
                    actual,
                }));
            }
        }
        Error::check_limit(toc, Limit::TocSize, uncompressed_len, MAX_TOC_SIZE)?;
        // Stream rather than preallocate: the claimed length is only trusted as an upper bound.
        let mut json = Vec::new();
        let decoder = zstd::stream::read::Decoder::new(payload)
            .map_err(|e| Error::bad_toc(format!("does not decompress: {e}")))?;
        std::io::Read::read_to_end(
            &mut std::io::Read::take(decoder, uncompressed_len + 1),
            &mut json,
        )
        .map_err(|e| Error::bad_toc(format!("does not decompress: {e}")))?;
        if json.len() as u64 != uncompressed_len {
            return Err(Error::bad_toc(
                "decompressed length differs from the footer",
            ));
        }
        limits::prescan(&json)?;
        let toc: Toc = serde_json::from_slice(&json).map_err(|e| Error::json("TOC", e))?;
        toc.validate()?;
        Ok(toc)
    }

    /// Checks everything a reader relies on, so later code can index without re-checking:
    /// counts and sizes are within `limits`, chunks tile the tar stream and the blob from
    /// offset 0, the prefetch list names each chunk at most once, entry names and hardlink
    /// targets are normalized, and every file's content lies inside the tar stream.
    pub fn validate(&self) -> Result<()> {
        if self.version != FORMAT_VERSION {
            return Err(Error::bad_toc(format!(
                "version {} is not supported",
                self.version
            )));
        }
        let toc = || "TOC".to_owned();
        let (chunks, entries) = (self.chunks.len() as u64, self.entries.len() as u64);
        Error::check_limit(toc, Limit::Chunks, chunks, MAX_CHUNKS as u64)?;
        Error::check_limit(toc, Limit::Entries, entries, MAX_ENTRIES as u64)?;
        Error::check_limit(toc, Limit::Prefetch, self.prefetch.len() as u64, chunks)?;
        let xattrs: usize = self.entries.iter().map(|e| e.xattrs.len()).sum();
        Error::check_limit(toc, Limit::TocXattrs, xattrs as u64, MAX_TOC_XATTRS as u64)?;
        self.validate_chunks()?;
        self.validate_prefetch()?;
        for (i, e) in self.entries.iter().enumerate() {
            self.validate_entry(i, e)?;
        }
        Ok(())
    }

    /// Brisk's chunks tile the blob from offset 0; other formats' lie in blob order with
    /// gaps (headers, landmarks) between them. In both, they tile the decoded stream.
    fn validate_chunks(&self) -> Result<()> {
        let (mut offset, mut tar_offset) = (0u64, 0u64);
        let gaps = self.format != LayerFormat::Brisk;
        for (i, c) in self.chunks.iter().enumerate() {
            let placed = if gaps {
                c.offset >= offset
            } else {
                c.offset == offset
            };
            if !placed || c.tar_offset != tar_offset {
                return Err(Error::bad_toc(format!(
                    "chunk {i} does not follow the previous one"
                )));
            }
            if c.size == 0 || c.tar_size == 0 {
                return Err(Error::bad_toc(format!("chunk {i} is empty")));
            }
            let what = || format!("TOC chunk {i}");
            Error::check_limit(what, Limit::ChunkSize, c.tar_size, MAX_CHUNK_SIZE)?;
            Error::check_limit(
                what,
                Limit::ChunkCompressedSize,
                c.size,
                c.codec.bound(c.tar_size),
            )?;
            offset = c
                .offset
                .checked_add(c.size)
                .ok_or_else(|| Error::bad_toc("overflow"))?;
            tar_offset = tar_offset
                .checked_add(c.tar_size)
                .ok_or_else(|| Error::bad_toc("overflow"))?;
        }
        if tar_offset != self.tar_size {
            return Err(Error::bad_toc("chunks do not cover the tar stream"));
        }
        Ok(())
    }

    /// Every index names a chunk, and none twice: our writer lists each chunk once, so a
    /// repeat means the TOC was not written by it (refused rather than cleaned up, like any
    /// other TOC that breaks the format).
    fn validate_prefetch(&self) -> Result<()> {
        let mut seen = vec![false; self.chunks.len()];
        for &i in &self.prefetch {
            match seen.get_mut(i as usize) {
                None => {
                    return Err(Error::bad_toc(
                        "prefetch list names a chunk that does not exist",
                    ))
                }
                Some(true) => {
                    return Err(Error::bad_toc(format!(
                        "prefetch list names chunk {i} twice"
                    )))
                }
                Some(seen) => *seen = true,
            }
        }
        Ok(())
    }

    fn validate_entry(&self, i: usize, e: &Entry) -> Result<()> {
        let name = short(&e.name);
        if normalize_name(&e.name)? != e.name {
            return Err(Error::bad_toc(format!(
                "entry name {name:?} is not normalized"
            )));
        }
        limits::check_entry(e, &|| format!("TOC entry {i} ({name:?})"))?;
        match (e.kind, e.offset) {
            (EntryKind::Reg, Some(o)) => {
                let end = o
                    .checked_add(e.size)
                    .ok_or_else(|| Error::bad_toc("overflow"))?;
                if end > self.tar_size || e.size == 0 {
                    return Err(Error::bad_toc(format!(
                        "{name:?} lies outside the tar stream"
                    )));
                }
            }
            (_, None) if e.size == 0 => {}
            _ => {
                return Err(Error::bad_toc(format!(
                    "{name:?} has content it cannot have"
                )))
            }
        }
        match (e.kind, &e.link) {
            (EntryKind::Symlink | EntryKind::Hardlink, None) => {
                Err(Error::bad_toc(format!("link {name:?} has no target")))
            }
            (EntryKind::Hardlink, Some(target)) if normalize_name(target)? != *target => {
                Err(Error::bad_toc(format!(
                    "hardlink {name:?} has a target that is not normalized"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The indexes of the chunks holding `range` of the tar stream (empty for an empty range).
    pub fn chunks_for(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let first = self
            .chunks
            .partition_point(|c| c.tar_offset + c.tar_size <= range.start);
        let end = self.chunks.partition_point(|c| c.tar_offset < range.end);
        first..end.max(first)
    }

    /// Total compressed bytes of the chunk data (everything before the TOC frame).
    pub fn data_size(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.offset + c.size)
    }
}

/// Decompresses chunk `index` of layer `blob` and checks it against the TOC
/// (`VerifiedChunk::decode`), so a caller never sees bytes that did not match their digest.
pub fn decode_chunk(
    blob: Digest,
    index: usize,
    chunk: &Chunk,
    compressed: &[u8],
) -> Result<crate::chunk::VerifiedChunk> {
    let corrupt = || {
        Error::Toc(TocError::CorruptChunk {
            index,
            digest: chunk.digest,
        })
    };
    let reference = crate::chunk::ChunkRef::new(blob, chunk);
    if compressed.len() as u64 != chunk.size || reference.check().is_err() {
        return Err(corrupt());
    }
    crate::chunk::VerifiedChunk::decode(&reference, compressed).map_err(|_| corrupt())
}

#[cfg(test)]
mod tests;

/// Reads a whole blob the way a lazy reader does (footer, TOC, every chunk), ignoring the
/// outcome. The fuzz target and the parser property test drive it with arbitrary bytes: it
/// must return, never panic.
#[doc(hidden)]
pub fn fuzz_read_blob(blob: &[u8]) {
    if blob.len() < FOOTER_SIZE {
        return;
    }
    let Ok(footer) = Footer::decode(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64) else {
        return;
    };
    let r = footer.toc.range();
    let Ok(toc) = Toc::decode(
        &blob[r.start as usize..r.end as usize],
        footer.toc.uncompressed_size,
        None,
    ) else {
        return;
    };
    let digest = Digest::sha256(blob);
    for (i, c) in toc.chunks.iter().enumerate() {
        let range = c.compressed_range();
        if range.end <= blob.len() as u64 {
            let _ = decode_chunk(
                digest,
                i,
                c,
                &blob[range.start as usize..range.end as usize],
            );
        }
    }
}
