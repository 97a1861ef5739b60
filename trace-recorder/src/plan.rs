//! From a trace to the chunks to prefetch: each entry looked up in its layer's TOC, in trace
//! order, and left out when the layer is not the image's or its chunk changed.

use std::collections::HashMap;

use brisk_blobcache::chunk::ChunkRef;
use brisk_blobcache::toc::Toc;
use brisk_blobcache::Digest;

use crate::trace::Trace;

/// What a trace asks to prefetch on an image's layers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub chunks: Vec<ChunkRef>,
    /// Entries whose chunk is not in the layer's TOC any more, or has another digest: the
    /// trace was recorded on another version of the layer.
    pub stale: usize,
}

/// The chunks `trace` lists, for the image whose lazy layers have the TOCs in `layers` (by
/// blob). Entries of other layers are left out without counting: they are layers the image
/// does not serve lazily.
pub fn plan(trace: &Trace, layers: &HashMap<Digest, &Toc>) -> Plan {
    let mut plan = Plan::default();
    for e in &trace.entries {
        let Some(toc) = layers.get(&e.layer) else {
            continue;
        };
        match toc
            .chunks
            .get(e.chunk as usize)
            .filter(|c| c.digest == e.digest)
        {
            Some(c) => plan.chunks.push(ChunkRef::new(e.layer, c)),
            None => plan.stale += 1,
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceEntry;
    use brisk_blobcache::toc;

    fn toc_of(digests: &[&[u8]]) -> Toc {
        Toc {
            format: Default::default(),
            version: toc::FORMAT_VERSION,
            tar_size: 100 * digests.len() as u64,
            chunks: digests
                .iter()
                .enumerate()
                .map(|(i, d)| toc::Chunk {
                    codec: Default::default(),
                    offset: 10 * i as u64,
                    size: 10,
                    tar_offset: 100 * i as u64,
                    tar_size: 100,
                    digest: Digest::sha256(d),
                })
                .collect(),
            entries: Vec::new(),
            prefetch: Vec::new(),
        }
    }

    fn entry(layer: Digest, chunk: u32, digest: &[u8]) -> TraceEntry {
        TraceEntry {
            layer,
            chunk,
            digest: Digest::sha256(digest),
            at_ms: 0,
            path: "f".into(),
        }
    }

    #[test]
    fn a_trace_becomes_its_chunks_in_order_and_changed_chunks_are_counted_stale() {
        let (a, b, gone) = (
            Digest::sha256(b"a"),
            Digest::sha256(b"b"),
            Digest::sha256(b"not lazy here"),
        );
        let (toc_a, toc_b) = (toc_of(&[b"a0", b"a1"]), toc_of(&[b"b0"]));
        let layers = HashMap::from([(a, &toc_a), (b, &toc_b)]);
        let trace = Trace {
            entries: vec![
                entry(b, 0, b"b0"),
                entry(gone, 0, b"x"),
                entry(a, 1, b"a1"),
                entry(a, 0, b"changed"),
                entry(a, 7, b"past the end"),
            ],
            ..Trace::new(Digest::sha256(b"image"))
        };
        let plan = plan(&trace, &layers);
        assert_eq!(
            plan.chunks,
            vec![
                ChunkRef::new(b, &toc_b.chunks[0]),
                ChunkRef::new(a, &toc_a.chunks[1]),
            ]
        );
        assert_eq!(plan.stale, 2);
    }
}
