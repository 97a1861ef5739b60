//! Where images come from and go to: a registry repository or an OCI layout directory,
//! behind one set of operations so conversion and inspection need not care which.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::{FetchedManifest, RegistryClient};
use brisk_blobcache::Digest;
use bytes::Bytes;

use crate::layout::OciLayout;
use crate::{Error, Result};

/// Configs and manifests are small; a larger one is refused rather than buffered.
const MAX_SMALL_BLOB: u64 = 8 * 1024 * 1024;

/// An image location as typed on the command line.
#[derive(Clone, Debug)]
pub enum Location {
    Registry(Reference),
    /// `oci:DIR[:tag]`.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !tag.is_empty() => {
                    (dir, Some(tag.to_owned()))
                }
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(Error::Location {
                    location: s.to_owned(),
                    reason: "no directory after oci:",
                });
            }
            return Ok(Self::Layout {
                dir: dir.into(),
                tag,
            });
        }
        Ok(Self::Registry(s.parse()?))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Registry(r) => write!(f, "{r}"),
            Self::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Self::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

/// A location opened for reading and writing.
#[derive(Clone)]
pub struct Store {
    location: Location,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Registry(Arc<RegistryClient>, Reference),
    Layout(OciLayout),
}

impl Store {
    pub fn open(location: Location, client: Arc<RegistryClient>) -> Self {
        let backend = match &location {
            Location::Registry(r) => Backend::Registry(client, r.clone()),
            Location::Layout { dir, .. } => Backend::Layout(OciLayout::new(dir)),
        };
        Self { location, backend }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The tag to write the top-level manifest under; `None` means "by digest only".
    pub fn tag(&self) -> Option<String> {
        match &self.location {
            Location::Registry(r) => r
                .tag
                .clone()
                .or_else(|| r.digest.is_none().then(|| "latest".to_owned())),
            Location::Layout { tag, .. } => {
                Some(tag.clone().unwrap_or_else(|| "latest".to_owned()))
            }
        }
    }

    /// The manifest (or index) the location names.
    pub async fn root_manifest(&self) -> Result<FetchedManifest> {
        match &self.backend {
            Backend::Registry(client, r) => Ok(client.get_manifest(r).await?),
            Backend::Layout(layout) => {
                let Location::Layout { tag, .. } = &self.location else {
                    unreachable!("layout backend")
                };
                let (digest, media_type) = layout.resolve(tag.as_deref())?;
                let bytes = layout.read_blob(&digest, MAX_SMALL_BLOB)?;
                Ok(FetchedManifest {
                    bytes: bytes.into(),
                    media_type,
                    digest,
                })
            }
        }
    }

    /// A manifest referenced by digest from an index. Its media type comes from the index.
    pub async fn manifest(&self, digest: &Digest, media_type: &str) -> Result<FetchedManifest> {
        match &self.backend {
            Backend::Registry(client, r) => {
                let by_digest = Reference {
                    digest: Some(*digest),
                    tag: None,
                    ..r.clone()
                };
                let mut m = client.get_manifest(&by_digest).await?;
                if m.media_type.is_empty() {
                    m.media_type = media_type.to_owned();
                }
                Ok(m)
            }
            Backend::Layout(layout) => Ok(FetchedManifest {
                bytes: layout.read_blob(digest, MAX_SMALL_BLOB)?.into(),
                media_type: media_type.to_owned(),
                digest: *digest,
            }),
        }
    }

    /// A small blob (a config), verified.
    pub async fn small_blob(&self, digest: &Digest) -> Result<Bytes> {
        match &self.backend {
            Backend::Registry(client, r) => Ok(client.get_blob_bytes(r, digest).await?),
            Backend::Layout(layout) => Ok(layout.read_blob(digest, MAX_SMALL_BLOB)?.into()),
        }
    }

    /// Copies a blob into the file `dest`, verified against digest and size.
    pub async fn blob_to_file(&self, digest: &Digest, size: u64, dest: &Path) -> Result<()> {
        match &self.backend {
            Backend::Registry(client, r) => {
                Ok(client.get_blob_to_file(r, digest, size, dest).await?)
            }
            Backend::Layout(layout) => {
                let (layout, digest, dest) = (layout.clone(), *digest, dest.to_owned());
                tokio::task::spawn_blocking(move || layout.copy_blob(&digest, size, &dest))
                    .await
                    .map_err(Error::Task)?
            }
        }
    }

    /// A byte range of a blob, unverified (the caller checks what it decodes).
    pub async fn blob_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes> {
        match &self.backend {
            Backend::Registry(client, r) => Ok(client.get_blob_range(r, digest, range).await?),
            Backend::Layout(layout) => {
                use std::io::{Read, Seek, SeekFrom};
                let path = layout.blob_path(digest);
                let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                f.seek(SeekFrom::Start(range.start))
                    .map_err(|e| Error::io(&path, e))?;
                let mut out = Vec::with_capacity((range.end - range.start) as usize);
                f.take(range.end - range.start)
                    .read_to_end(&mut out)
                    .map_err(|e| Error::io(&path, e))?;
                if out.len() as u64 != range.end - range.start {
                    return Err(Error::Layout {
                        path: path.display().to_string(),
                        reason: "blob is shorter than its descriptor".into(),
                    });
                }
                Ok(out.into())
            }
        }
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        match &self.backend {
            Backend::Registry(client, r) => Ok(client.blob_exists(r, digest).await?),
            Backend::Layout(layout) => Ok(layout.has_blob(digest)),
        }
    }

    /// Stores the file at `path` as blob `digest`, unless the store has it already.
    pub async fn put_blob_file(&self, digest: &Digest, path: &Path) -> Result<bool> {
        if self.has_blob(digest).await? {
            return Ok(false);
        }
        match &self.backend {
            Backend::Registry(client, r) => client.push_blob_file(r, digest, path).await?,
            Backend::Layout(layout) => layout.put_blob_file(digest, path)?,
        }
        Ok(true)
    }

    pub async fn put_blob_bytes(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        match &self.backend {
            Backend::Registry(client, r) => {
                let tmp =
                    tempfile::NamedTempFile::new().map_err(|e| Error::io("temporary file", e))?;
                std::fs::write(tmp.path(), &bytes).map_err(|e| Error::io(tmp.path(), e))?;
                client.push_blob_file(r, digest, tmp.path()).await?;
            }
            Backend::Layout(layout) => layout.put_blob_bytes(digest, &bytes)?,
        }
        Ok(())
    }

    /// Stores a manifest; with `tag`, also points the tag at it. Blobs it references must
    /// already be stored: that order is what keeps a failed run from leaving a dangling tag.
    pub async fn put_manifest(
        &self,
        bytes: Bytes,
        media_type: &str,
        tag: Option<&str>,
    ) -> Result<Digest> {
        let digest = Digest::sha256(&bytes);
        match &self.backend {
            Backend::Registry(client, r) => {
                client
                    .push_manifest(r, &digest.to_string(), media_type, bytes.clone())
                    .await?;
                if let Some(tag) = tag {
                    client.push_manifest(r, tag, media_type, bytes).await?;
                }
            }
            Backend::Layout(layout) => {
                layout.put_blob_bytes(&digest, &bytes)?;
                if let Some(tag) = tag {
                    layout.tag(tag, &digest, bytes.len() as u64, media_type)?;
                }
            }
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_and_registry_locations() {
        match "oci:images/app:v1".parse::<Location>().unwrap() {
            Location::Layout { dir, tag } => {
                assert_eq!(
                    (dir, tag.as_deref()),
                    (PathBuf::from("images/app"), Some("v1"))
                )
            }
            other => panic!("{other:?}"),
        }
        match "oci:out".parse::<Location>().unwrap() {
            Location::Layout { dir, tag } => assert_eq!((dir, tag), (PathBuf::from("out"), None)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            "127.0.0.1:5000/a:b".parse::<Location>().unwrap(),
            Location::Registry(_)
        ));
        assert!("oci:".parse::<Location>().is_err());
        assert!("noregistry".parse::<Location>().is_err());
    }
}
