//! The two daemons of the snapshotter tests, each private to one test: `brisk-snapshotter`
//! with its own root and socket, and `containerd` with its own root, state and socket and a
//! `[proxy_plugins.brisk]` entry pointing at that snapshotter. The benchmarks also run
//! another proxy snapshotter (stargz-snapshotter's daemon) through the same two types.
//!
//! containerd still uses a few fixed paths under `/run/containerd` (shim sockets), so every
//! test uses its own containerd namespace; containers and images get unique names.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::run;
use crate::workspace_root;

/// How long a daemon may take to start answering on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `brisk-snapshotter` binary under test: `BRISK_SNAPSHOTTER_BIN` or the debug build.
pub fn snapshotter_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("BRISK_SNAPSHOTTER_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target/debug/brisk-snapshotter"),
    };
    if !path.is_file() {
        bail!(
            "brisk-snapshotter not found at {} (run `cargo build --bins` first)",
            path.display()
        );
    }
    Ok(path)
}

fn wait_for_socket(path: &Path, child: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "daemon exited with {status}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "daemon did not listen on {} in time; log:\n{}",
        path.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

/// SIGTERM, up to 10 s to exit, then SIGKILL; always reaped.
fn stop(c: Child) {
    stop_with(c, "-TERM");
}

/// `sig`, up to 10 s to exit, then SIGKILL; always reaped.
fn stop_with(mut c: Child, sig: &str) {
    signal(&c, sig);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A running proxy snapshotter daemon: `brisk-snapshotter`, or another program taking the
/// same `--root` and `--address` flags.
pub struct Snapshotter {
    child: Option<Child>,
    program: PathBuf,
    pub root: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
}

impl Snapshotter {
    /// Starts a `brisk-snapshotter` whose state lives under `dir`.
    /// Tests that count registry bytes must not see a background hash's reads: unless a
    /// test chooses (`--verify`), layers are hashed only once their chunks are all local.
    pub fn start(dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let mut args = extra_args.to_vec();
        if !args.contains(&"--verify") {
            args.extend(["--verify", "cached"]);
        }
        Self::start_program(&snapshotter_bin()?, dir, &args)
    }

    /// Starts `program --root DIR/root --address DIR/brisk.sock EXTRA_ARGS`.
    pub fn start_program(program: &Path, dir: &Path, extra_args: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut s = Self {
            child: None,
            program: program.to_owned(),
            root: dir.join("root"),
            socket: dir.join("brisk.sock"),
            log: dir.join("snapshotter.log"),
            extra: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(&self.program)
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .args(&self.extra)
            // BRISK_E2E_LOG sets the daemon's log filter, e.g. `brisk_blobcache=debug,info`.
            .env(
                "RUST_LOG",
                std::env::var("BRISK_E2E_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // The machine's docker config is not the node's: a test's daemon has credentials
            // only from the pulls it serves.
            .env(
                "DOCKER_CONFIG",
                self.root.with_file_name("no-docker-config"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("Starting {}", self.program.display()))?;
        wait_for_socket(&self.socket, &mut child, &self.log)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no unmount, no flush, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "-KILL");
            let _ = c.wait();
        }
    }

    /// SIGTERM (a stop that hands the lazy layers over to the next daemon), and the time
    /// the daemon took to exit.
    pub fn terminate(&mut self) -> Result<Duration> {
        self.stop_by("-TERM")
    }

    /// SIGINT: the clean stop that unmounts everything and stops the holder; the time the
    /// daemon took to exit.
    pub fn stop_clean(&mut self) -> Result<Duration> {
        self.stop_by("-INT")
    }

    fn stop_by(&mut self, sig: &str) -> Result<Duration> {
        let Some(mut c) = self.child.take() else {
            bail!("not running")
        };
        let started = Instant::now();
        signal(&c, sig);
        while started.elapsed() < Duration::from_secs(20) {
            if c.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&c, "-KILL");
        let _ = c.wait();
        bail!("{} ignored {sig} for 20 s", self.program.display())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Starts the daemon again (after `kill9` or `terminate`), same program and flags.
    pub fn respawn(&mut self) -> Result<()> {
        self.spawn()
    }

    /// Starts `program` in the stopped daemon's place, same root, socket and flags: an upgrade.
    pub fn respawn_as(&mut self, program: &Path) -> Result<()> {
        self.program = program.to_owned();
        self.spawn()
    }
}

impl Snapshotter {
    /// The pid of the holder of FUSE connections the daemon started, while it runs.
    pub fn holder_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.root.join("holder.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_with(c, "-INT");
        }
        // The holder outlives daemons by design; not tests.
        if let Some(pid) = self.holder_pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // BRISK_E2E_KEEP_LOGS=DIR keeps every daemon's log after its scratch directory goes.
        if let Some(keep) = std::env::var_os("BRISK_E2E_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let name = format!(
                "snapshotter-{}-{}.log",
                std::process::id(),
                KEPT_LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(&self.log, keep.join(name));
        }
        // Whatever the daemon left mounted under its root must not outlive the test.
        crate::daemons::detach_under(&self.root);
    }
}

/// How many daemon logs `BRISK_E2E_KEEP_LOGS` has kept, to name the next one.
static KEPT_LOGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Lazily unmounts every mount below `dir`, deepest first.
pub fn detach_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
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

/// Mount points currently below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The namespace containerd's CRI plugin keeps pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// How the CRI plugin is set up: a node's settings, with everything it would fetch from the
/// internet pointed at the test's loopback registry instead.
pub struct CriSettings {
    /// The pause image (`host:port/repo:tag`), pushed to a loopback registry beforehand.
    pub sandbox_image: String,
    /// Plain-HTTP registries (`host:port`), written as `certs.d/HOST/hosts.toml`.
    pub plain_http: Vec<String>,
}

impl CriSettings {
    /// The `[plugins."io.containerd.grpc.v1.cri"]` section, and the `certs.d` it names.
    fn config_section(&self, dir: &Path) -> Result<String> {
        let certs = dir.join("certs.d");
        for host in &self.plain_http {
            let host_dir = certs.join(host);
            std::fs::create_dir_all(&host_dir)?;
            std::fs::write(
                host_dir.join("hosts.toml"),
                format!(
                    "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  \
                     capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )?;
        }
        let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
        // Port 0: several containerds may run at once, and the streaming server (exec,
        // attach) is not used here. No CNI config: pods use the host's network. Snapshot
        // stats (ImageFsInfo) are refreshed every second instead of every ten. The pause
        // container's oom_score_adj of -998 is refused on machines where even root lacks
        // CAP_SYS_RESOURCE; restricted, it stays at containerd's own.
        Ok(format!(
            "[plugins]\n  {cri}]\n    sandbox_image = \"{sandbox}\"\n    \
             stream_server_address = \"127.0.0.1\"\n    stream_server_port = \"0\"\n    \
             restrict_oom_score_adj = true\n    \
             stats_collect_period = 1\n  \
             {cri}.containerd]\n    snapshotter = \"brisk\"\n    \
             disable_snapshot_annotations = false\n    default_runtime_name = \"runc\"\n  \
             {cri}.containerd.runtimes.runc]\n    runtime_type = \"io.containerd.runc.v2\"\n  \
             {cri}.cni]\n    bin_dir = \"{cni}/bin\"\n    conf_dir = \"{cni}/conf\"\n  \
             {cri}.registry]\n    config_path = \"{certs}\"\n",
            sandbox = self.sandbox_image,
            cni = dir.join("cni").display(),
            certs = certs.display(),
        ))
    }
}

/// A running private containerd with Brisk (and possibly others) as proxy snapshotters.
pub struct Containerd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub namespace: String,
    dir: PathBuf,
}

impl Containerd {
    /// A containerd whose proxy snapshotter `brisk` is served on `brisk_socket`.
    pub fn start(dir: &Path, brisk_socket: &Path, namespace: &str) -> Result<Self> {
        Self::start_with_snapshotters(dir, &[("brisk", brisk_socket)], namespace)
    }

    /// A containerd with one proxy snapshotter per `(name, socket)`, its CRI plugin off.
    pub fn start_with_snapshotters(
        dir: &Path,
        snapshotters: &[(&str, &Path)],
        namespace: &str,
    ) -> Result<Self> {
        Self::start_config(dir, snapshotters, None, namespace)
    }

    /// A containerd as on a Kubernetes node: its CRI plugin on (serving on containerd's own
    /// socket), pulling and running every image on Brisk. CRI works in the `k8s.io`
    /// namespace whatever a client asks, so `ctr` calls go there too.
    pub fn start_cri(dir: &Path, brisk_socket: &Path, cri: &CriSettings) -> Result<Self> {
        Self::start_config(dir, &[("brisk", brisk_socket)], Some(cri), CRI_NAMESPACE)
    }

    fn start_config(
        dir: &Path,
        snapshotters: &[(&str, &Path)],
        cri: Option<&CriSettings>,
        namespace: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let mut text = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\
             [grpc]\n  address = \"{socket}\"\n[proxy_plugins]\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            disabled = if cri.is_some() {
                ""
            } else {
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
            },
        );
        for (name, address) in snapshotters {
            text += &format!(
                "  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                address.display()
            );
        }
        if let Some(cri) = cri {
            text += &cri.config_section(dir)?;
        }
        std::fs::write(&config, text)?;
        let log_path = dir.join("containerd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("Starting containerd")?;
        wait_for_socket(&socket, &mut child, &log_path)?;
        let c = Self {
            child: Some(child),
            socket,
            namespace: namespace.to_owned(),
            dir: dir.to_owned(),
        };
        // The socket accepts before every plugin is loaded; `version` answers once it is up.
        let deadline = Instant::now() + START_TIMEOUT;
        while c.ctr(&["version"]).is_err() {
            if Instant::now() > deadline {
                bail!("containerd did not answer; log:\n{}", c.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }

    /// containerd's root (`root` in its config): CRI's image filesystem path is under it.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a SOCK -n NS ARGS`, stdout on success.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace)
            .args(args))
    }

    /// `brisk pull IMAGE` into this containerd and namespace, with `extra` arguments.
    pub fn brisk_pull(&self, image: &str, extra: &[&str]) -> Result<String> {
        let socket = self.socket.to_str().context("Non-UTF-8 socket path")?;
        let mut args = vec![
            "pull",
            image,
            "--containerd",
            socket,
            "--namespace",
            &self.namespace,
        ];
        args.extend_from_slice(extra);
        crate::brisk(&args)
    }

    /// Runs `/bin/busybox ARGS` in a new container `id` of `image` on the brisk snapshotter,
    /// removed when it exits; its stdout.
    pub fn run_busybox(&self, image: &str, id: &str, args: &[&str]) -> Result<String> {
        let mut cmd = vec![
            "run",
            "--rm",
            "--snapshotter",
            "brisk",
            image,
            id,
            "/bin/busybox",
        ];
        cmd.extend_from_slice(args);
        self.ctr(&cmd)
    }

    /// Waits until containerd can use the brisk snapshotter again (after a restart its gRPC
    /// connection backs off for a while), by preparing and removing a probe snapshot.
    pub fn wait_for_snapshotter(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        loop {
            n += 1;
            let key = format!("probe-{n}");
            let ok = self
                .ctr(&["snapshots", "--snapshotter", "brisk", "prepare", &key])
                .is_ok();
            let _ = self.ctr(&["snapshots", "--snapshotter", "brisk", "rm", &key]);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("containerd never reached brisk-snapshotter again");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop(c);
        }
        detach_under(&self.dir);
    }
}
