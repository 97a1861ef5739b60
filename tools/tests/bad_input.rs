//! Conversion of malformed images: each case fails with an error that names the layer and the
//! problem, and leaves nothing at the destination.

mod common;

use brisk_blobcache::media;
use brisk_tools::convert::{convert, ConvertConfig};
use brisk_tools::inspect;
use common::*;

struct Case {
    _dir: tempfile::TempDir,
    src: String,
    dst: String,
    out_dir: std::path::PathBuf,
}

fn case(layers: &[Layer]) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("src");
    write_layout(&src_dir, "v1", layers);
    let out_dir = dir.path().join("out");
    Case {
        src: format!("oci:{}:v1", src_dir.display()),
        dst: format!("oci:{}:lazy", out_dir.display()),
        out_dir,
        _dir: dir,
    }
}

async fn convert_err(c: &Case) -> String {
    let err = convert(&store(&c.src), &store(&c.dst), &ConvertConfig::default())
        .await
        .unwrap_err();
    assert!(
        !c.out_dir.join("index.json").exists(),
        "a failed conversion wrote index.json"
    );
    chain(&err)
}

#[tokio::test]
async fn gzip_zstd_and_plain_layers_convert_and_verify() {
    let a = tar_of(&[("a.txt", b"alpha")]);
    let b = tar_of(&[("b/b.bin", &[7u8; 300_000])]);
    let c = tar_of(&[("c", b"")]);
    let c = case(&[
        Layer::new(gzip(&a), media::OCI_LAYER_GZIP, &a),
        Layer::new(zstd(&b), media::OCI_LAYER_ZSTD, &b),
        Layer::new(c.clone(), media::OCI_LAYER_TAR, &c),
    ]);
    let summary = convert(&store(&c.src), &store(&c.dst), &ConvertConfig::default())
        .await
        .unwrap();
    assert_eq!(summary.images[0].layers.len(), 3);
    let report = inspect::check(&store(&c.dst)).await.unwrap();
    assert_eq!((report.layers, report.lazy_layers), (3, 3));
}

#[tokio::test]
async fn corrupt_gzip_is_rejected() {
    let tar = tar_of(&[("f", &[1u8; 100_000]), ("g", b"tail")]);
    let mut gz = gzip(&tar);
    let mid = gz.len() / 2;
    gz[mid] ^= 0xff;
    gz[mid + 1] ^= 0xff;
    let err = convert_err(&case(&[Layer::new(gz, media::OCI_LAYER_GZIP, &tar)])).await;
    assert!(err.contains("Layer 0"), "{err}");
}

#[tokio::test]
async fn truncated_zstd_is_rejected() {
    let tar = tar_of(&[(
        "f",
        &(0..200_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>(),
    )]);
    let z = zstd(&tar);
    let cut = z[..z.len() * 2 / 3].to_vec();
    let err = convert_err(&case(&[Layer::new(cut, media::OCI_LAYER_ZSTD, &tar)])).await;
    assert!(
        err.contains("Layer 0") && err.contains("tar stream"),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_media_type_is_rejected() {
    let tar = tar_of(&[("f", b"x")]);
    let err = convert_err(&case(&[Layer::new(
        tar.clone(),
        "application/vnd.example.strange",
        &tar,
    )]))
    .await;
    assert!(
        err.contains("Unsupported media type") && err.contains("vnd.example.strange"),
        "{err}"
    );
}

#[tokio::test]
async fn entry_escaping_the_root_is_rejected() {
    let tar = tar_with_raw_name("../../etc/evil");
    let err = convert_err(&case(&[Layer::new(
        tar.clone(),
        media::OCI_LAYER_TAR,
        &tar,
    )]))
    .await;
    assert!(
        err.contains("escapes the layer root") && err.contains("../../etc/evil"),
        "{err}"
    );
}

#[tokio::test]
async fn hardlink_to_a_missing_target_is_rejected() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_link(&mut h, "link", "missing").unwrap();
    let tar = b.into_inner().unwrap();
    let err = convert_err(&case(&[Layer::new(
        tar.clone(),
        media::OCI_LAYER_TAR,
        &tar,
    )]))
    .await;
    assert!(err.contains("hardlink") && err.contains("missing"), "{err}");
}

#[tokio::test]
async fn a_config_that_lies_about_the_diff_id_is_rejected() {
    let tar = tar_of(&[("f", b"x")]);
    let mut layer = Layer::new(gzip(&tar), media::OCI_LAYER_GZIP, &tar);
    layer.diff_id = brisk_blobcache::Digest::sha256(b"something else");
    let err = convert_err(&case(&[layer])).await;
    assert!(err.contains("config says"), "{err}");
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_is_rejected() {
    let tar = tar_of(&[("f", b"x")]);
    let c = case(&[Layer::new(gzip(&tar), media::OCI_LAYER_GZIP, &tar)]);
    // Swap the layer blob's bytes behind the manifest's back.
    let blobs = c
        .src
        .trim_start_matches("oci:")
        .trim_end_matches(":v1")
        .to_owned()
        + "/blobs/sha256";
    let layer_hex = brisk_blobcache::Digest::sha256(&gzip(&tar)).hex();
    std::fs::write(
        format!("{blobs}/{layer_hex}"),
        gzip(&tar_of(&[("f", b"y")])),
    )
    .unwrap();
    let err = convert_err(&c).await;
    assert!(err.contains("has digest"), "{err}");
}

#[tokio::test]
async fn duplicate_entries_convert_and_the_last_one_wins() {
    let tar = tar_of(&[("dup", b"first"), ("dup", b"second")]);
    let c = case(&[Layer::new(tar.clone(), media::OCI_LAYER_TAR, &tar)]);
    convert(&store(&c.src), &store(&c.dst), &ConvertConfig::default())
        .await
        .unwrap();
    let reports = inspect::inspect(&store(&c.dst)).await.unwrap();
    let toc = reports[0].layers[0].toc.as_ref().unwrap();
    assert_eq!((toc.entries, toc.files), (1, 1));
}

#[tokio::test]
async fn converting_twice_gives_the_same_digests() {
    let tar = tar_of(&[("a", &[3u8; 200_000]), ("b", b"bee")]);
    let c = case(&[Layer::new(gzip(&tar), media::OCI_LAYER_GZIP, &tar)]);
    let first = convert(&store(&c.src), &store(&c.dst), &ConvertConfig::default())
        .await
        .unwrap();
    let again = format!("oci:{}:again", c.out_dir.display());
    let second = convert(&store(&c.src), &store(&again), &ConvertConfig::default())
        .await
        .unwrap();
    assert_eq!(first.digest, second.digest);
    assert!(
        !second.images[0].layers[0].uploaded,
        "the existing blob was uploaded again"
    );
}
