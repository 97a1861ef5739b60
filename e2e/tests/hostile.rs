//! Hostile images on a shared node (issue 14): a TOC that names a path 20,000 directories
//! deep, annotations that claim a 2^62-byte TOC, and a config that claims another image's
//! diff_ids, each pushed to the node's registry and pulled the normal way. After each the
//! daemon is alive, a healthy lazy image pulled before still reads right, and the hostile one
//! fell back to the ordinary download or failed with an error naming why. The diff_id lie is
//! tried in both orders: the liar first, and the honest image first.
//!
//! The hostile layers are made in-process from honest ones (a converted busybox tree whose
//! TOC, annotations or config is then edited), because no well-behaved tool writes them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use brisk_blobcache::toc::{self, ConvertOptions, Entry, EntryKind, Footer, Toc, TocPosition};
use brisk_blobcache::Digest;
use brisk_e2e::daemons::{Containerd, Snapshotter};
use brisk_e2e::{brisk, push_image, snapshotter_gate, OciImage, Registry};
use serde_json::{json, Value};
use tempfile::TempDir;

/// The TOC frame's skippable-frame magic (docs/format.md).
const TOC_FRAME_MAGIC: u32 = 0x184D_2A5B;

/// A converted layer held in memory, with what its descriptor and config say of it.
pub(crate) struct Lazy {
    blob: Vec<u8>,
    toc: Toc,
    toc_digest: Digest,
    position: TocPosition,
    pub(crate) diff_id: Digest,
}

impl Lazy {
    pub(crate) fn convert(tar: &[u8]) -> Result<Self> {
        let options = ConvertOptions {
            chunk_size: 256 * 1024,
            ..ConvertOptions::default()
        };
        let (layer, blob) = toc::convert_layer(tar, Vec::new(), &options)?;
        let footer = Footer::decode(&blob[blob.len() - toc::FOOTER_SIZE..], blob.len() as u64)?;
        let r = footer.toc.range();
        let toc = Toc::decode(
            &blob[r.start as usize..r.end as usize],
            footer.toc.uncompressed_size,
            Some(&layer.toc_digest),
        )?;
        Ok(Self {
            blob,
            toc,
            toc_digest: layer.toc_digest,
            position: layer.toc,
            diff_id: layer.diff_id,
        })
    }

    /// Rewrites the TOC (the chunks, and so the tar stream and diff_id, stay as they were),
    /// and with it the TOC frame, the footer and the TOC digest the manifest vouches for.
    fn edit_toc(&mut self, edit: impl FnOnce(&mut Toc)) -> Result<()> {
        edit(&mut self.toc);
        let data_end = self.toc.data_size() as usize;
        let (payload, uncompressed) = self.toc.encode()?;
        let mut blob = self.blob[..data_end].to_vec();
        blob.extend_from_slice(&TOC_FRAME_MAGIC.to_le_bytes());
        blob.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        blob.extend_from_slice(&payload);
        self.position = TocPosition {
            offset: data_end as u64 + 8,
            size: payload.len() as u64,
            uncompressed_size: uncompressed,
            version: toc::FORMAT_VERSION,
        };
        blob.extend_from_slice(
            &Footer {
                toc: self.position,
                flags: 0,
            }
            .encode(),
        );
        self.toc_digest = Digest::sha256(&payload);
        self.blob = blob;
        Ok(())
    }

    pub(crate) fn annotations(&self) -> BTreeMap<String, String> {
        toc::layer_annotations(&self.toc_digest, &self.position.to_string(), &[])
    }
}

/// An uncompressed tar of a busybox tree whose `/etc/hostname` says `hostname`.
fn busybox_tar(dir: &Path, hostname: &str) -> Result<Vec<u8>> {
    let root = dir.join(format!("rootfs-{hostname}"));
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("Copying /bin/busybox")?;
    std::fs::write(root.join("etc/hostname"), format!("{hostname}\n"))?;
    tar_dir(&root)
}

