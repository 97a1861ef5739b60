//! From a layer descriptor to an authenticated TOC: the annotations that make a layer lazy,
//! the range reads that fetch its TOC, and the checks that tie the TOC to the manifest.
//!
//! Callers supply the range reader (a registry, an OCI layout, a cache), so this is the one
//! implementation for the converter's checks, `brisk cat` and the snapshotter.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;

use bytes::Bytes;

use crate::toc::{self, estargz, zstd_chunked, Footer, LayerFormat, Toc, TocPosition, FOOTER_SIZE};
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
    /// The format whose annotation named the TOC: it decides how the TOC is found and read,
    /// and what `toc_digest` covers.
    pub format: LayerFormat,
}

impl LazyLayer {
    /// `None` when the descriptor has no TOC annotation (the layer is not lazy). A malformed
    /// position annotation is ignored (the footer is read instead); a well-formed one that
    /// claims a TOC over the limits refuses the layer, before anything is fetched.
    pub fn from_descriptor(
        blob: Digest,
        size: u64,
        annotations: Option<&HashMap<String, String>>,
    ) -> Result<Option<Self>> {
        let Some(annotations) = annotations else {
            return Ok(None);
        };
        let Some(toc_digest) = annotations.get(toc::ANNOTATION_TOC_DIGEST) else {
            // zstd:chunked (its annotations name the TOC's place), else eStargz (its footer
            // does). stargz-snapshotter's zstd variant carries both and is the former.
            if let Some((checksum, position)) =
                zstd_chunked::annotations(|k| annotations.get(k).cloned())
            {
                return Self::new(blob, size, &checksum, position, None)
                    .map(|l| Some(l.in_format(LayerFormat::ZstdChunked)));
            }
            return match annotations.get(estargz::ANNOTATION_TOC_DIGEST) {
                Some(digest) => Self::new(blob, size, digest, None, None)
                    .map(|l| Some(l.in_format(LayerFormat::Estargz))),
                None => Ok(None),
            };
        };
        let position = checked_position(annotations.get(toc::ANNOTATION_TOC_POSITION))?;
        let spans = annotations.get(toc::ANNOTATION_PREFETCH_SPANS);
        Self::new(blob, size, toc_digest, position, spans).map(Some)
    }

    /// The same layer, read as `format`.
    pub fn in_format(self, format: LayerFormat) -> Self {
        Self { format, ..self }
    }

