//! The lazy-image service: an image's typed manifest and each lazy layer's authenticated TOC,
//! each fetched once and kept, and the layer handle that makes a layer's chunks fetchable.
//! The one implementation behind the snapshotter, `brisk cat` and prefetch.
//!
//! A layer's chunks become fetchable from a repository only through [`LazyImages::open`],
//! after the repository served a TOC that the layer's descriptor vouches for: an image that
//! merely names another image's blob never adds its repository before that.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::chunk::ChunkRef;
use crate::image::LazyLayer;
use crate::meta::MetaStore;
use crate::reference::Reference;
use crate::registry::RegistryClient;
use crate::remote::RegistrySource;
use crate::toc::{Toc, TocPosition};
use crate::{media, Digest, Error, Limit, Result};

/// Layers a lazy image may list: more than any real image has (overlayfs stacks at most
/// about 500 lower directories), and few enough that one manifest cannot start thousands of
/// TOC fetches.
pub const MAX_LAYERS: usize = 512;

/// Platforms an index may list before it is refused.
pub const MAX_INDEX_MANIFESTS: usize = 1024;

/// A lazy layer opened from one repository: its authenticated TOC, and where its chunks
/// are fetched from.
#[derive(Clone, Debug)]
pub struct LayerHandle {
    pub layer: LazyLayer,
    pub position: TocPosition,
    pub toc: Arc<Toc>,
    /// The repository (no tag, no digest) whose TOC this is.
    pub repository: Reference,
}

impl LayerHandle {
    pub fn blob(&self) -> Digest {
        self.layer.blob
    }

    /// The reference for the TOC's chunk `index`; `None` past its chunks.
    pub fn chunk(&self, index: usize) -> Option<ChunkRef> {
        self.toc
            .chunks
            .get(index)
            .map(|c| ChunkRef::new(self.layer.blob, c))
    }
}

/// How the service's reads were answered, for `brisk cat --stats`.
#[derive(Debug, Default)]
pub struct LazyStats {
    /// Manifests and TOCs answered from the kept store.
    pub kept_hits: AtomicU64,
    /// Compressed TOC bytes fetched from a registry.
    pub toc_bytes_fetched: AtomicU64,
}

pub struct LazyImages {
    client: Arc<RegistryClient>,
    /// Manifests and TOCs kept on disk, checked against their digests on every load.
    kept: Option<MetaStore>,
    /// Where opened layers' chunks are fetched: each open registers its repository there.
    source: Option<Arc<RegistrySource>>,
    /// TOCs decoded in this process, while something holds them. Keyed by blob and TOC
    /// digest: an image that names another's blob with a TOC of its own never gets (or
    /// replaces) the other's TOC.
    decoded: Mutex<HashMap<(Digest, Digest), Weak<Toc>>>,
    stats: LazyStats,
}

impl LazyImages {
    pub fn new(client: Arc<RegistryClient>, kept: Option<MetaStore>) -> Self {
        Self {
            client,
            kept,
            source: None,
            decoded: Mutex::default(),
            stats: LazyStats::default(),
        }
    }

    /// Layers opened from now on are fetched through `source`.
    pub fn serving(mut self, source: Arc<RegistrySource>) -> Self {
        self.source = Some(source);
        self
    }

    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    pub fn kept(&self) -> Option<&MetaStore> {
        self.kept.as_ref()
    }

    pub fn stats(&self) -> &LazyStats {
        &self.stats
    }

    /// The bytes of manifest (or index) `digest` in repository `repo`: kept, or fetched (the
    /// client checks them against the digest) and kept.
    pub async fn manifest_bytes(&self, repo: &Reference, digest: Digest) -> Result<Bytes> {
        if let Some(bytes) = self.kept.as_ref().and_then(|k| k.get(&digest)) {
            self.stats.kept_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        }
        let by_digest = Reference {
            tag: None,
            digest: Some(digest),
            ..repo.clone()
        };
        let fetched = self.client.get_manifest(&by_digest).await?;
        if let Some(k) = &self.kept {
            k.put(&fetched.bytes)?;
        }
        Ok(fetched.bytes)
    }

    /// The image manifest `digest` of `repo`, typed.
    pub async fn manifest(&self, repo: &Reference, digest: Digest) -> Result<ImageManifest> {
        let bytes = self.manifest_bytes(repo, digest).await?;
        parse_manifest(digest, &bytes)
    }

