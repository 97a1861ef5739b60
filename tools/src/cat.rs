//! `brisk cat`: one file of a converted image, read through the layered chunk cache, fetching
//! only the chunks that file needs.
//!
//! With a cache directory, manifests and TOCs are kept beside the chunks, so a repeat costs no
//! registry blob bytes and works while the registry is unreachable (a tag then resolves to the
//! digest it had last time).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::chunk::ChunkRef;
use brisk_blobcache::disk::DiskCache;
use brisk_blobcache::layered::{Layered, LevelReport, Priority};
use brisk_blobcache::lazy::{self, LazyImages};
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::meta::MetaStore;
use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_blobcache::toc::{EntryKind, Toc};
use brisk_blobcache::Digest;
use bytes::Bytes;
use serde::Serialize;

use crate::view::MergedView;
use crate::{Error, Result};

/// Chunks requested together while streaming a file: bounds memory, keeps requests large.
const BATCH_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct CatOptions {
    pub cache_dir: Option<PathBuf>,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// `os/arch`; defaults to linux and the architecture Brisk was built for.
    pub platform: Option<String>,
    pub registry: RegistryConfig,
}

impl Default for CatOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            memory_bytes: 256 << 20,
            disk_bytes: 10 << 30,
            platform: None,
            registry: RegistryConfig::default(),
        }
    }
}

/// What a `cat` cost, for `--stats`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CatStats {
    pub levels: Vec<LevelReport>,
    /// Range requests and compressed bytes the registry served for chunks.
    pub registry_chunk_requests: u64,
    pub registry_chunk_bytes: u64,
    /// Compressed TOC bytes fetched from the registry (zero when all came from the cache).
    pub registry_toc_bytes: u64,
    /// Manifests and TOCs served by the metadata cache.
    pub metadata_cache_hits: u64,
    pub file_bytes: u64,
}

pub async fn cat<W: Write>(
    reference: &Reference,
    path: &str,
    opts: &CatOptions,
    out: &mut W,
) -> Result<CatStats> {
    let client = Arc::new(RegistryClient::new(opts.registry.clone())?);
    let kept = match &opts.cache_dir {
        Some(dir) => Some(MetaStore::open(dir.join("meta"))?),
        None => None,
    };
    let source = Arc::new(RegistrySource::new(client.clone(), RemoteConfig::default()));
    let images = LazyImages::new(client.clone(), kept).serving(source.clone());
    let mut stats = CatStats::default();

    let (root, bytes) = resolve_manifest(&client, reference, images.kept(), &mut stats).await?;
    let platform = opts.platform.clone().unwrap_or_else(lazy::host_platform);
    let (_, manifest) = images
        .platform_manifest(reference, root, &bytes, &platform)
        .await?;

    let mut tocs = Vec::new();
    let mut blobs = Vec::new();
    for (i, desc) in manifest.layers().iter().enumerate() {
        let blob: Digest = desc.digest().to_string().parse()?;
        let opened = async {
            let layer = lazy::lazy_layer(desc)?.ok_or(Error::NotLazy(blob))?;
            Ok::<_, Error>(images.open(reference, &layer).await?)
        };
        let handle = opened.await.map_err(|e| Error::layer(i, blob, e))?;
        tocs.push(Toc::clone(&handle.toc));
        blobs.push(blob);
    }
    let view = MergedView::new(&tocs);
    let found = view.resolve(path)?;
    if found.entry.kind != EntryKind::Reg {
        return Err(Error::invalid(
            format!("path {path:?}"),
            "not a regular file",
        ));
    }
    let Some(range) = found.entry.tar_range() else {
        return Ok(stats);
    };

    let origin_deadline =
        opts.registry.timeout * (opts.registry.retries + 1) + Duration::from_secs(15);
    let mut builder = Layered::builder().memory(
        Arc::new(MemoryCache::new(opts.memory_bytes)),
        Duration::from_secs(1),
    );
    if let Some(dir) = &opts.cache_dir {
        builder = builder.disk(
            Arc::new(DiskCache::open(dir.join("chunks"), opts.disk_bytes)?),
            Duration::from_secs(5),
        );
    }
    let layered = builder.origin(source.clone(), origin_deadline).build();

    let toc = &tocs[found.layer];
    let indexes: Vec<usize> = toc.chunks_for(range.clone()).collect();
    for batch in batches(toc, &indexes) {
        let refs: Vec<ChunkRef> = batch
            .iter()
            .map(|&i| ChunkRef::new(blobs[found.layer], &toc.chunks[i]))
            .collect();
        let chunks = layered.read_many(&refs, Priority::OnDemand).await?;
        for (&i, chunk) in batch.iter().zip(&chunks) {
            let c = &toc.chunks[i];
            let lo = range.start.max(c.tar_offset) - c.tar_offset;
            let hi = range.end.min(c.tar_offset + c.tar_size) - c.tar_offset;
            out.write_all(&chunk.data()[lo as usize..hi as usize])
                .map_err(|e| Error::io("standard output", e))?;
            stats.file_bytes += hi - lo;
        }
    }
    out.flush().map_err(|e| Error::io("standard output", e))?;
    stats.levels = layered.report();
    stats.registry_chunk_requests = source.stats().requests.load(Ordering::Relaxed);
    stats.registry_chunk_bytes = source.stats().bytes.load(Ordering::Relaxed);
    stats.metadata_cache_hits += images.stats().kept_hits.load(Ordering::Relaxed);
    stats.registry_toc_bytes = images.stats().toc_bytes_fetched.load(Ordering::Relaxed);
    Ok(stats)
}

