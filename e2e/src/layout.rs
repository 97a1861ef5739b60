//! Hand-made OCI layouts and tars, for inputs no well-behaved tool will produce.
//!
//! The tar writer here copies no safety checks from real archivers: it writes whatever
//! names it is given (`../evil` included), which is the point. It only knows regular files.

use std::fs;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::json;

use crate::cmd::sha256_file;
use crate::image::OciImage;

const BLOCK: usize = 512;

/// An uncompressed ustar archive of regular files, names written verbatim.
pub fn raw_tar(files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&ustar_header(name, data.len())?);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(BLOCK), 0);
    }
    // The end-of-archive marker: two zero blocks.
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

fn ustar_header(name: &str, size: usize) -> Result<[u8; BLOCK]> {
    if name.len() > 100 {
        bail!("Tar name too long for a plain ustar header: {name}");
    }
    let mut h = [0u8; BLOCK];
    let mut put =
        |offset: usize, field: &[u8]| h[offset..offset + field.len()].copy_from_slice(field);
    put(0, name.as_bytes());
    put(100, b"0000644\0"); // mode
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0"); // mtime
    put(148, b"        "); // the checksum counts its own field as spaces
    put(156, b"0"); // regular file
    put(257, b"ustar\0");
    put(263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Writes an OCI layout at `dir` holding one image, tagged `tag`, whose only layer is the
/// uncompressed tar `layer`.
pub fn single_layer_layout(dir: &Path, tag: &str, layer: &[u8]) -> Result<OciImage> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let layer_digest = put_blob(dir, layer)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let config_digest = put_blob(dir, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = put_blob(dir, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(OciImage {
        dir: dir.to_path_buf(),
        tag: tag.to_string(),
    })
}

/// Stores `data` as a blob of the layout at `dir` and returns its digest.
fn put_blob(dir: &Path, data: &[u8]) -> Result<String> {
    let staging = dir.join("blobs/staging");
    fs::write(&staging, data)?;
    let hex = sha256_file(&staging)?;
    fs::rename(&staging, dir.join("blobs/sha256").join(&hex))?;
    Ok(format!("sha256:{hex}"))
}

/// The manifests of the layout at `dir` tagged `tag`; none when it has no `index.json`.
pub fn tagged_manifests(dir: &Path, tag: &str) -> Result<Vec<serde_json::Value>> {
    let Ok(bytes) = fs::read(dir.join("index.json")) else {
        return Ok(Vec::new());
    };
    let index: serde_json::Value = serde_json::from_slice(&bytes)?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .cloned()
        .collect())
}
