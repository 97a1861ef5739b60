//! Snapshot metadata in sled, with the semantics of containerd's overlayfs snapshotter and
//! its metastore: keys, parents, kinds, labels, times, and the refusals containerd acts on
//! (NotFound, AlreadyExists, InvalidArgument, FailedPrecondition), checked in its order.
//!
//! Every mutation is flushed to disk before it returns, so an acknowledged Commit or Remove
//! survives a crash, and mutations are serialized as bolt serializes containerd's. It
//! stores records only; directories and mounts are the caller's.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use brisk_blobcache::reference::Reference;
use brisk_blobcache::toc::{LayerFormat, TocPosition};
use brisk_blobcache::Digest;
use serde::{Deserialize, Serialize};

use crate::error::{check_labels, Refusal};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// A lazily served layer: where its bytes come from, how they are authenticated, and whether
/// the chain ID containerd committed it under has been earned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The repository (registry/repository) the blob is fetched from.
    #[serde(with = "as_text")]
    pub image: Reference,
    pub manifest: Digest,
    /// The layer blob (compressed digest): it covers every byte, TOC included, so a Prepare
    /// naming the same blob may reuse this snapshot.
    pub blob: Digest,
    pub blob_size: u64,
    pub toc_digest: Digest,
    /// Where the TOC lies in the blob (`dev.brisk.toc.position`'s form on disk).
    #[serde(with = "as_text")]
    pub toc_position: TocPosition,
    /// The chain ID of the parent layer (`None` for a bottom layer): with the diff_id the
    /// layer's tar stream hashes to, it gives the chain ID the layer really has.
    #[serde(default)]
    pub parent_chain: Option<Digest>,
    #[serde(default)]
    pub proof: Proof,
    /// The format the layer's TOC is read in (recorded before it existed: Brisk's).
    #[serde(default)]
    pub format: LayerFormat,
}

/// Whether a lazy layer's tar stream was shown to hash to the diff_id its chain ID claims.
/// containerd names committed layers by chain IDs computed from what an image's config
/// *claims*; the overlayfs unpacker proves each while unpacking, a lazy layer only once all
/// its chunks have been read in order and hashed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum Proof {
    /// Not hashed yet: served to the image that brought it, never reused for another blob.
    #[default]
    Unproven,
    /// The tar stream hashes to the claimed diff_id: this is the layer its chain ID names.
    Proven,
    /// The tar stream hashes to `diff_id`, which does not give the chain ID it was committed
    /// under: its content is refused to everyone from then on.
    Refuted { diff_id: Digest },
}

