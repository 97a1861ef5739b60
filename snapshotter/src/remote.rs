//! Lazy layers: deciding from containerd's labels whether a layer can be served lazily,
//! fetching and authenticating its TOC (image digest → manifest → TOC), and keeping its FUSE
//! mount alive; also clearing mounts a crash left behind.
//!
//! Any failure here means "not lazy": the caller falls back to containerd's download, so a
//! registry Brisk cannot read (private, down, slow) costs a full pull, never a failed start.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_blobcache::image::LazyLayer;
use brisk_blobcache::layered::Layered;
use brisk_blobcache::meta::MetaStore as ManifestStore;
use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::RegistryClient;
use brisk_blobcache::remote::RegistrySource;
use brisk_blobcache::toc::{Toc, TocPosition};
use brisk_blobcache::Digest;

use crate::meta::RemoteLayer;
use crate::{Error, Result};

/// The committed snapshot name a remote-snapshotter client wants (the chain id).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// How long Prepare may spend deciding whether a layer is lazy before it falls back.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(30);

pub struct RemoteLayers {
    client: Arc<RegistryClient>,
    manifests: ManifestStore,
    source: Arc<RegistrySource>,
    cache: Arc<Layered>,
    rt: tokio::runtime::Handle,
    /// Live FUSE sessions by snapshot id; dropping one unmounts it. A std mutex: held only
    /// to insert or remove.
    sessions: Mutex<HashMap<u64, fuser::BackgroundSession>>,
}

impl RemoteLayers {
    pub fn new(
        client: Arc<RegistryClient>,
        manifests: ManifestStore,
        source: Arc<RegistrySource>,
        cache: Arc<Layered>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            client,
            manifests,
            source,
            cache,
            rt,
            sessions: Mutex::default(),
        }
    }

    pub fn mounted(&self) -> usize {
        self.sessions.lock().expect("not poisoned").len()
    }

    pub fn cache(&self) -> &Arc<Layered> {
        &self.cache
    }

    pub fn source(&self) -> &Arc<RegistrySource> {
        &self.source
    }

    /// The lazy layer the labels describe, with its verified TOC; `None` means "download it".
    pub async fn resolve(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Option<(RemoteLayer, Arc<Toc>)> {
        let (Some(image), Some(layer), Some(manifest)) = (
            labels.get(LABEL_IMAGE_REF),
            labels.get(LABEL_LAYER),
            labels.get(LABEL_MANIFEST),
        ) else {
            return None;
        };
        match tokio::time::timeout(RESOLVE_DEADLINE, self.try_resolve(image, layer, manifest)).await
        {
            Ok(Ok(found)) => found,
            Ok(Err(err)) => {
                tracing::warn!(image, layer, err = %chain(&err), "layer is not served lazily");
                None
            }
            Err(_) => {
                tracing::warn!(
                    image,
                    layer,
                    "resolving the layer took too long; it is downloaded instead"
                );
                None
            }
        }
    }

    async fn try_resolve(
        &self,
        image: &str,
        layer: &str,
        manifest: &str,
    ) -> Result<Option<(RemoteLayer, Arc<Toc>)>> {
        let mut reference: Reference = image.parse()?;
        let manifest: Digest = manifest.parse()?;
        let blob: Digest = layer.parse()?;
        reference.tag = None;
        reference.digest = Some(manifest);
        let bytes = match self.manifests.get(&manifest) {
            Some(b) => b,
            None => {
                let m = self.client.get_manifest(&reference).await?;
                self.manifests.put(&m.bytes)?;
                m.bytes
            }
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidArgument(format!("manifest {manifest}: {e}")))?;
        let Some(desc) = value["layers"]
            .as_array()
            .and_then(|l| l.iter().find(|d| d["digest"] == layer))
        else {
            return Ok(None);
        };
        let size = desc["size"].as_u64().unwrap_or(0);
        let annotations: Option<HashMap<String, String>> =
            serde_json::from_value(desc["annotations"].clone()).ok();
        let Some(lazy) = LazyLayer::from_descriptor(blob, size, annotations.as_ref())? else {
            return Ok(None);
        };
        let position = lazy
            .toc_position(|r| self.client.get_blob_range(&reference, &blob, r))
            .await?;
        reference.digest = None;
        let toc = self.toc(&reference, &lazy, &position).await?;
        self.source.register_blob(blob, &reference);
        let remote = RemoteLayer {
            image: reference.to_string(),
            manifest: manifest.to_string(),
            blob: blob.to_string(),
            blob_size: size,
            toc_digest: lazy.toc_digest.to_string(),
            toc_position: position.to_string(),
        };
        Ok(Some((remote, Arc::new(toc))))
    }

    /// The TOC from the local store, or from the registry (then kept), authenticated.
    async fn toc(
        &self,
        reference: &Reference,
        lazy: &LazyLayer,
        position: &TocPosition,
    ) -> Result<Toc> {
        let payload = match self.manifests.get(&lazy.toc_digest) {
            Some(p) => p,
            None => {
                let p = self
                    .client
                    .get_blob_range(reference, &lazy.blob, position.range())
                    .await?;
                self.manifests.put(&p)?;
                p
            }
        };
        Ok(lazy.decode_toc(&payload, position)?)
    }

    /// Mounts the layer's FUSE filesystem at `path`.
    pub fn mount(&self, id: u64, path: &Path, layer: &RemoteLayer, toc: Arc<Toc>) -> Result<()> {
        let blob: Digest = layer.blob.parse()?;
        let fs = crate::fs::LayerFs::new(toc, blob, self.cache.clone(), self.rt.clone())?;
        let session = crate::fs::mount(fs, path)?;
        self.sessions
            .lock()
            .expect("not poisoned")
            .insert(id, session);
        Ok(())
    }

    pub fn unmount(&self, id: u64) {
        let session = self.sessions.lock().expect("not poisoned").remove(&id);
        drop(session);
    }

    /// Mounts a committed remote snapshot again after a restart, from what metadata recorded
    /// (the TOC normally comes from the local store; the registry is asked only if it is gone).
    pub async fn remount(&self, id: u64, path: &Path, layer: &RemoteLayer) -> Result<()> {
        let reference: Reference = layer.image.parse()?;
        let blob: Digest = layer.blob.parse()?;
        let position: TocPosition = layer.toc_position.parse()?;
        let lazy = LazyLayer {
            blob,
            size: layer.blob_size,
            toc_digest: layer.toc_digest.parse()?,
            position: Some(position),
        };
        let toc = self.toc(&reference, &lazy, &position).await?;
        self.source.register_blob(blob, &reference);
        detach(path);
        self.mount(id, path, layer, Arc::new(toc))
    }

    /// Unmounts every FUSE session (shutdown).
    pub fn unmount_all(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .expect("not poisoned")
            .drain()
            .collect();
        drop(sessions);
    }
}

/// Lazily detaches whatever is mounted at `path` (a FUSE mount whose daemon died answers
/// every access with ENOTCONN until it is unmounted). Not mounted is fine.
pub fn detach(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; umount2 only reads it.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

/// Detaches every mount below `dir` (leftovers of a previous run killed before unmounting),
/// deepest first.
pub fn detach_all_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        tracing::info!(mountpoint = %p, "removing a stale mount");
        detach(Path::new(&p));
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
