//! A small on-disk store for manifests and TOCs, so a host that has seen an image once can
//! open it again without fetching either (and can open it offline).
//!
//! Content is stored by digest and checked against it on every load; a tag is only a pointer
//! to a digest, remembered for when the registry cannot be asked.

use std::path::PathBuf;

use bytes::Bytes;

use crate::reference::Reference;
use crate::{Digest, Error, Result};

pub struct MetaStore {
    root: PathBuf,
}

impl MetaStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for dir in ["sha256", "tags", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|e| Error::io(root.join(dir), e))?;
        }
        Ok(Self { root })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// The stored bytes of `digest`; a file that no longer matches is removed and is a miss.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let data = std::fs::read(self.path(digest)).ok()?;
        if Digest::sha256(&data) != *digest {
            let _ = std::fs::remove_file(self.path(digest));
            return None;
        }
        Some(data.into())
    }

    /// Stores `data` under its digest (written to a temp file, then renamed).
    pub fn put(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::sha256(data);
        let dest = self.path(&digest);
        if !dest.exists() {
            // A temp name of its own per write: two tasks keeping the same TOC at once (a
            // layer's Prepare and its image's prefetch) must not rename each other's file.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp =
                self.root
                    .join("tmp")
                    .join(format!("{}.{}.{n}", digest.hex(), std::process::id()));
            std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        Ok(digest)
    }

    /// Forgets `digest` (gone already is fine).
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        match std::fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(self.path(digest), e))
            }
            _ => Ok(()),
        }
    }

    /// Every digest stored (names that are not digests are not listed).
    pub fn list(&self) -> Result<Vec<Digest>> {
        let dir = self.root.join("sha256");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| format!("sha256:{}", e.file_name().to_str()?).parse().ok())
            .collect())
    }

    fn tag_path(&self, r: &Reference) -> PathBuf {
        let tag = r.tag.as_deref().unwrap_or("latest");
        // Registry hosts may carry a port; ':' is fine in a file name, '/' in the repository
        // becomes directories.
        self.root
            .join("tags")
            .join(&r.registry)
            .join(&r.repository)
            .join(tag)
    }

    /// The digest `r`'s tag pointed to when it was last resolved.
    pub fn tag(&self, r: &Reference) -> Option<Digest> {
        std::fs::read_to_string(self.tag_path(r))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn set_tag(&self, r: &Reference, digest: &Digest) -> Result<()> {
        let path = self.tag_path(r);
        std::fs::create_dir_all(path.parent().expect("tag paths have a parent"))
            .map_err(|e| Error::io(&path, e))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, digest.to_string()).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_digest_and_drops_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        let d = store.put(b"manifest").unwrap();
        assert_eq!(store.get(&d).unwrap(), &b"manifest"[..]);
        std::fs::write(dir.path().join("sha256").join(d.hex()), b"tampered").unwrap();
        assert!(store.get(&d).is_none());
        assert!(!dir.path().join("sha256").join(d.hex()).exists());
    }

    #[test]
    fn concurrent_puts_of_one_digest_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(MetaStore::open(dir.path()).unwrap());
        let data = vec![7u8; 1 << 20];
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, data) = (store.clone(), data.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        store.put(&data).unwrap();
                        let _ = store.remove(&Digest::sha256(&data));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn lists_and_removes_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        let (a, b) = (store.put(b"a").unwrap(), store.put(b"b").unwrap());
        std::fs::write(dir.path().join("sha256").join("junk"), b"x").unwrap();
        let mut listed = store.list().unwrap();
        listed.sort_by_key(|d| d.hex());
        let mut want = vec![a, b];
        want.sort_by_key(|d| d.hex());
        assert_eq!(listed, want);
        store.remove(&a).unwrap();
        store.remove(&a).unwrap();
        assert!(store.get(&a).is_none());
        assert_eq!(store.list().unwrap(), vec![b]);
    }

    #[test]
    fn remembers_tags() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        let r: Reference = "127.0.0.1:5000/team/app:v1".parse().unwrap();
        assert_eq!(store.tag(&r), None);
        let d = Digest::sha256(b"x");
        store.set_tag(&r, &d).unwrap();
        assert_eq!(store.tag(&r), Some(d));
    }
}
