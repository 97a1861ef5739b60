//! The JSON TOCs of other lazy formats (eStargz, zstd:chunked: one schema, from the same
//! lineage) translated into Brisk's `Toc`, so that nothing past `toc` knows which format a
//! layer came in.
//!
//! These TOCs name each chunk by the blob offset of the compressed unit (gzip member, zstd
//! frame) it starts, its length decoded and its digest, but not where it lies in the tar
//! stream (the tar headers between chunks are not sized). The translation therefore numbers
//! the chunks along the files' contents alone, in TOC order: each regular file's content is a
//! range of that stream, its chunks tile it, and a chunk's compressed range runs from its unit
//! to the file's recorded end (`endOffset`), else to the next data unit or the TOC. What the
//! reader then serves is exactly the bytes the TOC's chunk digests vouch for; the stream is
//! not the layer's tar stream, so such a layer cannot be hashed into its diff_id by reading
//! its chunks (`LayerFormat::chunks_tile_the_tar`).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::writer::{classify, EntryTable};
use super::{
    normalize_name, Chunk, Entry, EntryKind, LayerFormat, Toc, FORMAT_VERSION, MAX_CHUNKS,
    MAX_CHUNK_SIZE, MAX_ENTRIES, MAX_TOC_SIZE, MAX_XATTRS,
};
use crate::chunk::Codec;
use crate::{Digest, Error, Limit, Result};

/// Root entries that mark where the files read at start-up end (and, for the second, that
/// none were recorded); never shown in the layer. eStargz's, also written by
/// stargz-snapshotter's zstd variant.
const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// The Brisk TOC of a `format` layer from its TOC JSON, whose compressed bytes start at
/// `toc_offset` in the blob (no chunk reaches past it). Counts are bounded while the JSON is
/// read, one entry at a time, and the result passes `Toc::validate`.
pub(super) fn parse(json: &[u8], toc_offset: u64, format: LayerFormat) -> Result<Toc> {
    let label = format.title();
    Error::check_limit(
        || format!("{label} TOC"),
        Limit::TocSize,
        json.len() as u64,
        MAX_TOC_SIZE,
    )?;
    let mut builder = Builder::new(format);
    let mut de = serde_json::Deserializer::from_slice(json);
    TocSeed(&mut builder)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| match builder.error.take() {
            Some(err) => err,
            None => Error::json(format!("{label} TOC"), e),
        })?;
    let toc = builder.finish(toc_offset)?;
    toc.validate()?;
    Ok(toc)
}

/// One element of the TOC's `entries`, as eStargz and zstd:chunked writers produce it (Go's
/// `omitempty`: absent means zero). Unknown keys are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: i64,
    #[serde(default)]
    gid: i64,
    #[serde(default)]
    dev_major: i64,
    #[serde(default)]
    dev_minor: i64,
    #[serde(default)]
    xattrs: Option<Xattrs>,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    inner_offset: i64,
    #[serde(default)]
    chunk_offset: i64,
    #[serde(default)]
    chunk_size: i64,
    #[serde(default)]
    chunk_digest: Option<String>,
    /// The whole file's digest: zstd:chunked names a file stored in one chunk by it alone.
    #[serde(default)]
    digest: Option<String>,
    /// zstd:chunked: the blob offset just past the file's last frame.
    #[serde(default)]
    end_offset: i64,
}

/// An entry's xattrs (values base64, as Go encodes bytes), refused past `MAX_XATTRS` while
/// they are read.
struct Xattrs(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Xattrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Xattrs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of xattrs")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Xattrs, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.len() >= MAX_XATTRS {
                        return Err(de::Error::custom(format!(
                            "an entry has more than {MAX_XATTRS} xattrs"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Xattrs(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The top-level object, handing each entry to the builder as it is read.
struct TocSeed<'a>(&'a mut Builder);

impl<'de> DeserializeSeed<'de> for TocSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TocSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (mut version, mut entries) = (None, false);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" if version.is_none() => version = Some(map.next_value::<u64>()?),
                "entries" if !entries => {
                    entries = true;
                    map.next_value_seed(EntriesSeed(&mut *self.0))?;
                }
                "version" | "entries" => {
                    return Err(de::Error::custom(format!("duplicate field {key:?}")))
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match version {
            Some(1) => Ok(()),
            Some(v) => Err(de::Error::custom(format!("version {v} is not supported"))),
            None => Err(de::Error::custom("no version")),
        }
    }
}

struct EntriesSeed<'a>(&'a mut Builder);

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<JEntry>()? {
            if let Err(err) = self.0.push(entry) {
                // The typed error is kept; serde only carries a message.
                let message = err.to_string();
                self.0.error = Some(err);
                return Err(de::Error::custom(message));
            }
        }
        Ok(())
    }
}

/// A regular file whose chunks have not covered it yet.
struct OpenFile {
    name: String,
    size: u64,
    covered: u64,
    /// Where its last chunk's compressed range ends, if the TOC says (`endOffset`).
    end: Option<u64>,
}

