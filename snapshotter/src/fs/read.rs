//! File reads: a byte range of a file becomes a range of the layer's tar stream, that range
//! becomes chunks, the chunks come from the layered cache, and the requested bytes are cut out
//! of them.
//!
//! Planning is cheap arithmetic and runs on the FUSE thread; fetching may wait on the network
//! and runs in a task on the daemon's runtime (`super::LayerFs::read` spawns it). Nothing here
//! decides where a chunk comes from: that is `Layered`'s job.

use std::ops::Range;
use std::sync::Arc;

use brisk_blobcache::chunk::{ChunkRef, VerifiedChunk};
use brisk_blobcache::layered::{Layered, Priority, Role};
use brisk_blobcache::toc::{Chunk, Toc};
use brisk_blobcache::Digest;
use bytes::Bytes;

use crate::{Error, Result};

/// One read the kernel made, as the read-trace hook sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadEvent {
    /// The reading thread, as the kernel names it in the daemon's pid namespace.
    pub pid: u32,
    pub ino: u64,
    /// The file's first path in the layer (a hardlinked file is reported under one name).
    pub path: String,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes served: the request clipped at the end of the file.
    pub len: u32,
    /// Indexes into the TOC's chunk table of the chunks the read needs.
    pub chunks: Vec<usize>,
}

/// The hook `LayerFs::with_recorder` installs. It runs on the FUSE thread, so it must be
/// cheap and must not block (a bounded, lossy push).
pub type Recorder = Arc<dyn Fn(ReadEvent) + Send + Sync>;

/// What one read needs: a range of the tar stream and the chunks that hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub range: Range<u64>,
    pub chunks: Range<usize>,
}

impl Plan {
    /// The plan for `size` bytes at `offset` of a file whose content is `content` in the tar
    /// stream; `None` when there is nothing to read (an empty file, or at or past the end).
    pub fn new(toc: &Toc, content: &Range<u64>, offset: u64, size: u32) -> Option<Self> {
        let start = content.start.saturating_add(offset).min(content.end);
        let end = start.saturating_add(u64::from(size)).min(content.end);
        (start < end).then(|| Self {
            range: start..end,
            chunks: toc.chunks_for(start..end),
        })
    }

    pub fn len(&self) -> u32 {
        // At most the requested `size`, which is a u32.
        (self.range.end - self.range.start) as u32
    }
}

/// Fetches the plan's chunks as an on-demand read and returns exactly the planned bytes, and
/// the slowest level they came from.
pub(crate) async fn fetch(
    cache: &Arc<Layered>,
    toc: &Toc,
    blob: Digest,
    plan: &Plan,
) -> Result<(Bytes, Role)> {
    let (got, from) = cache
        .read_many_from(&refs(toc, blob, plan.chunks.clone()), Priority::OnDemand)
        .await?;
    Ok((
        cut(&toc.chunks[plan.chunks.clone()], &got, &plan.range)?,
        from,
    ))
}

/// Fetches the chunks that hold `range` of the tar stream as a reader would, for read-ahead:
/// the reads that follow join them, or find them cached.
pub(crate) async fn fetch_ahead(
    cache: &Arc<Layered>,
    toc: &Toc,
    blob: Digest,
    range: Range<u64>,
) -> Result<()> {
    cache
        .read_many(&refs(toc, blob, toc.chunks_for(range)), Priority::OnDemand)
        .await?;
    Ok(())
}

/// The cache's names for the TOC's chunks `chunks` of layer `blob`.
fn refs(toc: &Toc, blob: Digest, chunks: Range<usize>) -> Vec<ChunkRef> {
    toc.chunks[chunks]
        .iter()
        .map(|c| ChunkRef::new(blob, c))
        .collect()
}

/// The bytes of `range` (of the tar stream) out of the chunks that hold it.
pub(super) fn cut(chunks: &[Chunk], got: &[VerifiedChunk], range: &Range<u64>) -> Result<Bytes> {
    let part = |c: &Chunk, v: &VerifiedChunk| -> Result<Bytes> {
        let lo = (range.start.max(c.tar_offset) - c.tar_offset) as usize;
        let hi = (range.end.min(c.tar_offset + c.tar_size) - c.tar_offset) as usize;
        let data = v.data();
        // VerifiedChunk checked the length against the TOC, so this only guards against a
        // future change there turning into a panic in a read.
        if lo > hi || hi > data.len() {
            return Err(Error::Cache(brisk_blobcache::Error::SizeMismatch {
                what: format!("chunk {}", c.digest),
                expected: c.tar_size,
                actual: data.len() as u64,
            }));
        }
        Ok(data.slice(lo..hi))
    };
    match (chunks, got) {
        // The common case, a read inside one chunk, shares the cached bytes without a copy.
        ([c], [v]) => part(c, v),
        _ => {
            let mut out = Vec::with_capacity((range.end - range.start) as usize);
            for (c, v) in chunks.iter().zip(got) {
                out.extend_from_slice(&part(c, v)?);
            }
            Ok(out.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toc(sizes: &[u64]) -> (Toc, Vec<VerifiedChunk>) {
        let (mut chunks, mut verified, mut at) = (Vec::new(), Vec::new(), 0);
        for (i, &size) in sizes.iter().enumerate() {
            let data: Vec<u8> = (at..at + size).map(|b| b as u8).collect();
            let chunk = Chunk {
                codec: Default::default(),
                offset: i as u64 * 10,
                size: 10,
                tar_offset: at,
                tar_size: size,
                digest: Digest::sha256(&data),
            };
            let r = ChunkRef::new(Digest::sha256(b"blob"), &chunk);
            verified.push(VerifiedChunk::check(&r, data.into()).unwrap());
            chunks.push(chunk);
            at += size;
        }
        let toc = Toc {
            format: Default::default(),
            version: 1,
            tar_size: at,
            chunks,
            entries: Vec::new(),
            prefetch: Vec::new(),
        };
        (toc, verified)
    }

    #[test]
    fn reads_are_clipped_to_the_file_and_map_to_the_chunks_holding_them() {
        let (toc, _) = toc(&[100, 100, 100]);
        let file = 50..250;
        let plan = Plan::new(&toc, &file, 0, 4096).unwrap();
        assert_eq!(
            (plan.range.clone(), plan.chunks.clone(), plan.len()),
            (50..250, 0..3, 200)
        );
        assert_eq!(Plan::new(&toc, &file, 60, 10).unwrap().chunks, 1..2);
        assert_eq!(Plan::new(&toc, &file, 199, 10).unwrap().range, 249..250);
        assert_eq!(Plan::new(&toc, &file, 200, 10), None, "at the end");
        assert_eq!(
            Plan::new(&toc, &file, u64::MAX, u32::MAX),
            None,
            "far past it"
        );
        assert_eq!(Plan::new(&toc, &(0..0), 0, 10), None);
    }

    #[test]
    fn bytes_are_cut_across_chunk_boundaries() {
        let (toc, got) = toc(&[100, 100, 100]);
        let expect = |r: Range<u64>| r.map(|b| b as u8).collect::<Vec<u8>>();
        let plan = Plan::new(&toc, &(50..250), 30, 150).unwrap();
        let bytes = cut(
            &toc.chunks[plan.chunks.clone()],
            &got[plan.chunks],
            &plan.range,
        );
        assert_eq!(bytes.unwrap(), expect(80..230));
        let one = cut(&toc.chunks[1..2], &got[1..2], &(120..130)).unwrap();
        assert_eq!(one, expect(120..130));
    }
}
