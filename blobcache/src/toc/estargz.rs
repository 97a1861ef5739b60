//! eStargz layers read as they are: the footer that locates their TOC, the TOC itself (a gzip
//! member holding a tar whose one entry is `stargz.index.json`), and its translation into a
//! Brisk `Toc`.
//!
//! The JSON is translated by `foreign`, which says how its chunks become Brisk's.

use std::io::Read;

use super::{LayerFormat, Toc, TocPosition, MAX_TOC_COMPRESSED_SIZE, MAX_TOC_SIZE};
use crate::{Error, Limit, Result};

/// Layer annotation (and, under containerd's snapshot prefix, label): sha256 of the TOC JSON.
pub const ANNOTATION_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// The footer eStargz writers put last: an empty gzip member whose extra field holds the TOC
/// offset.
pub const FOOTER_SIZE: usize = 51;

/// The footer of the older stargz format (no subfield header in the extra field).
pub const LEGACY_FOOTER_SIZE: usize = 47;

/// The TOC tar's entry.
const TOC_NAME: &str = "stargz.index.json";

/// Tar bytes the TOC member may hold beyond the JSON: its header, PAX records, padding and
/// the end-of-archive.
const TOC_TAR_OVERHEAD: u64 = 64 << 10;

/// Where the TOC of an eStargz blob of `blob_size` bytes lies, from the blob's last
/// `FOOTER_SIZE` bytes (or fewer, for a blob shorter than that): the position's `version`
/// is the footer's length, which is how the TOC's end is found again from the position alone.
pub fn footer_position(tail: &[u8], blob_size: u64) -> Result<TocPosition> {
    let hex_offset = |hex: &[u8]| {
        std::str::from_utf8(hex)
            .ok()
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    let gzip_with_extra =
        |f: &[u8]| f.len() >= 12 && f[0] == 0x1f && f[1] == 0x8b && f[2] == 8 && f[3] & 4 != 0;
    let mut found = None;
    if tail.len() >= FOOTER_SIZE {
        let f = &tail[tail.len() - FOOTER_SIZE..];
        if gzip_with_extra(f) && f[10..16] == [26, 0, b'S', b'G', 22, 0] && &f[32..38] == b"STARGZ"
        {
            found = hex_offset(&f[16..32]).map(|o| (o, FOOTER_SIZE));
        }
    }
    if found.is_none() && tail.len() >= LEGACY_FOOTER_SIZE {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE..];
        if gzip_with_extra(f) && f[10..12] == [22, 0] && &f[28..34] == b"STARGZ" {
            found = hex_offset(&f[12..28]).map(|o| (o, LEGACY_FOOTER_SIZE));
        }
    }
    let (offset, footer) =
        found.ok_or_else(|| Error::bad_toc("no eStargz footer at the end of the blob"))?;
    let position = TocPosition {
        offset,
        size: blob_size
            .checked_sub(footer as u64)
            .and_then(|end| end.checked_sub(offset))
            .ok_or_else(|| {
                Error::bad_toc(format!(
                    "eStargz footer puts the TOC at {offset}, past the end of a blob of {blob_size} bytes"
                ))
            })?,
        uncompressed_size: 0,
        version: footer as u32,
    };
    check_within(&position, blob_size)?;
    Ok(position)
}

/// An eStargz position (as `footer_position` makes them, or as recorded) fits a blob of
/// `blob_size` bytes, and its TOC is within what a reader fetches.
pub fn check_within(position: &TocPosition, blob_size: u64) -> Result<()> {
    Error::check_limit(
        || format!("eStargz TOC position {position}"),
        Limit::TocCompressedSize,
        position.size,
        MAX_TOC_COMPRESSED_SIZE,
    )?;
    let footer = position.version as u64;
    let fits = [FOOTER_SIZE as u64, LEGACY_FOOTER_SIZE as u64].contains(&footer)
        && position.size > 0
        && position
            .offset
            .checked_add(position.size)
            .and_then(|e| e.checked_add(footer))
            == Some(blob_size);
    if !fits {
        return Err(Error::bad_toc(format!(
            "eStargz TOC position {position} does not fit a blob of {blob_size} bytes"
        )));
    }
    Ok(())
}

/// The TOC JSON out of the TOC's gzip member: decoded (at most `MAX_TOC_SIZE` and a tar's
/// overhead, whatever the member claims), the first tar entry, which must be
/// `stargz.index.json`. The caller checks the JSON against the annotated digest.
pub fn toc_json(member: &[u8]) -> Result<Vec<u8>> {
    Error::check_limit(
        || "eStargz TOC".to_owned(),
        Limit::TocCompressedSize,
        member.len() as u64,
        MAX_TOC_COMPRESSED_SIZE,
    )?;
    let bad = |e: std::io::Error| Error::bad_toc(format!("eStargz TOC does not decode: {e}"));
    let decoded = flate2::read::GzDecoder::new(member).take(MAX_TOC_SIZE + TOC_TAR_OVERHEAD);
    let mut archive = tar::Archive::new(decoded);
    let mut entries = archive.entries().map_err(bad)?;
    let mut entry = entries
        .next()
        .ok_or_else(|| Error::bad_toc("eStargz TOC member holds no tar entry"))?
        .map_err(bad)?;
    let name = entry.path_bytes().into_owned();
    if name != TOC_NAME.as_bytes() {
        return Err(Error::bad_toc(format!(
            "eStargz TOC member starts with {:?}, not {TOC_NAME}",
            crate::error::short(&String::from_utf8_lossy(&name))
        )));
    }
    let size = entry.size();
    Error::check_limit(
        || "eStargz TOC".to_owned(),
        Limit::TocSize,
        size,
        MAX_TOC_SIZE,
    )?;
    let mut json = Vec::new();
    (&mut entry)
        .take(size)
        .read_to_end(&mut json)
        .map_err(bad)?;
    if json.len() as u64 != size {
        return Err(Error::bad_toc("eStargz TOC member ends inside the TOC"));
    }
    Ok(json)
}

/// The Brisk TOC of an eStargz layer from its TOC JSON, whose compressed bytes start at
/// `toc_offset` in the blob (where the last chunk's member range ends).
pub fn parse(json: &[u8], toc_offset: u64) -> Result<Toc> {
    super::foreign::parse(json, toc_offset, LayerFormat::Estargz)
}

#[cfg(test)]
mod tests;
