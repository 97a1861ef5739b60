//! zstd:chunked layers (containers/storage's format, also stargz-snapshotter's zstd variant
//! of eStargz) read as they are: the annotations that locate and authenticate the TOC, the
//! TOC (one zstd frame of JSON in a skippable frame), and its translation into Brisk's TOC
//! (`foreign`).
//!
//! The reader needs no footer: the manifest annotations give the TOC's position and the
//! digest of its compressed bytes, which is checked before anything is decompressed.

use super::{LayerFormat, Toc, TocPosition, MAX_TOC_COMPRESSED_SIZE, MAX_TOC_SIZE};
use crate::error::short;
use crate::{Digest, Error, Limit, Result};

/// sha256 of the compressed TOC (the skippable frame's payload), and its position as
/// `<offset>:<compressed length>:<uncompressed length>:<type>`: containers/storage's keys
/// since v1.44.
pub const ANNOTATION_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
pub const ANNOTATION_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";

/// The same, under the keys written before (containers/storage < 1.44, as Debian 12's skopeo
/// and stargz-snapshotter's `--zstdchunked` write them).
pub const LEGACY_ANNOTATION_CHECKSUM: &str = "io.containers.zstd-chunked.manifest-checksum";
pub const LEGACY_ANNOTATION_POSITION: &str = "io.containers.zstd-chunked.manifest-position";

/// The one TOC type the format defines (`ManifestTypeCRFS`).
const TOC_TYPE: u32 = 1;

/// Skippable-frame header in front of the compressed TOC.
const SKIPPABLE_HEADER: u64 = 8;

/// The checksum and position annotations of a layer, new keys first; `None` unless both of
/// one generation are there.
pub fn annotations(get: impl Fn(&str) -> Option<String>) -> Option<(String, Option<TocPosition>)> {
    [
        (ANNOTATION_CHECKSUM, ANNOTATION_POSITION),
        (LEGACY_ANNOTATION_CHECKSUM, LEGACY_ANNOTATION_POSITION),
    ]
    .into_iter()
    .find_map(|(checksum, position)| {
        let checksum = get(checksum)?;
        Some((
            checksum,
            get(position).and_then(|p| TocPosition::parse_fields(&p)),
        ))
    })
}

/// A zstd:chunked position fits a blob of `blob_size` bytes (its skippable header before it,
/// all of it inside the blob), has the format's one type, and is within what a reader fetches
/// and decodes.
pub fn check_within(position: &TocPosition, blob_size: u64) -> Result<()> {
    let what = || format!("zstd:chunked TOC position {position}");
    Error::check_limit(
        what,
        Limit::TocCompressedSize,
        position.size,
        MAX_TOC_COMPRESSED_SIZE,
    )?;
    Error::check_limit(
        what,
        Limit::TocSize,
        position.uncompressed_size,
        MAX_TOC_SIZE,
    )?;
    let inside = position
        .offset
        .checked_add(position.size)
        .is_some_and(|end| end <= blob_size);
    if position.version != TOC_TYPE
        || position.offset < SKIPPABLE_HEADER
        || position.size == 0
        || !inside
    {
        return Err(Error::bad_toc(format!(
            "zstd:chunked TOC position {position} does not fit a blob of {blob_size} bytes"
        )));
    }
    Ok(())
}

/// The Brisk TOC of a zstd:chunked layer from its compressed TOC bytes: checked against
/// `expected` first, then decompressed (to at most the position's length, which is within
/// the limits), then parsed; no chunk may reach the TOC's skippable frame.
pub fn decode(payload: &[u8], position: &TocPosition, expected: &Digest) -> Result<Toc> {
    let actual = Digest::sha256(payload);
    if actual != *expected {
        return Err(Error::Toc(super::TocError::DigestMismatch {
            expected: *expected,
            actual,
        }));
    }
    Error::check_limit(
        || "zstd:chunked TOC".to_owned(),
        Limit::TocSize,
        position.uncompressed_size,
        MAX_TOC_SIZE,
    )?;
    let bad = |e: std::io::Error| Error::bad_toc(format!("zstd:chunked TOC does not decode: {e}"));
    let mut json = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(payload).map_err(bad)?;
    std::io::Read::read_to_end(
        &mut std::io::Read::take(decoder, position.uncompressed_size + 1),
        &mut json,
    )
    .map_err(bad)?;
    if json.len() as u64 != position.uncompressed_size {
        return Err(Error::bad_toc(format!(
            "zstd:chunked TOC decodes to {} bytes, not the {} its position {} says",
            json.len(),
            position.uncompressed_size,
            short(&position.to_string())
        )));
    }
    let data_end = position
        .offset
        .checked_sub(SKIPPABLE_HEADER)
        .ok_or_else(|| Error::bad_toc("zstd:chunked TOC position is inside its frame header"))?;
    super::foreign::parse(&json, data_end, LayerFormat::ZstdChunked)
}

#[cfg(test)]
mod tests;
