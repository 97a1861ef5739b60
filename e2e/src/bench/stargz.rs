//! stargz-snapshotter, the peer the comparison measures Brisk against: building its daemon
//! (`e2e/stargz/build.sh`), converting a workload's image to eStargz with `ctr-remote`
//! (plain and optimized with the workload's own start), and one timed start of such an image
//! on a fresh daemon behind the same link as every other mode.
//!
//! The daemon runs with the library's defaults: the registry sits on a loopback address, which
//! it contacts over plain HTTP without any setting. Its layer caches never outlive the
//! process, so every start gets a new daemon and a new containerd (as its notes require), and a
//! start is checked to have mounted its layers lazily: a silent fall-back to a full download is
//! reported as such, never as a lazy start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::cold::{ColdStart, Setup};
use super::images::layer_bytes;
use super::stack::{
    ctr, ctr_like, drop_caches, memory_kib, scratch, unique, unused_socket, watch, STEP_TIMEOUT,
};
use super::workload::{free_port, Ready, Workload};
use crate::cmd::run;
use crate::daemons::{Containerd, Snapshotter};
use crate::registry::{answers_200, Registry};
use crate::workspace_root;

/// The proxy plugin name containerd knows the daemon by.
const PLUGIN: &str = "stargz";

/// Tags of the converted images: `ctr-remote image convert --estargz` and `image optimize`.
pub const LAZY_TAG: &str = "esgz";
pub const OPTIMIZED_TAG: &str = "esgz-opt";

/// The built daemon and what it was built from.
#[derive(Clone, Debug, Serialize)]
pub struct Daemon {
    #[serde(skip)]
    pub bin: PathBuf,
    /// `name: version` lines `build.sh` prints (Go, the library, containerd's library,
    /// ctr-remote).
    pub versions: Vec<String>,
    /// The effective service config (`--print-config`): the library's defaults.
    pub config: String,
}