    /// The image manifest for `platform` (`os/arch`) given the bytes of what a reference
    /// resolved to: those bytes if they are a manifest, else the index's entry for the
    /// platform, fetched or kept.
    pub async fn platform_manifest(
        &self,
        repo: &Reference,
        digest: Digest,
        bytes: &[u8],
        platform: &str,
    ) -> Result<(Digest, ImageManifest)> {
        let Some(child) = index_entry(digest, bytes, platform)? else {
            return Ok((digest, parse_manifest(digest, bytes)?));
        };
        let child: Digest = child.digest().to_string().parse()?;
        Ok((child, self.manifest(repo, child).await?))
    }

    /// Whether the TOC `layer` names is at hand (decoded here, or kept): opening it costs
    /// no registry bytes.
    pub fn holds_toc(&self, layer: &LazyLayer) -> bool {
        self.decoded_toc(layer).is_some()
            || self
                .kept
                .as_ref()
                .is_some_and(|k| k.get(&layer.toc_digest).is_some())
    }

    fn decoded_toc(&self, layer: &LazyLayer) -> Option<Arc<Toc>> {
        self.decoded
            .lock()
            .expect("not poisoned")
            .get(&(layer.blob, layer.toc_digest))
            .and_then(Weak::upgrade)
    }

    /// Opens lazy layer `layer` of repository `repo`: its TOC (decoded already, kept, or
    /// fetched from `repo`'s sources in turn, a source whose TOC does not check passed over),
    /// authenticated against the digest the layer's descriptor names; then, and only then,
    /// `repo` is made a source of the layer's chunks. A TOC reaches the kept store only once
    /// it checked.
    pub async fn open(&self, repo: &Reference, layer: &LazyLayer) -> Result<LayerHandle> {
        let repository = Reference {
            tag: None,
            digest: None,
            ..repo.clone()
        };
        let position = layer
            .toc_position(|r| self.client.get_blob_range(&repository, &layer.blob, r))
            .await?;
        let toc = match self.decoded_toc(layer) {
            Some(toc) => toc,
            None => {
                let toc = Arc::new(self.toc(&repository, layer, &position).await?);
                let mut decoded = self.decoded.lock().expect("not poisoned");
                decoded.retain(|_, t| t.strong_count() > 0);
                decoded.insert((layer.blob, layer.toc_digest), Arc::downgrade(&toc));
                toc
            }
        };
        if let Some(source) = &self.source {
            source.register_blob(layer.blob, &repository);
        }
        Ok(LayerHandle {
            layer: layer.clone(),
            position,
            toc,
            repository,
        })
    }

    async fn toc(
        &self,
        repo: &Reference,
        layer: &LazyLayer,
        position: &TocPosition,
    ) -> Result<Toc> {
        if let Some(payload) = self.kept.as_ref().and_then(|k| k.get(&layer.toc_digest)) {
            self.stats.kept_hits.fetch_add(1, Ordering::Relaxed);
            return layer.decode_toc(&payload, position);
        }
        let (toc, (payload, fetched)) = self
            .client
            .via_mirrors(repo, |source| async move {
                let p = self
                    .client
                    .get_blob_range_from(&source, &layer.blob, position.range(), &|_| {})
                    .await?;
                let fetched = p.len() as u64;
                let p = layer.digested_toc(p)?;
                Ok((layer.decode_toc(&p, position)?, (p, fetched)))
            })
            .await?;
        self.stats
            .toc_bytes_fetched
            .fetch_add(fetched, Ordering::Relaxed);
        if let Some(k) = &self.kept {
            k.put(&payload)?;
        }
        Ok(toc)
    }

    /// Every lazy layer of `manifest`, opened from `repo`, all at once (prefetch of a whole
    /// image waits for the last TOC). Layers that are not lazy are left out.
    pub async fn open_all(
        &self,
        repo: &Reference,
        manifest: &ImageManifest,
    ) -> Result<Vec<LayerHandle>> {
        let layers = lazy_layers(manifest)?;
        futures::future::try_join_all(layers.iter().map(|l| self.open(repo, l))).await
    }

    /// Forgets the kept manifests and TOCs whose digests `keep` does not hold, and every
    /// decoded TOC nobody holds: what is persisted is bounded by what the host holds.
    pub fn forget_except(&self, keep: &HashSet<Digest>) {
        self.decoded
            .lock()
            .expect("not poisoned")
            .retain(|_, t| t.strong_count() > 0);
        let Some(kept) = &self.kept else { return };
        let Ok(stored) = kept.list() else { return };
        for d in stored.into_iter().filter(|d| !keep.contains(d)) {
            if let Err(err) = kept.remove(&d) {
                tracing::warn!(digest = %d, %err, "a kept manifest or TOC could not be removed");
            }
        }
    }
}

