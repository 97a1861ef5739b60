//! The fixed-size footer at the very end of a converted layer, and the TOC position it holds.
//!
//! Both the TOC and the footer sit in zstd skippable frames, which every zstd decoder passes
//! over, so `zstd -d` on the blob yields the tar stream alone.

use std::fmt;
use std::str::FromStr;

use super::{MAX_TOC_COMPRESSED_SIZE, MAX_TOC_SIZE};
use crate::error::short;
use crate::{Error, Limit, Result};

/// Skippable-frame magic for the TOC frame. Any of 0x184D2A50..=0x184D2A5F is skippable;
/// Brisk uses two fixed values so a dump of the blob shows which frame is which.
pub(crate) const TOC_FRAME_MAGIC: u32 = 0x184D_2A5B;
pub(crate) const FOOTER_FRAME_MAGIC: u32 = 0x184D_2A5C;

/// Identifies a Brisk footer inside its skippable frame.
const FOOTER_MAGIC: &[u8; 8] = b"BRISKTOC";

const FOOTER_PAYLOAD: usize = 48;

/// Total footer length: 8 bytes of skippable-frame header, 48 bytes of payload.
pub const FOOTER_SIZE: usize = 8 + FOOTER_PAYLOAD;

/// Where the compressed TOC lives in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TocPosition {
    /// Offset of the compressed TOC bytes (the TOC frame's payload) in the blob.
    pub offset: u64,
    /// Length of the compressed TOC bytes.
    pub size: u64,
    /// Length of the TOC once decompressed.
    pub uncompressed_size: u64,
    pub version: u32,
}

impl fmt::Display for TocPosition {
    /// The form of the `dev.brisk.toc.position` annotation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.offset, self.size, self.uncompressed_size, self.version
        )
    }
}

impl FromStr for TocPosition {
    type Err = Error;

    /// Parses the annotation form; a position claiming a TOC over the limits is refused here,
    /// before anything is fetched for it.
    fn from_str(s: &str) -> Result<Self> {
        let pos = Self::parse_fields(s)
            .ok_or_else(|| Error::bad_toc(format!("invalid TOC position {:?}", short(s))))?;
        pos.check_limits()?;
        Ok(pos)
    }
}

/// The decoded footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub toc: TocPosition,
    /// Reserved for format extensions; writers set zero and readers ignore unknown bits.
    pub flags: u32,
}

impl Footer {
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut out = [0u8; FOOTER_SIZE];
        out[0..4].copy_from_slice(&FOOTER_FRAME_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(FOOTER_PAYLOAD as u32).to_le_bytes());
        out[8..16].copy_from_slice(&self.toc.offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.toc.size.to_le_bytes());
        out[24..32].copy_from_slice(&self.toc.uncompressed_size.to_le_bytes());
        out[32..36].copy_from_slice(&self.toc.version.to_le_bytes());
        out[36..40].copy_from_slice(&self.flags.to_le_bytes());
        // 40..48 reserved, zero.
        out[48..56].copy_from_slice(FOOTER_MAGIC);
        out
    }

    /// Parses the last `FOOTER_SIZE` bytes of a blob of `blob_size` bytes, and checks that the
    /// TOC it points to lies inside the blob, before the footer.
    pub fn decode(bytes: &[u8], blob_size: u64) -> Result<Self> {
        let bytes: &[u8; FOOTER_SIZE] = bytes
            .try_into()
            .map_err(|_| Error::bad_toc("footer has the wrong length"))?;
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != FOOTER_FRAME_MAGIC
            || u32_at(4) != FOOTER_PAYLOAD as u32
            || &bytes[48..56] != FOOTER_MAGIC
        {
            return Err(Error::bad_toc("no Brisk footer at the end of the blob"));
        }
        let footer = Footer {
            toc: TocPosition {
                offset: u64_at(8),
                size: u64_at(16),
                uncompressed_size: u64_at(24),
                version: u32_at(32),
            },
            flags: u32_at(36),
        };
        footer.toc.check_within(blob_size)?;
        Ok(footer)
    }
}

impl TocPosition {
    /// The four fields of the annotation form, unchecked; `None` if it is not that form.
    pub(crate) fn parse_fields(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let mut next = || parts.next()?.parse::<u64>().ok();
        let pos = TocPosition {
            offset: next()?,
            size: next()?,
            uncompressed_size: next()?,
            version: u32::try_from(next()?).ok()?,
        };
        parts.next().is_none().then_some(pos)
    }

    /// Refuses a position whose TOC is larger than a reader fetches or decodes
    /// (`MAX_TOC_COMPRESSED_SIZE`, `MAX_TOC_SIZE`), or whose blob would end past `u64::MAX`.
    pub fn check_limits(&self) -> Result<()> {
        let what = || format!("TOC position {self}");
        Error::check_limit(
            what,
            Limit::TocCompressedSize,
            self.size,
            MAX_TOC_COMPRESSED_SIZE,
        )?;
        Error::check_limit(what, Limit::TocSize, self.uncompressed_size, MAX_TOC_SIZE)?;
        self.blob_size()
            .map(drop)
            .ok_or_else(|| Error::bad_toc(format!("TOC position {self} overflows")))
    }

    /// The size of the blob this position implies: the TOC frame and the footer end it.
    pub fn blob_size(&self) -> Option<u64> {
        self.offset
            .checked_add(self.size)?
            .checked_add(FOOTER_SIZE as u64)
    }

    /// The TOC frame header sits just before `offset`, and the footer just after the TOC;
    /// the TOC is within the limits.
    pub fn check_within(&self, blob_size: u64) -> Result<()> {
        self.check_limits()?;
        if self.offset < 8 || self.blob_size() != Some(blob_size) {
            return Err(Error::bad_toc(format!(
                "TOC position {self} does not fit a blob of {blob_size} bytes"
            )));
        }
        if self.version != super::FORMAT_VERSION {
            return Err(Error::bad_toc(format!(
                "version {} is not supported",
                self.version
            )));
        }
        Ok(())
    }

    /// The compressed TOC's range in the blob (checked positions never overflow; others are
    /// cut at `u64::MAX` rather than wrap).
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset.saturating_add(self.size)
    }
}

/// The 8-byte header of a skippable frame of `len` payload bytes.
pub(crate) fn skippable_header(magic: u32, len: usize) -> std::io::Result<[u8; 8]> {
    let len = u32::try_from(len).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "skippable frame too large",
        )
    })?;
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&magic.to_le_bytes());
    out[4..].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}
