//! The snapshotter's operations, as containerd's overlayfs snapshotter defines them: active
//! snapshots are overlayfs mounts (upper and work dirs over the parents' dirs), a view of one
//! parent is a read-only bind, committed snapshots are lower dirs. Remote (lazy) layers are
//! committed snapshots whose dir is a FUSE mount.
//!
//! It speaks in crate types; `service` adapts it to gRPC.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use brisk_blobcache::Digest;

use crate::error::{check_labels, Refusal};
use crate::filter::Filters;
use crate::meta::{Kind, Proof, Snapshot, SnapshotStore};
use crate::proof::{Claim, Prover};
use crate::remote::{RemoteLayers, LABEL_LAYER, LABEL_TARGET};
use crate::{Error, Result};

/// A mount containerd performs for a container's rootfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

pub struct Snapshotter {
    root: PathBuf,
    store: SnapshotStore,
    remote: Arc<RemoteLayers>,
    prover: Arc<Prover>,
}

impl Snapshotter {
    pub fn new(
        root: &Path,
        store: SnapshotStore,
        remote: Arc<RemoteLayers>,
        prover: Arc<Prover>,
    ) -> Result<Self> {
        let dir = root.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self {
            root: root.to_owned(),
            store,
            remote,
            prover,
        })
    }

    pub fn prover(&self) -> &Arc<Prover> {
        &self.prover
    }

    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    pub fn remote(&self) -> &Arc<RemoteLayers> {
        &self.remote
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// Creates the snapshot's directories with containerd's overlayfs modes whatever the
    /// umask: the snapshot's own 0700, `fs` 0755 (the container's root directory when
    /// nothing is stacked under it), `work` 0711.
    fn make_dirs(&self, s: &Snapshot, work: bool) -> Result<()> {
        let mut dirs = vec![(self.dir(s.id), 0o700), (self.fs(s.id), 0o755)];
        if work {
            dirs.push((self.dir(s.id).join("work"), 0o711));
        }
        for (d, mode) in dirs {
            std::fs::create_dir(&d).map_err(|e| Error::io(&d, e))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&d, e))?;
        }
        Ok(())
    }

    /// Gives a new snapshot's `fs` the owner of its parent's root directory, as containerd
    /// does: overlayfs shows the upper directory's owner on the merged root, so without it a
    /// container's `/` would be root's whatever its image says.
    fn own_like_parent(&self, s: &Snapshot) -> Result<()> {
        let Some(p) = self.store.ancestors(&s.parent)?.into_iter().next() else {
            return Ok(());
        };
        let from = self.fs(p.id);
        let m = std::fs::metadata(&from).map_err(|e| Error::io(&from, e))?;
        let to = self.fs(s.id);
        std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid())).map_err(|e| Error::io(&to, e))
    }

    /// Creates an ordinary active or view snapshot and its directories. Nothing outlives a
    /// failure: containerd's Prepare is one transaction, so a failed one leaves no record.
    fn create_local(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let s = self.store.create(kind, key, parent, labels, None)?;
        let made = self
            .make_dirs(&s, kind == Kind::Active)
            .and_then(|()| self.own_like_parent(&s))
            .and_then(|()| self.mounts_of(&s));
        if made.is_err() {
            if let Err(err) = self.store.remove(key) {
                tracing::warn!(key, err = %brisk_blobcache::error_chain(&err), "the record of a failed Prepare could not be removed");
            }
            // Only a directory this call made: one in the way is Cleanup's to judge.
            if self.dir(s.id).join("fs").is_dir() {
                let _ = std::fs::remove_dir_all(self.dir(s.id));
            }
        }
        made
    }

    /// Prepare: a lazy layer becomes a committed remote snapshot and the answer is
    /// AlreadyExists (containerd then skips the download); anything else is a normal active
    /// snapshot. A chain ID already held lazily is reused only for the same blob or once
    /// proven; otherwise the newcomer is downloaded and unpacked, which containerd verifies.
    /// The labels and the parent are checked first, as containerd checks them.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        check_labels(&labels)?;
        self.store.check_parent(parent)?;
        self.check_lower(parent)?;
        if let Some(target) = labels.get(LABEL_TARGET) {
            if let Some(existing) = self.store.get(target)? {
                match reusable(&existing, labels.get(LABEL_LAYER)) {
                    Ok(()) => return Err(Refusal::TargetExists(target.clone()).into()),
                    Err(why) => {
                        tracing::warn!(target = %target, layer = labels.get(LABEL_LAYER).map(String::as_str).unwrap_or("?"), why, "chain ID not reused; the layer is downloaded and unpacked instead");
                    }
                }
            } else if let Some((mut layer, toc)) = self.remote.resolve(&labels).await {
                layer.parent_chain = self.chain_of(parent)?;
                // The record's flush, the inode table and the mount block: the worker hands
                // its other tasks on meanwhile.
                let created = brisk_blobcache::blocking::in_place(|| {
                    let s = self.store.create(
                        Kind::Committed,
                        target,
                        parent,
                        labels.clone(),
                        Some(layer.clone()),
                    )?;
                    let mounted = self.make_dirs(&s, false).and_then(|()| {
                        self.remote.mount(s.id, &self.fs(s.id), &layer, toc.clone())
                    });
                    Ok::<_, Error>((s, mounted))
                });
                let (s, mounted) = created?;
                if let Err(err) = mounted {
                    tracing::warn!(%err, key, "mounting the lazy layer failed; falling back to a download");
                    let _ = self.store.remove(target);
                    let _ = std::fs::remove_dir_all(self.dir(s.id));
                } else {
                    tracing::info!(target = %target, blob = %layer.blob, "lazy layer mounted");
                    self.remote.start_image(&layer, &toc);
                    self.prove(&s, toc);
                    return Err(Refusal::TargetExists(target.clone()).into());
                }
            }
        }
        brisk_blobcache::blocking::in_place(|| self.create_local(Kind::Active, key, parent, labels))
    }

    /// Schedules the proof of a lazy layer just mounted (or mounted again) and unproven.
    pub fn prove(&self, s: &Snapshot, toc: Arc<brisk_blobcache::toc::Toc>) {
        let Some(r) = &s.remote else { return };
        if r.proof != Proof::Unproven {
            return;
        }
        if !toc.format.chunks_tile_the_tar() {
            // Its chunks are the files' contents, not the tar stream: hashing them gives no
            // diff_id. It stays unproven, so it serves only the image that vouched for it.
            tracing::info!(snapshot = %s.key, format = toc.format.as_str(), "this lazy layer's format cannot be proven by reading its chunks; it is never reused for another blob");
            return;
        }
        if !s.parent.is_empty() && r.parent_chain.is_none() {
            tracing::warn!(snapshot = %s.key, "the parent's chain ID is unknown: this lazy layer cannot be proven and is never reused for another blob");
            return;
        }
        self.prover.schedule(Claim {
            key: s.key.clone(),
            id: s.id,
            blob: r.blob,
            parent_chain: r.parent_chain,
            toc,
        });
    }

    /// The chain ID of committed snapshot `parent`: a lazy layer's key is its chain ID; a
    /// layer containerd unpacked carries it as its `snapshot.ref` label, and containerd's
    /// metadata names it `<namespace>/<n>/<chain ID>`.
    fn chain_of(&self, parent: &str) -> Result<Option<Digest>> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = self.store.must_get(parent)?;
        let named = p.labels.get(LABEL_TARGET).map(String::as_str);
        let last = p.key.rsplit('/').next();
        let chain = [named, last, Some(p.key.as_str())]
            .into_iter()
            .flatten()
            .find_map(|c| c.parse().ok());
        Ok(chain)
    }

    /// Refuses to stack on a lower layer that must not be served: a refuted lazy layer, or
    /// one that could not be mounted again after a restart (its empty directory would let
    /// the layers below show through its whiteouts).
    fn check_lower(&self, parent: &str) -> Result<()> {
        for p in self.store.ancestors(parent)? {
            let Some(r) = &p.remote else { continue };
            if matches!(r.proof, Proof::Refuted { .. }) {
                return Err(Error::FailedPrecondition(format!(
                    "lazy layer {} (blob {}, image {}) does not match the chain ID it was committed under; remove the image that brought it",
                    p.key, r.blob, r.image
                )));
            }
            if !self.remote.is_mounted(p.id) {
                return Err(Error::FailedPrecondition(format!(
                    "lazy layer {} (blob {}) is not mounted: it could not be mounted again after a restart",
                    p.key, r.blob
                )));
            }
        }
        Ok(())
    }

    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        check_labels(&labels)?;
        self.store.check_parent(parent)?;
        self.check_lower(parent)?;
        self.create_local(Kind::View, key, parent, labels)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self.store.get(key)?.ok_or(Refusal::MissingMount)?;
        if s.kind == Kind::Committed {
            return Err(Refusal::NoMounts(key.to_owned()).into());
        }
        self.check_lower(&s.parent)?;
        self.mounts_of(&s)
    }

    fn mounts_of(&self, s: &Snapshot) -> Result<Vec<Mount>> {
        let parents = self.store.ancestors(&s.parent)?;
        let lower = || {
            parents
                .iter()
                .map(|p| self.fs(p.id).display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        let bind = |path: PathBuf, mode: &str| Mount {
            kind: "bind".into(),
            source: path.display().to_string(),
            options: vec![mode.into(), "rbind".into()],
        };
        Ok(vec![match (s.kind, parents.len()) {
            (Kind::Active, 0) => bind(self.fs(s.id), "rw"),
            (Kind::View, 0) => bind(self.fs(s.id), "ro"),
            (Kind::View, 1) => bind(self.fs(parents[0].id), "ro"),
            // containerd gives a view's overlay `index=off` too.
            (Kind::View, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["index=off".into(), format!("lowerdir={}", lower())],
            },
            (_, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", self.dir(s.id).join("work").display()),
                    format!("upperdir={}", self.fs(s.id).display()),
                    format!("lowerdir={}", lower()),
                ],
            },
        }])
    }

    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let s = self.store.must_get(key)?;
        let usage = if s.kind == Kind::Active {
            disk_usage(&self.fs(s.id))
        } else {
            (0, 0)
        };
        self.store.commit(name, key, labels, usage)
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let s = self.store.remove(key)?;
        if s.remote.is_some() {
            self.remote.unmount(s.id);
            self.remote.forget_unheld(&self.lazy_layers()?);
        }
        let dir = self.dir(s.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            // Cleanup retries what could not be removed now.
            tracing::warn!(dir = %dir.display(), %e, "snapshot directory not removed yet");
        }
        Ok(())
    }

    /// Every lazy layer still committed.
    pub fn lazy_layers(&self) -> Result<Vec<crate::meta::RemoteLayer>> {
        Ok(self
            .store
            .all()?
            .into_iter()
            .filter_map(|s| s.remote)
            .collect())
    }

    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        self.store.must_get(key)
    }

    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Snapshot> {
        self.store.update_labels(key, labels, fields)
    }

    /// Bytes and inodes on disk, as containerd's overlayfs snapshotter counts them: measured
    /// now while active, what was measured at commit once committed, nothing for a view
    /// (it writes nothing). A remote layer's bytes live in the shared chunk cache, not in
    /// its directory, so it counts none.
    pub fn usage(&self, key: &str) -> Result<(u64, u64)> {
        let s = self.store.must_get(key)?;
        Ok(match s.kind {
            _ if s.remote.is_some() => (0, 0),
            Kind::Active => disk_usage(&self.fs(s.id)),
            Kind::Committed => s.usage.unwrap_or((0, 0)),
            Kind::View => (0, 0),
        })
    }

    pub fn walk(&self, filters: &[String]) -> Result<Vec<Snapshot>> {
        let filters = Filters::parse(filters)?;
        Ok(self
            .store
            .all()?
            .into_iter()
            .filter(|s| filters.matches(s))
            .collect())
    }

    /// Removes whatever no snapshot owns any more under `snapshots/` (directories, their
    /// mounts, and anything else there, as containerd's Cleanup does).
    pub fn cleanup(&self) -> Result<()> {
        let dir = self.root.join("snapshots");
        // Listed before the records are read: a snapshot's record is written before its
        // directory, so every directory listed whose snapshot exists is among the records,
        // however many Prepares run meanwhile.
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .flatten()
            .collect();
        let known: std::collections::HashSet<u64> =
            self.store.all()?.iter().map(|s| s.id).collect();
        for entry in entries {
            // A directory is a snapshot's only under the id's canonical name.
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok().filter(|id| id.to_string() == n));
            if id.is_some_and(|id| known.contains(&id)) {
                continue;
            }
            if let Some(id) = id {
                self.remote.unmount(id);
            }
            let path = entry.path();
            crate::remote::detach(&path.join("fs"));
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), %e, "cleanup could not remove it");
            }
        }
        Ok(())
    }
}