/// `bytes` as an image manifest (OCI or Docker schema 2).
pub fn parse_manifest(digest: Digest, bytes: &[u8]) -> Result<ImageManifest> {
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::json(format!("image manifest {digest}"), e))?;
    Error::check_limit(
        || format!("image manifest {digest}"),
        Limit::Layers,
        manifest.layers().len() as u64,
        MAX_LAYERS as u64,
    )?;
    Ok(manifest)
}

/// The index entry for `platform` when `bytes` are an index; `None` when they are a manifest.
fn index_entry(digest: Digest, bytes: &[u8], platform: &str) -> Result<Option<Descriptor>> {
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        manifests: Option<serde::de::IgnoredAny>,
    }
    let kind: Kind =
        serde_json::from_slice(bytes).map_err(|e| Error::json(format!("manifest {digest}"), e))?;
    if kind.manifests.is_none() && !media::is_index(&kind.media_type) {
        return Ok(None);
    }
    let index: ImageIndex = serde_json::from_slice(bytes)
        .map_err(|e| Error::json(format!("image index {digest}"), e))?;
    Error::check_limit(
        || format!("image index {digest}"),
        Limit::IndexManifests,
        index.manifests().len() as u64,
        MAX_INDEX_MANIFESTS as u64,
    )?;
    index
        .manifests()
        .iter()
        .find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|p| format!("{}/{}", p.os(), p.architecture()) == platform)
        })
        .cloned()
        .map(Some)
        .ok_or_else(|| Error::NoPlatform {
            index: digest,
            platform: platform.to_owned(),
        })
}

/// The lazy view of a layer descriptor; `None` if the layer is not lazy.
pub fn lazy_layer(desc: &Descriptor) -> Result<Option<LazyLayer>> {
    let blob: Digest = desc.digest().to_string().parse()?;
    LazyLayer::from_descriptor(blob, desc.size(), desc.annotations().as_ref())
}

/// The lazy layer `blob` of `manifest`; `None` if the manifest does not list it or does not
/// make it lazy.
pub fn layer_of(manifest: &ImageManifest, blob: &Digest) -> Result<Option<LazyLayer>> {
    let blob = blob.to_string();
    match manifest
        .layers()
        .iter()
        .find(|d| d.digest().to_string() == blob)
    {
        Some(desc) => lazy_layer(desc),
        None => Ok(None),
    }
}

