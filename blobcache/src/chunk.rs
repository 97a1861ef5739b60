//! What a chunk is and where it can be found, and the one type that proves its bytes are right.

use std::ops::Range;

use bytes::Bytes;

use crate::toc::{self, Chunk, Toc};
use crate::{Digest, Error, Limit, Result};

/// A chunk's identity (the sha256 of its uncompressed bytes) and its location (its blob and
/// compressed range, which only the registry level needs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub digest: Digest,
    pub blob: Digest,
    pub compressed: Range<u64>,
    pub uncompressed_len: u64,
    /// How the compressed range decodes; only the registry level needs it.
    pub codec: Codec,
}

/// How a chunk's compressed bytes decode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// One zstd frame holding exactly the chunk (Brisk's own layers).
    #[default]
    Zstd,
    /// A gzip member whose first `uncompressed_len` decoded bytes are the chunk; the rest of
    /// the member (tar padding and the headers of later entries) is not part of it (eStargz).
    GzipPrefix,
    /// A zstd frame (possibly followed by others) whose first `uncompressed_len` decoded bytes
    /// are the chunk (zstd:chunked).
    ZstdPrefix,
}

impl Codec {
    /// The most compressed bytes a chunk of `n` decoded bytes may span. A gzip member also
    /// holds the tar headers that follow the chunk, which the TOC does not size, so its bound
    /// is the largest any chunk may have.
    pub const fn bound(self, n: u64) -> u64 {
        match self {
            Codec::Zstd => toc::compressed_bound(n),
            Codec::GzipPrefix | Codec::ZstdPrefix => toc::MAX_CHUNK_COMPRESSED_SIZE,
        }
    }
}

impl ChunkRef {
    /// The reference for chunk `chunk` of a layer blob described by a TOC.
    pub fn new(blob: Digest, chunk: &Chunk) -> Self {
        Self {
            digest: chunk.digest,
            blob,
            compressed: chunk.compressed_range(),
            uncompressed_len: chunk.tar_size,
            codec: chunk.codec,
        }
    }

    /// Refuses a reference no TOC within the limits can hold: an empty or oversized compressed
    /// range, or a decoded length over `MAX_CHUNK_SIZE` (readers size a buffer from it). The
    /// read path checks every reference it is handed, from a TOC or from a zone peer.
    pub fn check(&self) -> Result<()> {
        let what = || format!("Chunk {}", self.digest);
        if self.compressed.is_empty() || self.uncompressed_len == 0 {
            return Err(Error::bad_toc(format!(
                "chunk {} has an empty range or length",
                self.digest
            )));
        }
        Error::check_limit(
            what,
            Limit::ChunkSize,
            self.uncompressed_len,
            toc::MAX_CHUNK_SIZE,
        )?;
        Error::check_limit(
            what,
            Limit::ChunkCompressedSize,
            self.compressed.end - self.compressed.start,
            self.codec.bound(self.uncompressed_len),
        )
    }

    /// Every chunk of a layer, in blob order.
    pub fn all(blob: Digest, toc: &Toc) -> Vec<Self> {
        toc.chunks.iter().map(|c| Self::new(blob, c)).collect()
    }
}

/// Why a frame is not the chunk it should hold.
#[derive(Debug)]
pub enum BadFrame {
    /// Not a zstd frame that decodes within the chunk's length.
    Undecodable(std::io::Error),
    /// It decodes, to other bytes (kept for a read path to count and discard).
    Mismatch(Bytes),
}

/// Bytes whose sha256 matched their `ChunkRef`. `VerifiedChunk::check` is the only
/// constructor, so no level can be handed unverified bytes to keep and no reader can be
/// handed unverified bytes to serve.
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    digest: Digest,
    data: Bytes,
}

impl VerifiedChunk {
    pub fn check(chunk: &ChunkRef, data: Bytes) -> Option<Self> {
        (data.len() as u64 == chunk.uncompressed_len && Digest::sha256(&data) == chunk.digest)
            .then_some(Self {
                digest: chunk.digest,
                data,
            })
    }

    /// Decompresses one chunk's compressed bytes and checks them against `chunk`: the one
    /// place chunks are decoded, for the registry level, `toc::decode_chunk` and every tool.
    /// `chunk` must have passed `ChunkRef::check`, which bounds the buffer.
    pub fn decode(chunk: &ChunkRef, frame: &[u8]) -> std::result::Result<Self, BadFrame> {
        let len = chunk.uncompressed_len as usize;
        let data = match chunk.codec {
            Codec::Zstd => zstd::bulk::decompress(frame, len).map_err(BadFrame::Undecodable)?,
            Codec::GzipPrefix => {
                // Only the member's first `len` bytes are the chunk, so its CRC (which covers
                // the whole member) is never reached; the digest check below stands for it.
                let mut data = vec![0u8; len];
                std::io::Read::read_exact(&mut flate2::read::GzDecoder::new(frame), &mut data)
                    .map_err(BadFrame::Undecodable)?;
                data
            }
            Codec::ZstdPrefix => {
                let mut data = vec![0u8; len];
                let decoder = zstd::stream::read::Decoder::with_buffer(frame)
                    .map_err(BadFrame::Undecodable)?;
                std::io::Read::read_exact(&mut decoder.single_frame(), &mut data)
                    .map_err(BadFrame::Undecodable)?;
                data
            }
        };
        let data = Bytes::from(data);
        Self::check(chunk, data.clone()).ok_or(BadFrame::Mismatch(data))
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toc::TocError;

    #[test]
    fn references_no_toc_could_hold_are_refused() {
        let good = ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(b"x"),
            blob: Digest::sha256(b"blob"),
            compressed: 100..200,
            uncompressed_len: 1000,
        };
        good.check().unwrap();
        let over = |r: &ChunkRef| match r.check() {
            Err(Error::OverLimit {
                limit, value, max, ..
            }) => (limit, value, max),
            other => panic!("expected a limit error, got {other:?}"),
        };
        let huge = ChunkRef {
            uncompressed_len: 1 << 40,
            ..good.clone()
        };
        assert_eq!(
            over(&huge),
            (Limit::ChunkSize, 1 << 40, toc::MAX_CHUNK_SIZE)
        );
        let wide = ChunkRef {
            compressed: 0..1 << 40,
            ..good.clone()
        };
        let bound = toc::compressed_bound(1000);
        assert_eq!(over(&wide), (Limit::ChunkCompressedSize, 1 << 40, bound));
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 200..100;
        for empty in [
            ChunkRef {
                compressed: backwards,
                ..good.clone()
            },
            ChunkRef {
                uncompressed_len: 0,
                ..good
            },
        ] {
            assert!(
                matches!(empty.check(), Err(Error::Toc(TocError::Malformed(_)))),
                "{empty:?}"
            );
        }
    }
}