/// Whether a Prepare naming layer blob `blob` may be told that `existing`, a snapshot already
/// committed under the chain ID it asks for, is its layer.
fn reusable(existing: &Snapshot, blob: Option<&String>) -> std::result::Result<(), &'static str> {
    // Committed here by an unpack, which containerd verified.
    let Some(r) = &existing.remote else {
        return Ok(());
    };
    match r.proof {
        Proof::Refuted { .. } => Err("the lazy layer held under it was refuted"),
        Proof::Proven => Ok(()),
        // The blob digest covers every byte of the layer, TOC included.
        Proof::Unproven if blob.and_then(|b| b.parse::<Digest>().ok()) == Some(r.blob) => Ok(()),
        Proof::Unproven => Err("it is held lazily from another blob, not proven yet"),
    }
}

/// Bytes (allocated blocks) and inodes of `dir` and everything under it, each inode counted
/// once, as containerd's `fs.DiskUsage` counts them; unlike it, never crossing into other
/// filesystems (nothing mounted inside an upper directory is the snapshot's).
fn disk_usage(dir: &Path) -> (u64, u64) {
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let mut seen = std::collections::HashSet::from([root.ino()]);
    let (mut bytes, mut inodes) = (root.blocks() * 512, 1u64);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != root.dev() || !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::meta::RemoteLayer;

    pub(crate) fn remote_layer(blob: Digest) -> RemoteLayer {
        RemoteLayer {
            image: "127.0.0.1:5000/good".parse().unwrap(),
            manifest: Digest::sha256(b"manifest"),
            blob,
            blob_size: 1,
            toc_digest: Digest::sha256(b"toc"),
            toc_position: "8:1:1:1".parse().unwrap(),
            parent_chain: None,
            proof: Proof::Unproven,
            format: Default::default(),
        }
    }

    /// A committed lazy snapshot `id` served from `remote`.
    pub(crate) fn lazy_snapshot(id: u64, key: String, remote: RemoteLayer) -> Snapshot {
        Snapshot {
            id,
            key,
            kind: Kind::Committed,
            parent: String::new(),
            labels: BTreeMap::new(),
            created: (0, 0),
            updated: (0, 0),
            usage: None,
            remote: Some(remote),
        }
    }

    fn lazy(blob: Digest, proof: Proof) -> Snapshot {
        let remote = RemoteLayer {
            proof,
            ..remote_layer(blob)
        };
        lazy_snapshot(1, Digest::sha256(b"chain").to_string(), remote)
    }

    #[test]
    fn a_chain_id_is_reused_for_the_same_blob_or_once_proven_never_once_refuted() {
        let (good, evil) = (Digest::sha256(b"good"), Digest::sha256(b"evil"));
        let named = |d: Digest| Some(d.to_string());
        let unproven = lazy(good, Proof::Unproven);
        assert_eq!(reusable(&unproven, named(good).as_ref()), Ok(()));
        assert!(reusable(&unproven, named(evil).as_ref()).is_err());
        assert!(reusable(&unproven, None).is_err(), "no layer named");
        let proven = lazy(good, Proof::Proven);
        assert_eq!(reusable(&proven, named(evil).as_ref()), Ok(()));
        let refuted = lazy(
            good,
            Proof::Refuted {
                diff_id: Digest::sha256(b"real"),
            },
        );
        assert!(reusable(&refuted, named(good).as_ref()).is_err());
        assert!(reusable(&refuted, named(evil).as_ref()).is_err());
        let mut unpacked = lazy(good, Proof::Unproven);
        unpacked.remote = None;
        assert_eq!(reusable(&unpacked, named(evil).as_ref()), Ok(()));
    }
}
