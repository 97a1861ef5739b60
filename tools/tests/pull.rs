//! System test of `brisk pull` against a private containerd and a loopback registry.
//!
//! It unpacks into containerd's built-in `overlayfs` snapshotter, which serves nothing
//! lazily: every layer takes the fallback path (content write, diff apply, commit), and a
//! container run from the result proves the image is complete. Lazy layers need the Brisk
//! snapshotter and are tested with it in `e2e/`.
//!
//! Gated like the e2e tests: without `BRISK_E2E=1` it prints `skipped: …` and passes; with
//! it, a missing prerequisite (root, containerd, runc, docker-registry, skopeo, umoci,
//! busybox-static) fails the test.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use brisk_blobcache::registry::RegistryConfig;
use brisk_blobcache::Digest;
use brisk_tools::pull::{self, PullOptions, PullSummary};

const TOOLS: &[&str] = &[
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "runc",
    "docker-registry",
    "skopeo",
    "umoci",
];
const BUSYBOX: &str = "/bin/busybox";
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn gate() -> bool {
    if std::env::var("BRISK_E2E").as_deref() != Ok("1") {
        println!("skipped: set BRISK_E2E=1 to run system tests (needs root and {TOOLS:?})");
        return false;
    }
    let mut missing = Vec::new();
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        missing.push("running as root".to_owned());
    }
    for tool in TOOLS {
        let on_path = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
        if !on_path {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        missing.push(format!("{BUSYBOX} (package busybox-static)"));
    }
    assert!(
        missing.is_empty(),
        "BRISK_E2E=1 but prerequisites are missing:\n  - {}",
        missing.join("\n  - ")
    );
    true
}

/// Runs `cmd`; panics with its stderr unless it succeeds. Returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A daemon this test started; stopped by its pid when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Self { child, log }
    }

    /// Polls `ready` until it holds; panics with the log if the daemon exits or is too slow.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what} exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{what} not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Daemon {
    /// SIGTERM, up to 10 s to exit, then SIGKILL. Does nothing once the child is reaped, so a
    /// reused pid is never signalled.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn registry_answers(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if conn
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

/// A `docker-registry` on a free loopback port, storing under `dir`.
fn start_registry(dir: &Path) -> (Daemon, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{level: warn}}\n\
             storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
             http: {{addr: 127.0.0.1:{port}}}\n",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(
        Command::new("docker-registry").arg("serve").arg(&config),
        dir.join("registry.log"),
    );
    daemon.wait_until("docker-registry", || registry_answers(port));
    (daemon, port)
}

/// A containerd with its own root, state and socket under `dir`, and no CRI plugin.
struct Containerd {
    socket: PathBuf,
    dir: PathBuf,
    daemon: Daemon,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                dir.join("root").display(),
                dir.join("state").display(),
                socket.display()
            ),
        )
        .unwrap();
        let daemon = Daemon::spawn(
            Command::new("containerd").arg("--config").arg(&config),
            dir.join("containerd.log"),
        );
        let mut c = Self {
            socket,
            dir: dir.to_owned(),
            daemon,
        };
        let socket = c.socket.clone();
        c.daemon
            .wait_until("containerd", || UnixStream::connect(&socket).is_ok());
        // The socket accepts before every plugin is loaded; `version` answers once it is up.
        let ctr_socket = c.socket.clone();
        c.daemon.wait_until("containerd", || {
            Command::new("ctr")
                .arg("-a")
                .arg(&ctr_socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        c
    }

    fn ctr(&self, args: &[&str]) -> String {
        run(Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "default"])
            .args(args))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Stop containerd first, then lift whatever it left mounted under its dirs, deepest
        // first.
        self.daemon.stop();
        let prefix = self.dir.display().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).status();
        }
    }
}

/// Removes a container and its task whatever state a failed test left them in, so no shim
/// or runc state outlives the test.
struct ContainerCleanup<'a> {
    containerd: &'a Containerd,
    id: String,
}