impl Proof {
    pub fn as_str(&self) -> &'static str {
        match self {
            Proof::Unproven => "unproven",
            Proof::Proven => "proven",
            Proof::Refuted { .. } => "refuted",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Numeric id: names the snapshot's directory (`snapshots/<id>`), kept short so long
    /// lowerdir lists fit the kernel's mount option limit.
    pub id: u64,
    pub key: String,
    pub kind: Kind,
    /// Key of the committed parent, or empty.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Seconds and nanoseconds since the epoch.
    pub created: (i64, u32),
    pub updated: (i64, u32),
    /// Bytes and inodes, computed when the snapshot is committed.
    #[serde(default)]
    pub usage: Option<(u64, u64)>,
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

#[derive(Clone)]
pub struct SnapshotStore {
    db: sled::Db,
    snapshots: sled::Tree,
    /// Held by every read-check-write of the records, as bolt's single writer is by
    /// containerd's: two Prepares of one key must not both succeed, a Remove must not miss
    /// a child being created, and a proof must not undo a label update. A std mutex: callers
    /// are on blocking threads, and it is never held across an await.
    writer: Arc<Mutex<()>>,
}

fn now() -> (i64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

impl SnapshotStore {
    pub fn open(path: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(8 << 20)
            .open()
            .map_err(Error::Meta)?;
        let snapshots = db.open_tree("snapshots").map_err(Error::Meta)?;
        Ok(Self {
            db,
            snapshots,
            writer: Arc::default(),
        })
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        // A panic elsewhere leaves no half-written record behind the lock (each write is
        // one sled operation), so a poisoned lock is still good.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database, for other trees kept beside the snapshot records.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(Error::Meta)
    }

    pub fn get(&self, key: &str) -> Result<Option<Snapshot>> {
        match self.snapshots.get(key).map_err(Error::Meta)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(Error::MetaRecord),
            None => Ok(None),
        }
    }

    /// `key`'s record, or containerd's NotFound for Stat, Update, Usage and Commit.
    pub fn must_get(&self, key: &str) -> Result<Snapshot> {
        self.get(key)?.ok_or_else(|| Refusal::Missing.into())
    }

    fn put(&self, s: &Snapshot) -> Result<()> {
        let v = serde_json::to_vec(s).map_err(Error::MetaRecord)?;
        self.snapshots
            .insert(s.key.as_bytes(), v)
            .map_err(Error::Meta)?;
        Ok(())
    }

    /// Moves every record that no longer decodes (a crash mid-write, a disk error) out of
    /// the way, into the `damaged` tree, so the others keep being served; returns their keys
    /// and why each failed.
    pub fn set_aside_damaged(&self) -> Result<Vec<(String, String)>> {
        let damaged = self.db.open_tree("damaged").map_err(Error::Meta)?;
        let mut out = Vec::new();
        for r in self.snapshots.iter() {
            let (k, v) = r.map_err(Error::Meta)?;
            if let Err(e) = serde_json::from_slice::<Snapshot>(&v) {
                damaged.insert(&k, v).map_err(Error::Meta)?;
                self.snapshots.remove(&k).map_err(Error::Meta)?;
                out.push((String::from_utf8_lossy(&k).into_owned(), e.to_string()));
            }
        }
        if !out.is_empty() {
            self.flush()?;
        }
        Ok(out)
    }

    /// All snapshots, in key order. Collected first so no lock is held while a caller streams.
    pub fn all(&self) -> Result<Vec<Snapshot>> {
        self.snapshots
            .iter()
            .map(|r| {
                let (_, v) = r.map_err(Error::Meta)?;
                serde_json::from_slice(&v).map_err(Error::MetaRecord)
            })
            .collect()
    }

    /// The chain of committed ancestors of `parent`, nearest first (the lowerdir order).
    pub fn ancestors(&self, parent: &str) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        let mut next = parent.to_owned();
        while !next.is_empty() {
            let s = self.must_get(&next)?;
            next = s.parent.clone();
            out.push(s);
            if out.len() > 4096 {
                return Err(Error::FailedPrecondition("parent chain loops".into()));
            }
        }
        Ok(out)
    }

    /// Refuses what containerd's metastore refuses before it creates `key` on `parent`, in
    /// its order: labels, a missing parent (NotFound), a parent not committed
    /// (InvalidArgument), then an existing key (AlreadyExists).
    pub fn check_create(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        check_labels(labels)?;
        self.check_parent(parent)?;
        if key.is_empty() {
            // containerd's bolt store fails this as an unclassified error ("bucket name
            // required"); the class it belongs to is this one.
            return Err(Error::InvalidArgument("empty snapshot key".into()));
        }
        if self.get(key)?.is_some() {
            return Err(Refusal::Exists(key.to_owned()).into());
        }
        Ok(())
    }

    /// Refuses a `parent` that is not there (NotFound) or not committed (InvalidArgument).
    pub fn check_parent(&self, parent: &str) -> Result<()> {
        if parent.is_empty() {
            return Ok(());
        }
        let p = self
            .get(parent)?
            .ok_or_else(|| Refusal::MissingParent(parent.to_owned()))?;
        if p.kind != Kind::Committed {
            return Err(Refusal::ParentNotCommitted(parent.to_owned()).into());
        }
        Ok(())
    }

    /// Creates an active or view snapshot (or a lazy layer, committed) on top of a committed
    /// `parent`. Labels with empty values are not kept, as containerd keeps none.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        mut labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
    ) -> Result<Snapshot> {
        let _w = self.write_lock();
        self.check_create(key, parent, &labels)?;
        labels.retain(|_, v| !v.is_empty());
        let id = self.db.generate_id().map_err(Error::Meta)? + 1;
        let t = now();
        let s = Snapshot {
            id,
            key: key.to_owned(),
            kind,
            parent: parent.to_owned(),
            labels,
            created: t,
            updated: t,
            usage: None,
            remote,
        };
        self.put(&s)?;
        self.flush()?;
        Ok(s)
    }

