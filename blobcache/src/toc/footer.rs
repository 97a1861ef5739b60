//! The fixed-size footer at the very end of a converted layer, and the TOC position it holds.
//!
//! Both the TOC and the footer sit in zstd skippable frames, which every zstd decoder passes
//! over, so `zstd -d` on the blob yields the tar stream alone.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

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

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::bad_toc(format!("invalid TOC position {s:?}"));
        let mut parts = s.split(':');
        let mut next = || {
            parts
                .next()
                .ok_or_else(bad)?
                .parse::<u64>()
                .map_err(|_| bad())
        };
        let pos = TocPosition {
            offset: next()?,
            size: next()?,
            uncompressed_size: next()?,
            version: u32::try_from(next()?).map_err(|_| bad())?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
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
    /// The TOC frame header sits just before `offset`, and the footer just after the TOC.
    pub fn check_within(&self, blob_size: u64) -> Result<()> {
        let end = self.offset.checked_add(self.size);
        if self.offset < 8 || end.and_then(|e| e.checked_add(FOOTER_SIZE as u64)) != Some(blob_size)
        {
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

    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.size
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
