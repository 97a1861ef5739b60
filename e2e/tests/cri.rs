//! Brisk on a Kubernetes node: containerd's CRI plugin drives the snapshotter, and a CRI
//! client makes the kubelet's calls. A converted image's pod starts lazily, an unconverted
//! one through the fallback, two pods share one image's layers, RemoveImage leaves nothing
//! behind, and ImageFsInfo and ImageStatus report what containerd 1.6 can know of Brisk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use brisk_e2e::cri::{CriClient, Pod};
use brisk_e2e::daemons::{mounts_under, Containerd, CriSettings, Snapshotter, CRI_NAMESPACE};
use brisk_e2e::image::build_pause_image;
use brisk_e2e::{push_image, raw_manifest, sample_in_registry, snapshotter_gate, Proxy, Registry};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, UsageRequest};
use serde_json::Value;
use tempfile::TempDir;

/// A file of each of the sample's layers (CRI bind-mounts its own `/etc/hostname`).
pub(crate) const FILES: [&str; 2] = ["/app/nested/target.txt", "/app/added/new.txt"];
pub(crate) const FILES_TEXT: &str = "the target\nadded by layer 2\n";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

/// A node: the registry (sample plain and converted, and a pause image) behind a counting
/// proxy, Brisk, and containerd with CRI on, all private to one test.
pub(crate) struct Node {
    pub(crate) cri: CriClient,
    pub(crate) containerd: Containerd,
    pub(crate) snapshotter: Snapshotter,
    pub(crate) proxy: Proxy,
    pub(crate) registry: Registry,
    pub(crate) tmp: TempDir,
}

impl Node {
    pub(crate) fn start() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let sample = sample_in_registry(tmp.path(), true, &[])?;
        Self::start_with(tmp, sample.registry, &[], false)
    }

    /// A node on `registry` (open: the pause image is pushed there and pulled through the
    /// proxy like everything else), also reaching the plain-HTTP registries `more_hosts`.
    /// With `image_proxy` the client's ImageService calls go through Brisk's CRI proxy, as
    /// a kubelet's with `--image-service-endpoint` do.
    pub(crate) fn start_with(
        tmp: TempDir,
        registry: Registry,
        more_hosts: &[String],
        image_proxy: bool,
    ) -> Result<Self> {
        let pause = build_pause_image(&tmp.path().join("pause"))?;
        push_image(&pause, &registry.image("pause:local"))?;
        let proxy = Proxy::start(&registry.addr())?;
        let containerd_dir = tmp.path().join("containerd");
        let cri_socket = tmp.path().join("brisk/cri.sock");
        let mut args = Vec::new();
        if image_proxy {
            args.push("--cri-listen".to_owned());
            args.push(cri_socket.display().to_string());
            args.push("--cri-containerd".to_owned());
            args.push(containerd_dir.join("containerd.sock").display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let snapshotter = Snapshotter::start(&tmp.path().join("brisk"), &args)?;
        let settings = CriSettings {
            sandbox_image: proxy.image("pause:local"),
            plain_http: [vec![proxy.addr()], more_hosts.to_vec()].concat(),
        };
        let containerd = Containerd::start_cri(&containerd_dir, &snapshotter.socket, &settings)?;
        let cri = if image_proxy {
            CriClient::connect_split(&cri_socket, &containerd.socket)?
        } else {
            CriClient::connect(&containerd.socket)?
        };
        Ok(Self {
            cri,
            containerd,
            snapshotter,
            proxy,
            registry,
            tmp,
        })
    }

    pub(crate) fn lazy(&self) -> String {
        self.proxy.image("sample:lazy")
    }

    pub(crate) fn logs(&self) -> PathBuf {
        self.tmp.path().join("pods").join(unique("pod"))
    }

    /// A whole pod of `image` running busybox `args`; its exit code and output.
    pub(crate) fn run(&self, image: &str, args: &[&str]) -> Result<(i32, String)> {
        let mut command = vec!["/bin/busybox"];
        command.extend_from_slice(args);
        self.cri
            .run_to_exit(&unique("pod"), &self.logs(), image, None, &command)
            .with_context(|| {
                format!(
                    "snapshotter log:\n{}\ncontainerd log:\n{}",
                    self.snapshotter.log(),
                    self.containerd.log()
                )
            })
    }

    /// The compressed size of `tag`'s layers in the registry.
    pub(crate) fn layer_bytes(&self, tag: &str) -> Result<u64> {
        let manifest: Value = serde_json::from_str(&raw_manifest(&self.registry.image(tag))?)?;
        Ok(manifest["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum())
    }

    /// FUSE mounts Brisk serves (one per mounted lazy layer).
    pub(crate) fn fuse_mounts(&self) -> usize {
        fuse_mounts_under(&self.snapshotter.root)
    }

    /// Every snapshot containerd holds on Brisk for CRI, with its usage as Brisk reports it.
    pub(crate) fn snapshots(&self) -> Result<Vec<(String, i32, i64, i64)>> {
        snapshot_usages(&self.containerd.socket)
    }
}

/// Mounts of type `fuse*` below `dir`.
pub(crate) fn fuse_mounts_under(dir: &Path) -> usize {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let fs_type = fields
                .iter()
                .position(|f| *f == "-")
                .and_then(|i| fields.get(i + 1));
            fields.get(4).is_some_and(|p| p.starts_with(&prefix))
                && fs_type.is_some_and(|t| t.starts_with("fuse"))
        })
        .count()
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "containerd-namespace",
        CRI_NAMESPACE.parse().expect("ascii"),
    );
    r
}

