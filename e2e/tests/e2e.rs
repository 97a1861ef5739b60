//! System tests: the built `brisk` binary against a real registry and images made by the
//! real packaging tools. One test binary, one module per area.
//!
//! Each test is gated: without `BRISK_E2E=1` it prints `skipped: …` and passes; with it, a
//! missing prerequisite fails the test. Each test starts its own registry.

mod cache;
mod cri;
mod cri_auth;
mod formats;
mod hostile;
mod restart;
mod semantics;
mod snapshotter;
mod traces;
mod zone;

mod convert {
    //! `brisk convert`, `inspect` and `check`: a converted image unpacks to exactly the
    //! tree of its source, conversion is deterministic, corruption is caught, and bad input
    //! fails without leaving anything at the destination.

    use std::process::{Command, Output};

    use anyhow::{ensure, Context, Result};
    use brisk_e2e::cmd::{run_output, stderr_of};
    use brisk_e2e::layout::{raw_tar, single_layer_layout, tagged_manifests};
    use brisk_e2e::{
        assert_same_tree, brisk, brisk_output, build_sample_image, gate, push_image, raw_manifest,
        tree_manifest, unpack_image_from_layout, unpack_image_from_registry, OciImage, Registry,
        CONVERT_FILES, CONVERT_TOOLS,
    };
    use serde_json::Value;
    use tempfile::TempDir;

    const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    const TOC_DIGEST: &str = "dev.brisk.toc.digest";

    fn enabled() -> bool {
        gate(CONVERT_TOOLS, CONVERT_FILES)
    }

    /// A registry holding the sample image as `sample:v1`, and a scratch directory.
    fn registry_with_sample() -> Result<(Registry, String, TempDir)> {
        let tmp = tempfile::tempdir()?;
        let registry = Registry::start()?;
        let sample = build_sample_image(&tmp.path().join("sample"))?;
        let src = registry.image("sample:v1");
        push_image(&sample, &src)?;
        Ok((registry, src, tmp))
    }

    fn layers(manifest: &str) -> Result<Vec<Value>> {
        let manifest: Value = serde_json::from_str(manifest)?;
        manifest["layers"]
            .as_array()
            .cloned()
            .context("Manifest has no layers")
    }

