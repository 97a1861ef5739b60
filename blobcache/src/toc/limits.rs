//! The bounds a reader holds a TOC, a TOC position and a tar entry to, and the checks that
//! apply them before anything is allocated, recursed or looped on from the claimed values.
//!
//! Every image may be hostile, so each size and count it states is bounded here, with a typed
//! `Error::OverLimit` naming the bound. The bounds are far above what real layers need (a
//! Python image's TOC: 124 KiB compressed, 1.4 MiB decoded, about 5k entries; a 700 MB ML
//! image: 26k files), and low enough that a daemon holding many TOCs stays within memory.
//! `docs/format.md` lists them for other readers.
//!
//! What it does not do: judge whether a TOC is consistent (that is `Toc::validate`).

use std::collections::BTreeMap;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::Entry;
use crate::error::short;
use crate::{Error, Limit, Result};

/// Compressed TOC bytes (one range read, held whole to check its digest). A TOC of nothing
/// but chunks compresses least (their digests are random): 3.7x at level 19, 3x at level 3,
/// so a TOC within `MAX_TOC_SIZE` is under 22 MiB compressed.
pub const MAX_TOC_COMPRESSED_SIZE: u64 = 32 << 20;

/// Decoded TOC JSON. With the count limits below it bounds a decoded TOC in memory to 3.5x
/// this (225 MiB, `worst_case_toc_memory`) however the JSON is shaped, plus the JSON itself
/// while it is decoded. Legitimate TOCs are 45 times smaller.
pub const MAX_TOC_SIZE: u64 = 64 << 20;

/// Entries of one layer: 20 times the files of a whole 700 MB ML image; about as many as
/// `MAX_TOC_SIZE` holds at the size our writer gives an entry.
pub const MAX_ENTRIES: usize = 1 << 19;

/// Chunks of one layer: 256 GiB at the default 1 MiB chunk size.
pub const MAX_CHUNKS: usize = 1 << 18;

/// No chunk may decode to more than this (every reader sizes one buffer from it); the
/// converter's `--chunk-size` is clamped to it.
pub const MAX_CHUNK_SIZE: u64 = 16 << 20;

/// The compressed size of the largest chunk: a zstd frame can't legitimately be larger than
/// `compressed_bound` of what it decodes to.
pub const MAX_CHUNK_COMPRESSED_SIZE: u64 = compressed_bound(MAX_CHUNK_SIZE);

/// Bytes of a layer path (PATH_MAX): the container could not open a longer one.
pub const MAX_PATH_LEN: usize = 4096;

/// Components of a layer path: ten times the deepest real trees (nested `node_modules`, Java
/// packages), so that whatever walks the tree (the snapshotter's inode table) stays shallow.
pub const MAX_PATH_DEPTH: usize = 256;

/// Bytes of one path component (NAME_MAX): no Linux filesystem holds a longer name.
pub const MAX_NAME_LEN: usize = 255;

/// Bytes of a symlink target (PATH_MAX): symlink(2) refuses longer ones.
pub const MAX_LINK_LEN: usize = 4096;

/// Extended attributes of one entry: real entries carry a few (capabilities, ACLs, an SELinux
/// label), and listxattr(2) returns at most 64 KiB of names anyway.
pub const MAX_XATTRS: usize = 128;

/// Extended attributes of one TOC, all entries together: half the entry limit. An entry's
/// attributes cost far more in memory than in JSON (a map node and two strings for a 7-byte
/// `"a":"",`), so without it the decoded TOC could reach 17x `MAX_TOC_SIZE`.
pub const MAX_TOC_XATTRS: usize = 1 << 18;

/// Bytes of an xattr name, namespace included (XATTR_NAME_MAX).
pub const MAX_XATTR_NAME_LEN: usize = 255;

/// Bytes of an xattr value once base64-decoded (XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE_SIZE: usize = 64 * 1024;

/// Largest tar metadata entry (a PAX extended header, a GNU long name or link) a layer may
/// hold: room for every xattr an entry may carry at its largest, with its path and link.
pub const MAX_TAR_METADATA: u64 = 16 << 20;

const _: () = assert!(
    MAX_TAR_METADATA
        >= (MAX_XATTRS * (MAX_XATTR_NAME_LEN + MAX_XATTR_VALUE_SIZE + 64)
            + MAX_PATH_LEN
            + MAX_LINK_LEN) as u64
);

