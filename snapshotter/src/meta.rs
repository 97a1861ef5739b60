//! Snapshot metadata in sled, with the semantics of containerd's own snapshotters: keys,
//! parents, kinds, labels, and the errors containerd acts on (NotFound, AlreadyExists,
//! FailedPrecondition).
//!
//! Every mutation is flushed to disk before it returns, so an acknowledged Commit or Remove
//! survives a crash. It stores records only; directories and mounts are the caller's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use brisk_blobcache::reference::Reference;
use brisk_blobcache::toc::TocPosition;
use brisk_blobcache::Digest;
use serde::{Deserialize, Serialize};

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
        Ok(Self { db, snapshots })
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

    pub fn must_get(&self, key: &str) -> Result<Snapshot> {
        self.get(key)?
            .ok_or_else(|| Error::NotFound(key.to_owned()))
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

    /// Creates an active or view snapshot on top of a committed `parent`.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
    ) -> Result<Snapshot> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("empty snapshot key".into()));
        }
        if self.get(key)?.is_some() {
            return Err(Error::AlreadyExists(key.to_owned()));
        }
        if !parent.is_empty() {
            let p = self
                .get(parent)?
                .ok_or_else(|| Error::NotFound(format!("parent {parent}")))?;
            if p.kind != Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
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
    /// directory.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: (u64, u64),
    ) -> Result<Snapshot> {
        let mut s = self.must_get(key)?;
        if s.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        if self.get(name)?.is_some() {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        s.key = name.to_owned();
        s.kind = Kind::Committed;
        s.labels = labels;
        s.updated = now();
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
        let s = self.must_get(key)?;
        if self.all()?.iter().any(|o| o.parent == key) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} has children"
            )));
        }
        self.snapshots.remove(key.as_bytes()).map_err(Error::Meta)?;
        self.flush()?;
        Ok(s)
    }

    /// Records what hashing a lazy layer showed. `Ok(false)` if `key` is gone or is no
    /// longer the lazy layer of blob `blob` (removed, or committed again from another blob).
    pub fn set_proof(&self, key: &str, blob: &Digest, proof: Proof) -> Result<bool> {
        let Some(mut s) = self.get(key)? else {
            return Ok(false);
        };
        let Some(remote) = s.remote.as_mut().filter(|r| r.blob == *blob) else {
            return Ok(false);
        };
        remote.proof = proof;
        s.updated = now();
        self.put(&s)?;
        self.flush()?;
        Ok(true)
    }

    /// Replaces labels (all of them, or only those named by `fields` as `labels.<k>`).
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Snapshot> {
        let mut s = self.must_get(key)?;
        if fields.is_empty() || fields.iter().any(|f| f == "labels") {
            s.labels = labels;
        } else {
            for f in fields {
                let Some(k) = f.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!("cannot update field {f}")));
                };
                match labels.get(k) {
                    Some(v) => s.labels.insert(k.to_owned(), v.clone()),
                    None => s.labels.remove(k),
                };
            }
        }
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

    fn store() -> (tempfile::TempDir, SnapshotStore) {
        let dir = tempfile::tempdir().unwrap();
        let m = SnapshotStore::open(&dir.path().join("meta")).unwrap();
        (dir, m)
    }

    #[test]
    fn prepare_commit_and_parents_follow_containerd_rules() {
        let (_d, m) = store();
        m.create(Kind::Active, "a", "", BTreeMap::new(), None)
            .unwrap();
        assert!(matches!(
            m.create(Kind::Active, "a", "", BTreeMap::new(), None),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            m.create(Kind::Active, "b", "a", BTreeMap::new(), None),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.create(Kind::Active, "b", "nope", BTreeMap::new(), None),
            Err(Error::NotFound(_))
        ));
        let committed = m.commit("layer1", "a", BTreeMap::new(), (10, 1)).unwrap();
        assert!(m.get("a").unwrap().is_none());
        assert_eq!(committed.kind, Kind::Committed);
        let b = m
            .create(Kind::View, "b", "layer1", BTreeMap::new(), None)
            .unwrap();
        assert!(matches!(
            m.commit("x", "b", BTreeMap::new(), (0, 0)),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.remove("layer1"),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(m.ancestors("layer1").unwrap().len(), 1);
        m.remove("b").unwrap();
        m.remove("layer1").unwrap();
        assert!(matches!(m.remove("layer1"), Err(Error::NotFound(_))));
        assert_ne!(b.id, committed.id);
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
    fn labels_update_whole_or_by_field() {
        let (_d, m) = store();
        let labels = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        m.create(Kind::Active, "k", "", labels, None).unwrap();
        let new = BTreeMap::from([("a".to_owned(), "9".to_owned())]);
        let s = m
            .update_labels("k", new.clone(), &["labels.a".into(), "labels.b".into()])
            .unwrap();
        assert_eq!(s.labels, new);
        let s = m.update_labels("k", BTreeMap::new(), &[]).unwrap();
        assert!(s.labels.is_empty());
        assert!(m
            .update_labels("k", BTreeMap::new(), &["name".into()])
            .is_err());
    }
}