/// Builds the daemon into `out` (a no-op when it is up to date).
pub fn build(out: &Path) -> Result<Daemon> {
    let script = workspace_root().join("e2e/stargz/build.sh");
    let printed = run(Command::new("bash").arg(&script).arg(out))
        .context("Building stargz-snapshotter's daemon (e2e/stargz/build.sh)")?;
    let versions = printed
        .lines()
        .filter(|l| !l.starts_with("binary:") && !l.starts_with("built ") && l.contains(':'))
        .filter(|l| !l.starts_with("up to date"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let bin = out.join("containerd-stargz-grpc");
    let config = run(Command::new(&bin).arg("--print-config"))
        .context("Printing the daemon's effective config")?;
    Ok(Daemon {
        bin,
        versions,
        config,
    })
}

/// The two eStargz images of one workload, made once per run before any measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Conversions {
    /// `ctr-remote image convert --estargz --oci`, including its push.
    pub convert_seconds: f64,
    pub lazy_bytes: u64,
    /// `ctr-remote image optimize --oci` (runs the workload), including its push.
    pub optimize_seconds: f64,
    pub optimized_bytes: u64,
    /// The `optimize` command line, with the registry's address left out.
    pub optimize_command: String,
}

/// Converts `NAME:v1` to `NAME:esgz` and `NAME:esgz-opt` on `registry`, through a containerd
/// of its own (overlayfs only), directly on the registry: setup, not measured.
pub fn convert(registry: &Registry, base: &Path, workload: &Workload) -> Result<Conversions> {
    let dir = scratch(base, "stargz-convert-")?;
    let containerd = Containerd::start(
        &dir.path().join("containerd"),
        &unused_socket(dir.path()),
        &unique("stargz-convert"),
    )?;
    let image = |tag: &str| registry.image(&format!("{}:{tag}", workload.name));
    let (source, lazy, optimized) = (image("v1"), image(LAZY_TAG), image(OPTIMIZED_TAG));
    let step = |cmd: &mut Command| watch(cmd, None, STEP_TIMEOUT).map(drop);
    step(&mut ctr(
        &containerd,
        &["image", "pull", "--plain-http", &source],
    ))?;

    let started = Instant::now();
    step(&mut ctr_like(
        "ctr-remote",
        &containerd,
        &["image", "convert", "--estargz", "--oci", &source, &lazy],
    ))
    .context("ctr-remote image convert --estargz")?;
    step(&mut ctr(
        &containerd,
        &["image", "push", "--plain-http", &lazy],
    ))?;
    let convert_seconds = started.elapsed().as_secs_f64();

    let period = workload.optimize_secs.to_string();
    let port = format!("PORT={}", free_port()?);
    let mut args = vec!["image", "optimize", "--oci", "--period", &period];
    if let Ready::Http = workload.ready {
        args.extend(["--net-host", "--env", &port]);
    }
    args.extend([source.as_str(), optimized.as_str()]);
    let optimize_command =
        format!("ctr-remote {}", args.join(" ")).replace(&registry.addr(), "REGISTRY");
    let started = Instant::now();
    optimize(&containerd, &args, workload, &port).context("ctr-remote image optimize")?;
    step(&mut ctr(
        &containerd,
        &["image", "push", "--plain-http", &optimized],
    ))?;
    let optimize_seconds = started.elapsed().as_secs_f64();
    Ok(Conversions {
        convert_seconds,
        lazy_bytes: layer_bytes(&lazy)?.1,
        optimize_seconds,
        optimized_bytes: layer_bytes(&optimized)?.1,
        optimize_command,
    })
}

/// Runs `ctr-remote ARGS` (an optimize). A server workload is also asked `GET /` while it
/// is watched, so that what answering a request reads is recorded along with its start.
fn optimize(containerd: &Containerd, args: &[&str], workload: &Workload, port: &str) -> Result<()> {
    let mut cmd = ctr_like("ctr-remote", containerd, args);
    let Ready::Http = workload.ready else {
        return watch(&mut cmd, None, STEP_TIMEOUT).map(drop);
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let addr = format!("127.0.0.1:{}", port.trim_start_matches("PORT="));
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut answered = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            // Only this child, by its pid.
            let _ = child.kill();
            bail!("ctr-remote image optimize took longer than {STEP_TIMEOUT:?}");
        }
        if !answered {
            answered = answers_200(&addr, "/");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output()?;
    if !status.success() {
        bail!(
            "ctr-remote image optimize failed ({status}):\n{}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    if !answered {
        bail!("The server never answered on {addr} while optimize watched it");
    }
    Ok(())
}

/// How many of an image's layers the daemon mounted lazily (FUSE), found after the run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Laziness {
    pub lazy_layers: usize,
    pub layers: usize,
}

impl Laziness {
    /// Every layer was served lazily.
    pub fn all(&self) -> bool {
        self.layers > 0 && self.lazy_layers >= self.layers
    }
}

/// One timed start of `NAME:TAG` on a fresh stargz daemon and containerd, across the link:
/// `ctr-remote image rpull`, then `ctr run --snapshotter stargz` until ready. The page cache
/// is dropped and the link's counters reset first.
pub fn start(setup: &Setup, daemon: &Daemon, tag: &str) -> Result<(ColdStart, Laziness)> {
    let dir = scratch(setup.base, "stargz-")?;
    // Declared first, so dropped last: containerd stops before the daemon unmounts layers.
    let stargz = Snapshotter::start_program(&daemon.bin, &dir.path().join("stargz"), &[])?;
    let containerd = Containerd::start_with_snapshotters(
        &dir.path().join("containerd"),
        &[(PLUGIN, &stargz.socket)],
        &setup.namespace(),
    )?;
    let image = setup.reference(tag);
    let layers = layer_bytes(
        &setup
            .registry
            .image(&format!("{}:{tag}", setup.workload.name)),
    )?
    .0;
    drop_caches()?;
    setup.wan.reset();
    let started = Instant::now();
    watch(
        &mut ctr_like(
            "ctr-remote",
            &containerd,
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                PLUGIN,
                &image,
            ],
        ),
        None,
        STEP_TIMEOUT,
    )?;
    let pulled = started.elapsed();
    let ready = setup
        .workload
        .start_until_ready(&containerd, PLUGIN, &image)
        .with_context(|| {
            format!(
                "stargz daemon log:\n{}",
                super::cold::tail(&stargz.log(), 20)
            )
        })?;
    let traffic = setup.wan.traffic();
    let rss_kib = stargz
        .pid()
        .and_then(|pid| memory_kib(pid).ok())
        .map(|(rss, _)| rss);
    let laziness = Laziness {
        lazy_layers: fuse_mounts_under(&stargz.root),
        layers,
    };
    Ok((
        ColdStart {
            seconds: (ready - started).as_secs_f64(),
            pull_seconds: pulled.as_secs_f64(),
            traffic,
            pull: None,
            status: None,
            trace: None,
            rss_kib,
        },
        laziness,
    ))
}

/// FUSE mounts below `dir`: the layers a stargz daemon serves lazily (one per layer; a
/// layer it could not serve lazily is an ordinary directory instead).
fn fuse_mounts_under(dir: &Path) -> usize {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&prefix)))
        // The filesystem type follows the " - " separator.
        .filter(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, rest)| rest.starts_with("fuse"))
        })
        .count()
}
