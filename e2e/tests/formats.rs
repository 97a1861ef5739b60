//! Other lazy formats served as they are. eStargz: the sample converted by stargz-snapshotter's
//! own `ctr-remote image convert --estargz` starts lazily on Brisk (the registry serves a
//! fraction of it), the container sees exactly the image's files, `brisk inspect` and `check`
//! read it, a chunk whose bytes were changed in the registry is an I/O error (never wrong
//! bytes), and a manifest vouching for another TOC gets the ordinary full download instead of
//! a lazy mount. zstd:chunked: the sample as skopeo writes it (`--dest-compress-format
//! zstd:chunked`) starts lazily with the image's files.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use brisk_blobcache::toc::estargz;
use brisk_e2e::cmd::run;
use brisk_e2e::daemons::{mounts_under, Containerd, Snapshotter};
use brisk_e2e::{
    brisk, brisk_output, gate, raw_manifest, sample_in_registry, snapshotter_gate, Proxy, Registry,
};
use serde_json::Value;
use tempfile::TempDir;

fn enabled() -> bool {
    snapshotter_gate() && gate(&["ctr-remote"], &[])
}

/// How the sample reaches the registry besides plain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    /// `sample:esgz`, by `ctr-remote image convert --estargz --oci`.
    Estargz,
    /// `zchunked/sample:v1`, by `skopeo copy --dest-compress-format zstd:chunked`.
    ZstdChunked,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// The sample pushed plain and converted to eStargz by `ctr-remote` (`sample:esgz`), a
/// counting proxy, Brisk and a containerd using it.
struct Stack {
    containerd: Containerd,
    snapshotter: Snapshotter,
    proxy: Proxy,
    registry: Registry,
    rootfs: PathBuf,
    _tmp: TempDir,
}

impl Stack {
    fn start() -> Result<Self> {
        Self::start_with(Made::Estargz)
    }

    fn start_with(made: Made) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let sample = sample_in_registry(tmp.path(), true, &[])?;
        let snapshotter = Snapshotter::start(&tmp.path().join("brisk"), &[])?;
        let containerd = Containerd::start(
            &tmp.path().join("containerd"),
            &snapshotter.socket,
            &unique("brisk-formats"),
        )?;
        // The conversion talks to the registry directly: the proxy counts Brisk's reads only.
        match made {
            Made::Estargz => estargz_of(&containerd, &sample.registry)?,
            Made::ZstdChunked => {
                // Recompressed into a layout of its own first: copied straight to the
                // registry, skopeo would reuse the gzip blobs it knows are already there.
                let layout = tmp.path().join("zchunked");
                let local = format!("oci:{}:v1", layout.display());
                run(Command::new("skopeo").args([
                    "copy",
                    "--quiet",
                    "--dest-compress-format",
                    "zstd:chunked",
                    &sample.sample.transport(),
                    &local,
                ]))
                .context("skopeo copy --dest-compress-format zstd:chunked")?;
                run(Command::new("skopeo").args([
                    "copy",
                    "--quiet",
                    "--dest-tls-verify=false",
                    &local,
                    &format!("docker://{}", sample.registry.image("zchunked/sample:v1")),
                ]))?;
            }
        }
        let proxy = Proxy::start(&sample.registry.addr())?;
        Ok(Self {
            containerd,
            snapshotter,
            proxy,
            registry: sample.registry,
            rootfs: sample.rootfs,
            _tmp: tmp,
        })
    }

    fn run(&self, image: &str, args: &[&str]) -> Result<String> {
        self.containerd
            .run_busybox(image, &unique("c"), args)
            .with_context(|| format!("snapshotter log:\n{}", self.snapshotter.log()))
    }

    fn manifest(&self, tag: &str) -> Result<Value> {
        Ok(serde_json::from_str(&raw_manifest(
            &self.registry.image(tag),
        )?)?)
    }
}

/// `sample:v1` converted to `sample:esgz` by `ctr-remote` through `containerd`.
fn estargz_of(containerd: &Containerd, registry: &Registry) -> Result<()> {
    let (plain, esgz) = (registry.image("sample:v1"), registry.image("sample:esgz"));
    containerd.ctr(&["image", "pull", "--plain-http", &plain])?;
    let socket = containerd.socket.to_str().context("socket path")?;
    run(Command::new("ctr-remote").args([
        "-a",
        socket,
        "-n",
        &containerd.namespace,
        "image",
        "convert",
        "--estargz",
        "--oci",
        &plain,
        &esgz,
    ]))
    .context("ctr-remote image convert --estargz")?;
    containerd.ctr(&["image", "push", "--plain-http", &esgz])?;
    containerd.ctr(&["image", "rm", &plain, &esgz])?;
    Ok(())
}