    fn assert_failed(out: &Output, what: &str) {
        assert!(
            !out.status.success(),
            "{what} should fail but succeeded; stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn convert_registry_to_registry_preserves_the_tree() -> Result<()> {
        if !enabled() {
            return Ok(());
        }
        let (registry, src, tmp) = registry_with_sample()?;
        let dst = registry.image("sample:lazy");
        brisk(&["convert", &src, &dst])?;

        let original = unpack_image_from_registry(&src, &tmp.path().join("original"))?;
        let converted = unpack_image_from_registry(&dst, &tmp.path().join("converted"))?;
        // The comparison is only as strong as the sample: make sure the features it is
        // meant to carry survived the original's own round trip through umoci.
        let listing = tree_manifest(&original)?;
        for needle in [
            "xattr:user.brisk=\"hello\"",
            "hardlink-of \"app/data/",
            "mode=4755",
            "mode=1777",
            "uid=1000 gid=1000",
            "-> \"/app/nested/target.txt\"",
            "ünïcødé-名前.txt",
            "\"app/added/deeper/more.txt\"",
        ] {
            ensure!(
                listing.contains(needle),
                "Sample lacks {needle}:\n{listing}"
            );
        }
        for gone in ["remove-me", "old-dir"] {
            ensure!(
                !listing.contains(gone),
                "Whiteout not applied to {gone}:\n{listing}"
            );
        }
        assert_same_tree(&original, &converted)?;

        let manifest = raw_manifest(&dst)?;
        let converted_layers = layers(&manifest)?;
        assert_eq!(converted_layers.len(), layers(&raw_manifest(&src)?)?.len());
        for layer in &converted_layers {
            assert_eq!(layer["mediaType"], ZSTD_LAYER, "layer {layer}");
            assert!(
                layer["annotations"][TOC_DIGEST].is_string(),
                "layer without {TOC_DIGEST}: {layer}"
            );
        }

        // Same bytes, so the same manifest digest: conversion is deterministic.
        let again = registry.image("sample:again");
        brisk(&["convert", &src, &again])?;
        assert_eq!(
            raw_manifest(&again)?,
            manifest,
            "converting the same image twice gave different manifests"
        );
        Ok(())
    }

    #[test]
    fn convert_registry_to_oci_layout() -> Result<()> {
        if !enabled() {
            return Ok(());
        }
        let (_registry, src, tmp) = registry_with_sample()?;
        let out = OciImage {
            dir: tmp.path().join("out"),
            tag: "lazy".into(),
        };
        brisk(&["convert", &src, &out.transport()])?;

        let original = unpack_image_from_registry(&src, &tmp.path().join("original"))?;
        let converted = unpack_image_from_layout(&out, &tmp.path().join("converted"))?;
        assert_same_tree(&original, &converted)
    }

    #[test]
    fn inspect_and_check_a_converted_image() -> Result<()> {
        if !enabled() {
            return Ok(());
        }
        let (registry, src, _tmp) = registry_with_sample()?;
        let dst = registry.image("sample:lazy");
        brisk(&["convert", &src, &dst])?;

        let inspected = brisk(&["inspect", &dst])?;
        assert!(
            inspected.contains("2 layers"),
            "inspect output:\n{inspected}"
        );
        brisk(&["check", &dst])?;

        // The registry serves a blob by digest without hashing it again, so a flipped byte
        // on disk reaches the client: exactly what `check` is there to catch.
        let first = layers(&raw_manifest(&dst)?)?[0]["digest"]
            .as_str()
            .context("Layer without a digest")?
            .to_string();
        let blob = registry.blob_path(&first)?;
        let mut bytes =
            std::fs::read(&blob).with_context(|| format!("Reading {}", blob.display()))?;
        // Offset 100 is inside the first chunk's compressed frame.
        bytes[100] ^= 0xff;
        std::fs::write(&blob, bytes)?;

        let out = brisk_output(&["check", &dst])?;
        assert_failed(&out, "check of a corrupted image");
        assert_eq!(out.status.code(), Some(1));
        let stderr = stderr_of(&out);
        assert!(
            stderr.to_lowercase().contains("chunk"),
            "stderr does not name a chunk:\n{stderr}"
        );
        Ok(())
    }

    #[test]
    fn convert_rejects_a_missing_source_cleanly() -> Result<()> {
        if !enabled() {
            return Ok(());
        }
        let registry = Registry::start()?;
        let dst = registry.image("x:y");
        let out = brisk_output(&["convert", &registry.image("nope:v1"), &dst])?;
        assert_failed(&out, "convert of a missing image");
        assert!(!stderr_of(&out).trim().is_empty(), "no error message");

        let inspect = run_output(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{dst}"),
        ]))?;
        assert_failed(&inspect, "skopeo inspect of the destination");
        assert!(!registry.has_repository("x"), "something was written to x");
        Ok(())
    }

    #[test]
    fn convert_with_an_escaping_tar_entry_fails_and_writes_nothing() -> Result<()> {
        if !enabled() {
            return Ok(());
        }
        let tmp = tempfile::tempdir()?;
        let out_dir = tmp.path().join("out");
        let output = |tag: &str| OciImage {
            dir: out_dir.clone(),
            tag: tag.into(),
        };
        // The same hand-made layout without the bad entry converts: what fails below fails
        // because of `../evil`, and the destination already exists when it does.
        let layer = raw_tar(&[("ok.txt", b"fine\n")])?;
        let good = single_layer_layout(&tmp.path().join("good"), "good", &layer)?;
        brisk(&["convert", &good.transport(), &output("good").transport()])?;

        let layer = raw_tar(&[("ok.txt", b"fine\n"), ("../evil", b"outside\n")])?;
        let bad = single_layer_layout(&tmp.path().join("bad"), "bad", &layer)?;
        let dst = output("bad");

        let out = brisk_output(&["convert", &bad.transport(), &dst.transport()])?;
        assert_failed(&out, "convert of a layer with `../evil`");
        let stderr = stderr_of(&out);
        assert!(stderr.contains("escapes"), "stderr:\n{stderr}");
        let written = tagged_manifests(&out_dir, "bad")?;
        assert!(written.is_empty(), "manifest written anyway: {written:?}");
        Ok(())
    }
}