/// An uncompressed tar of the tree at `root`, owned by root, every time zero: the same tree
/// always gives the same bytes.
pub(crate) fn tar_dir(root: &Path) -> Result<Vec<u8>> {
    let out = Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "-C",
        ])
        .arg(root)
        .args(["-cf", "-", "."])
        .output()?;
    ensure!(out.status.success(), "tar failed");
    Ok(out.stdout)
}

/// Writes `layer` as a one-layer OCI layout at `dir`, tagged `tag`, with `annotations` on the
/// layer descriptor and `diff_id` in the config (the layer's own unless told otherwise).
pub(crate) fn layout(
    dir: &Path,
    tag: &str,
    layer: &Lazy,
    annotations: &BTreeMap<String, String>,
    diff_id: &Digest,
) -> Result<OciImage> {
    layout_layers(dir, tag, &[(layer, annotations, diff_id)])
}

/// Writes an OCI layout at `dir`, tagged `tag`, of `layers` (bottom first), each with the
/// annotations on its descriptor and the diff_id its config claims for it.
pub(crate) fn layout_layers(
    dir: &Path,
    tag: &str,
    layers: &[(&Lazy, &BTreeMap<String, String>, &Digest)],
) -> Result<OciImage> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let put = |data: &[u8]| -> Result<Digest> {
        let d = Digest::sha256(data);
        std::fs::write(dir.join("blobs/sha256").join(d.hex()), data)?;
        Ok(d)
    };
    let mut descriptors = Vec::new();
    for (layer, annotations, _) in layers {
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": put(&layer.blob)?.to_string(),
            "size": layer.blob.len(),
            "annotations": annotations,
        }));
    }
    let diff_ids: Vec<String> = layers.iter().map(|(_, _, d)| d.to_string()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))?;
    let config_digest = put(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": descriptors,
    }))?;
    let manifest_digest = put(&manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest.to_string(),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(OciImage {
        dir: dir.to_path_buf(),
        tag: tag.to_owned(),
    })
}

/// A registry, Brisk and a containerd using it, on one node.
struct Node {
    containerd: Containerd,
    snapshotter: Snapshotter,
    registry: Registry,
    tmp: TempDir,
}

impl Node {
    fn start(snapshotter_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let registry = Registry::start()?;
        let snapshotter = Snapshotter::start(&tmp.path().join("brisk"), snapshotter_args)?;
        let namespace = format!("hostile-{}", std::process::id());
        let containerd = Containerd::start(
            &tmp.path().join("containerd"),
            &snapshotter.socket,
            &namespace,
        )?;
        Ok(Self {
            containerd,
            snapshotter,
            registry,
            tmp,
        })
    }

    /// Pushes `layer` as `name` (a one-layer image) and returns its reference.
    fn push(
        &self,
        name: &str,
        layer: &Lazy,
        annotations: &BTreeMap<String, String>,
        diff_id: &Digest,
    ) -> Result<String> {
        let dir = self.tmp.path().join("layouts").join(name.replace(':', "-"));
        let image = layout(&dir, "t", layer, annotations, diff_id)?;
        let reference = self.registry.image(name);
        push_image(&image, &reference)?;
        Ok(reference)
    }

    fn honest(&self, name: &str, hostname: &str) -> Result<(String, Lazy)> {
        let layer = Lazy::convert(&busybox_tar(self.tmp.path(), hostname)?)?;
        let reference = self.push(name, &layer, &layer.annotations(), &layer.diff_id)?;
        Ok((reference, layer))
    }

    fn pull(&self, namespace: &str, image: &str) -> Result<String> {
        let socket = self.containerd.socket.to_str().context("socket path")?;
        brisk(&[
            "pull",
            image,
            "--containerd",
            socket,
            "--namespace",
            namespace,
        ])
    }