/// The script whose output shows the sample's files, and that output from the sample's tree.
fn files_script(rootfs: &std::path::Path) -> Result<(&'static str, String)> {
    let script = "cat /app/link; readlink /app/link; stat -c '%a %u:%g' /usr/bin/suid-tool /home/user/notes.txt /tmp; \
                  stat -c %h /app/data/original; for f in /app/*; do echo \"${f#/app/}\"; done; \
                  test -e /app/remove-me.txt && echo present || echo gone; \
                  test -e /app/old-dir && echo present || echo gone; \
                  sha256sum /app/big.bin | cut -d' ' -f1";
    let big = brisk_e2e::cmd::sha256_file(&rootfs.join("app/big.bin"))?;
    let mut names: Vec<String> = std::fs::read_dir(rootfs.join("app"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let ls = names.join("\n");
    Ok((
        script,
        format!(
            "the target\n/app/nested/target.txt\n4755 0:0\n640 1000:1000\n1777 0:0\n2\n{ls}\ngone\ngone\n{big}\n"
        ),
    ))
}

fn layers(manifest: &Value) -> Result<&Vec<Value>> {
    manifest["layers"].as_array().context("layers")
}

#[test]
fn an_estargz_image_starts_lazily_and_shows_the_images_files() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    let manifest = stack.manifest("sample:esgz")?;
    for layer in layers(&manifest)? {
        assert!(
            layer["annotations"][estargz::ANNOTATION_TOC_DIGEST].is_string(),
            "ctr-remote annotates every layer: {layer}"
        );
    }
    let direct = stack.registry.image("sample:esgz");
    let inspected = brisk(&["inspect", &direct])?;
    let n = layers(&manifest)?.len();
    assert_eq!(
        inspected.matches("lazy (estargz)").count(),
        n,
        "inspect output:\n{inspected}"
    );
    let checked: Value = serde_json::from_str(&brisk(&["check", "--json", &direct])?)?;
    assert_eq!(checked["lazy_layers"].as_u64(), Some(n as u64), "{checked}");
    assert!(
        checked["chunks"].as_u64().unwrap_or(0) >= n as u64,
        "{checked}"
    );

    let image = stack.proxy.image("sample:esgz");
    stack.containerd.brisk_pull(&image, &[])?;
    let out = stack.run(&image, &["cat", "/etc/hostname"])?;
    assert_eq!(out, "sample-v2\n");
    let log = stack.snapshotter.log();
    assert!(log.contains("lazy layer mounted"), "{log}");
    assert!(!mounts_under(&stack.snapshotter.root).is_empty());
    let fetched = stack.proxy.counts().blob_bytes;
    let total: u64 = layers(&manifest)?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    // The 3 MiB file of layer 1 is never read; busybox and a few small files are.
    assert!(
        fetched * 10 < total * 7,
        "fetched {fetched} of {total} bytes"
    );

    let (script, expected) = files_script(&stack.rootfs)?;
    assert_eq!(stack.run(&image, &["sh", "-c", script])?, expected);
    Ok(())
}

#[test]
fn a_changed_estargz_chunk_is_an_io_error_inside_the_container() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    let manifest = stack.manifest("sample:esgz")?;
    // The layer holding big.bin, and big.bin's chunk, found through the layer's own TOC.
    let mut hit = None;
    for layer in layers(&manifest)? {
        let path = stack
            .registry
            .blob_path(layer["digest"].as_str().context("digest")?)?;
        let bytes = std::fs::read(&path)?;
        let n = bytes.len();
        let position = estargz::footer_position(&bytes[n - estargz::FOOTER_SIZE..], n as u64)?;
        let r = position.range();
        let json = estargz::toc_json(&bytes[r.start as usize..r.end as usize])?;
        let toc = estargz::parse(&json, position.offset)?;
        if let Some(big) = toc.entries.iter().find(|e| e.name == "app/big.bin") {
            let chunk =
                toc.chunks[toc.chunks_for(big.tar_range().context("content")?).start].clone();
            hit = Some((path, bytes, chunk));
        }
    }
    let (path, mut bytes, chunk) = hit.context("big.bin in a layer's TOC")?;
    bytes[(chunk.offset + chunk.size / 2) as usize] ^= 0x55;
    std::fs::write(&path, &bytes)?;
    let out = brisk_output(&["check", &stack.registry.image("sample:esgz")])?;
    assert_eq!(out.status.code(), Some(1), "check of a changed chunk");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("chunk"), "{stderr}");
    let image = stack.proxy.image("sample:esgz");
    stack.containerd.brisk_pull(&image, &[])?;
    let out = stack.run(
        &image,
        &[
            "sh",
            "-c",
            "cat /etc/hostname; cat /app/big.bin > /dev/null 2>/tmp/err; echo rc=$?; cat /tmp/err",
        ],
    )?;
    assert!(out.starts_with("sample-v2\nrc=1\n"), "{out}");
    assert!(out.to_lowercase().contains("input/output error"), "{out}");
    Ok(())
}