impl Drop for ContainerCleanup<'_> {
    fn drop(&mut self) {
        let ctr = |args: &[&str]| {
            let _ = Command::new("ctr")
                .arg("-a")
                .arg(&self.containerd.socket)
                .args(["-n", "default"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        ctr(&["tasks", "kill", "-s", "SIGKILL", &self.id]);
        ctr(&["tasks", "rm", "-f", &self.id]);
        ctr(&["containers", "rm", &self.id]);
    }
}

/// A two-layer image made with umoci: busybox with `sh`, then a file on top.
fn build_image(dir: &Path) -> String {
    let layout = dir.join("layout");
    let image = format!("{}:app", layout.display());
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    std::fs::set_permissions(
        rootfs.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let repack = || {
        run(Command::new("umoci")
            .args(["repack", "--refresh-bundle", "--image", &image])
            .arg(&bundle));
    };
    repack();
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/greeting"), "from the second layer\n").unwrap();
    repack();
    run(Command::new("umoci").args(["config", "--image", &image, "--config.cmd=/bin/sh"]));
    format!("oci:{image}")
}

/// The chain id of the top layer, computed here from the config's diff ids.
fn top_chain_id(config: &serde_json::Value) -> Digest {
    let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("config has diff_ids")
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(diff_ids.len(), 2, "the test image has two layers");
    let mut chain = diff_ids[0];
    for diff_id in &diff_ids[1..] {
        chain = Digest::sha256(format!("{chain} {diff_id}").as_bytes());
    }
    chain
}

/// Each blob of `ctr content ls` with its labels. Compared as sets: ctr prints labels in map
/// order, and the age column changes by itself.
fn blobs_and_labels(listing: &str) -> BTreeSet<(String, BTreeSet<String>)> {
    listing
        .lines()
        .skip(1)
        .map(|line| {
            let columns: Vec<&str> = line.split('\t').filter(|c| !c.is_empty()).collect();
            let labels = columns.last().unwrap().split(',').map(str::to_owned);
            (columns[0].to_owned(), labels.collect())
        })
        .collect()
}

fn pull(image: &str, containerd: &Containerd) -> PullSummary {
    let opts = PullOptions {
        containerd: containerd.socket.clone(),
        namespace: "default".to_owned(),
        snapshotter: "overlayfs".to_owned(),
        platform: None,
        registry: RegistryConfig::default(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(pull::pull(image, &opts))
        .unwrap_or_else(|e| panic!("pull failed: {:?}\n{}", e, containerd.daemon.log()))
}

#[test]
fn pull_unpacks_into_overlayfs_runs_and_is_idempotent() {
    if !gate() {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (_registry, port) = start_registry(&tmp.path().join("registry"));
    let containerd = Containerd::start(&tmp.path().join("containerd"));

    let layout = build_image(&tmp.path().join("image"));
    let image = format!("127.0.0.1:{port}/app:v1");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &layout,
        &format!("docker://{image}"),
    ]));
    let config: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ])))
    .unwrap();
    let chain = top_chain_id(&config).to_string();

    let first = pull(&image, &containerd);
    println!("first pull: {first}");
    assert_eq!(
        (first.layers, first.downloaded, first.lazy, first.present),
        (2, 2, 0, 0)
    );
    assert!(first.bytes_downloaded > 0);
    assert_eq!(first.chain_id.map(|c| c.to_string()), Some(chain.clone()));

    let images = containerd.ctr(&["images", "ls"]);
    assert!(
        images.lines().any(|l| l.starts_with(&format!("{image} "))),
        "{image} not in:\n{images}"
    );
    assert!(images.contains(&first.digest.to_string()), "{images}");
    let snapshots = containerd.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(
        snapshots.lines().any(|l| l.starts_with(&chain)),
        "{chain} not in:\n{snapshots}"
    );
    assert!(!snapshots.contains("extract-"), "{snapshots}");
    // The config holds the snapshot chain for the garbage collector once the lease is gone.
    let content = containerd.ctr(&["content", "ls"]);
    assert!(
        content.contains(&format!("containerd.io/gc.ref.snapshot.overlayfs={chain}")),
        "{content}"
    );
    let leases = containerd.ctr(&["leases", "ls"]);
    assert_eq!(
        leases.lines().count(),
        1,
        "a lease was left behind:\n{leases}"
    );
    // A synchronous collection now (deleting any lease with `--sync` runs one) must keep
    // every blob and snapshot: the image's labels, not the pull's lease, hold them.
    containerd.ctr(&["leases", "create", "--id", "collect"]);
    containerd.ctr(&["leases", "delete", "--sync", "collect"]);
    assert_eq!(
        containerd.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]),
        snapshots
    );
    assert_eq!(
        blobs_and_labels(&containerd.ctr(&["content", "ls"])),
        blobs_and_labels(&content)
    );

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = format!("brisk-pull-test-{}-{nanos}", std::process::id());
    let _cleanup = ContainerCleanup {
        containerd: &containerd,
        id: id.clone(),
    };
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        &image,
        &id,
        "/bin/busybox",
        "echo",
        "hello",
    ]);
    assert_eq!(out.trim(), "hello");

    let second = pull(&image, &containerd);
    println!("second pull: {second}");
    assert_eq!(
        (
            second.layers,
            second.downloaded,
            second.lazy,
            second.present
        ),
        (2, 0, 0, 2)
    );
    assert_eq!(second.bytes_downloaded, 0);
    assert_eq!(second.digest, first.digest);
    assert_eq!(
        containerd.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]),
        snapshots
    );
    assert_eq!(containerd.ctr(&["images", "ls"]), images);
    assert_eq!(containerd.ctr(&["leases", "ls"]).lines().count(), 1);

    // The top layer is there too: the file only the second layer adds.
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        &image,
        &id,
        "/bin/busybox",
        "cat",
        "/etc/greeting",
    ]);
    assert_eq!(out.trim(), "from the second layer");
    println!("took {:.1}s", started.elapsed().as_secs_f64());
}
