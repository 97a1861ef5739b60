//! OCI image layout directories (`oci:DIR[:tag]`): blobs under `blobs/sha256/`, tags in
//! `index.json` as `org.opencontainers.image.ref.name` annotations.
//!
//! Every write lands in a temporary file and is renamed into place, so a failed conversion
//! leaves either the old `index.json` or the new one, never half of one, and `index.json`
//! is written only after every blob it points to.

use std::io::Write;
use std::path::{Path, PathBuf};

use brisk_blobcache::digest::HashingReader;
use brisk_blobcache::{media, Digest};
use serde_json::{json, Value};

use crate::{Error, Result};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Clone, Debug)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Layout {
            path: self.root.display().to_string(),
            reason: reason.into(),
        }
    }

    fn read_index(&self) -> Result<Option<Value>> {
        let path = self.root.join("index.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.err(format!("bad index.json: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// The descriptor of the manifest tagged `tag`; without a tag, the only manifest.
    pub fn resolve(&self, tag: Option<&str>) -> Result<(Digest, String)> {
        let index = self
            .read_index()?
            .ok_or_else(|| self.err("no index.json"))?;
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let chosen = match tag {
            Some(tag) => manifests.iter().find(|m| m["annotations"][REF_NAME] == tag),
            None if manifests.len() == 1 => manifests.first(),
            None => return Err(self.err("several images and no tag given")),
        };
        let m =
            chosen.ok_or_else(|| self.err(format!("no image tagged {:?}", tag.unwrap_or(""))))?;
        let digest: Digest = m["digest"].as_str().unwrap_or_default().parse()?;
        Ok((
            digest,
            m["mediaType"]
                .as_str()
                .unwrap_or(media::OCI_MANIFEST)
                .to_owned(),
        ))
    }

    /// Reads a whole blob and checks its digest.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut reader = HashingReader::new(std::io::Read::take(file, limit + 1));
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut out).map_err(|e| Error::io(&path, e))?;
        if out.len() as u64 > limit {
            return Err(self.err(format!("blob {digest} is larger than {limit} bytes")));
        }
        let (actual, _, _) = reader.finish();
        check_digest(digest, actual)?;
        Ok(out)
    }

    /// Copies a blob to `dest`, checking its digest and size on the way.
    pub fn copy_blob(&self, digest: &Digest, size: u64, dest: &Path) -> Result<()> {
        let path = self.blob_path(digest);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut reader = HashingReader::new(file);
        let mut out = std::fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
        let n = std::io::copy(&mut reader, &mut out).map_err(|e| Error::io(&path, e))?;
        let (actual, _, _) = reader.finish();
        if n != size {
            return Err(brisk_blobcache::Error::SizeMismatch {
                what: format!("blob {digest}"),
                expected: size,
                actual: n,
            }
            .into());
        }
        check_digest(digest, actual)
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    fn prepare(&self) -> Result<()> {
        let blobs = self.root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        let marker = self.root.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(())
    }

    /// Moves the file at `src` into the layout as blob `digest`.
    pub fn put_blob_file(&self, digest: &Digest, src: &Path) -> Result<()> {
        self.prepare()?;
        let dest = self.blob_path(digest);
        if dest.exists() {
            return Ok(());
        }
        let tmp = dest.with_extension("tmp");
        std::fs::copy(src, &tmp).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))
    }

    pub fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        self.prepare()?;
        let dest = self.blob_path(digest);
        if dest.exists() {
            return Ok(());
        }
        write_atomic(&dest, bytes)
    }

    /// Points `tag` at a manifest already stored as a blob, replacing any older image of
    /// that tag in `index.json`.
    pub fn tag(&self, tag: &str, digest: &Digest, size: u64, media_type: &str) -> Result<()> {
        self.prepare()?;
        let mut index = self
            .read_index()?
            .unwrap_or_else(|| json!({"schemaVersion": 2, "manifests": []}));
        index["mediaType"] = json!(media::OCI_INDEX);
        let manifests = index["manifests"]
            .as_array_mut()
            .ok_or_else(|| self.err("index.json has no manifests list"))?;
        manifests.retain(|m| m["annotations"][REF_NAME] != tag);
        manifests.push(json!({
            "mediaType": media_type,
            "digest": digest.to_string(),
            "size": size,
            "annotations": {REF_NAME: tag},
        }));
        let bytes = serde_json::to_vec(&index).map_err(|e| self.err(e.to_string()))?;
        write_atomic(&self.root.join("index.json"), &bytes)
    }
}

fn check_digest(expected: &Digest, actual: Digest) -> Result<()> {
    if actual != *expected {
        return Err(brisk_blobcache::Error::DigestMismatch {
            what: format!("blob {expected}"),
            expected: *expected,
            actual,
        }
        .into());
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