/// Every lazy layer of `manifest`, in order; layers that are not lazy are left out.
pub fn lazy_layers(manifest: &ImageManifest) -> Result<Vec<LazyLayer>> {
    Error::check_limit(
        || "image manifest".to_owned(),
        Limit::Layers,
        manifest.layers().len() as u64,
        MAX_LAYERS as u64,
    )?;
    Ok(manifest
        .layers()
        .iter()
        .map(lazy_layer)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// `os/arch` of the machine Brisk runs on, in OCI's spelling.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, respond, Reply};
    use crate::toc::TocError;
    use crate::toc::{self, ConvertOptions};

    /// A converted layer of one 300 KiB file in 64 KiB chunks, and its blob bytes.
    fn layer() -> (LazyLayer, Vec<u8>) {
        let mut tar = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, "file", &data[..]).unwrap();
        let tar = tar.into_inner().unwrap();
        let opts = ConvertOptions {
            chunk_size: 64 * 1024,
            ..ConvertOptions::default()
        };
        let (converted, blob) = toc::convert_layer(&tar[..], Vec::new(), &opts).unwrap();
        let lazy = LazyLayer {
            format: Default::default(),
            blob: converted.digest,
            size: converted.size,
            toc_digest: converted.toc_digest,
            position: Some(converted.toc),
            prefetch_spans: Vec::new(),
        };
        (lazy, blob)
    }

    fn manifest_with(layers: usize) -> Vec<u8> {
        let layer = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": Digest::sha256(b"l").to_string(),
            "size": 1,
        });
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": Digest::sha256(b"c").to_string(),
                "size": 1,
            },
            "layers": vec![layer; layers],
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_layer_becomes_fetchable_from_a_repository_only_once_its_toc_checked() {
        let (lazy, blob) = layer();
        let registry = respond(move |r| Reply::range_of(&blob, r.range)).await;
        let client = client(&registry.host, &[]);
        let source = Arc::new(RegistrySource::new(client.clone(), Default::default()));
        let kept_dir = tempfile::tempdir().unwrap();
        let images = LazyImages::new(client, Some(MetaStore::open(kept_dir.path()).unwrap()))
            .serving(source.clone());
        let repo: Reference = format!("{}/tenant/evil", registry.host).parse().unwrap();

        // The same blob named with a TOC digest the registry's bytes do not have.
        let liar = LazyLayer {
            toc_digest: Digest::sha256(b"another toc"),
            ..lazy.clone()
        };
        let err = images.open(&repo, &liar).await.unwrap_err();
        assert!(
            matches!(err, Error::Toc(TocError::DigestMismatch { .. })),
            "{}",
            crate::error_chain(&err)
        );
        assert!(source.repositories_of(&lazy.blob).is_empty());
        assert!(
            images.kept().unwrap().list().unwrap().is_empty(),
            "nothing unverified kept"
        );

        let handle = images.open(&repo, &lazy).await.unwrap();
        assert_eq!(source.repositories_of(&lazy.blob), vec![repo.clone()]);
        assert_eq!(handle.repository, repo);
        let n = handle.toc.chunks.len();
        assert!(n >= 5, "300 KiB in 64 KiB chunks: {n}");
        assert_eq!(
            handle.chunk(n - 1).unwrap().digest,
            handle.toc.chunks[n - 1].digest
        );
        assert!(handle.chunk(n).is_none());
        assert_eq!(
            images.kept().unwrap().list().unwrap(),
            vec![lazy.toc_digest],
            "the verified TOC is kept"
        );
    }

    #[tokio::test]
    async fn a_held_toc_is_opened_again_without_the_registry() {
        let (lazy, blob) = layer();
        let registry = respond(move |r| Reply::range_of(&blob, r.range)).await;
        let kept_dir = tempfile::tempdir().unwrap();
        let repo: Reference = format!("{}/tenant/app", registry.host).parse().unwrap();
        let open = |kept| LazyImages::new(client(&registry.host, &[]), Some(kept));
        let first = open(MetaStore::open(kept_dir.path()).unwrap());
        assert!(!first.holds_toc(&lazy));
        let handle = first.open(&repo, &lazy).await.unwrap();
        let fetched = registry.count();
        assert_eq!(fetched, 1, "one range request for the TOC");
        assert!(first.holds_toc(&lazy));
        // Decoded once in this process: the same TOC, no request.
        let again = first.open(&repo, &lazy).await.unwrap();
        assert!(Arc::ptr_eq(&handle.toc, &again.toc));
        // A new process with the kept store: no request either.
        let second = open(MetaStore::open(kept_dir.path()).unwrap());
        let reopened = second.open(&repo, &lazy).await.unwrap();
        assert_eq!(*reopened.toc, *handle.toc);
        assert_eq!(registry.count(), fetched);
        assert_eq!(second.stats().kept_hits.load(Ordering::Relaxed), 1);
        // Forgetting what nobody holds removes the kept TOC.
        second.forget_except(&HashSet::new());
        assert!(second.kept().unwrap().list().unwrap().is_empty());
    }

    #[test]
    fn a_manifest_listing_too_many_layers_is_refused_naming_the_limit() {
        let digest = Digest::sha256(b"m");
        assert_eq!(
            parse_manifest(digest, &manifest_with(MAX_LAYERS))
                .unwrap()
                .layers()
                .len(),
            MAX_LAYERS
        );
        match parse_manifest(digest, &manifest_with(MAX_LAYERS + 1)) {
            Err(Error::OverLimit { limit, value, .. }) => {
                assert_eq!((limit, value), (Limit::Layers, MAX_LAYERS as u64 + 1))
            }
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_index_leads_to_the_platforms_manifest_or_names_the_missing_platform() {
        let kept_dir = tempfile::tempdir().unwrap();
        let kept = MetaStore::open(kept_dir.path()).unwrap();
        let child_bytes = manifest_with(2);
        let child = kept.put(&child_bytes).unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": child.to_string(),
                "size": child_bytes.len(),
                "platform": {"os": "linux", "architecture": "amd64"},
            }],
        }))
        .unwrap();
        // No registry is asked: the child is kept.
        let images = LazyImages::new(client("127.0.0.1:1", &[]), Some(kept));
        let repo: Reference = "127.0.0.1:1/app".parse().unwrap();
        let root = Digest::sha256(&index);
        let (found, manifest) = images
            .platform_manifest(&repo, root, &index, "linux/amd64")
            .await
            .unwrap();
        assert_eq!((found, manifest.layers().len()), (child, 2));
        match images
            .platform_manifest(&repo, root, &index, "linux/riscv64")
            .await
        {
            Err(Error::NoPlatform { index, platform }) => {
                assert_eq!((index, platform.as_str()), (root, "linux/riscv64"))
            }
            other => panic!("expected no platform, got {other:?}"),
        }
        // A manifest is its own platform's manifest.
        let (same, _) = images
            .platform_manifest(&repo, child, &child_bytes, "linux/amd64")
            .await
            .unwrap();
        assert_eq!(same, child);
    }
}