/// Chunk indexes in the prefetch list. `Toc::validate` also refuses duplicates (our writer
/// lists each chunk once, so a TOC that repeats one was not written by it) and indexes past
/// the chunks, so the list is never longer than the chunk table.
pub const MAX_PREFETCH: usize = MAX_CHUNKS;

/// Spans kept in the prefetch annotation at most; the rest of the list is still prefetched,
/// after the TOC.
pub const MAX_PREFETCH_SPANS: usize = 256;

/// zstd's `ZSTD_COMPRESSBOUND` (the largest frame its encoder makes of `n` bytes), plus 64
/// bytes for the headers and checksum another encoder may add.
pub const fn compressed_bound(n: u64) -> u64 {
    let small = if n < (128 << 10) {
        ((128 << 10) - n) >> 11
    } else {
        0
    };
    n + (n >> 8) + small + 64
}

/// Checks the extended attributes and link target of `entry` (its name and a hardlink's
/// target are checked by `normalize_name`). `what` names the entry in the error.
pub(crate) fn check_entry(entry: &Entry, what: &dyn Fn() -> String) -> Result<()> {
    if let Some(link) = &entry.link {
        Error::check_limit(what, Limit::LinkLength, len(link.len()), len(MAX_LINK_LEN))?;
    }
    check_xattrs(&entry.xattrs, what)
}

fn check_xattrs(xattrs: &BTreeMap<String, String>, what: &dyn Fn() -> String) -> Result<()> {
    Error::check_limit(what, Limit::Xattrs, len(xattrs.len()), len(MAX_XATTRS))?;
    for (name, value) in xattrs {
        let what = || format!("{}, xattr {:?}", what(), short(name));
        Error::check_limit(
            what,
            Limit::XattrNameLength,
            len(name.len()),
            len(MAX_XATTR_NAME_LEN),
        )?;
        Error::check_limit(
            what,
            Limit::XattrValueSize,
            base64_decoded_len(value),
            len(MAX_XATTR_VALUE_SIZE),
        )?;
    }
    Ok(())
}

/// How many bytes `value` decodes to if it is well-formed base64 (a malformed value fails
/// when it is decoded; this only has to bound it).
fn base64_decoded_len(value: &str) -> u64 {
    let padding = value
        .bytes()
        .rev()
        .take_while(|&b| b == b'=')
        .count()
        .min(2);
    (len(value.len()) * 3 / 4).saturating_sub(len(padding))
}

pub(crate) fn len(n: usize) -> u64 {
    n as u64
}

/// Counts what the TOC JSON would make serde allocate (chunks, entries, prefetch indexes,
/// xattrs) without allocating any of it, and refuses a TOC over a count limit. Run before the
/// real deserialization: serde_json would otherwise build a `Vec` of millions of entries, or
/// a map of millions of xattrs, before `Toc::validate` could count them.
///
/// The shapes below mirror `Toc` and `Entry` field for field (names, order, defaults), so
/// that JSON in either form serde accepts (an object, or an array of fields in order) is
/// counted exactly as the real deserialization will read it.
pub(super) fn prescan(json: &[u8]) -> Result<()> {
    let shape: TocShape = serde_json::from_slice(json).map_err(|e| Error::json("TOC", e))?;
    let toc = || "TOC".to_owned();
    Error::check_limit(toc, Limit::Chunks, shape.chunks.0, len(MAX_CHUNKS))?;
    Error::check_limit(toc, Limit::Entries, shape.entries.count, len(MAX_ENTRIES))?;
    Error::check_limit(toc, Limit::Prefetch, shape.prefetch.0, len(MAX_PREFETCH))?;
    Error::check_limit(
        toc,
        Limit::TocXattrs,
        shape.entries.xattrs,
        len(MAX_TOC_XATTRS),
    )?;
    let (index, most) = shape.entries.most_xattrs;
    Error::check_limit(
        || format!("TOC entry {index}"),
        Limit::Xattrs,
        most,
        len(MAX_XATTRS),
    )
}

#[derive(Deserialize)]
struct TocShape {
    #[serde(rename = "version")]
    _version: IgnoredAny,
    #[serde(rename = "tar_size")]
    _tar_size: IgnoredAny,
    chunks: SeqCount,
    entries: EntriesShape,
    #[serde(default)]
    prefetch: SeqCount,
}

