//! `brisk inspect` and `brisk check`: read a converted image back through its manifest, the
//! way a lazy reader will, and report on it or verify every byte of it.

use brisk_blobcache::digest::Hasher;
use brisk_blobcache::image::LazyLayer;
use brisk_blobcache::lazy::lazy_layer;
use brisk_blobcache::registry::FetchedManifest;
use brisk_blobcache::toc::{self, EntryKind, Toc, TocPosition};
use brisk_blobcache::{media, Digest};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Serialize;

use crate::store::Store;
use crate::{Error, Result};

/// Consecutive chunks are fetched together up to this many compressed bytes, so a check
/// costs a few large reads instead of one request per chunk.
const FETCH_BATCH: u64 = 8 * 1024 * 1024;

#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub manifest: Digest,
    pub platform: Option<String>,
    pub layers: Vec<LayerReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Present when the layer is in the lazy format.
    pub toc: Option<TocSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TocSummary {
    /// The lazy format the TOC was read in (`brisk`, `estargz`).
    pub format: &'static str,
    pub digest: Digest,
    pub position: String,
    pub tar_size: u64,
    pub entries: usize,
    pub files: usize,
    pub whiteouts: usize,
    pub chunks: usize,
    pub chunk_bytes_min: u64,
    pub chunk_bytes_median: u64,
    pub chunk_bytes_max: u64,
}

/// Every image manifest the location names (one, or one per platform of an index).
async fn images(store: &Store) -> Result<Vec<(FetchedManifest, Option<String>)>> {
    let root = store.root_manifest().await?;
    let value: serde_json::Value = serde_json::from_slice(&root.bytes)
        .map_err(|e| Error::invalid(format!("manifest {}", root.digest), e))?;
    if value.get("manifests").is_none() {
        return Ok(vec![(root, None)]);
    }
    let index: ImageIndex =
        serde_json::from_slice(&root.bytes).map_err(|e| Error::invalid("image index", e))?;
    let mut out = Vec::new();
    for desc in index.manifests() {
        let digest: Digest = desc.digest().to_string().parse()?;
        let platform = desc
            .platform()
            .as_ref()
            .map(|p| format!("{}/{}", p.os(), p.architecture()));
        out.push((
            store.manifest(&digest, desc.media_type().as_ref()).await?,
            platform,
        ));
    }
    Ok(out)
}

fn parse_manifest(m: &FetchedManifest) -> Result<ImageManifest> {
    serde_json::from_slice(&m.bytes)
        .map_err(|e| Error::invalid(format!("image manifest {}", m.digest), e))
}

/// Fetches a lazy layer's compressed TOC bytes (not yet authenticated) and its position.
pub async fn fetch_toc_payload(
    store: &Store,
    layer: &LazyLayer,
) -> Result<(bytes::Bytes, TocPosition)> {
    let position = layer
        .toc_position(|range| store.blob_range(&layer.blob, range))
        .await?;
    Ok((
        store.blob_range(&layer.blob, position.range()).await?,
        position,
    ))
}

/// Fetches and authenticates a layer's TOC.
pub async fn read_toc(
    store: &Store,
    desc: &Descriptor,
) -> Result<Option<(Toc, TocPosition, Digest)>> {
    let Some(layer) = lazy_layer(desc)? else {
        return Ok(None);
    };
    let (payload, position) = fetch_toc_payload(store, &layer).await?;
    let payload = layer.digested_toc(payload)?;
    Ok(Some((
        layer.decode_toc(&payload, &position)?,
        position,
        layer.toc_digest,
    )))
}

pub async fn inspect(store: &Store) -> Result<Vec<ImageReport>> {
    let mut reports = Vec::new();
    for (fetched, platform) in images(store).await? {
        let manifest = parse_manifest(&fetched)?;
        let mut layers = Vec::new();
        for (i, desc) in manifest.layers().iter().enumerate() {
            let digest: Digest = desc.digest().to_string().parse()?;
            let toc = read_toc(store, desc)
                .await
                .map_err(|e| Error::layer(i, digest, e))?;
            layers.push(LayerReport {
                digest,
                media_type: desc.media_type().to_string(),
                size: desc.size(),
                toc: toc.map(|(toc, pos, d)| summarize(&toc, pos, d)),
            });
        }
        reports.push(ImageReport {
            manifest: fetched.digest,
            platform,
            layers,
        });
    }
    Ok(reports)
}