#[test]
fn a_manifest_vouching_for_another_toc_gets_the_full_download() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    let mut manifest = stack.manifest("sample:esgz")?;
    for layer in manifest["layers"].as_array_mut().context("layers")? {
        layer["annotations"][estargz::ANNOTATION_TOC_DIGEST] =
            format!("sha256:{}", "ab".repeat(32)).into();
    }
    put_manifest(&stack.registry, "sample:esgz-liar", &manifest)?;
    let image = stack.proxy.image("sample:esgz-liar");
    stack.containerd.brisk_pull(&image, &[])?;
    let out = stack.run(&image, &["cat", "/etc/hostname", "/app/added/new.txt"])?;
    assert_eq!(out, "sample-v2\nadded by layer 2\n");
    let log = stack.snapshotter.log();
    assert!(!log.contains("lazy layer mounted"), "{log}");
    assert!(log.contains("TOC digest is"), "the reason is logged: {log}");
    assert!(mounts_under(&stack.snapshotter.root).is_empty());
    Ok(())
}

/// Stores `manifest` under `name:tag` on the registry, as a client pushing it would.
fn put_manifest(registry: &Registry, reference: &str, manifest: &Value) -> Result<()> {
    let (repo, tag) = reference.split_once(':').context("no tag")?;
    let url = format!("http://{}/v2/{repo}/manifests/{tag}", registry.addr());
    let media = manifest["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    let body = serde_json::to_vec(manifest)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            reqwest::Client::builder()
                .no_proxy()
                .build()?
                .put(url)
                .header("content-type", media)
                .body(body)
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        })
}

#[test]
fn a_zstd_chunked_image_from_skopeo_starts_lazily_and_shows_the_images_files() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start_with(Made::ZstdChunked)?;
    let manifest = stack.manifest("zchunked/sample:v1")?;
    for layer in layers(&manifest)? {
        assert!(
            layer["annotations"].as_object().is_some_and(|a| a
                .keys()
                .any(|k| k.ends_with("zstd-chunked.manifest-checksum"))),
            "skopeo annotates every layer: {layer}"
        );
    }
    let direct = stack.registry.image("zchunked/sample:v1");
    let inspected = brisk(&["inspect", &direct])?;
    let n = layers(&manifest)?.len();
    assert_eq!(
        inspected.matches("lazy (zstd-chunked)").count(),
        n,
        "inspect output:\n{inspected}"
    );
    brisk(&["check", &direct])?;
    let image = stack.proxy.image("zchunked/sample:v1");
    stack.containerd.brisk_pull(&image, &[])?;
    assert_eq!(stack.run(&image, &["cat", "/etc/hostname"])?, "sample-v2\n");
    let log = stack.snapshotter.log();
    assert!(log.contains("lazy layer mounted"), "{log}");
    let fetched = stack.proxy.counts().blob_bytes;
    let total: u64 = layers(&manifest)?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    assert!(
        fetched * 10 < total * 7,
        "fetched {fetched} of {total} bytes"
    );
    let (script, expected) = files_script(&stack.rootfs)?;
    assert_eq!(stack.run(&image, &["sh", "-c", script])?, expected);
    Ok(())
}
