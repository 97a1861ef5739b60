//! What a chunk is and where it can be found, and the one type that proves its bytes are right.

use std::ops::Range;

use bytes::Bytes;

use crate::toc::{Chunk, Toc};
use crate::Digest;

/// A chunk's identity (the sha256 of its uncompressed bytes) and its location (its blob and
/// compressed range, which only the registry level needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub digest: Digest,
    pub blob: Digest,
    pub compressed: Range<u64>,
    pub uncompressed_len: u64,
}

impl ChunkRef {
    /// The reference for chunk `chunk` of a layer blob described by a TOC.
    pub fn new(blob: Digest, chunk: &Chunk) -> Self {
        Self {
            digest: chunk.digest,
            blob,
            compressed: chunk.compressed_range(),
            uncompressed_len: chunk.tar_size,
        }
    }

    /// Every chunk of a layer, in blob order.
    pub fn all(blob: Digest, toc: &Toc) -> Vec<Self> {
        toc.chunks.iter().map(|c| Self::new(blob, c)).collect()
    }
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

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }
}
