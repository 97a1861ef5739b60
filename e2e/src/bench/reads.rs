//! Reads of a large file inside a container: `cat FILE > /dev/null` on the 200 MiB file of
//! `big`, timed inside the container, on overlayfs and on Brisk, one containerd and one
//! snapshotter for the whole phase.
//!
//! Each container reads the file twice. On overlayfs the first read follows a dropped page
//! cache (the file comes from disk) and the second finds it in the page cache. On Brisk the
//! first read follows a clean snapshotter restart (L1, in memory, is empty; L2 on disk holds
//! every chunk) and a dropped page cache, and the second again finds the page cache warm.
//! Start-up traces are off in this phase, so no prefetch can serve a read ahead of time. The
//! very first read on Brisk, with nothing cached at all, crosses the link; it is reported for
//! information only.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::images::BIG_FILE_BYTES;
use super::stack::{
    brisk_pull, ctr, drop_caches, restart_clean, scratch, unique, watch, write_no_trace_config,
    STEP_TIMEOUT,
};
use super::wan::{Traffic, Wan};
use crate::daemons::{Containerd, Snapshotter};

/// Times two reads of the file with `cat`, from inside the container. Each figure includes
/// starting `cat`, the same on both filesystems; `spawn` measures that cost on its own (the
/// fastest of five `cat /dev/null`), so the report can show it.
const READ_TWICE: &str = "\
import json, subprocess, time
def timed(path):
    t = time.perf_counter()
    subprocess.run(['cat', path], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t
first = timed('/data/big.bin')
second = timed('/data/big.bin')
spawn = min(timed('/dev/null') for _ in range(5))
print(json.dumps({'first': first, 'second': second, 'spawn': spawn}))";

/// Seconds of the two reads of one container.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct TwoReads {
    pub first: f64,
    pub second: f64,
    /// Starting and ending `cat` with nothing to read.
    pub spawn: f64,
}

pub fn mib_per_sec(seconds: f64) -> f64 {
    (BIG_FILE_BYTES as f64 / (1 << 20) as f64) / seconds
}

/// One Brisk repetition: the reads and what crossed the link meanwhile (none expected).
#[derive(Clone, Debug, Serialize)]
pub struct BriskReads {
    pub reads: TwoReads,
    pub traffic: Traffic,
}

/// The phase's one-off figures, for information.
#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    /// `ctr image pull` of `big:v1` into overlayfs across the link.
    pub overlay_pull_seconds: f64,
    pub overlay_pull_traffic: Traffic,
    /// `brisk pull` of `big:lazy`.
    pub brisk_pull_seconds: f64,
    /// The first container on Brisk: its first read fetched the file across the link.
    pub brisk_network: TwoReads,
    pub brisk_network_traffic: Traffic,
}

/// The daemons of the phase, with `big` pulled into both snapshotters.
pub struct Phase<'a> {
    wan: &'a Wan,
    args: Vec<String>,
    // Fields drop in order: containerd stops first, then the snapshotter, and the directory
    // holding their state goes last.
    containerd: Containerd,
    snapshotter: Option<Snapshotter>,
    dir: tempfile::TempDir,
}

impl<'a> Phase<'a> {
    /// Starts the daemons and pulls `big` both ways; also makes the first, uncached Brisk read.
    pub fn start(wan: &'a Wan, base: &Path) -> Result<(Self, Setup)> {
        let dir = scratch(base, "reads-")?;
        let config = dir.path().join("snapshotter.toml");
        write_no_trace_config(&config)?;
        let args = vec!["--config".to_owned(), config.display().to_string()];
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let snapshotter = Snapshotter::start(&dir.path().join("brisk"), &arg_refs)?;
        let containerd = Containerd::start(
            &dir.path().join("containerd"),
            &snapshotter.socket,
            &unique("brisk-bench"),
        )?;
        let phase = Self {
            wan,
            dir,
            args,
            containerd,
            snapshotter: Some(snapshotter),
        };

        wan.reset();
        let started = Instant::now();
        watch(
            &mut ctr(
                &phase.containerd,
                &[
                    "image",
                    "pull",
                    "--plain-http",
                    "--snapshotter",
                    "overlayfs",
                    &phase.image("v1"),
                ],
            ),
            None,
            STEP_TIMEOUT,
        )?;
        let overlay_pull_seconds = started.elapsed().as_secs_f64();
        let overlay_pull_traffic = wan.traffic();

        let started = Instant::now();
        brisk_pull(&phase.containerd, &phase.image("lazy"))?;
        let brisk_pull_seconds = started.elapsed().as_secs_f64();
        wan.reset();
        let brisk_network = phase.read_twice("brisk", "lazy")?;
        let setup = Setup {
            overlay_pull_seconds,
            overlay_pull_traffic,
            brisk_pull_seconds,
            brisk_network,
            brisk_network_traffic: wan.traffic(),
        };
        Ok((phase, setup))
    }

    fn image(&self, tag: &str) -> String {
        self.wan.image(&format!("big:{tag}"))
    }

    fn read_twice(&self, snapshotter: &str, tag: &str) -> Result<TwoReads> {
        let id = unique("reads");
        let image = self.image(tag);
        let out = watch(
            &mut ctr(
                &self.containerd,
                &[
                    "run",
                    "--rm",
                    "--snapshotter",
                    snapshotter,
                    &image,
                    &id,
                    "python3",
                    "-c",
                    READ_TWICE,
                ],
            ),
            None,
            STEP_TIMEOUT,
        )?;
        let line = out.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("Unexpected output: {}", out.stdout))
    }

    /// overlayfs: a dropped page cache, then a container reading twice.
    pub fn overlay(&self) -> Result<TwoReads> {
        drop_caches()?;
        self.read_twice("overlayfs", "v1")
    }

    /// Brisk: a clean restart (empty L1), a dropped page cache, then a container reading twice.
    pub fn brisk(&mut self) -> Result<BriskReads> {
        let snapshotter = self.snapshotter.take().context("No snapshotter running")?;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let snapshotter = restart_clean(snapshotter, &self.dir.path().join("brisk"), &args)?;
        self.snapshotter = Some(snapshotter);
        self.containerd.wait_for_snapshotter()?;
        drop_caches()?;
        self.wan.reset();
        let reads = self.read_twice("brisk", "lazy")?;
        Ok(BriskReads {
            reads,
            traffic: self.wan.traffic(),
        })
    }
}