fn summarize(toc: &Toc, position: TocPosition, digest: Digest) -> TocSummary {
    let mut sizes: Vec<u64> = toc.chunks.iter().map(|c| c.tar_size).collect();
    sizes.sort_unstable();
    let count = |k: EntryKind| toc.entries.iter().filter(|e| e.kind == k).count();
    TocSummary {
        format: toc.format.as_str(),
        digest,
        position: position.to_string(),
        tar_size: toc.tar_size,
        entries: toc.entries.len(),
        files: count(EntryKind::Reg),
        whiteouts: count(EntryKind::Whiteout) + count(EntryKind::Opaque),
        chunks: toc.chunks.len(),
        chunk_bytes_min: sizes.first().copied().unwrap_or(0),
        chunk_bytes_median: sizes.get(sizes.len() / 2).copied().unwrap_or(0),
        chunk_bytes_max: sizes.last().copied().unwrap_or(0),
    }
}

/// What `check` verified.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub images: usize,
    pub layers: usize,
    pub lazy_layers: usize,
    pub chunks: usize,
    pub bytes: u64,
}

/// Verifies every TOC against its manifest annotation, every chunk against its TOC digest,
/// and every layer blob against its manifest digest. The first failure is the error.
pub async fn check(store: &Store) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    for (fetched, _) in images(store).await? {
        report.images += 1;
        let manifest = parse_manifest(&fetched)?;
        let config: Digest = manifest.config().digest().to_string().parse()?;
        store.small_blob(&config).await?;
        for (i, desc) in manifest.layers().iter().enumerate() {
            let digest: Digest = desc.digest().to_string().parse()?;
            check_layer(store, desc, &mut report)
                .await
                .map_err(|e| Error::layer(i, digest, e))?;
            report.layers += 1;
        }
    }
    Ok(report)
}

async fn check_layer(store: &Store, desc: &Descriptor, report: &mut CheckReport) -> Result<()> {
    let digest: Digest = desc.digest().to_string().parse()?;
    let Some((toc, position, _)) = read_toc(store, desc).await? else {
        if media::layer_compression(desc.media_type().as_ref()).is_none() {
            return Err(brisk_blobcache::Error::UnsupportedMediaType(
                desc.media_type().to_string(),
            )
            .into());
        }
        let tmp = tempfile::NamedTempFile::new().map_err(|e| Error::io("temporary file", e))?;
        store.blob_to_file(&digest, desc.size(), tmp.path()).await?;
        report.bytes += desc.size();
        return Ok(());
    };
    report.lazy_layers += 1;
    // The whole blob is hashed on the way too: chunks (with what lies between them, in
    // formats that leave gaps), then the TOC and footer.
    let mut blob = Hasher::new();
    let (mut i, mut start) = (0, 0);
    while i < toc.chunks.len() {
        let mut end = i + 1;
        while end < toc.chunks.len()
            && toc.chunks[end].offset + toc.chunks[end].size - start <= FETCH_BATCH
        {
            end += 1;
        }
        let stop = toc.chunks[end - 1].offset + toc.chunks[end - 1].size;
        let bytes = store.blob_range(&digest, start..stop).await?;
        blob.update(&bytes);
        for (j, chunk) in toc.chunks[i..end].iter().enumerate() {
            let lo = (chunk.offset - start) as usize;
            toc::decode_chunk(digest, i + j, chunk, &bytes[lo..lo + chunk.size as usize])?;
            report.chunks += 1;
        }
        (i, start) = (end, stop);
    }
    let tail = store.blob_range(&digest, start..desc.size()).await?;
    blob.update(&tail);
    report.bytes += desc.size();
    let actual = blob.finish();
    if actual != digest {
        return Err(brisk_blobcache::Error::DigestMismatch {
            what: "layer blob".into(),
            expected: digest,
            actual,
        }
        .into());
    }
    debug_assert!(position.offset >= toc.data_size());
    Ok(())
}

/// Human-readable text for `brisk inspect`.
pub fn render(reports: &[ImageReport]) -> String {
    let mut out = String::new();
    for image in reports {
        let platform = image
            .platform
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        out += &format!(
            "image {}{platform}: {} layers\n",
            image.manifest,
            image.layers.len()
        );
        for (i, l) in image.layers.iter().enumerate() {
            out += &format!(
                "  layer {i} {} {} bytes {}\n",
                l.digest, l.size, l.media_type
            );
            match &l.toc {
                Some(t) => {
                    out += &format!(
                        "    lazy ({}): toc {} ({}), {} {} bytes, {} entries ({} files, {} whiteouts), {} chunks (min {} / median {} / max {} bytes)\n",
                        t.format, t.digest, t.position,
                        if t.format == "brisk" { "tar" } else { "contents" }, t.tar_size, t.entries, t.files, t.whiteouts, t.chunks,
                        t.chunk_bytes_min, t.chunk_bytes_median, t.chunk_bytes_max
                    );
                }
                None => out += "    not lazy: served by a full download\n",
            }
        }
    }
    out
}
