//! From a reference to what an unpack needs: the top descriptor (index or manifest), the
//! manifest for this platform, its config and its layers with their diff ids.
//!
//! Manifests and configs are kept as the exact bytes the registry served, because their
//! digests are their names in containerd's content store. Layer blobs are not fetched here:
//! a lazy snapshotter may never need them.

use std::collections::HashMap;

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::{FetchedManifest, RegistryClient};
use brisk_blobcache::{media, toc, Digest};
use bytes::Bytes;
use serde::Deserialize;

use crate::{Error, Result};

/// A small blob (index, manifest or config) held in memory.
pub(crate) struct Blob {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

impl Blob {
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

pub(crate) struct Layer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// The digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: Digest,
    /// The descriptor's annotations that containerd would pass to `Prepare` as labels (those
    /// under `containerd.io/snapshot/`).
    pub inherited_labels: HashMap<String, String>,
}

pub(crate) struct Resolved {
    /// The index the reference named, if it named one.
    pub index: Option<Blob>,
    /// Position of `manifest` in the index.
    pub index_position: usize,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Layer>,
}

impl Resolved {
    /// What the image record points at: the index if there is one, else the manifest.
    pub fn top(&self) -> &Blob {
        self.index.as_ref().unwrap_or(&self.manifest)
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Deserialize)]
struct IndexJson {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ManifestJson {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigJson {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<Digest>,
}

pub(crate) use brisk_blobcache::lazy::host_platform;

pub(crate) async fn resolve(
    client: &RegistryClient,
    reference: &Reference,
    platform: &str,
) -> Result<Resolved> {
    let top = client.get_manifest(reference).await?;
    let top_type = media_type_of(&top);
    let (index, index_position, manifest) = if media::is_index(&top_type) {
        let parsed: IndexJson = serde_json::from_slice(&top.bytes)
            .map_err(|e| Error::invalid(format!("image index {}", top.digest), e))?;
        let (position, desc) = parsed
            .manifests
            .iter()
            .enumerate()
            .find(|(_, d)| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| format!("{}/{}", p.os, p.architecture) == platform)
            })
            .ok_or_else(|| Error::NoPlatform(platform.to_owned()))?;
        let by_digest = Reference {
            digest: Some(desc.digest),
            tag: None,
            ..reference.clone()
        };
        let mut child = client.get_manifest(&by_digest).await?;
        if child.media_type.is_empty() {
            child.media_type.clone_from(&desc.media_type);
        }
        let index = Blob {
            digest: top.digest,
            media_type: top_type,
            bytes: top.bytes,
        };
        (Some(index), position, child)
    } else {
        (None, 0, top)
    };
    let manifest = Blob {
        media_type: media_type_of(&manifest),
        digest: manifest.digest,
        bytes: manifest.bytes,
    };
    let parsed: ManifestJson = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| Error::invalid(format!("manifest {}", manifest.digest), e))?;
    let config_bytes = client
        .get_blob_bytes(reference, &parsed.config.digest)
        .await?;
    let config_json: ConfigJson = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::invalid(format!("image config {}", parsed.config.digest), e))?;
    let diff_ids = config_json.rootfs.diff_ids;
    if diff_ids.len() != parsed.layers.len() {
        return Err(Error::invalid(
            format!("image config {}", parsed.config.digest),
            format!(
                "{} diff ids for {} layers",
                diff_ids.len(),
                parsed.layers.len()
            ),
        ));
    }
    let layers = parsed
        .layers
        .into_iter()
        .zip(diff_ids)
        .map(|(d, diff_id)| Layer {
            digest: d.digest,
            media_type: d.media_type,
            size: d.size,
            diff_id,
            inherited_labels: d
                .annotations
                .into_iter()
                .filter(|(k, _)| k.starts_with(toc::SNAPSHOT_LABEL_PREFIX))
                .collect(),
        })
        .collect();
    let config_type = if parsed.config.media_type.is_empty() {
        media::OCI_CONFIG.to_owned()
    } else {
        parsed.config.media_type
    };
    Ok(Resolved {
        index,
        index_position,
        manifest,
        config: Blob {
            digest: parsed.config.digest,
            media_type: config_type,
            bytes: config_bytes,
        },
        layers,
    })
}

/// The media type of a fetched manifest: the registry's `Content-Type` when it is a manifest
/// type, else the document's own `mediaType`, else its shape. containerd walks an image by
/// these types, so a generic `application/json` would make the image unusable.
fn media_type_of(m: &FetchedManifest) -> String {
    if media::is_index(&m.media_type) || media::is_manifest(&m.media_type) {
        return m.media_type.clone();
    }
    let value: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
    match value.get("mediaType").and_then(|v| v.as_str()) {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ if value.get("manifests").is_some() => media::OCI_INDEX.to_owned(),
        _ => media::OCI_MANIFEST.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(media_type: &str, json: &str) -> FetchedManifest {
        FetchedManifest {
            bytes: Bytes::copy_from_slice(json.as_bytes()),
            media_type: media_type.to_owned(),
            digest: Digest::sha256(json.as_bytes()),
        }
    }

    #[test]
    fn media_type_comes_from_header_then_document_then_shape() {
        assert_eq!(
            media_type_of(&fetched(media::DOCKER_LIST, "{}")),
            media::DOCKER_LIST
        );
        let docker = format!(r#"{{"mediaType":"{}"}}"#, media::DOCKER_MANIFEST);
        assert_eq!(
            media_type_of(&fetched("application/json", &docker)),
            media::DOCKER_MANIFEST
        );
        assert_eq!(
            media_type_of(&fetched("", r#"{"manifests":[]}"#)),
            media::OCI_INDEX
        );
        assert_eq!(
            media_type_of(&fetched("", r#"{"layers":[]}"#)),
            media::OCI_MANIFEST
        );
    }
}