/// (key, kind, bytes, inodes) of every `brisk` snapshot in CRI's namespace, through
/// containerd's snapshots API: the Walk and Usage calls CRI's image filesystem stats are
/// made of.
fn snapshot_usages(containerd: &Path) -> Result<Vec<(String, i32, i64, i64)>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = containerd_client::connect(containerd).await?;
        let mut client = SnapshotsClient::new(channel);
        let mut stream = client
            .list(request(ListSnapshotsRequest {
                snapshotter: "brisk".into(),
                filters: vec![],
            }))
            .await?
            .into_inner();
        let mut infos = Vec::new();
        while let Some(page) = stream.message().await? {
            infos.extend(page.info);
        }
        let mut out = Vec::new();
        for info in infos {
            let usage = client
                .usage(request(UsageRequest {
                    snapshotter: "brisk".into(),
                    key: info.name.clone(),
                }))
                .await?
                .into_inner();
            out.push((info.name, info.kind, usage.size, usage.inodes));
        }
        Ok(out)
    })
}

/// `PullImage` of a converted image, then a pod of it: the container reads the image's
/// files through FUSE, exits 0, and the registry served a fraction of the layers.
#[test]
fn a_pod_starts_lazily_through_cri() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start()?;
    let log_dir = node.logs();
    let pod = node
        .cri
        .run_pod("lazy", &log_dir)
        .with_context(|| node.containerd.log())?;
    let before = node.proxy.counts().blob_bytes;
    let image_ref = node.cri.pull(&node.lazy(), None, Some(&pod.config))?;
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert!(
        node.snapshotter.log().contains("lazy layer mounted"),
        "{}",
        node.snapshotter.log()
    );
    assert_eq!(node.fuse_mounts(), 2, "one FUSE mount per lazy layer");
    let id = node.cri.create_container(
        &pod,
        "main",
        &node.lazy(),
        &["/bin/busybox", "cat", FILES[0], FILES[1]],
    )?;
    node.cri.start_container(&id)?;
    let status = node.cri.wait_exited(&id)?;
    assert_eq!(status.exit_code, 0, "{status:?}");
    let log = brisk_e2e::cri::read_log(&log_dir.join("main.log"))?;
    assert_eq!(log, FILES_TEXT);
    let fetched = node.proxy.counts().blob_bytes - before;
    let image = node.layer_bytes("sample:lazy")?;
    // The 3 MiB file of layer 1 is never read; busybox and a few small files are.
    println!("registry served {fetched} of the image's {image} layer bytes");
    assert!(
        fetched * 10 < image * 7,
        "fetched {fetched} of {image} bytes"
    );
    teardown(&node, &pod, &id)
}

fn teardown(node: &Node, pod: &Pod, id: &str) -> Result<()> {
    node.cri.stop_container(id)?;
    node.cri.remove_container(id)?;
    node.cri.stop_pod(pod)?;
    node.cri.remove_pod(pod)
}

#[test]
fn an_unconverted_image_runs_through_the_fallback() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start()?;
    let plain = node.proxy.image("sample:v1");
    let mounted_before = node.fuse_mounts();
    let (code, out) = node.run(&plain, &["cat", FILES[0], FILES[1]])?;
    assert_eq!((code, out.as_str()), (0, FILES_TEXT));
    assert!(!node.snapshotter.log().contains("lazy layer mounted"));
    assert_eq!(node.fuse_mounts(), mounted_before);
    // Every layer was downloaded whole.
    assert!(node.proxy.counts().blob_bytes >= node.layer_bytes("sample:v1")?);
    Ok(())
}

