//! From a layer descriptor to an authenticated TOC: the annotations that make a layer lazy,
//! the range reads that fetch its TOC, and the checks that tie the TOC to the manifest.
//!
//! Callers supply the range reader (a registry, an OCI layout, a cache), so this is the one
//! implementation for the converter's checks, `brisk cat` and the snapshotter.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;

use bytes::Bytes;

use crate::toc::{self, Footer, Toc, TocPosition, FOOTER_SIZE};
use crate::{Digest, Error, Result};

/// A layer whose descriptor names a TOC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LazyLayer {
    pub blob: Digest,
    pub size: u64,
    pub toc_digest: Digest,
    /// From the position annotation when present; otherwise the footer is read.
    pub position: Option<TocPosition>,
    /// Where the chunks listed for prefetch lie (the spans annotation), unverified: worth
    /// fetching before the TOC arrives, usable only once its digests check them.
    pub prefetch_spans: Vec<Range<u64>>,
}

impl LazyLayer {
    /// `None` when the descriptor has no TOC annotation (the layer is not lazy).
    pub fn from_descriptor(
        blob: Digest,
        size: u64,
        annotations: Option<&HashMap<String, String>>,
    ) -> Result<Option<Self>> {
        let Some(annotations) = annotations else {
            return Ok(None);
        };
        let Some(toc_digest) = annotations.get(toc::ANNOTATION_TOC_DIGEST) else {
            return Ok(None);
        };
        let position = annotations
            .get(toc::ANNOTATION_TOC_POSITION)
            .and_then(|p| p.parse().ok());
        let prefetch_spans = annotations
            .get(toc::ANNOTATION_PREFETCH_SPANS)
            .map(|v| toc::parse_spans(v, size))
            .unwrap_or_default();
        Ok(Some(Self {
            blob,
            size,
            toc_digest: toc_digest.parse()?,
            position,
            prefetch_spans,
        }))
    }

    /// Where the TOC is: the annotated position, or what the footer says (one tail read).
    pub async fn toc_position<F, Fut, E>(&self, read: F) -> Result<TocPosition, E>
    where
        F: FnOnce(Range<u64>) -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: From<Error>,
    {
        let position = match self.position {
            Some(p) => p,
            None => {
                if self.size < FOOTER_SIZE as u64 {
                    return Err(Error::bad_toc("blob is smaller than a footer").into());
                }
                let tail = read(self.size - FOOTER_SIZE as u64..self.size).await?;
                Footer::decode(&tail, self.size)?.toc
            }
        };
        position.check_within(self.size)?;
        Ok(position)
    }

    /// Authenticates the compressed TOC bytes against the manifest's digest, decodes them and
    /// checks that the chunks end where the TOC frame begins.
    pub fn decode_toc(&self, payload: &[u8], position: &TocPosition) -> Result<Toc> {
        let toc = Toc::decode(payload, position.uncompressed_size, Some(&self.toc_digest))?;
        if toc.data_size() + 8 != position.offset {
            return Err(Error::bad_toc(
                "chunks do not end where the TOC frame begins",
            ));
        }
        Ok(toc)
    }
}
