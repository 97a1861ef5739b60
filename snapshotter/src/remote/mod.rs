//! Lazy layers: deciding from containerd's labels whether a layer can be served lazily
//! (through `blobcache::lazy`: image digest → manifest → authenticated TOC), and keeping its
//! FUSE mount alive; also clearing mounts a crash left behind. What an image's start
//! prefetches or records is `startup`.
//!
//! Any failure here means "not lazy": the caller falls back to containerd's download, so a
//! registry Brisk cannot read (private, down, slow) costs a full pull, never a failed start.

use brisk_blobcache::error_chain as chain;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_blobcache::image::LazyLayer;
use brisk_blobcache::layered::Layered;
use brisk_blobcache::lazy::{self, LazyImages};
use brisk_blobcache::reference::Reference;
use brisk_blobcache::remote::RegistrySource;
use brisk_blobcache::toc::Toc;
use brisk_blobcache::Digest;

use crate::meta::RemoteLayer;
use crate::Result;

mod startup;
#[cfg(test)]
mod testing;

/// The committed snapshot name a remote-snapshotter client wants (the chain id).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// How long Prepare may spend deciding whether a layer is lazy before it falls back.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(30);

/// What the daemon does with start-up traces.
#[derive(Clone, Debug)]
pub struct TracePolicy {
    /// Record a trace the first time an image with none starts.
    pub record: bool,
    /// Prefetch from a trace when an image's layers are prepared.
    pub prefetch: bool,
    /// Look for a trace in the registry on first sight of an image.
    pub fetch_from_registry: bool,
    /// Repositories (`host/name`) never prefetched.
    pub skip: Vec<String>,
}

/// Largest prefetch batch (one range request of neighbouring chunks, compressed bytes): the
/// registry level's coalescing limit, so a baked start-up set arrives as one ordered stream.
const PREFETCH_BATCH: u64 = 16 << 20;

pub struct RemoteLayers {
    /// Manifests and TOCs, fetched once and kept; opening a layer there makes its chunks
    /// fetchable through `source`.
    images: Arc<LazyImages>,
    traces: Arc<crate::traces::Traces>,
    policy: TracePolicy,
    source: Arc<RegistrySource>,
    cache: Arc<Layered>,
    rt: tokio::runtime::Handle,
    /// Which mounted layers a reading process's root is stacked from (for traces).
    readers: Arc<crate::readers::Readers>,
    /// Live FUSE sessions by snapshot id; dropping one unmounts it. A std mutex: held only
    /// to insert, look up or remove.
    sessions: Mutex<HashMap<u64, Mounted>>,
    /// The holder of FUSE connections (`crate::handover`); `None` when there is none. A std
    /// mutex: calls are short local round trips.
    holder: Mutex<Option<crate::handover::Client>>,
    /// Zone peers, asked for traces before the registry.
    zone: Option<Arc<brisk_blobcache::zone::client::PeerSource>>,
    /// Layers (blobs) and images whose baked start-up chunks were handed to prefetch in this
    /// run: each layer's once, counted once per image.
    baked: Mutex<BakedStarted>,
}

/// One lazy layer's FUSE mount.
struct Mounted {
    session: fuser::BackgroundSession,
    path: std::path::PathBuf,
    /// False for a connection taken over from a dead predecessor: dropping the session does
    /// not unmount, so `unmount` detaches the path itself.
    owns_mount: bool,
    /// Set when the layer is refuted: its filesystem answers EIO from then on.
    refuted: Arc<std::sync::atomic::AtomicBool>,
    /// Inode numbers run from 1 to this: what to drop from the page cache on refutal.
    inodes: u64,
    blob: Digest,
    /// What containers read through this mount, and how long they waited.
    stats: Arc<crate::fs::ReadStats>,
}

/// What `keep` needs of a filesystem that has moved into its FUSE session.
struct FsHandles {
    refuted: Arc<std::sync::atomic::AtomicBool>,
    inodes: u64,
    stats: Arc<crate::fs::ReadStats>,
}

impl FsHandles {
    fn of(fs: &crate::fs::LayerFs) -> Self {
        Self {
            refuted: fs.refuted_flag(),
            inodes: fs.inodes(),
            stats: fs.stats(),
        }
    }
}

#[derive(Default)]
struct BakedStarted {
    /// By blob and the repository it is read from: an image that merely names another
    /// image's blob cannot mark that image's start-up chunks as started.
    blobs: HashSet<(Digest, String)>,
    images: HashSet<Digest>,
}

impl RemoteLayers {
    pub fn new(
        images: Arc<LazyImages>,
        source: Arc<RegistrySource>,
        cache: Arc<Layered>,
        rt: tokio::runtime::Handle,
        traces: Arc<crate::traces::Traces>,
        policy: TracePolicy,
    ) -> Self {
        Self {
            images,
            traces,
            policy,
            source,
            cache,
            rt,
            readers: Arc::default(),
            sessions: Mutex::default(),
            zone: None,
            holder: Mutex::default(),
            baked: Mutex::default(),
        }
    }