struct Builder {
    format: LayerFormat,
    /// `format`'s name, for errors.
    label: &'static str,
    entries: EntryTable,
    /// Chunks in blob order; the last one's compressed size is set once the next data member
    /// (or the TOC) shows where it ends.
    chunks: Vec<Chunk>,
    /// Length of the contents stream so far.
    content: u64,
    open: Option<OpenFile>,
    /// Blob offset of the last data member seen: members must come in blob order.
    last_member: Option<u64>,
    landmark: Option<u64>,
    /// The typed error behind a failed `push`.
    error: Option<Error>,
}

impl Builder {
    fn new(format: LayerFormat) -> Self {
        Self {
            format,
            label: format.title(),
            entries: EntryTable::new(MAX_ENTRIES),
            chunks: Vec::new(),
            content: 0,
            open: None,
            last_member: None,
            landmark: None,
            error: None,
        }
    }

    fn non_negative(&self, value: i64, field: &str, name: &str) -> Result<u64> {
        u64::try_from(value).map_err(|_| {
            Error::bad_toc(format!(
                "{} entry {:?} has a negative {field}",
                self.label,
                crate::error::short(name)
            ))
        })
    }

    fn push(&mut self, e: JEntry) -> Result<()> {
        let label = self.label;
        let bad = |why: &str| {
            Error::bad_toc(format!(
                "{label} entry {:?} {why}",
                crate::error::short(&e.name)
            ))
        };
        if e.inner_offset != 0 {
            return Err(bad(
                "starts inside a compressed member (innerOffset), which is not supported",
            ));
        }
        if e.kind == "chunk" {
            let Some(open) = self.open.take() else {
                return Err(bad("is a chunk that follows no regular file"));
            };
            if self.non_negative(e.chunk_offset, "chunk offset", &e.name)? != open.covered {
                return Err(bad(
                    "is a chunk that does not start where the last one ended",
                ));
            }
            return self.push_chunk(e, open);
        }
        if let Some(open) = &self.open {
            return Err(Error::bad_toc(format!(
                "{} file {:?} ends before its chunks cover it",
                self.label,
                crate::error::short(&open.name)
            )));
        }
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::Reg,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            _ => return Err(bad("has an unknown type")),
        };
        let size = self.non_negative(e.size, "size", &e.name)?;
        let landmark = kind == EntryKind::Reg
            && matches!(
                normalize_name(&e.name)?.as_str(),
                PREFETCH_LANDMARK | NO_PREFETCH_LANDMARK
            );
        if landmark {
            // Its member ends the chunk before it; its byte is no file of the layer.
            if e.offset > 0 {
                let offset = self.non_negative(e.offset, "offset", &e.name)?;
                self.member(offset, &e.name)?;
                if normalize_name(&e.name)? == PREFETCH_LANDMARK {
                    self.landmark = Some(offset);
                }
            }
            return Ok(());
        }
        let Some((kind, name)) = classify(&e.name, kind)? else {
            return Ok(());
        };
        let mut entry = Entry {
            kind,
            name,
            mode: (e.mode & 0o7777) as u32,
            uid: self.non_negative(e.uid, "uid", &e.name)?,
            gid: self.non_negative(e.gid, "gid", &e.name)?,
            size: 0,
            mtime: match e.modtime.as_deref() {
                None | Some("") => 0,
                Some(t) => rfc3339_seconds(t).ok_or_else(|| bad("has a malformed modtime"))?,
            },
            link: None,
            offset: None,
            dev_major: None,
            dev_minor: None,
            xattrs: e.xattrs.as_ref().map(|x| x.0.clone()).unwrap_or_default(),
        };
        match kind {
            EntryKind::Symlink => entry.link = Some(e.link_name.clone()),
            EntryKind::Hardlink => entry.link = Some(normalize_name(&e.link_name)?),
            EntryKind::Char | EntryKind::Block => {
                let dev = |v: i64, f: &str| {
                    u32::try_from(v).map_err(|_| bad(&format!("has an invalid {f}")))
                };
                entry.dev_major = Some(dev(e.dev_major, "device major")?);
                entry.dev_minor = Some(dev(e.dev_minor, "device minor")?);
            }
            _ => {}
        }
        if kind == EntryKind::Reg && size > 0 {
            if e.chunk_offset != 0 {
                return Err(bad("does not start with its first chunk"));
            }
            entry.size = size;
            entry.offset = Some(self.content);
            let end = self.non_negative(e.end_offset, "end offset", &e.name)?;
            let open = OpenFile {
                name: entry.name.clone(),
                size,
                covered: 0,
                end: (end > 0).then_some(end),
            };
            self.entries.insert(entry)?;
            return self.push_chunk(e, open);
        }
        if size > 0 && kind != EntryKind::Hardlink {
            return Err(bad("has content it cannot have"));
        }
        self.entries.insert(entry)
    }

    /// The chunk `e` describes, of file `open` (whose content so far is `open.covered`).
    fn push_chunk(&mut self, e: JEntry, mut open: OpenFile) -> Result<()> {
        let label = self.label;
        let bad = |why: &str| {
            Error::bad_toc(format!(
                "{label} chunk of {:?} {why}",
                crate::error::short(&open.name)
            ))
        };
        let left = open.size - open.covered;
        let len = match self.non_negative(e.chunk_size, "chunk size", &e.name)? {
            0 => left,
            n => n,
        };
        if len > left {
            return Err(bad("runs past the end of the file"));
        }
        Error::check_limit(
            || {
                format!(
                    "{} chunk of {:?}",
                    self.label,
                    crate::error::short(&open.name)
                )
            },
            Limit::ChunkSize,
            len,
            MAX_CHUNK_SIZE,
        )?;
        Error::check_limit(
            || format!("{} TOC", self.label),
            Limit::Chunks,
            self.chunks.len() as u64 + 1,
            MAX_CHUNKS as u64,
        )?;
        // zstd:chunked names a file kept in one chunk by the file's digest alone.
        let whole = open.covered == 0 && len == open.size;
        let digest: Digest = e
            .chunk_digest
            .as_deref()
            .filter(|d| !d.is_empty())
            .or(e.digest.as_deref().filter(|d| whole && !d.is_empty()))
            .ok_or_else(|| bad("has no chunkDigest"))?
            .parse()
            .map_err(|_| bad("has a malformed chunkDigest"))?;
        let offset = self.non_negative(e.offset, "offset", &e.name)?;
        if offset == 0 {
            return Err(bad("has no offset"));
        }
        self.member(offset, &open.name)?;
        self.chunks.push(Chunk {
            offset,
            size: 0,
            tar_offset: self.content,
            tar_size: len,
            digest,
            codec: match self.format {
                LayerFormat::ZstdChunked => Codec::ZstdPrefix,
                _ => Codec::GzipPrefix,
            },
        });
        self.content += len;
        open.covered += len;
        if open.covered < open.size {
            self.open = Some(open);
        } else if let Some(end) = open.end {
            if end <= offset {
                return Err(bad("ends before its last chunk starts"));
            }
            self.close_last(end);
        }
        Ok(())
    }

    /// A data member starts at `offset`: it must come after the last one, and it ends the
    /// chunk before it.
    fn member(&mut self, offset: u64, name: &str) -> Result<()> {
        if self.last_member.is_some_and(|last| offset <= last) {
            return Err(Error::bad_toc(format!(
                "{} entry {:?} is not in blob order",
                self.label,
                crate::error::short(name)
            )));
        }
        self.last_member = Some(offset);
        self.close_last(offset);
        Ok(())
    }

    fn close_last(&mut self, end: u64) {
        if let Some(last) = self.chunks.last_mut().filter(|c| c.size == 0) {
            last.size = end - last.offset;
        }
    }

    fn finish(mut self, toc_offset: u64) -> Result<Toc> {
        if let Some(open) = &self.open {
            return Err(Error::bad_toc(format!(
                "{} file {:?} ends before its chunks cover it",
                self.label,
                crate::error::short(&open.name)
            )));
        }
        if self.last_member.is_some_and(|last| last >= toc_offset) {
            return Err(Error::bad_toc(format!(
                "{} TOC names data at or after the TOC itself",
                self.label
            )));
        }
        self.close_last(toc_offset);
        if self.chunks.iter().any(|c| c.offset + c.size > toc_offset) {
            return Err(Error::bad_toc(format!(
                "{} TOC names data at or after the TOC itself",
                self.label
            )));
        }
        let prefetch = match self.landmark {
            Some(landmark) => (0..self.chunks.len() as u32)
                .take_while(|&i| self.chunks[i as usize].offset < landmark)
                .collect(),
            None => Vec::new(),
        };
        Ok(Toc {
            version: FORMAT_VERSION,
            tar_size: self.content,
            chunks: self.chunks,
            entries: self.entries.into_vec(),
            prefetch,
            format: self.format,
        })
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2019-08-20T10:30:43Z`, fractions and
/// offsets allowed, fractions dropped); `None` if it is not one.
fn rfc3339_seconds(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut rest = &t[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let zone = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (zh, zm) = (num(t.len() - 5..t.len() - 3)?, num(t.len() - 2..t.len())?);
            let z = zh * 3600 + zm * 60;
            if *sign == b'+' {
                z
            } else {
                -z
            }
        }
        _ => return None,
    };
    // Days from the civil date (the proleptic Gregorian calendar), March-based year.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s - zone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_are_read_in_seconds() {
        assert_eq!(rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_seconds("2019-08-20T10:30:43Z"), Some(1_566_297_043));
        assert_eq!(
            rfc3339_seconds("2019-08-20T12:30:43.123456+02:00"),
            Some(1_566_297_043)
        );
        assert_eq!(
            rfc3339_seconds("0001-01-01T00:00:00Z"),
            Some(-62_135_596_800)
        );
        for bad in [
            "",
            "2019-13-01T00:00:00Z",
            "2019-08-20 10:30",
            "2019-08-20T10:30:43",
        ] {
            assert_eq!(rfc3339_seconds(bad), None, "{bad:?}");
        }
    }
}
