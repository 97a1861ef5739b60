//! Running containers survive the snapshotter's death (issue 15): containers that stream a
//! large file, read many small files in a scattered order, and keep opening new files, all
//! lazily and through a registry slow enough that reads are in flight, keep running while
//! the daemon is killed with SIGKILL and restarted, stopped with SIGTERM and restarted, and
//! replaced by another binary; each finishes with the right sha256 of what it read. Also: a
//! second daemon on a live root refuses and the first keeps serving; a killed daemon whose
//! cache index is damaged starts again and serves.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use brisk_blobcache::Digest;
use brisk_e2e::daemons::{mounts_under, snapshotter_bin, Containerd, Snapshotter};
use brisk_e2e::{brisk, push_image, snapshotter_gate, Fault, Injection, Proxy, Registry};
use tempfile::TempDir;

use brisk_e2e::image::seeded_bytes;

use crate::hostile::{layout, tar_dir, Lazy};

const SMALL_FILES: usize = 160;
const BIG: usize = 24 << 20;

/// Image `n`: busybox, one large file and many small ones, each file distinct (and distinct
/// from other images', so no image's reads are cache hits for another).
fn image_tar(dir: &std::path::Path, n: u64) -> Result<Vec<u8>> {
    let root = dir.join(format!("rootfs-{n}"));
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("data/small"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    std::fs::write(root.join("data/big"), big(n))?;
    for i in 0..SMALL_FILES {
        std::fs::write(root.join(format!("data/small/{i}")), small(n, i))?;
    }
    tar_dir(&root)
}

fn big(n: u64) -> Vec<u8> {
    seeded_bytes(BIG, 1_000_000 + n)
}

fn small(n: u64, i: usize) -> Vec<u8> {
    seeded_bytes(3000 + i * 97, n * 10_000 + i as u64)
}

fn sha256_hex(data: &[u8]) -> String {
    Digest::sha256(data).hex()
}

/// A scattered order of the small files: each visited once.
fn scattered() -> Vec<usize> {
    (0..SMALL_FILES)
        .map(|i| (i * 37 + 11) % SMALL_FILES)
        .collect()
}

/// The three workloads on image `n`: the shell script each runs, and the sha256 it must
/// print.
fn workloads(n: u64) -> Vec<(&'static str, String, String)> {
    let small = |i: usize| small(n, i);
    let scattered_bytes: Vec<u8> = scattered().into_iter().flat_map(small).collect();
    let sequential: Vec<u8> = (0..SMALL_FILES).flat_map(small).collect();
    let list = |order: Vec<usize>| {
        order
            .iter()
            .map(|i| format!("/data/small/{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    vec![
        (
            "stream",
            // Slowly, so the read spans the daemon's death.
            "dd if=/data/big bs=65536 2>/dev/null | sha256sum".to_owned(),
            sha256_hex(&big(n)),
        ),
        (
            "scattered",
            format!(
                "for f in {}; do cat $f; sleep 0.02; done | sha256sum",
                list(scattered())
            ),
            sha256_hex(&scattered_bytes),
        ),
        (
            "opening",
            format!(
                "for f in {}; do cat $f; sleep 0.05; done | sha256sum",
                list((0..SMALL_FILES).collect())
            ),
            sha256_hex(&sequential),
        ),
    ]
}

struct Node {
    containerd: Containerd,
    snapshotter: Snapshotter,
    proxy: Proxy,
    _registry: Registry,
    tmp: TempDir,
}

impl Node {
    /// A node with `images` lazy images pulled, `restart-0:lazy` and on.
    fn start(images: u64) -> Result<Self> {
        // Off: the background hash of a layer would fetch what the workloads are to read.
        Self::start_with(images, &["--verify", "off"])
    }

    fn start_with(images: u64, snapshotter_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let registry = Registry::start()?;
        for n in 0..images {
            let layer = Lazy::convert(&image_tar(tmp.path(), n)?)?;
            let oci = layout(
                &tmp.path().join(format!("layout-{n}")),
                "t",
                &layer,
                &layer.annotations(),
                &layer.diff_id,
            )?;
            push_image(&oci, &registry.image(&format!("restart-{n}:lazy")))?;
        }
        let proxy = Proxy::start(&registry.addr())?;
        let snapshotter = Snapshotter::start(&tmp.path().join("brisk"), snapshotter_args)?;
        let containerd = Containerd::start(
            &tmp.path().join("containerd"),
            &snapshotter.socket,
            &format!("restart-{}", std::process::id()),
        )?;
        for n in 0..images {
            containerd.brisk_pull(&proxy.image(&format!("restart-{n}:lazy")), &[])?;
        }
        Ok(Self {
            containerd,
            snapshotter,
            proxy,
            _registry: registry,
            tmp,
        })
    }

    /// Starts every workload on image `n` in a container of its own; they run until done.
    fn start_workloads(&self, n: u64, round: &str) -> Result<Vec<(String, String, Child)>> {
        let image = self.proxy.image(&format!("restart-{n}:lazy"));
        let mut out = Vec::new();
        for (name, script, want) in workloads(n) {
            let id = format!("{name}-{round}-{}", std::process::id());
            let child = Command::new("ctr")
                .arg("-a")
                .arg(&self.containerd.socket)
                .args(["-n", &self.containerd.namespace])
                .args(["run", "--rm", "--snapshotter", "brisk", &image, &id])
                .args(["/bin/busybox", "sh", "-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            out.push((name.to_owned(), want, child));
        }
        Ok(out)
    }

    fn wait_for_reads_in_flight(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.proxy.counts().blob_requests < 1 {
            ensure!(Instant::now() < deadline, "the workloads never read");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(1000));
        Ok(())
    }
}

/// Waits for every workload; each must exit 0 having printed its sha256.
fn finish(workloads: Vec<(String, String, Child)>, log: impl Fn() -> String) -> Result<()> {
    for (name, want, child) in workloads {
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.split_whitespace().next() == Some(want.as_str()),
            "workload {name}: status {:?}, stdout {stdout:?}, stderr {:?}; snapshotter log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            log()
        );
    }
    Ok(())
}

#[test]
fn issue_15_running_containers_survive_kill_restart_and_upgrade() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let rounds = ["kill-1", "kill-2", "term", "upgrade"];
    let mut node = Node::start(rounds.len() as u64)?;
    // Every chunk takes a while to come: reads are in flight when the daemon dies.
    node.proxy
        .inject(Injection::blobs(Fault::Delay(Duration::from_millis(800))));
    let upgraded = node.tmp.path().join("brisk-snapshotter-next");
    std::fs::copy(snapshotter_bin()?, &upgraded)?;

    for (n, round) in rounds.into_iter().enumerate() {
        node.proxy.reset_counts();
        let running = node.start_workloads(n as u64, round)?;
        if let Err(err) = node.wait_for_reads_in_flight() {
            finish(running, || node.snapshotter.log())?;
            return Err(err);
        }
        let holder = node.snapshotter.holder_pid().context("a holder runs")?;
        match round {
            "term" => {
                node.snapshotter.terminate()?;
                node.snapshotter.respawn()?;
            }
            "upgrade" => {
                node.snapshotter.terminate()?;
                node.snapshotter.respawn_as(&upgraded)?;
            }
            _ => {
                node.snapshotter.kill9();
                node.snapshotter.respawn()?;
            }
        }
        let log = node.snapshotter.log();
        ensure!(
            log.contains("lazy layer taken over"),
            "round {round}: nothing was taken over:\n{log}"
        );
        ensure!(
            node.snapshotter.holder_pid() == Some(holder),
            "round {round}: the holder was replaced"
        );
        finish(running, || node.snapshotter.log())?;
    }
    // A clean stop still unmounts everything and stops the holder.
    let holder = node.snapshotter.holder_pid();
    node.snapshotter.stop_clean()?;
    ensure!(
        mounts_under(&node.snapshotter.root).is_empty(),
        "{:?}",
        mounts_under(&node.snapshotter.root)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
        if Instant::now() > deadline {
            bail!("the holder did not stop with a clean stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn issue_15_running_containers_survive_a_kill_while_a_prefetch_is_in_flight() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    // The background hash reads the whole layer at prefetch priority, from its mount on.
    let mut node = Node::start_with(1, &["--verify", "background", "--verify-delay-secs", "0"])?;
    node.proxy
        .inject(Injection::blobs(Fault::Delay(Duration::from_millis(800))));
    node.proxy.reset_counts();
    let running = node.start_workloads(0, "prefetching")?;
    node.wait_for_reads_in_flight()?;
    node.snapshotter.kill9();
    node.snapshotter.respawn()?;
    finish(running, || node.snapshotter.log())?;
    // The successor takes the unfinished hash up again and completes it.
    let socket = node
        .snapshotter
        .socket
        .to_str()
        .context("socket")?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&brisk(&["status", "--snapshotter", &socket, "--json"])?)?;
        if status["verify"]["proven"] == 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the layer was never proven after the restart: {status}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

#[test]
fn issue_15_a_second_daemon_on_a_live_root_refuses_and_the_first_keeps_serving() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let node = Node::start(1)?;
    let second = Command::new(snapshotter_bin()?)
        .arg("--root")
        .arg(&node.snapshotter.root)
        .arg("--address")
        .arg(node.tmp.path().join("second.sock"))
        .output()?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second daemon started");
    assert!(stderr.contains("another brisk-snapshotter"), "{stderr}");
    let running = node.start_workloads(0, "after-refusal")?;
    finish(running, || node.snapshotter.log())?;
    Ok(())
}

#[test]
fn issue_15_a_killed_daemon_with_a_damaged_cache_index_starts_and_serves() -> Result<()> {
    if !snapshotter_gate() {
        return Ok(());
    }
    let mut node = Node::start(1)?;
    node.snapshotter.kill9();
    // The cache index (sled) torn: every file of its database overwritten with garbage.
    let index = node.snapshotter.root.join("cache/index");
    let mut damaged = 0;
    for entry in walk(&index)? {
        std::fs::write(&entry, b"\x00garbage")?;
        damaged += 1;
    }
    ensure!(
        damaged > 0,
        "no index files found under {}",
        index.display()
    );
    node.snapshotter.respawn()?;
    let running = node.start_workloads(0, "after-damage")?;
    finish(running, || node.snapshotter.log())?;
    let socket = node.snapshotter.socket.to_str().context("socket")?;
    brisk(&["status", "--snapshotter", socket])?;
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}