    /// `cat /etc/hostname` in a new container of `image` in `namespace`.
    fn hostname(&self, namespace: &str, image: &str) -> Result<String> {
        self.run(namespace, image, &["cat", "/etc/hostname"])
    }

    /// Busybox applet `args` in a new container of `image` in `namespace`: its stdout.
    fn run(&self, namespace: &str, image: &str, args: &[&str]) -> Result<String> {
        let id = format!("c-{}-{}", std::process::id(), rand::random::<u32>());
        let mut ctr = vec![
            "run",
            "--rm",
            "--snapshotter",
            "brisk",
            image,
            &id,
            "/bin/busybox",
        ];
        ctr.extend_from_slice(args);
        run_ctr(&self.containerd, namespace, &ctr)
    }

    fn status(&self) -> Result<Value> {
        let socket = self.snapshotter.socket.to_str().context("socket path")?;
        Ok(serde_json::from_str(&brisk(&[
            "status",
            "--snapshotter",
            socket,
            "--json",
        ])?)?)
    }

    /// The proof state `brisk status` shows for the lazy layer committed as `chain`.
    fn proof(&self, chain: &Digest) -> Result<Option<String>> {
        let status = self.status()?;
        Ok(status["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["chain_id"] == chain.to_string().as_str())
            .and_then(|l| l["proof"].as_str())
            .map(str::to_owned))
    }

    fn wait_for_proof(&self, chain: &Digest, want: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let proof = self.proof(chain)?;
            if proof.as_deref() == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "layer {chain} never became {want} (is {proof:?}); log:\n{}",
                    self.snapshotter.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `ctr -a SOCK -n NAMESPACE ARGS`: stdout, or an error carrying stderr.
fn run_ctr(containerd: &Containerd, namespace: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .arg("-a")
        .arg(&containerd.socket)
        .args(["-n", namespace])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn issue_14_a_deep_path_and_a_huge_toc_fall_back_and_others_keep_reading() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start(&[])?;
    let ns = "tenant-a";
    let (good, _) = node.honest("good:lazy", "good")?;
    node.pull(ns, &good)?;
    assert_eq!(node.hostname(ns, &good)?, "good\n");

    // One directory entry 20,000 levels deep in the TOC (a 40 KB path): the layer's real tar
    // stream is the honest busybox tree, so the download that replaces it runs.
    let mut deep = Lazy::convert(&busybox_tar(node.tmp.path(), "deep")?)?;
    deep.edit_toc(|toc| {
        toc.entries.push(Entry {
            kind: EntryKind::Dir,
            name: vec!["d"; 20_000].join("/"),
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: None,
            offset: None,
            dev_major: None,
            dev_minor: None,
            xattrs: BTreeMap::new(),
        })
    })?;
    let deep_ref = node.push("deep:lazy", &deep, &deep.annotations(), &deep.diff_id)?;
    node.pull(ns, &deep_ref)?;
    assert_eq!(node.hostname(ns, &deep_ref)?, "deep\n");
    let log = node.snapshotter.log();
    assert!(
        log.contains("not served lazily"),
        "the deep layer fell back, saying why:\n{log}"
    );

    // A TOC position (annotation and label copy) claiming 2^62 compressed bytes.
    let huge = Lazy::convert(&busybox_tar(node.tmp.path(), "huge")?)?;
    let mut annotations = huge.annotations();
    let lie = TocPosition {
        size: 1 << 62,
        ..huge.position
    }
    .to_string();
    annotations.insert(toc::ANNOTATION_TOC_POSITION.to_owned(), lie.clone());
    annotations.insert(toc::LABEL_TOC_POSITION.to_owned(), lie);
    let huge_ref = node.push("huge:lazy", &huge, &annotations, &huge.diff_id)?;
    node.pull(ns, &huge_ref)?;
    assert_eq!(node.hostname(ns, &huge_ref)?, "huge\n");

    // The daemon is alive, and the healthy image still reads right.
    node.status().context("the daemon answers")?;
    assert_eq!(node.hostname(ns, &good)?, "good\n");
    let mounted = node.status()?["remote_layers"].as_u64().unwrap_or(0);
    assert_eq!(mounted, 1, "only the healthy layer is lazy");
    Ok(())
}

/// GOOD (its /etc/hostname says "good") and EVIL ("evil"), both converted honestly; EVIL's
/// config then claims GOOD's diff_id, so both name their layer by GOOD's chain ID.
fn good_and_evil(node: &Node) -> Result<(String, String, Digest)> {
    let (good, good_layer) = node.honest("good:lazy", "good")?;
    let evil_layer = Lazy::convert(&busybox_tar(node.tmp.path(), "evil")?)?;
    let evil = node.push(
        "evil:lazy",
        &evil_layer,
        &evil_layer.annotations(),
        &good_layer.diff_id,
    )?;
    Ok((good, evil, good_layer.diff_id))
}

#[test]
fn issue_14_a_liar_pulled_first_is_refuted_and_never_serves_another_image() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start(&["--verify", "background", "--verify-delay-secs", "0"])?;
    let (good, evil, chain) = good_and_evil(&node)?;
    let (a, b) = ("tenant-a", "tenant-b");

    node.pull(a, &evil)?;
    node.wait_for_proof(&chain, "refuted")?;
    let log = node.snapshotter.log();
    assert!(log.contains("REFUTED"), "{log}");

    // EVIL's own containers cannot start on the refuted layer.
    let err = node
        .hostname(a, &evil)
        .expect_err("the refuted layer is refused");
    assert!(
        format!("{err:#}").contains("does not match the chain ID"),
        "{err:#}"
    );
    // GOOD in the liar's namespace: containerd already holds the chain ID there and reuses
    // it without asking the snapshotter; the start fails, naming the layer, instead of
    // showing EVIL's files.
    node.pull(a, &good)?;
    match node.hostname(a, &good) {
        Ok(out) => panic!("GOOD started on EVIL's layer and read {out:?}"),
        Err(err) => assert!(
            format!("{err:#}").contains("does not match the chain ID"),
            "{err:#}"
        ),
    }
    // GOOD in another namespace: the refuted chain ID is not reused; GOOD's own layer is
    // downloaded and unpacked (containerd checks its diff_id), and it reads its own files.
    node.pull(b, &good)?;
    assert_eq!(node.hostname(b, &good)?, "good\n");
    node.status().context("the daemon answers")?;
    Ok(())
}

#[test]
fn issue_14_an_honest_image_pulled_first_keeps_its_files_when_a_liar_comes() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    // Unproven for the whole test: reuse must rest on the blob, not on a proof.
    let node = Node::start(&["--verify", "off"])?;
    let (good, evil, chain) = good_and_evil(&node)?;
    let (a, b) = ("tenant-a", "tenant-b");

    node.pull(a, &good)?;
    assert_eq!(node.hostname(a, &good)?, "good\n");
    assert_eq!(node.proof(&chain)?.as_deref(), Some("unproven"));

    // EVIL in another namespace asks for GOOD's chain ID from its own blob: not reused
    // unproven, so it is downloaded, and its tar does not hash to the diff_id it claims.
    let err = node
        .pull(b, &evil)
        .expect_err("the liar's download fails its diff_id");
    assert!(
        format!("{err:#}").contains("but the image config says"),
        "{err:#}"
    );
    // EVIL in GOOD's namespace gets the layer its chain ID names: GOOD's.
    node.pull(a, &evil)?;
    assert_eq!(node.hostname(a, &evil)?, "good\n");
    // GOOD reads its own files throughout.
    assert_eq!(node.hostname(a, &good)?, "good\n");
    node.status().context("the daemon answers")?;
    Ok(())
}

/// Paths of the files a trace lists, without a leading `/`.
fn trace_files(node: &Node, image: &str) -> Result<Vec<String>> {
    let file = node
        .tmp
        .path()
        .join(format!("trace-{}.json", rand::random::<u32>()));
    let socket = node.snapshotter.socket.to_str().context("socket path")?;
    let path = file.to_str().context("path")?;
    brisk(&["trace", "export", image, path, "--snapshotter", socket])?;
    let trace: Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    Ok(trace["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["path"].as_str())
        .map(|p| p.trim_start_matches('/').to_owned())
        .collect())
}

#[test]
fn issue_14_reads_of_a_shared_base_by_another_images_containers_stay_out_of_its_trace() -> Result<()>
{
    if !snapshotter_gate() {
        return Ok(());
    }
    let config = tempfile::tempdir()?;
    let config = config.path().join("brisk.toml");
    std::fs::write(&config, "[trace]\nquiet_secs = 3\n")?;
    let node = Node::start(&["--config", config.to_str().context("path")?])?;
    // One base layer (busybox, and a file each image's start reads), under two images.
    let base_root = node.tmp.path().join("base");
    std::fs::create_dir_all(base_root.join("bin"))?;
    std::fs::create_dir_all(base_root.join("etc"))?;
    std::fs::create_dir_all(base_root.join("shared"))?;
    std::fs::copy("/bin/busybox", base_root.join("bin/busybox"))?;
    std::fs::write(base_root.join("etc/hostname"), "base\n")?;
    std::fs::write(base_root.join("shared/good-reads"), "g\n")?;
    std::fs::write(base_root.join("shared/evil-reads"), "e\n")?;
    let base = Lazy::convert(&tar_dir(&base_root)?)?;
    let top = |name: &str| -> Result<Lazy> {
        let root = node.tmp.path().join(name);
        std::fs::create_dir_all(root.join("app"))?;
        std::fs::write(root.join("app").join(format!("{name}.txt")), name)?;
        Lazy::convert(&tar_dir(&root)?)
    };
    let push = |name: &str, top: &Lazy| -> Result<String> {
        let dir = node.tmp.path().join("layouts").join(name);
        let (a, b) = (base.annotations(), top.annotations());
        let image = layout_layers(
            &dir,
            "t",
            &[(&base, &a, &base.diff_id), (top, &b, &top.diff_id)],
        )?;
        let reference = node.registry.image(&format!("{name}:lazy"));
        push_image(&image, &reference)?;
        Ok(reference)
    };
    let good = push("good", &top("good")?)?;
    let evil = push("evil", &top("evil")?)?;
    let ns = "tenant-a";
    node.pull(ns, &good)?;
    node.pull(ns, &evil)?;
    // Both images are being recorded; each container reads its own file of the base.
    let evil_out = node.run(ns, &evil, &["cat", "/shared/evil-reads", "/app/evil.txt"])?;
    assert_eq!(evil_out, "e\nevil");
    let good_out = node.run(ns, &good, &["cat", "/shared/good-reads", "/app/good.txt"])?;
    assert_eq!(good_out, "g\ngood");

    let socket = node.snapshotter.socket.to_str().context("socket path")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed: Value =
            serde_json::from_str(&brisk(&["trace", "ls", "--json", "--snapshotter", socket])?)?;
        if listed["traces"].as_array().is_some_and(|t| t.len() >= 2) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "two traces were not recorded: {listed}; log:\n{}",
                node.snapshotter.log()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let good_files = trace_files(&node, &good)?;
    let evil_files = trace_files(&node, &evil)?;
    for (files, own, other) in [(&good_files, "good", "evil"), (&evil_files, "evil", "good")] {
        let has = |p: &str| files.iter().any(|f| f == p);
        assert!(has(&format!("shared/{own}-reads")), "{own}: {files:?}");
        assert!(has(&format!("app/{own}.txt")), "{own}: {files:?}");
        assert!(
            !has(&format!("shared/{other}-reads")),
            "{other}'s read of the shared base entered {own}'s trace: {files:?}"
        );
    }
    Ok(())
}
