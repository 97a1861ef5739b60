//! Traces in a registry: an OCI artifact (artifact type `application/vnd.brisk.trace.v1+json`)
//! whose subject is the image manifest, found through the OCI 1.1 referrers API or, on
//! registries without it, the referrers tag schema (`sha256-<hex>` tagging an index).

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::RegistryClient;
use brisk_blobcache::{media, Digest};
use serde_json::{json, Value};

use crate::trace::{Trace, MEDIA_TYPE};
use crate::{Error, Result};

/// The OCI empty descriptor's content, used as the artifact's config.
const EMPTY_JSON: &[u8] = b"{}";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

fn registry_err(e: brisk_blobcache::Error) -> Error {
    Error::Registry(Box::new(e))
}

/// The repository of `image` with no tag or digest.
fn repo(image: &Reference) -> Reference {
    Reference {
        tag: None,
        digest: None,
        ..image.clone()
    }
}

fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// Pushes `trace` next to its image in `image`'s repository; returns the artifact's digest.
pub async fn push(client: &RegistryClient, image: &Reference, trace: &Trace) -> Result<Digest> {
    let repo = repo(image);
    let subject = Reference {
        digest: Some(trace.image),
        ..repo.clone()
    };
    let subject_manifest = client.get_manifest(&subject).await.map_err(registry_err)?;
    let body = trace.encode();
    let blob = Digest::sha256(&body);
    client
        .push_blob_bytes(&repo, &blob, &body)
        .await
        .map_err(registry_err)?;
    let empty = Digest::sha256(EMPTY_JSON);
    client
        .push_blob_bytes(&repo, &empty, EMPTY_JSON)
        .await
        .map_err(registry_err)?;
    let subject_type = if subject_manifest.media_type.is_empty() {
        media::OCI_MANIFEST.to_owned()
    } else {
        subject_manifest.media_type.clone()
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": MEDIA_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": empty.to_string(), "size": EMPTY_JSON.len()},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": blob.to_string(), "size": body.len()}],
        "subject": {"mediaType": subject_type, "digest": trace.image.to_string(), "size": subject_manifest.bytes.len()},
    });
    let bytes = serde_json::to_vec(&manifest).expect("JSON values serialize");
    let digest = Digest::sha256(&bytes);
    client
        .push_manifest(
            &repo,
            &digest.to_string(),
            media::OCI_MANIFEST,
            bytes.clone().into(),
        )
        .await
        .map_err(registry_err)?;

    // The tag-schema index, for registries without the referrers API. Older traces of this
    // image are replaced: the newest one is the merge of everything known.
    let tag = Reference {
        tag: Some(fallback_tag(&trace.image)),
        ..repo.clone()
    };
    let mut index = match client.get_manifest(&tag).await {
        Ok(m) => serde_json::from_slice::<Value>(&m.bytes).unwrap_or_else(|_| json!({})),
        Err(brisk_blobcache::Error::Registry(
            brisk_blobcache::registry::RegistryError::ManifestNotFound(_),
        )) => json!({}),
        Err(e) => return Err(registry_err(e)),
    };
    let mut manifests: Vec<Value> = index["manifests"].as_array().cloned().unwrap_or_default();
    manifests.retain(|m| m["artifactType"] != MEDIA_TYPE);
    manifests.push(json!({"mediaType": media::OCI_MANIFEST, "digest": digest.to_string(), "size": bytes.len(), "artifactType": MEDIA_TYPE}));
    index = json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests});
    let index_bytes = serde_json::to_vec(&index).expect("JSON values serialize");
    client
        .push_manifest(
            &repo,
            &fallback_tag(&trace.image),
            media::OCI_INDEX,
            index_bytes.into(),
        )
        .await
        .map_err(registry_err)?;
    Ok(digest)
}

/// Fetches the newest trace for image manifest `subject` from `image`'s repository.
/// `Ok(None)`: the registry has none.
pub async fn fetch(
    client: &RegistryClient,
    image: &Reference,
    subject: &Digest,
) -> Result<Option<Trace>> {
    let repo = repo(image);
    let index = match client
        .get_referrers(&repo, subject)
        .await
        .map_err(registry_err)?
    {
        Some(bytes) => Some(bytes),
        None => {
            let tag = Reference {
                tag: Some(fallback_tag(subject)),
                ..repo.clone()
            };
            match client.get_manifest(&tag).await {
                Ok(m) => Some(m.bytes),
                Err(brisk_blobcache::Error::Registry(
                    brisk_blobcache::registry::RegistryError::ManifestNotFound(_),
                )) => None,
                Err(e) => return Err(registry_err(e)),
            }
        }
    };
    let Some(index) = index else { return Ok(None) };
    let index: Value = serde_json::from_slice(&index).map_err(Error::Format)?;
    let Some(desc) = index["manifests"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|d| d["artifactType"] == MEDIA_TYPE))
    else {
        return Ok(None);
    };
    let digest: Digest = desc["digest"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(registry_err)?;
    let manifest = client
        .get_manifest(&Reference {
            digest: Some(digest),
            ..repo.clone()
        })
        .await
        .map_err(registry_err)?;
    let manifest: Value = serde_json::from_slice(&manifest.bytes).map_err(Error::Format)?;
    let blob: Digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(registry_err)?;
    let bytes = client
        .get_blob_bytes(&repo, &blob)
        .await
        .map_err(registry_err)?;
    Trace::decode(&bytes, Some(subject)).map(Some)
}
