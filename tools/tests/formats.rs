//! Input formats beyond a single OCI manifest: Docker schema 2 manifests and multi-platform
//! indexes, with and without `--platform`.

mod common;

use std::path::Path;

use brisk_blobcache::{media, Digest};
use brisk_tools::convert::{convert, ConvertConfig};
use brisk_tools::inspect;
use common::*;
use serde_json::json;

fn put(dir: &Path, bytes: &[u8]) -> (Digest, usize) {
    let d = Digest::sha256(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    (d, bytes.len())
}

/// A Docker schema 2 image (gzip layer, Docker config media type); returns its manifest.
fn docker_image(dir: &Path, content: &[u8], arch: &str) -> (Digest, usize) {
    let tar = tar_of(&[("hello.txt", content)]);
    let gz = gzip(&tar);
    let (layer, layer_size) = put(dir, &gz);
    let config = json!({"architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [Digest::sha256(&tar).to_string()]}});
    let (config, config_size) = put(dir, &serde_json::to_vec(&config).unwrap());
    let manifest = json!({"schemaVersion": 2, "mediaType": media::DOCKER_MANIFEST,
        "config": {"mediaType": media::DOCKER_CONFIG, "digest": config.to_string(), "size": config_size},
        "layers": [{"mediaType": media::DOCKER_LAYER_GZIP, "digest": layer.to_string(), "size": layer_size}]});
    put(dir, &serde_json::to_vec(&manifest).unwrap())
}

fn write_index(dir: &Path, tag: &str, media_type: &str, entries: &[(Digest, usize, &str)]) {
    let manifests: Vec<_> = entries
        .iter()
        .map(|(d, size, arch)| {
            json!({"mediaType": media::DOCKER_MANIFEST, "digest": d.to_string(), "size": size,
                                       "platform": {"os": "linux", "architecture": arch}})
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests});
    let (d, size) = put(dir, &serde_json::to_vec(&index).unwrap());
    let top = json!({"schemaVersion": 2, "manifests": [{"mediaType": media_type, "digest": d.to_string(), "size": size,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[tokio::test]
async fn docker_schema2_image_converts_to_an_oci_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let (manifest, size) = docker_image(&src, b"docker", "amd64");
    let top = json!({"schemaVersion": 2, "manifests": [{"mediaType": media::DOCKER_MANIFEST, "digest": manifest.to_string(),
        "size": size, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(src.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let dst = format!("oci:{}:lazy", dir.path().join("dst").display());
    let summary = convert(
        &store(&format!("oci:{}:v1", src.display())),
        &store(&dst),
        &ConvertConfig::default(),
    )
    .await
    .unwrap();
    let out: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("dst/blobs/sha256")
                .join(summary.digest.hex()),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(out["mediaType"], media::OCI_MANIFEST);
    assert_eq!(out["config"]["mediaType"], media::OCI_CONFIG);
    assert_eq!(out["layers"][0]["mediaType"], media::OCI_LAYER_ZSTD);
    assert!(out["layers"][0]["annotations"]["dev.brisk.toc.digest"].is_string());
    inspect::check(&store(&dst)).await.unwrap();
}

#[tokio::test]
async fn an_index_converts_every_platform_or_only_the_one_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let (amd, amd_size) = docker_image(&src, b"amd64 content", "amd64");
    let (arm, arm_size) = docker_image(&src, b"arm64 content", "arm64");
    write_index(
        &src,
        "multi",
        media::DOCKER_LIST,
        &[(amd, amd_size, "amd64"), (arm, arm_size, "arm64")],
    );
    let src = format!("oci:{}:multi", src.display());

    let all = format!("oci:{}:all", dir.path().join("dst").display());
    let summary = convert(&store(&src), &store(&all), &ConvertConfig::default())
        .await
        .unwrap();
    let platforms: Vec<_> = summary
        .images
        .iter()
        .map(|i| i.platform.clone().unwrap())
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let reports = inspect::inspect(&store(&all)).await.unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.layers[0].toc.is_some()));

    let one = format!("oci:{}:arm", dir.path().join("dst").display());
    let config = ConvertConfig {
        platform: Some("linux/arm64".into()),
        ..ConvertConfig::default()
    };
    let summary = convert(&store(&src), &store(&one), &config).await.unwrap();
    assert_eq!(summary.images.len(), 1);
    assert_eq!(summary.images[0].source_manifest, arm);

    let none = format!("oci:{}:none", dir.path().join("dst").display());
    let config = ConvertConfig {
        platform: Some("linux/s390x".into()),
        ..ConvertConfig::default()
    };
    let err = convert(&store(&src), &store(&none), &config)
        .await
        .unwrap_err();
    assert!(chain(&err).contains("linux/s390x"), "{}", chain(&err));
}