#[derive(Deserialize)]
struct EntryShape {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    #[serde(rename = "name")]
    _name: IgnoredAny,
    #[serde(default, rename = "mode")]
    _mode: IgnoredAny,
    #[serde(default, rename = "uid")]
    _uid: IgnoredAny,
    #[serde(default, rename = "gid")]
    _gid: IgnoredAny,
    #[serde(default, rename = "size")]
    _size: IgnoredAny,
    #[serde(default, rename = "mtime")]
    _mtime: IgnoredAny,
    #[serde(default, rename = "link")]
    _link: IgnoredAny,
    #[serde(default, rename = "offset")]
    _offset: IgnoredAny,
    #[serde(default, rename = "dev_major")]
    _dev_major: IgnoredAny,
    #[serde(default, rename = "dev_minor")]
    _dev_minor: IgnoredAny,
    #[serde(default)]
    xattrs: MapCount,
}

/// The length of a JSON array, read without keeping its elements.
#[derive(Default)]
struct SeqCount(u64);

impl<'de> Deserialize<'de> for SeqCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SeqCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SeqCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(SeqCount(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The number of keys of a JSON object, read without keeping them.
#[derive(Default)]
struct MapCount(u64);

impl<'de> Deserialize<'de> for MapCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MapCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MapCount, A::Error> {
                let mut n = 0;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(MapCount(n))
            }
        }
        d.deserialize_map(V)
    }
}

/// The entries array: how many, their xattrs in all, and the entry with the most.
struct EntriesShape {
    count: u64,
    xattrs: u64,
    most_xattrs: (u64, u64),
}

