//! One layer into one committed snapshot, the way containerd's own unpacker does it, so a
//! remote snapshotter gets its chance to serve the layer lazily.
//!
//! The snapshotter is asked to `Prepare` the layer with labels naming the layer, the image
//! and the chain id it should end up as. A remote snapshotter that can serve the layer
//! commits it itself and answers `ALREADY_EXISTS`: nothing is downloaded. Any other answer
//! means the layer must be fetched, stored in the content store and applied by containerd's
//! Diff service onto the mounts the snapshotter returned, then committed under its chain id.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::RegistryClient;
use brisk_blobcache::{toc, Digest};
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::ApplyRequest;
use containerd_client::types::{Descriptor, Mount};
use tonic::Code;

use super::client::{failed, is_code, Session};
use super::content::{self, Labels};
use super::resolve::Layer;
use crate::{Error, Result};

pub(crate) const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub(crate) const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub(crate) const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
pub(crate) const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub(crate) const LABEL_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// What containerd records on a layer blob once it knows the blob's uncompressed digest.
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

/// How a layer's snapshot came to exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The snapshotter had the chain already (an earlier pull, or another image).
    Present,
    /// The snapshotter served the layer without a download.
    Lazy,
    /// Fetched (unless the content store had the blob: then `bytes` is 0) and applied.
    Downloaded { bytes: u64 },
}

/// What every layer of one image shares.
pub(crate) struct Unpacker<'a> {
    pub session: &'a Session,
    pub registry: &'a RegistryClient,
    pub reference: &'a Reference,
    /// The name the image is pulled under, exactly as given.
    pub image: &'a str,
    pub snapshotter: &'a str,
    /// The platform manifest's digest.
    pub manifest: Digest,
    /// Where layer blobs wait between the registry and the content store.
    pub tmp: &'a Path,
}

impl Unpacker<'_> {
    /// Makes the snapshot `chain[i]` for `layers[i]`, on top of `chain[i - 1]`.
    pub async fn layer(&self, layers: &[Layer], chain: &[Digest], i: usize) -> Result<Outcome> {
        let name = chain[i].to_string();
        if self.stat(&name).await? {
            return Ok(Outcome::Present);
        }
        let labels = self.labels(layers, chain, i);
        let key = format!("extract-{}-{name}", unique_nanos());
        let parent = match i {
            0 => String::new(),
            _ => chain[i - 1].to_string(),
        };
        let request = self.session.request(PrepareSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: key.clone(),
            parent,
            labels: labels.clone(),
        });
        let prepared = self.session.snapshots().prepare(request).await;
        if is_code(&prepared, Code::AlreadyExists) {
            // A remote snapshotter says it committed the target itself; trust but verify.
            if !self.stat(&name).await? {
                return Err(failed("snapshot stat")(tonic::Status::not_found(format!(
                    "{name}: Prepare answered ALREADY_EXISTS, but there is no such snapshot"
                ))));
            }
            return Ok(Outcome::Lazy);
        }
        let mounts = prepared
            .map_err(failed("snapshot prepare"))?
            .into_inner()
            .mounts;
        let applied = self.download_and_apply(&layers[i], mounts, &name, &key, labels);
        match applied.await {
            Ok(bytes) => Ok(Outcome::Downloaded { bytes }),
            Err(err) => {
                let remove = self.session.request(RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    key,
                });
                if let Err(status) = self.session.snapshots().remove(remove).await {
                    tracing::warn!(%status, "could not remove the failed layer's snapshot");
                }
                Err(err)
            }
        }
    }

    async fn stat(&self, key: &str) -> Result<bool> {
        let request = self.session.request(StatSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: key.to_owned(),
        });
        let result = self.session.snapshots().stat(request).await;
        if is_code(&result, Code::NotFound) {
            return Ok(false);
        }
        result.map_err(failed("snapshot stat"))?;
        Ok(true)
    }

    fn labels(&self, layers: &[Layer], chain: &[Digest], i: usize) -> HashMap<String, String> {
        prepare_labels(self.image, &self.manifest, layers, chain, i)
    }

    /// The fallback: the layer's blob into the content store, applied onto `mounts`, and
    /// `key` committed as `name`. Returns the bytes fetched from the registry.
    async fn download_and_apply(
        &self,
        layer: &Layer,
        mounts: Vec<Mount>,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<u64> {
        let fetched = self.store_blob(layer).await?;
        let request = self.session.request(ApplyRequest {
            diff: Some(Descriptor {
                media_type: layer.media_type.clone(),
                digest: layer.digest.to_string(),
                size: layer.size as i64,
                annotations: HashMap::new(),
            }),
            mounts,
            ..Default::default()
        });
        let applied = self
            .session
            .diff()
            .apply(request)
            .await
            .map_err(failed("diff apply"))?
            .into_inner()
            .applied
            .unwrap_or_default();
        let actual: Digest = applied.digest.parse()?;
        if actual != layer.diff_id {
            return Err(Error::DiffIdMismatch {
                expected: layer.diff_id,
                actual,
            });
        }
        let request = self.session.request(CommitSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels,
        });
        let committed = self.session.snapshots().commit(request).await;
        if is_code(&committed, Code::AlreadyExists) {
            // Another pull committed the same chain meanwhile. Its snapshot is as good as
            // ours, so this is success, and our copy, still active under `key`, is dropped.
            let remove = self.session.request(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.to_owned(),
                key: key.to_owned(),
            });
            let _ = self.session.snapshots().remove(remove).await;
            return Ok(fetched);
        }
        committed.map_err(failed("snapshot commit"))?;
        Ok(fetched)
    }

    /// Makes sure the content store has the layer's blob; returns the bytes fetched.
    async fn store_blob(&self, layer: &Layer) -> Result<u64> {
        let labels = Labels::from([(LABEL_UNCOMPRESSED.to_owned(), layer.diff_id.to_string())]);
        if content::exists(self.session, &layer.digest).await? {
            content::add_labels(self.session, &layer.digest, labels).await?;
            return Ok(0);
        }
        let path = self.tmp.join(layer.digest.hex());
        self.registry
            .get_blob_to_file(self.reference, &layer.digest, layer.size, &path)
            .await?;
        let stored =
            content::put_file(self.session, &layer.digest, layer.size, &path, labels).await;
        let _ = tokio::fs::remove_file(&path).await;
        stored?;
        Ok(layer.size)
    }
}