/// Two pods of one image: the second pull finds the layers committed, mounts nothing new
/// and creates no snapshot but its container's.
#[test]
fn two_pods_of_one_image_share_its_layers() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start()?;
    let first = node.cri.run_pod("first", &node.logs())?;
    node.cri.pull(&node.lazy(), None, Some(&first.config))?;
    let long = node.cri.create_container(
        &first,
        "main",
        &node.lazy(),
        &["/bin/busybox", "sleep", "60"],
    )?;
    node.cri.start_container(&long)?;
    let committed = |node: &Node| -> Result<usize> {
        Ok(node.snapshots()?.iter().filter(|s| s.1 == 3).count())
    };
    let (layers, mounts) = (committed(&node)?, node.fuse_mounts());
    let (code, out) = node.run(&node.lazy(), &["cat", "/app/added/new.txt"])?;
    assert_eq!((code, out.as_str()), (0, "added by layer 2\n"));
    assert_eq!(
        committed(&node)?,
        layers,
        "the second pod added committed snapshots"
    );
    assert_eq!(
        node.fuse_mounts(),
        mounts,
        "the second pod mounted layers again"
    );
    assert_eq!(
        node.snapshotter.log().matches("lazy layer mounted").count(),
        2
    );
    teardown(&node, &first, &long)
}

/// After its pods are gone, RemoveImage takes the image's snapshots, FUSE mounts and
/// directories with it; the pause image's layer is all that stays.
#[test]
fn remove_image_leaves_no_snapshot_mount_or_directory() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start()?;
    let (code, _) = node.run(&node.lazy(), &["true"])?;
    assert_eq!(code, 0);
    let pause_only = 1;
    assert!(node.snapshots()?.len() > pause_only);
    node.cri.remove_image(&node.lazy())?;
    assert!(node.cri.image_status(&node.lazy())?.is_none());
    let left = node.snapshots()?;
    assert_eq!(left.len(), pause_only, "{left:?}");
    assert_eq!(node.fuse_mounts(), 0);
    assert!(
        mounts_under(&node.snapshotter.root).is_empty(),
        "{:?}",
        mounts_under(&node.snapshotter.root)
    );
    let dirs = std::fs::read_dir(node.snapshotter.root.join("snapshots"))?.count();
    assert_eq!(dirs, pause_only);
    Ok(())
}

/// What the kubelet sees of image sizes. ImageStatus's size is containerd's sum of the
/// manifest's descriptors (manifest, config, compressed layers), lazy or not. ImageFsInfo
/// is the sum of Brisk's Usage over CRI's snapshots (a lazy layer holds no bytes of its
/// own: its chunks are in the shared cache) at the path containerd derives for the
/// snapshotter under its own root.
#[test]
fn image_fs_info_and_image_status_are_true_for_brisk() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start()?;
    let (code, _) = node.run(&node.lazy(), &["true"])?;
    assert_eq!(code, 0);
    let (code, _) = node.run(&node.proxy.image("sample:v1"), &["true"])?;
    assert_eq!(code, 0);

    let raw = raw_manifest(&node.registry.image("sample:lazy"))?;
    let manifest: Value = serde_json::from_str(&raw)?;
    let config = manifest["config"]["size"].as_u64().context("config size")?;
    let expected = raw.len() as u64 + config + node.layer_bytes("sample:lazy")?;
    let status = node.cri.image_status(&node.lazy())?.context("no image")?;
    assert_eq!(status.size, expected);
    assert!(node
        .cri
        .list_images()?
        .iter()
        .any(|i| i.id == status.id && i.size == expected));

    let snapshots = node.snapshots()?;
    let lazy: Vec<_> = snapshots.iter().filter(|s| s.2 == 0).collect();
    let bytes: i64 = snapshots.iter().map(|s| s.2).sum();
    let inodes: i64 = snapshots.iter().map(|s| s.3).sum();
    assert_eq!(lazy.len(), 2, "the lazy image's two layers: {snapshots:?}");
    assert!(
        bytes > 1 << 20,
        "the fallback's unpacked layers: {snapshots:?}"
    );
    // CRI refreshes its snapshot stats every `stats_collect_period` (1 s here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let fs = loop {
        let info = node.cri.image_fs_info()?;
        let fs = info
            .image_filesystems
            .first()
            .cloned()
            .context("no image fs")?;
        let used = fs.used_bytes.as_ref().map(|u| u.value as i64);
        let used_inodes = fs.inodes_used.as_ref().map(|u| u.value as i64);
        if (used, used_inodes) == (Some(bytes), Some(inodes)) {
            break fs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ImageFsInfo {fs:?}, snapshots {snapshots:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let mountpoint = fs.fs_id.context("fs id")?.mountpoint;
    assert_eq!(
        Path::new(&mountpoint),
        node.containerd
            .root()
            .join("io.containerd.snapshotter.v1.brisk")
    );
    Ok(())
}