/// Chunk indexes grouped so each group's compressed size stays near `BATCH_BYTES`.
fn batches<'a>(toc: &Toc, indexes: &'a [usize]) -> Vec<&'a [usize]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (k, &i) in indexes.iter().enumerate() {
        size += toc.chunks[i].size;
        if size >= BATCH_BYTES {
            out.push(&indexes[start..=k]);
            start = k + 1;
            size = 0;
        }
    }
    if start < indexes.len() {
        out.push(&indexes[start..]);
    }
    out
}

/// The manifest (or index) digest and bytes for `reference`: from the metadata cache when the
/// registry says the tag still points there, or when the registry cannot be reached.
async fn resolve_manifest(
    client: &RegistryClient,
    reference: &Reference,
    meta: Option<&MetaStore>,
    stats: &mut CatStats,
) -> Result<(Digest, Bytes)> {
    let cached = |d: &Digest| meta.and_then(|m| m.get(d));
    let digest = match reference.digest {
        Some(d) => Some(d),
        None => match client.head_manifest(reference).await {
            Ok(d) => d,
            Err(
                err @ (brisk_blobcache::Error::Registry(
                    brisk_blobcache::registry::RegistryError::Http { .. },
                )
                | brisk_blobcache::Error::Registry(
                    brisk_blobcache::registry::RegistryError::Status { .. },
                )),
            ) => {
                let Some(d) = meta.and_then(|m| m.tag(reference)) else {
                    return Err(err.into());
                };
                tracing::warn!(%err, "registry unreachable; using the cached digest of the tag");
                let bytes = cached(&d).ok_or(err)?;
                stats.metadata_cache_hits += 1;
                return Ok((d, bytes));
            }
            Err(err) => return Err(err.into()),
        },
    };
    if let Some(d) = digest {
        if let Some(bytes) = cached(&d) {
            stats.metadata_cache_hits += 1;
            if let (Some(m), None) = (meta, reference.digest) {
                m.set_tag(reference, &d)?;
            }
            return Ok((d, bytes));
        }
    }
    let fetched = client.get_manifest(reference).await?;
    if let Some(m) = meta {
        m.put(&fetched.bytes)?;
        if reference.digest.is_none() {
            m.set_tag(reference, &fetched.digest)?;
        }
    }
    Ok((fetched.digest, fetched.bytes))
}
