//! Fixtures shared by the tools integration tests: tars, compressed layers and hand-built
//! OCI layouts, so each test states exactly what is wrong with its input.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::{media, Digest};
use brisk_tools::store::Store;
use serde_json::json;

pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A tar whose single entry has exactly `name` (the builder would refuse `..`).
pub fn tar_with_raw_name(name: &str) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.push(b'x');
    out.resize(out.len() + 511 + 1024, 0);
    out.truncate(512 + 512 + 1024);
    out
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).unwrap()
}

pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: String,
    /// What the config claims as the layer's diff_id.
    pub diff_id: Digest,
}

impl Layer {
    pub fn new(blob: Vec<u8>, media_type: &str, tar: &[u8]) -> Self {
        Self {
            blob,
            media_type: media_type.to_owned(),
            diff_id: Digest::sha256(tar),
        }
    }
}

fn put(dir: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::sha256(bytes);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(d.hex()), bytes).unwrap();
    d
}

/// Writes an OCI layout at `dir` holding one image tagged `tag`; returns the manifest digest.
pub fn write_layout(dir: &Path, tag: &str, layers: &[Layer]) -> Digest {
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put(dir, &config);
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": put(dir, &l.blob).to_string(), "size": l.blob.len()}))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap();
    let digest = put(dir, &manifest);
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": media::OCI_MANIFEST, "digest": digest.to_string(), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

pub fn client(timeout: Duration, retries: u32) -> Arc<RegistryClient> {
    Arc::new(
        RegistryClient::new(RegistryConfig {
            plain_http: true,
            timeout,
            retries,
            backoff: Duration::from_millis(10),
            ..RegistryConfig::default()
        })
        .unwrap(),
    )
}

pub fn store(location: &str) -> Store {
    Store::open(location.parse().unwrap(), client(Duration::from_secs(5), 1))
}

/// The whole error chain as one string, the way the CLI prints it.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out += &format!(": {e}");
        cur = e.source();
    }
    out
}