impl<'de> Deserialize<'de> for EntriesShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EntriesShape;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EntriesShape, A::Error> {
                let mut out = EntriesShape {
                    count: 0,
                    xattrs: 0,
                    most_xattrs: (0, 0),
                };
                while let Some(entry) = seq.next_element::<EntryShape>()? {
                    let n = entry.xattrs.0;
                    if n > out.most_xattrs.1 {
                        out.most_xattrs = (out.count, n);
                    }
                    out.count += 1;
                    out.xattrs += n;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// The most memory a decoded TOC within the limits can take, in bytes, however its JSON is
/// shaped: every count at its limit, every string a separate allocation of at least 32 bytes,
/// the string bytes themselves at most the JSON's, and a map node per xattr pair half full.
pub const fn worst_case_toc_memory() -> u64 {
    const ALLOC: u64 = 32;
    let entries = MAX_ENTRIES as u64 * (std::mem::size_of::<Entry>() as u64 + 2 * ALLOC);
    let chunks = MAX_CHUNKS as u64 * std::mem::size_of::<super::Chunk>() as u64;
    let prefetch = MAX_PREFETCH as u64 * 4;
    let xattrs = MAX_TOC_XATTRS as u64 * (2 * 2 * std::mem::size_of::<String>() as u64 + 2 * ALLOC);
    entries + chunks + prefetch + xattrs + MAX_TOC_SIZE
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::super::tests::{convert, read_toc, sample_tar, TarBuilder};
    use super::super::*;
    use super::*;
    use crate::Digest;

    /// The bound an error reports, or a panic naming what came back instead.
    fn over<T: std::fmt::Debug>(result: Result<T>) -> (Limit, u64, u64) {
        match result {
            Err(Error::OverLimit {
                limit, value, max, ..
            }) => (limit, value, max),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    fn good_toc() -> Toc {
        let (layer, blob) = convert(&sample_tar(), 64 * 1024);
        read_toc(&blob, &layer)
    }

    const HUGE: u64 = 1 << 62;

    #[test]
    fn a_position_claiming_a_huge_toc_is_refused_before_anything_is_fetched() {
        let text = format!("8:{HUGE}:100:1");
        let err = text.parse::<TocPosition>().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "TOC position {text}: compressed TOC size {HUGE} is over the limit of 33554432"
            )
        );
        assert_eq!(
            over(text.parse::<TocPosition>()),
            (Limit::TocCompressedSize, HUGE, MAX_TOC_COMPRESSED_SIZE)
        );
        assert_eq!(
            over(format!("8:100:{HUGE}:1").parse::<TocPosition>()),
            (Limit::TocSize, HUGE, MAX_TOC_SIZE)
        );
        let end_past_u64 = format!("{}:100:100:1", u64::MAX - 10);
        assert!(matches!(
            end_past_u64.parse::<TocPosition>(),
            Err(Error::Toc(TocError::Malformed(_)))
        ));
        // The footer's copy is held to the same bounds, even when the blob size agrees.
        let position = TocPosition {
            offset: 8,
            size: HUGE,
            uncompressed_size: 100,
            version: FORMAT_VERSION,
        };
        let blob_size = position.blob_size().unwrap();
        assert_eq!(
            over(position.check_within(blob_size)),
            (Limit::TocCompressedSize, HUGE, MAX_TOC_COMPRESSED_SIZE)
        );
        let footer = Footer {
            toc: position,
            flags: 0,
        };
        assert_eq!(
            over(Footer::decode(&footer.encode(), blob_size)),
            (Limit::TocCompressedSize, HUGE, MAX_TOC_COMPRESSED_SIZE)
        );
    }

    #[test]
    fn toc_bytes_and_claims_over_the_limits_are_refused_before_hashing_or_decoding() {
        let payload = vec![0u8; MAX_TOC_COMPRESSED_SIZE as usize + 1];
        // Refused before the digest is even computed: a mismatch would say so otherwise.
        let other = Digest::sha256(b"something else");
        assert_eq!(
            over(Toc::decode(&payload, 100, Some(&other))),
            (
                Limit::TocCompressedSize,
                MAX_TOC_COMPRESSED_SIZE + 1,
                MAX_TOC_COMPRESSED_SIZE
            )
        );
        let (payload, _) = good_toc().encode().unwrap();
        assert_eq!(
            over(Toc::decode(&payload, MAX_TOC_SIZE + 1, None)),
            (Limit::TocSize, MAX_TOC_SIZE + 1, MAX_TOC_SIZE)
        );
    }

    /// `Toc::decode` of `json` as a TOC payload.
    fn decode_json(json: &str) -> Result<Toc> {
        let payload = zstd::bulk::compress(json.as_bytes(), 1).unwrap();
        Toc::decode(&payload, json.len() as u64, None)
    }

    fn zeros(n: usize) -> String {
        vec!["0"; n].join(",")
    }

    #[test]
    fn counts_are_refused_before_serde_builds_anything_from_them() {
        // The elements are not even chunks: the count is checked before they are read.
        let chunks = format!(
            r#"{{"version":1,"tar_size":0,"chunks":[{}],"entries":[]}}"#,
            zeros(MAX_CHUNKS + 1)
        );
        assert_eq!(
            over(decode_json(&chunks)),
            (Limit::Chunks, MAX_CHUNKS as u64 + 1, MAX_CHUNKS as u64)
        );
        let prefetch = format!(
            r#"{{"version":1,"tar_size":0,"chunks":[],"entries":[],"prefetch":[{}]}}"#,
            zeros(MAX_PREFETCH + 1)
        );
        assert_eq!(
            over(decode_json(&prefetch)),
            (
                Limit::Prefetch,
                MAX_PREFETCH as u64 + 1,
                MAX_PREFETCH as u64
            )
        );
        // The same TOC as an array of its fields, which serde also accepts, is counted too.
        let as_array = format!(r#"[1,0,[{}],[]]"#, zeros(MAX_CHUNKS + 1));
        assert_eq!(over(decode_json(&as_array)).0, Limit::Chunks);
    }

    #[test]
    fn entries_and_xattrs_are_counted_before_serde_builds_them() {
        let entry = r#"{"type":"dir","name":""}"#;
        let entries = format!(
            r#"{{"version":1,"tar_size":0,"chunks":[],"entries":[{}]}}"#,
            vec![entry; MAX_ENTRIES + 1].join(",")
        );
        assert_eq!(
            over(decode_json(&entries)),
            (Limit::Entries, MAX_ENTRIES as u64 + 1, MAX_ENTRIES as u64)
        );

        let xattrs = |n: usize| {
            let pairs: Vec<String> = (0..n).map(|i| format!(r#""user.{i}":"""#)).collect();
            format!(
                r#"{{"type":"reg","name":"f","xattrs":{{{}}}}}"#,
                pairs.join(",")
            )
        };
        let one = format!(
            r#"{{"version":1,"tar_size":0,"chunks":[],"entries":[{},{}]}}"#,
            entry,
            xattrs(MAX_XATTRS + 1)
        );
        let err = decode_json(&one).unwrap_err();
        assert!(err.to_string().starts_with("TOC entry 1: "), "{err}");
        assert_eq!(
            over(Err::<(), _>(err)),
            (Limit::Xattrs, MAX_XATTRS as u64 + 1, MAX_XATTRS as u64)
        );

        // Each entry at its own limit, but together over the TOC's.
        let full = xattrs(MAX_XATTRS);
        let count = MAX_TOC_XATTRS / MAX_XATTRS + 1;
        let all = format!(
            r#"{{"version":1,"tar_size":0,"chunks":[],"entries":[{}]}}"#,
            vec![full.as_str(); count].join(",")
        );
        assert_eq!(
            over(decode_json(&all)),
            (
                Limit::TocXattrs,
                (count * MAX_XATTRS) as u64,
                MAX_TOC_XATTRS as u64
            )
        );
    }

    #[test]
    fn validate_holds_a_toc_built_in_memory_to_the_same_counts() {
        let good = good_toc();
        let mut entries = good.clone();
        entries.entries = vec![good.entries[0].clone(); MAX_ENTRIES + 1];
        assert_eq!(over(entries.validate()).0, Limit::Entries);

        let mut chunks = good.clone();
        chunks.chunks = vec![good.chunks[0].clone(); MAX_CHUNKS + 1];
        assert_eq!(over(chunks.validate()).0, Limit::Chunks);

        let n = good.chunks.len();
        let mut long = good.clone();
        long.prefetch = (0..=n as u32).collect();
        assert_eq!(
            over(long.validate()),
            (Limit::Prefetch, n as u64 + 1, n as u64)
        );

        let mut twice = good.clone();
        twice.prefetch = vec![1, 0, 1];
        let err = twice.validate().unwrap_err();
        assert!(
            matches!(&err, Error::Toc(TocError::Malformed(why)) if why == "prefetch list names chunk 1 twice"),
            "{err}"
        );

        let mut xattrs = good;
        let file = xattrs
            .entries
            .iter_mut()
            .find(|e| e.offset.is_some())
            .unwrap();
        file.xattrs = (0..=MAX_XATTRS)
            .map(|i| (format!("user.{i}"), String::new()))
            .collect();
        assert_eq!(over(xattrs.validate()).0, Limit::Xattrs);
    }

    #[test]
    fn chunks_are_held_to_their_decoded_and_compressed_bounds() {
        let good = good_toc();
        let mut huge = good.clone();
        huge.chunks[0].tar_size = MAX_CHUNK_SIZE + 1;
        assert_eq!(
            over(huge.validate()),
            (Limit::ChunkSize, MAX_CHUNK_SIZE + 1, MAX_CHUNK_SIZE)
        );
        let mut bloated = good;
        let bound = compressed_bound(bloated.chunks[0].tar_size);
        bloated.chunks[0].size = bound + 1;
        assert_eq!(
            over(bloated.validate()),
            (Limit::ChunkCompressedSize, bound + 1, bound)
        );
        // Our own frames, even of incompressible bytes, stay inside the bound.
        let noise: Vec<u8> = (0..300_000u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        let (layer, blob) = convert(&TarBuilder::new().file("noise", &noise).finish(), 4096);
        read_toc(&blob, &layer).validate().unwrap();
        assert_eq!(MAX_CHUNK_COMPRESSED_SIZE, (16 << 20) + (16 << 12) + 64);
    }

    #[test]
    fn entries_from_a_toc_are_held_to_the_path_link_and_xattr_bounds() {
        let good = good_toc();
        let with = |f: &dyn Fn(&mut Entry)| {
            let mut toc = good.clone();
            let file = toc.entries.iter_mut().find(|e| e.offset.is_some()).unwrap();
            f(file);
            toc.validate()
        };
        let deep = vec!["d"; MAX_PATH_DEPTH + 1].join("/");
        assert_eq!(
            over(with(&|e| e.name = deep.clone())),
            (
                Limit::PathDepth,
                MAX_PATH_DEPTH as u64 + 1,
                MAX_PATH_DEPTH as u64
            )
        );
        let target = "t/".repeat(MAX_LINK_LEN / 2 + 1);
        assert_eq!(
            over(with(&|e| {
                e.kind = EntryKind::Symlink;
                (e.offset, e.size) = (None, 0);
                e.link = Some(target.clone());
            })),
            (Limit::LinkLength, target.len() as u64, MAX_LINK_LEN as u64)
        );
        let long_name = format!("user.{}", "n".repeat(MAX_XATTR_NAME_LEN));
        assert_eq!(
            over(with(&|e| {
                e.xattrs = [(long_name.clone(), String::new())].into();
            })),
            (
                Limit::XattrNameLength,
                long_name.len() as u64,
                MAX_XATTR_NAME_LEN as u64
            )
        );
        let big =
            base64::engine::general_purpose::STANDARD.encode(vec![7u8; MAX_XATTR_VALUE_SIZE + 1]);
        assert_eq!(
            over(with(&|e| {
                e.xattrs = [("user.big".to_owned(), big.clone())].into();
            })),
            (
                Limit::XattrValueSize,
                MAX_XATTR_VALUE_SIZE as u64 + 1,
                MAX_XATTR_VALUE_SIZE as u64
            )
        );
        let unnormalized = with(&|e| {
            e.kind = EntryKind::Hardlink;
            (e.offset, e.size) = (None, 0);
            e.link = Some("./etc//passwd".into());
        });
        assert!(
            matches!(&unnormalized, Err(Error::Toc(TocError::Malformed(why))) if why.contains("not normalized")),
            "{unnormalized:?}"
        );
    }

    fn convert_err(tar: &[u8]) -> Result<ConvertedLayer> {
        convert_layer(tar, Vec::new(), &ConvertOptions::default()).map(|(layer, _)| layer)
    }

    #[test]
    fn the_converter_refuses_tar_entries_over_the_bounds() {
        // The image that overflowed the snapshotter's stack: one entry 20,000 directories
        // deep, a 40 KB name (here a GNU long name record).
        let deep = TarBuilder::new()
            .file("d/".repeat(20_000).trim_end_matches('/'), b"x")
            .finish();
        let err = convert_err(&deep).unwrap_err();
        assert!(err.to_string().starts_with("Path \"d/d/d/"), "{err}");
        assert_eq!(
            over(Err::<(), _>(err)),
            (Limit::PathDepth, 20_000, MAX_PATH_DEPTH as u64)
        );

        let target = "t".repeat(MAX_LINK_LEN + 1);
        let link = TarBuilder::new()
            .link(tar::EntryType::Symlink, "l", &target)
            .finish();
        let err = convert_err(&link).unwrap_err();
        assert!(err.to_string().starts_with("Tar entry \"l\": "), "{err}");
        assert_eq!(
            over(Err::<(), _>(err)),
            (Limit::LinkLength, target.len() as u64, MAX_LINK_LEN as u64)
        );

        let many: Vec<(String, Vec<u8>)> = (0..=MAX_XATTRS)
            .map(|i| (format!("user.{i}"), vec![1]))
            .collect();
        let tar = TarBuilder::new().xattrs_file("f", &many).finish();
        assert_eq!(over(convert_err(&tar)).0, Limit::Xattrs);
        let big = [("user.big".to_owned(), vec![0u8; MAX_XATTR_VALUE_SIZE + 1])];
        let tar = TarBuilder::new().xattrs_file("f", &big).finish();
        assert_eq!(
            over(convert_err(&tar)),
            (
                Limit::XattrValueSize,
                MAX_XATTR_VALUE_SIZE as u64 + 1,
                MAX_XATTR_VALUE_SIZE as u64
            )
        );
    }

    #[test]
    fn a_huge_spans_annotation_keeps_no_more_than_the_limit_in_memory() {
        let many = (0..100_000u64)
            .map(|i| format!("{}-{}", i * 2, i * 2 + 1))
            .collect::<Vec<_>>()
            .join(",");
        let spans = parse_spans(&many, u64::MAX);
        assert_eq!(spans.len(), MAX_PREFETCH_SPANS);
        assert!(spans.capacity() <= 2 * MAX_PREFETCH_SPANS);
        // Still read to the end: a malformed tail makes the whole value unusable.
        assert!(parse_spans(&format!("{many},oops"), u64::MAX).is_empty());
    }

    #[test]
    fn the_largest_toc_the_limits_allow_stays_within_a_few_times_its_json() {
        let worst = worst_case_toc_memory();
        assert!(
            worst <= 4 * MAX_TOC_SIZE,
            "a decoded TOC may take {} MiB",
            worst >> 20
        );
    }
}