/// The labels containerd's CRI plugin would give `layers[i]`'s `Prepare`; they are how a
/// remote snapshotter learns which blob to serve and from where. Like containerd's unpacker,
/// the layer's own annotations under `containerd.io/snapshot/` come along.
fn prepare_labels(
    image: &str,
    manifest: &Digest,
    layers: &[Layer],
    chain: &[Digest],
    i: usize,
) -> HashMap<String, String> {
    let mut labels = layers[i].inherited_labels.clone();
    labels.extend([
        (LABEL_TARGET.to_owned(), chain[i].to_string()),
        (LABEL_IMAGE_REF.to_owned(), image.to_owned()),
        (LABEL_LAYER.to_owned(), layers[i].digest.to_string()),
        (LABEL_MANIFEST.to_owned(), manifest.to_string()),
        (LABEL_LAYERS.to_owned(), layer_list(&layers[i..])),
    ]);
    labels
}

/// Comma-joined layer digests, as many as fit in one label: a remote snapshotter may use
/// them to start fetching the layers above, and a truncated list only costs it that.
fn layer_list(layers: &[Layer]) -> String {
    let budget = toc::MAX_LABEL_BYTES - LABEL_LAYERS.len();
    let mut out = String::new();
    for layer in layers {
        let digest = layer.digest.to_string();
        let extra = digest.len() + usize::from(!out.is_empty());
        if out.len() + extra > budget {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&digest);
    }
    out
}

/// Makes snapshot keys unique across concurrent pulls of the same image.
fn unique_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> Layer {
        Layer {
            digest: Digest::sha256(&[n]),
            media_type: brisk_blobcache::media::OCI_LAYER_GZIP.to_owned(),
            size: 1,
            diff_id: Digest::sha256(&[n, n]),
            inherited_labels: HashMap::new(),
        }
    }

    #[test]
    fn a_layers_snapshot_annotations_come_along_as_labels_and_cannot_override_the_cri_ones() {
        let mut layers: Vec<Layer> = (0..2).map(layer).collect();
        layers[1].inherited_labels = HashMap::from([
            (toc::LABEL_TOC_DIGEST.to_owned(), "sha256:abc".to_owned()),
            (LABEL_LAYER.to_owned(), "sha256:forged".to_owned()),
        ]);
        let manifest = Digest::sha256(b"manifest");
        let chain: Vec<Digest> = (0..2u8).map(|n| Digest::sha256(&[9, n])).collect();
        let labels = prepare_labels("example/app:1", &manifest, &layers, &chain, 1);
        assert_eq!(labels[toc::LABEL_TOC_DIGEST], "sha256:abc");
        assert_eq!(labels[LABEL_LAYER], layers[1].digest.to_string());
        assert_eq!(labels[LABEL_TARGET], chain[1].to_string());
        assert!(
            !prepare_labels("example/app:1", &manifest, &layers, &chain, 0)
                .contains_key(toc::LABEL_TOC_DIGEST)
        );
    }

    #[test]
    fn layer_list_joins_digests_and_stays_under_the_label_limit() {
        let two: Vec<Layer> = (0..2).map(layer).collect();
        assert_eq!(
            layer_list(&two),
            format!("{},{}", two[0].digest, two[1].digest)
        );
        let many: Vec<Layer> = (0..100).map(layer).collect();
        let list = layer_list(&many);
        assert!(list.len() + LABEL_LAYERS.len() <= toc::MAX_LABEL_BYTES);
        // 71 bytes per digest: 56 whole ones fit, and the list never ends mid-digest.
        assert_eq!(list.split(',').count(), 56);
        assert!(list.split(',').all(|d| d.parse::<Digest>().is_ok()));
    }
}
