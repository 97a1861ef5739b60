//! Prefetch batching: chunks fetched ahead of need, in the order given, as runs of neighbours
//! (one range request each), with about a window of bytes on the way at a time, always behind
//! on-demand reads.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Layered, Reader};
use crate::chunk::ChunkRef;
use crate::source::Priority;

/// Compressed bytes prefetch keeps on the way before it starts another batch: several round
/// trips' worth on a WAN link, little enough that chunks arrive about in trace order.
const PREFETCH_WINDOW: u64 = 1 << 20;

/// Prefetch keeps chunks this close in one range request (the gap is read and dropped): the
/// registry level's own limit.
const PREFETCH_MAX_GAP: u64 = 64 * 1024;

/// `chunks` cut into runs of consecutive chunks that lie next to each other in one blob, each
/// up to about `batch_bytes` compressed. References outside the limits are left out (their
/// range could not even be sized).
pub(super) fn batches(chunks: Vec<ChunkRef>, batch_bytes: u64) -> Vec<Vec<ChunkRef>> {
    let mut batches: Vec<Vec<ChunkRef>> = Vec::new();
    let mut size = 0;
    for c in chunks.into_iter().filter(|c| c.check().is_ok()) {
        let follows = batches.last().and_then(|b| b.last()).is_some_and(|last| {
            last.blob == c.blob
                && c.compressed.start >= last.compressed.end
                && c.compressed.start - last.compressed.end <= PREFETCH_MAX_GAP
        });
        if !follows || size >= batch_bytes {
            batches.push(Vec::new());
            size = 0;
        }
        size += c.compressed.end - c.compressed.start;
        batches.last_mut().expect("a batch was just pushed").push(c);
    }
    batches
}

impl Layered {
    /// Fetches `chunks` in the background, in the order given, always behind on-demand reads.
    /// A few batches run at once, so the chunks needed first arrive first instead of sharing
    /// the link with later ones. Stops early when `cancel` fires. Returns how many chunks it
    /// made local.
    pub fn prefetch(
        self: &Arc<Self>,
        chunks: Vec<ChunkRef>,
        batch_bytes: u64,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<usize> {
        let this = self.clone();
        tokio::spawn(async move {
            // The next batch starts once what is still to arrive fits the window: the link
            // stays busy across round trips, and chunks keep arriving about in the order given.
            let mut pending = futures::stream::FuturesUnordered::new();
            let mut outstanding = 0u64;
            let mut made_local = 0;
            let mut batches = batches(chunks, batch_bytes).into_iter();
            loop {
                while pending.is_empty() || outstanding < PREFETCH_WINDOW {
                    if cancel.is_cancelled() {
                        break;
                    }
                    let Some(batch) = batches.next() else { break };
                    let flights = this.join_or_start(&batch, Priority::Prefetch, Reader::Local);
                    for (c, flight) in batch.iter().zip(flights) {
                        let size = c.compressed.end - c.compressed.start;
                        outstanding += size;
                        let flight = flight.expect("local reads are never declined");
                        pending.push(async move { (size, flight.await) });
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = pending.next() => match next {
                        Some((size, outcome)) => {
                            outstanding -= size;
                            match outcome {
                                Ok(_) => made_local += 1,
                                Err(err) => tracing::debug!(%err, "prefetch of a chunk failed"),
                            }
                        }
                        None => break,
                    },
                }
            }
            made_local
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    fn chunk(blob: &[u8], range: std::ops::Range<u64>) -> ChunkRef {
        ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(&range.start.to_le_bytes()),
            blob: Digest::sha256(blob),
            compressed: range,
            uncompressed_len: 10,
        }
    }

    #[test]
    fn batches_are_runs_of_close_neighbours_in_one_blob_up_to_the_size() {
        let chunks = vec![
            chunk(b"a", 0..100),
            chunk(b"a", 100..200),
            // A gap within the limit joins; past it, a new batch.
            chunk(b"a", 200 + PREFETCH_MAX_GAP..300 + PREFETCH_MAX_GAP),
            chunk(b"a", 400 + 2 * PREFETCH_MAX_GAP..500 + 2 * PREFETCH_MAX_GAP),
            // Another blob; then backwards in the first blob.
            chunk(b"b", 500..600),
            chunk(b"a", 0..50),
        ];
        let sizes: Vec<usize> = batches(chunks.clone(), 1 << 20)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [3, 1, 1, 1]);
        // The size limit starts a new batch once reached.
        let sizes: Vec<usize> = batches(chunks[..2].to_vec(), 100)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [1, 1]);
        // A reference outside the limits is left out.
        let empty = chunk(b"a", 5..5);
        assert!(batches(vec![empty], 1 << 20).is_empty());
    }
}