    /// Turns active snapshot `key` into committed snapshot `name`, keeping its id and
    /// directory. As in containerd, an existing `name` is checked before `key`'s kind, the
    /// labels replace the active's, and the commit is the committed snapshot's creation.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        mut labels: BTreeMap<String, String>,
        usage: (u64, u64),
    ) -> Result<Snapshot> {
        check_labels(&labels)?;
        let _w = self.write_lock();
        let mut s = self.must_get(key)?;
        if self.get(name)?.is_some() {
            return Err(Refusal::CommittedExists(name.to_owned()).into());
        }
        if s.kind != Kind::Active {
            return Err(Refusal::NotActive(key.to_owned()).into());
        }
        labels.retain(|_, v| !v.is_empty());
        s.key = name.to_owned();
        s.kind = Kind::Committed;
        s.labels = labels;
        s.created = now();
        s.updated = s.created;
        s.usage = Some(usage);
        let record = serde_json::to_vec(&s).map_err(Error::MetaRecord)?;
        let mut batch = sled::Batch::default();
        batch.remove(key.as_bytes());
        batch.insert(name.as_bytes(), record);
        self.snapshots.apply_batch(batch).map_err(Error::Meta)?;
        self.flush()?;
        Ok(s)
    }

    /// Removes `key`; a snapshot that is some other snapshot's parent cannot go.
    pub fn remove(&self, key: &str) -> Result<Snapshot> {
        let _w = self.write_lock();
        let s = self
            .get(key)?
            .ok_or_else(|| Refusal::MissingRemove(key.to_owned()))?;
        if self.all()?.iter().any(|o| o.parent == key) {
            return Err(Refusal::HasChild.into());
        }
        self.snapshots.remove(key.as_bytes()).map_err(Error::Meta)?;
        self.flush()?;
        Ok(s)
    }

    /// Records what hashing a lazy layer showed. `Ok(false)` if `key` is gone or is no
    /// longer the lazy layer of blob `blob` (removed, or committed again from another blob).
    /// The proof is Brisk's own state, not the snapshot's: `updated` stays the time of the
    /// last Update, as containerd's clients expect.
    pub fn set_proof(&self, key: &str, blob: &Digest, proof: Proof) -> Result<bool> {
        let _w = self.write_lock();
        let Some(mut s) = self.get(key)? else {
            return Ok(false);
        };
        let Some(remote) = s.remote.as_mut().filter(|r| r.blob == *blob) else {
            return Ok(false);
        };
        remote.proof = proof;
        self.put(&s)?;
        self.flush()?;
        Ok(true)
    }

    /// Replaces labels as containerd's metastore does: with no field paths all of them;
    /// otherwise each path in turn, `labels` for all of them and `labels.<k>` for one (absent
    /// from `labels`: removed); any other path is refused. Empty values are not kept.
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Snapshot> {
        let _w = self.write_lock();
        let mut s = self.must_get(key)?;
        if fields.is_empty() {
            s.labels = labels;
        } else {
            for f in fields {
                if let Some(k) = f.strip_prefix("labels.") {
                    s.labels
                        .insert(k.to_owned(), labels.get(k).cloned().unwrap_or_default());
                } else if f == "labels" {
                    s.labels = labels.clone();
                } else {
                    return Err(Refusal::Immutable {
                        field: f.clone(),
                        key: key.to_owned(),
                    }
                    .into());
                }
            }
        }
        check_labels(&s.labels)?;
        s.labels.retain(|_, v| !v.is_empty());
        s.updated = now();
        self.put(&s)?;
        self.flush()?;
        Ok(s)
    }
}