    pub fn with_zone(
        mut self,
        zone: Option<Arc<brisk_blobcache::zone::client::PeerSource>>,
    ) -> Self {
        self.zone = zone;
        self
    }

    pub fn zone(&self) -> Option<&Arc<brisk_blobcache::zone::client::PeerSource>> {
        self.zone.as_ref()
    }

    pub fn traces(&self) -> &Arc<crate::traces::Traces> {
        &self.traces
    }

    pub fn mounted(&self) -> usize {
        self.sessions.lock().expect("not poisoned").len()
    }

    pub fn cache(&self) -> &Arc<Layered> {
        &self.cache
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// What containers read through snapshot `id`'s mount in this run, and what its blob's
    /// chunks cost off the host; `None` when it is not mounted.
    pub fn read_report(
        &self,
        id: u64,
    ) -> Option<(crate::fs::ReadReport, brisk_blobcache::layered::BlobFetched)> {
        let sessions = self.sessions.lock().expect("not poisoned");
        let m = sessions.get(&id)?;
        Some((m.stats.report(), self.cache.fetched(&m.blob)))
    }

    /// Whether snapshot `id`'s lazy layer is mounted in this run.
    pub fn is_mounted(&self, id: u64) -> bool {
        self.sessions
            .lock()
            .expect("not poisoned")
            .contains_key(&id)
    }

    /// Cuts a refuted layer's content off: every access through its mount fails with EIO, and
    /// the pages the kernel cached for it are dropped, so no container (the image that
    /// brought it, or another one sharing its chain ID) reads its files again. The mount
    /// stays, so containerd can still remove the snapshot.
    pub fn refute(&self, id: u64) {
        let sessions = self.sessions.lock().expect("not poisoned");
        let Some(m) = sessions.get(&id) else { return };
        m.refuted.store(true, std::sync::atomic::Ordering::SeqCst);
        let notifier = m.session.notifier();
        for ino in 1..=m.inodes {
            // Inodes the kernel never saw answer ENOENT; nothing to drop there.
            let _ = notifier.inval_inode(fuser::INodeNo(ino), 0, -1);
        }
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
        match tokio::time::timeout(
            RESOLVE_DEADLINE,
            self.try_resolve(image, layer, manifest, labels),
        )
        .await
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
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<(RemoteLayer, Arc<Toc>)>> {
        let mut reference: Reference = image.parse()?;
        let manifest: Digest = manifest.parse()?;
        let blob: Digest = layer.parse()?;
        reference.tag = None;
        reference.digest = Some(manifest);
        // containerd passes the label copies of a converted layer's annotations: with them,
        // the manifest round trip is not on the way to the mount.
        let lazy = match LazyLayer::from_labels(blob, labels)? {
            Some(lazy) => lazy,
            None => {
                let m = self.images.manifest(&reference, manifest).await?;
                match lazy::layer_of(&m, &blob)? {
                    Some(lazy) => lazy,
                    None => return Ok(None),
                }
            }
        };
        // A layer never seen here (its TOC is not held) that names where its start-up chunks
        // lie: they start on their way now, while the TOC is fetched and checked.
        if !lazy.prefetch_spans.is_empty()
            && self.prefetch_allowed(&reference)
            && !self.images.holds_toc(&lazy)
        {
            tracing::debug!(%blob, spans = lazy.prefetch_spans.len(), "fetching the start-up chunks ahead of the TOC");
            self.source
                .preload(blob, &reference, lazy.prefetch_spans.clone());
        }
        let handle = self.images.open(&reference, &lazy).await?;
        let remote = RemoteLayer {
            image: handle.repository,
            manifest,
            blob,
            blob_size: lazy.size,
            toc_digest: lazy.toc_digest,
            toc_position: handle.position,
            parent_chain: None,
            proof: crate::meta::Proof::Unproven,
            format: lazy.format,
        };
        Ok(Some((remote, handle.toc)))
    }

    /// The filesystem serving `layer`, with its reads recorded for traces.
    fn layer_fs(&self, layer: &RemoteLayer, toc: Arc<Toc>) -> Result<crate::fs::LayerFs> {
        let blob = layer.blob;
        let recorder = self.traces.recorder().clone();
        let readers = self.readers.clone();
        let chunks = toc.clone();
        let record: crate::fs::Recorder = Arc::new(move |ev: crate::fs::ReadEvent| {
            if !recorder.any_active() {
                return;
            }
            recorder.record(brisk_trace_recorder::ReadRecord {
                layer: blob,
                chunks: ev
                    .chunks
                    .iter()
                    .map(|&i| (i as u32, chunks.chunks[i].digest))
                    .collect(),
                range: ev.offset..ev.offset + ev.len as u64,
                path: ev.path,
                at: std::time::Instant::now(),
                reader: readers.reader(ev.pid),
            });
        });
        let fs = crate::fs::LayerFs::new(toc, blob, self.cache.clone(), self.rt.clone())?
            .with_recorder(record);
        if matches!(layer.proof, crate::meta::Proof::Refuted { .. }) {
            fs.refuted_flag()
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(fs)
    }

    fn keep(
        &self,
        id: u64,
        path: &Path,
        blob: Digest,
        handles: FsHandles,
        m: crate::fs::MountedLayer,
    ) {
        self.readers.mounted(id, path, blob);
        if let Some(holder) = &*self.holder.lock().expect("not poisoned") {
            let held = crate::handover::Held {
                id,
                abi: m.connection.abi,
                capabilities: m.connection.capabilities,
            };
            if let Err(err) = holder.put(held, std::os::fd::AsFd::as_fd(&m.fd)) {
                tracing::warn!(id, %err, "the holder did not take the layer's FUSE connection; it will not survive a restart of the daemon");
            }
        }
        self.sessions.lock().expect("not poisoned").insert(
            id,
            Mounted {
                session: m.session,
                refuted: handles.refuted,
                inodes: handles.inodes,
                blob,
                stats: handles.stats,
                path: path.to_owned(),
                owns_mount: m.owns_mount,
            },
        );
    }

    /// Mounts the layer's FUSE filesystem at `path`.
    pub fn mount(&self, id: u64, path: &Path, layer: &RemoteLayer, toc: Arc<Toc>) -> Result<()> {
        let fs = self.layer_fs(layer, toc)?;
        let handles = FsHandles::of(&fs);
        let m = crate::fs::mount(fs, path)?;
        self.keep(id, path, layer.blob, handles, m);
        Ok(())
    }

    /// Serves a layer still mounted at `path` whose previous server died, over `fd`, its live
    /// FUSE connection kept by the holder. Needs the TOC only: normally from the local store.
    pub async fn adopt(
        &self,
        id: u64,
        path: &Path,
        layer: &RemoteLayer,
        fd: std::os::fd::OwnedFd,
        connection: crate::fs::Connection,
    ) -> Result<Arc<Toc>> {
        let toc = self.toc_of(layer).await?;
        let fs = self.layer_fs(layer, toc.clone())?;
        let handles = FsHandles::of(&fs);
        let m = crate::fs::adopt(fs, fd, connection, path)?;
        self.keep(id, path, layer.blob, handles, m);
        Ok(toc)
    }

    /// Tells the holder to let go of connections no snapshot owns any more.
    pub fn forget_connection(&self, id: u64) {
        if let Some(holder) = &*self.holder.lock().expect("not poisoned") {
            if let Err(err) = holder.forget(id) {
                tracing::warn!(id, %err, "the holder did not let a FUSE connection go");
            }
        }
    }

    pub fn unmount(&self, id: u64) {
        self.readers.unmounted(id);
        let (mounted, blob_still_mounted) = {
            let mut sessions = self.sessions.lock().expect("not poisoned");
            let mounted = sessions.remove(&id);
            let still = mounted
                .as_ref()
                .is_some_and(|m| sessions.values().any(|o| o.blob == m.blob));
            (mounted, still)
        };
        if let Some(m) = mounted {
            if !blob_still_mounted {
                self.cache.forget_fetched(&m.blob);
            }
            if !m.owns_mount {
                detach(&m.path);
            }
            drop(m);
        }
        self.forget_connection(id);
    }

    /// Mounts a committed remote snapshot again after a restart, from what metadata recorded
    /// (the TOC normally comes from the local store; the registry is asked only if it is gone).
    pub async fn remount(&self, id: u64, path: &Path, layer: &RemoteLayer) -> Result<Arc<Toc>> {
        let toc = self.toc_of(layer).await?;
        detach(path);
        self.mount(id, path, layer, toc.clone())?;
        Ok(toc)
    }

    /// A committed lazy layer's TOC, from the local store (the registry only if it is gone).
    async fn toc_of(&self, layer: &RemoteLayer) -> Result<Arc<Toc>> {
        let lazy = LazyLayer {
            blob: layer.blob,
            size: layer.blob_size,
            toc_digest: layer.toc_digest,
            position: Some(layer.toc_position),
            prefetch_spans: Vec::new(),
            format: layer.format,
        };
        Ok(self.images.open(&layer.image, &lazy).await?.toc)
    }

    /// Forgets the manifests and TOCs kept on disk that none of `held` (the lazy layers
    /// still committed) names: what is persisted is bounded by what the host holds.
    pub fn forget_unheld(&self, held: &[RemoteLayer]) {
        let keep: HashSet<Digest> = held
            .iter()
            .flat_map(|l| [l.manifest, l.toc_digest])
            .collect();
        self.images.forget_except(&keep);
    }

    /// A clean stop: unmounts every lazy layer and tells the holder to let every connection
    /// go and exit.
    pub fn unmount_all(&self) {
        let ids: Vec<u64> = self
            .sessions
            .lock()
            .expect("not poisoned")
            .keys()
            .copied()
            .collect();
        for id in ids {
            self.unmount(id);
        }
        if let Some(holder) = self.holder.lock().expect("not poisoned").take() {
            if let Err(err) = holder.quit() {
                tracing::warn!(%err, "the holder did not stop");
            }
        }
    }

    /// A stop for a successor: every FUSE session is left running until the process exits
    /// and its mount in place; the holder keeps the connections, so readers wait for the
    /// successor instead of failing.
    pub fn leave_all(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .expect("not poisoned")
            .drain()
            .collect();
        for (_, m) in sessions {
            crate::fs::leave(m.session);
        }
    }

    /// Connects to the holder that keeps FUSE connections across restarts.
    pub fn set_holder(&self, holder: Option<crate::handover::Client>) {
        *self.holder.lock().expect("not poisoned") = holder;
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

#[cfg(test)]
mod tests {
    use super::testing::{host, policy, Host};
    use super::*;

    fn labels_for(h: &Host, manifest: &Digest) -> BTreeMap<String, String> {
        let mut labels = h.labels.clone();
        labels.insert(LABEL_IMAGE_REF.into(), "127.0.0.1:1/tenant/app:v1".into());
        labels.insert(LABEL_LAYER.into(), h.layer.blob.to_string());
        labels.insert(LABEL_MANIFEST.into(), manifest.to_string());
        labels
    }

    #[test]
    fn a_layer_whose_toc_is_kept_resolves_from_its_labels_alone() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = host(&rt, policy());
        let (remote, toc) = rt
            .block_on(h.remote.resolve(&labels_for(&h, &h.layer.manifest)))
            .expect("lazy");
        assert_eq!(
            remote, h.layer,
            "the repository, blob, TOC and position recorded"
        );
        assert_eq!(*toc, *h.toc);
        // Its chunks can now be fetched from the image's repository, and only from it.
        assert_eq!(
            h.remote.source().repositories_of(&h.layer.blob),
            vec![h.layer.image.clone()]
        );
    }

    #[test]
    fn without_the_label_copies_the_kept_manifest_decides() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = host(&rt, policy());
        let mut labels = labels_for(&h, &h.layer.manifest);
        labels.retain(|k, _| {
            !k.starts_with(brisk_blobcache::toc::SNAPSHOT_LABEL_PREFIX)
                || k.starts_with("containerd.io/snapshot/cri.")
        });
        let (remote, _) = rt.block_on(h.remote.resolve(&labels)).expect("lazy");
        assert_eq!(remote.blob, h.layer.blob);
        // A blob the manifest does not list is not lazy: containerd downloads it.
        labels.insert(
            LABEL_LAYER.into(),
            Digest::sha256(b"another blob").to_string(),
        );
        assert!(rt.block_on(h.remote.resolve(&labels)).is_none());
    }

    #[test]
    fn labels_that_cannot_be_trusted_or_fetched_fall_back_to_the_download() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = host(&rt, policy());
        // No manifest label: not a lazy pull at all.
        let mut labels = labels_for(&h, &h.layer.manifest);
        labels.remove(LABEL_MANIFEST);
        assert!(rt.block_on(h.remote.resolve(&labels)).is_none());
        // A position claiming a 2^62-byte TOC: refused before anything is fetched.
        let mut labels = labels_for(&h, &h.layer.manifest);
        labels.insert(
            brisk_blobcache::toc::LABEL_TOC_POSITION.into(),
            format!("8:{}:100:1", 1u64 << 62),
        );
        assert!(rt.block_on(h.remote.resolve(&labels)).is_none());
        // A TOC digest the kept TOC does not have: it would have to come from the registry,
        // which cannot be reached, so the layer is downloaded (and nothing is registered).
        let mut labels = labels_for(&h, &Digest::sha256(b"another manifest"));
        labels.insert(
            brisk_blobcache::toc::LABEL_TOC_DIGEST.into(),
            Digest::sha256(b"another toc").to_string(),
        );
        labels.insert(
            LABEL_LAYER.into(),
            Digest::sha256(b"another blob").to_string(),
        );
        assert!(rt.block_on(h.remote.resolve(&labels)).is_none());
        assert!(h
            .remote
            .source()
            .repositories_of(&Digest::sha256(b"another blob"))
            .is_empty());
    }
}