    /// The layer as the label copies of its annotations describe it (what containerd passes
    /// to `Prepare`), with no manifest at hand: `None` unless both the TOC digest and a
    /// well-formed TOC position are there. The blob's size follows from the position, since
    /// the TOC frame and the footer end the blob; a position that claims a TOC over the
    /// limits, or a blob past `u64::MAX`, is an error, before anything is fetched.
    pub fn from_labels(
        blob: Digest,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Self>> {
        let Some(toc_digest) = labels.get(toc::LABEL_TOC_DIGEST) else {
            return Ok(None);
        };
        let Some(position) = checked_position(labels.get(toc::LABEL_TOC_POSITION))? else {
            return Ok(None);
        };
        let size = position
            .blob_size()
            .ok_or_else(|| Error::bad_toc(format!("TOC position {position} overflows")))?;
        let spans = labels.get(toc::LABEL_PREFETCH_SPANS);
        Self::new(blob, size, toc_digest, Some(position), spans).map(Some)
    }

    fn new(
        blob: Digest,
        size: u64,
        toc_digest: &str,
        position: Option<TocPosition>,
        spans: Option<&String>,
    ) -> Result<Self> {
        Ok(Self {
            blob,
            size,
            toc_digest: toc_digest.parse()?,
            position,
            prefetch_spans: spans.map(|v| toc::parse_spans(v, size)).unwrap_or_default(),
            format: LayerFormat::Brisk,
        })
    }

    /// Where the TOC is: the annotated position, or what the footer says (one tail read).
    pub async fn toc_position<F, Fut, E>(&self, read: F) -> Result<TocPosition, E>
    where
        F: FnOnce(Range<u64>) -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: From<Error>,
    {
        let footer = match self.format {
            LayerFormat::Brisk => FOOTER_SIZE,
            LayerFormat::Estargz => estargz::FOOTER_SIZE,
            LayerFormat::ZstdChunked => 0,
        } as u64;
        let position = match self.position {
            Some(p) => p,
            None if self.format == LayerFormat::ZstdChunked => {
                return Err(Error::bad_toc(
                    "zstd:chunked layer without a well-formed manifest-position annotation",
                )
                .into());
            }
            None => {
                if self.size < footer.min(estargz::LEGACY_FOOTER_SIZE as u64) {
                    return Err(Error::bad_toc("blob is smaller than a footer").into());
                }
                let tail = read(self.size.saturating_sub(footer)..self.size).await?;
                match self.format {
                    LayerFormat::Estargz => estargz::footer_position(&tail, self.size)?,
                    _ => Footer::decode(&tail, self.size)?.toc,
                }
            }
        };
        match self.format {
            LayerFormat::Brisk => position.check_within(self.size)?,
            LayerFormat::Estargz => estargz::check_within(&position, self.size)?,
            LayerFormat::ZstdChunked => zstd_chunked::check_within(&position, self.size)?,
        }
        Ok(position)
    }

    /// What the TOC digest covers, out of the bytes a range read of the TOC's position
    /// fetched: those bytes for Brisk and zstd:chunked (the compressed TOC), the JSON inside
    /// the TOC's gzip member for eStargz. This is what is kept, and what `decode_toc` takes.
    pub fn digested_toc(&self, fetched: Bytes) -> Result<Bytes> {
        match self.format {
            LayerFormat::Brisk | LayerFormat::ZstdChunked => Ok(fetched),
            LayerFormat::Estargz => Ok(estargz::toc_json(&fetched)?.into()),
        }
    }

    /// Authenticates the TOC bytes (`digested_toc`'s) against the manifest's digest, decodes
    /// them and checks that the chunks end where the TOC begins.
    pub fn decode_toc(&self, payload: &[u8], position: &TocPosition) -> Result<Toc> {
        if self.format == LayerFormat::Estargz {
            let actual = Digest::sha256(payload);
            if actual != self.toc_digest {
                return Err(Error::Toc(toc::TocError::DigestMismatch {
                    expected: self.toc_digest,
                    actual,
                }));
            }
            return estargz::parse(payload, position.offset);
        }
        if self.format == LayerFormat::ZstdChunked {
            return zstd_chunked::decode(payload, position, &self.toc_digest);
        }
        let toc = Toc::decode(payload, position.uncompressed_size, Some(&self.toc_digest))?;
        if toc.data_size().checked_add(8) != Some(position.offset) {
            return Err(Error::bad_toc(
                "chunks do not end where the TOC frame begins",
            ));
        }
        Ok(toc)
    }
}

/// A position annotation or label: `None` if absent or malformed, an error if well-formed
/// but over the limits (`TocPosition::check_limits`).
fn checked_position(value: Option<&String>) -> Result<Option<TocPosition>> {
    let Some(position) = value.and_then(|v| TocPosition::parse_fields(v)) else {
        return Ok(None);
    };
    position.check_limits()?;
    Ok(Some(position))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_labels_describe_the_same_layer_as_the_manifest() {
        let blob = Digest::sha256(b"layer");
        let toc_digest = Digest::sha256(b"toc");
        let position = TocPosition {
            offset: 5_000,
            size: 700,
            uncompressed_size: 9_000,
            version: toc::FORMAT_VERSION,
        };
        let size = 5_000 + 700 + FOOTER_SIZE as u64;
        let annotations = toc::layer_annotations(
            &toc_digest,
            &position.to_string(),
            &[0..4_000, 4_100..4_500],
        );
        let labels: BTreeMap<String, String> = annotations
            .iter()
            .filter(|(k, _)| k.starts_with(toc::SNAPSHOT_LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let from_labels = LazyLayer::from_labels(blob, &labels).unwrap().unwrap();
        let annotations: HashMap<String, String> = annotations.into_iter().collect();
        let from_manifest = LazyLayer::from_descriptor(blob, size, Some(&annotations))
            .unwrap()
            .unwrap();
        assert_eq!(from_labels, from_manifest);
        assert_eq!(from_labels.size, size);
        assert_eq!(from_labels.prefetch_spans, vec![0..4_000, 4_100..4_500]);
    }

    #[test]
    fn labels_without_a_usable_position_leave_the_manifest_to_decide() {
        let blob = Digest::sha256(b"layer");
        let mut labels = BTreeMap::from([(
            toc::LABEL_TOC_DIGEST.to_owned(),
            Digest::sha256(b"toc").to_string(),
        )]);
        assert_eq!(LazyLayer::from_labels(blob, &labels).unwrap(), None);
        labels.insert(toc::LABEL_TOC_POSITION.to_owned(), "garbage".into());
        assert_eq!(LazyLayer::from_labels(blob, &labels).unwrap(), None);
        labels.insert(
            toc::LABEL_TOC_POSITION.to_owned(),
            format!("{}:10:10:1", u64::MAX - 5),
        );
        assert!(LazyLayer::from_labels(blob, &labels).is_err(), "overflow");
        labels.insert(toc::LABEL_TOC_POSITION.to_owned(), "100:10:10:1".into());
        labels.insert(toc::LABEL_TOC_DIGEST.to_owned(), "not a digest".into());
        assert!(LazyLayer::from_labels(blob, &labels).is_err());
    }

    #[test]
    fn a_position_claiming_a_huge_toc_refuses_the_layer_before_anything_is_fetched() {
        // The daemon-killing label: a 2^62-byte compressed TOC whose blob size, derived from
        // the position itself, agrees with it.
        let blob = Digest::sha256(b"layer");
        let huge = format!("8:{}:100:1", 1u64 << 62);
        let digest = Digest::sha256(b"toc").to_string();
        let labels = BTreeMap::from([
            (toc::LABEL_TOC_DIGEST.to_owned(), digest.clone()),
            (toc::LABEL_TOC_POSITION.to_owned(), huge.clone()),
        ]);
        let over = |r: Result<Option<LazyLayer>>| match r {
            Err(Error::OverLimit {
                limit, value, max, ..
            }) => (limit, value, max),
            other => panic!("expected a limit error, got {other:?}"),
        };
        let expected = (
            crate::Limit::TocCompressedSize,
            1 << 62,
            toc::MAX_TOC_COMPRESSED_SIZE,
        );
        assert_eq!(over(LazyLayer::from_labels(blob, &labels)), expected);
        let annotations = HashMap::from([
            (toc::ANNOTATION_TOC_DIGEST.to_owned(), digest),
            (toc::ANNOTATION_TOC_POSITION.to_owned(), huge),
        ]);
        let size = (1u64 << 62) + 8 + FOOTER_SIZE as u64;
        assert_eq!(
            over(LazyLayer::from_descriptor(blob, size, Some(&annotations))),
            expected
        );
    }

    /// Found while fuzzing (`toc_json`): a valid TOC whose chunks end within 8 bytes of
    /// u64::MAX overflowed the check that the TOC frame follows them.
    #[test]
    fn chunks_ending_at_the_top_of_u64_are_refused_without_overflow() {
        let toc = Toc {
            format: Default::default(),
            version: toc::FORMAT_VERSION,
            tar_size: 1,
            chunks: vec![toc::Chunk {
                codec: Default::default(),
                offset: 0,
                size: u64::MAX - 3,
                tar_offset: 0,
                tar_size: 1,
                digest: Digest::sha256(b"x"),
            }],
            entries: Vec::new(),
            prefetch: Vec::new(),
        };
        assert!(
            toc.validate().is_err(),
            "a chunk that large is over the limits"
        );
        let (payload, len) = toc.encode().unwrap();
        let layer = LazyLayer {
            format: Default::default(),
            blob: Digest::sha256(b"layer"),
            size: 0,
            toc_digest: Digest::sha256(&payload),
            position: None,
            prefetch_spans: Vec::new(),
        };
        let position = TocPosition {
            offset: 8,
            size: payload.len() as u64,
            uncompressed_size: len,
            version: toc::FORMAT_VERSION,
        };
        // Refused with an error (validation, or the checked frame check), never a panic.
        let outcome = std::panic::catch_unwind(|| layer.decode_toc(&payload, &position));
        assert!(outcome.expect("no panic").is_err());
    }
}