/// A field stored in its text form (`Display` / `FromStr`), as records always stored it.
mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Class;

    fn store() -> (tempfile::TempDir, SnapshotStore) {
        let dir = tempfile::tempdir().unwrap();
        let m = SnapshotStore::open(&dir.path().join("meta")).unwrap();
        (dir, m)
    }

    fn class(r: Result<impl std::fmt::Debug>) -> Class {
        match r {
            Err(Error::Refused(r)) => r.class(),
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn prepare_commit_and_parents_follow_containerd_rules() {
        let (_d, m) = store();
        let none = BTreeMap::new;
        m.create(Kind::Active, "a", "", none(), None).unwrap();
        let again = m.create(Kind::Active, "a", "", none(), None);
        assert_eq!(class(again), Class::AlreadyExists);
        // containerd's metastore: a parent that is not committed is an invalid argument...
        let on_active = m.create(Kind::Active, "b", "a", none(), None);
        assert_eq!(class(on_active), Class::InvalidArgument);
        let on_missing = m.create(Kind::Active, "b", "nope", none(), None);
        assert_eq!(class(on_missing), Class::NotFound);
        // ... and the parent is looked at before the key.
        let both = m.create(Kind::Active, "a", "nope", none(), None);
        assert_eq!(class(both), Class::NotFound);
        let committed = m.commit("layer1", "a", none(), (10, 1)).unwrap();
        assert!(m.get("a").unwrap().is_none());
        assert_eq!(committed.kind, Kind::Committed);
        let b = m.create(Kind::View, "b", "layer1", none(), None).unwrap();
        assert_eq!(
            class(m.commit("x", "b", none(), (0, 0))),
            Class::FailedPrecondition
        );
        // An existing name is refused before the kind of the key is looked at.
        assert_eq!(
            class(m.commit("layer1", "b", none(), (0, 0))),
            Class::AlreadyExists
        );
        assert_eq!(
            class(m.commit("x", "gone", none(), (0, 0))),
            Class::NotFound
        );
        let has_child = m.remove("layer1");
        assert_eq!(
            has_child.unwrap_err().to_string(),
            "failed to remove: cannot remove snapshot with child"
        );
        assert_eq!(m.ancestors("layer1").unwrap().len(), 1);
        m.remove("b").unwrap();
        m.remove("layer1").unwrap();
        assert_eq!(class(m.remove("layer1")), Class::NotFound);
        assert_ne!(b.id, committed.id);
    }

    #[test]
    fn a_commit_is_the_committed_snapshots_creation() {
        let (_d, m) = store();
        let a = m
            .create(Kind::Active, "a", "", BTreeMap::new(), None)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let c = m.commit("c", "a", BTreeMap::new(), (0, 0)).unwrap();
        assert!(c.created > a.created, "{:?} !> {:?}", c.created, a.created);
        assert_eq!(c.created, c.updated);
    }

    #[test]
    fn concurrent_creates_of_one_key_give_one_snapshot() {
        let (_d, m) = store();
        // The race is narrow (a lookup, then an insert): many rounds of threads released at
        // once make an unserialized store lose it within a few rounds.
        for round in 0..200 {
            let key = format!("k{round}");
            let start = std::sync::Barrier::new(8);
            let made = std::thread::scope(|s| {
                let all: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            m.create(Kind::Active, &key, "", BTreeMap::new(), None)
                                .is_ok()
                        })
                    })
                    .collect();
                all.into_iter()
                    .map(|h| h.join().unwrap())
                    .filter(|ok| *ok)
                    .count()
            });
            assert_eq!(
                made, 1,
                "round {round}: {made} creates of one key succeeded"
            );
        }
    }

    #[test]
    fn a_proof_does_not_change_the_updated_time() {
        let (_d, m) = store();
        let layer = crate::snapshots::tests::remote_layer(Digest::sha256(b"blob"));
        let s = m
            .create(Kind::Committed, "l", "", BTreeMap::new(), Some(layer))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(m
            .set_proof("l", &Digest::sha256(b"blob"), Proof::Proven)
            .unwrap());
        let after = m.get("l").unwrap().unwrap();
        assert_eq!(after.remote.unwrap().proof, Proof::Proven);
        assert_eq!(after.updated, s.updated);
    }

    #[test]
    fn damaged_records_are_set_aside_and_the_rest_kept() {
        let (_d, m) = store();
        m.create(Kind::Active, "good", "", BTreeMap::new(), None)
            .unwrap();
        m.snapshots.insert("torn", &b"{\"id\":3,"[..]).unwrap();
        let aside = m.set_aside_damaged().unwrap();
        assert_eq!(aside.len(), 1);
        assert_eq!(aside[0].0, "torn");
        assert_eq!(m.all().unwrap().len(), 1);
        assert!(m.set_aside_damaged().unwrap().is_empty());
    }

    #[test]
    fn labels_update_whole_or_by_field_in_order() {
        let (_d, m) = store();
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        m.create(Kind::Active, "k", "", l(&[("a", "1"), ("b", "2")]), None)
            .unwrap();
        let fields = |f: &[&str]| f.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        let s = m
            .update_labels(
                "k",
                l(&[("a", "9"), ("c", "3")]),
                &fields(&["labels.a", "labels.b"]),
            )
            .unwrap();
        assert_eq!(s.labels, l(&[("a", "9")]), "c is not named, b is removed");
        // Paths apply in order: the whole set, then one label of the request.
        let s = m
            .update_labels(
                "k",
                l(&[("x", "1"), ("y", "2")]),
                &fields(&["labels", "labels.a"]),
            )
            .unwrap();
        assert_eq!(s.labels, l(&[("x", "1"), ("y", "2")]));
        // An empty value is a removal, never a stored label.
        let s = m
            .update_labels("k", l(&[("x", ""), ("z", "1")]), &[])
            .unwrap();
        assert_eq!(s.labels, l(&[("z", "1")]));
        assert_eq!(m.get("k").unwrap().unwrap().labels, l(&[("z", "1")]));
        // Any other path is refused, even beside `labels`, and nothing changes.
        let bad = m.update_labels("k", BTreeMap::new(), &fields(&["labels", "parent"]));
        assert_eq!(
            bad.unwrap_err().to_string(),
            r#"cannot update "parent" field on snapshot "k""#
        );
        assert_eq!(m.get("k").unwrap().unwrap().labels, l(&[("z", "1")]));
        let big = l(&[("k", &"v".repeat(4096))]);
        assert_eq!(
            class(m.update_labels("k", big, &[])),
            Class::InvalidArgument
        );
        let fits = l(&[("k", &"v".repeat(4095))]);
        m.update_labels("k", fits, &[]).unwrap();
    }
}
