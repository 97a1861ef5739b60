//! The snapshotter daemon's memory: `VmRSS` from `/proc/PID/status` when idle, after `brisk
//! pull` of ten different lazy images (ten FUSE mounts), and after one short container on
//! each of them; plus the peak (`VmHWM`). The daemon runs with its default configuration.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde::Serialize;

use super::images::SMALL_IMAGES;
use super::stack::{
    brisk_pull, ctr, memory_kib, scratch, snapshotter_pid, unique, watch, STEP_TIMEOUT,
};
use super::wan::Wan;
use crate::daemons::{mounts_under, Containerd, Snapshotter};

/// How long the daemon is left alone before each reading, so that work a request started in
/// the background (trace lookups, recordings) is not caught half-way.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub idle_kib: u64,
    /// After pulling `SMALL_IMAGES` lazy images.
    pub pulled_kib: u64,
    /// After one container has run on each.
    pub ran_kib: u64,
    /// Peak RSS over the whole run.
    pub peak_kib: u64,
    /// FUSE mounts under the root once all were pulled.
    pub lazy_mounts: usize,
}

pub fn measure(wan: &Wan, base: &Path) -> Result<Memory> {
    let dir = scratch(base, "memory-")?;
    let snapshotter = Snapshotter::start(&dir.path().join("brisk"), &[])?;
    let containerd = Containerd::start(
        &dir.path().join("containerd"),
        &snapshotter.socket,
        &unique("brisk-bench"),
    )?;
    let pid = snapshotter_pid(&snapshotter)?;
    std::thread::sleep(SETTLE);
    let (idle_kib, _) = memory_kib(pid)?;

    let images: Vec<String> = (0..SMALL_IMAGES)
        .map(|i| wan.image(&format!("small-{i}:lazy")))
        .collect();
    for image in &images {
        brisk_pull(&containerd, image)?;
    }
    let lazy_mounts = mounts_under(&snapshotter.root).len();
    ensure!(
        lazy_mounts >= SMALL_IMAGES,
        "Only {lazy_mounts} lazy mounts after pulling {SMALL_IMAGES} images"
    );
    std::thread::sleep(SETTLE);
    let (pulled_kib, _) = memory_kib(pid)?;

    for image in &images {
        let id = unique("mem");
        watch(
            &mut ctr(
                &containerd,
                &[
                    "run",
                    "--rm",
                    "--snapshotter",
                    "brisk",
                    image,
                    &id,
                    "/bin/cat",
                    "/etc/hostname",
                ],
            ),
            None,
            STEP_TIMEOUT,
        )?;
    }
    std::thread::sleep(SETTLE);
    let (ran_kib, peak_kib) = memory_kib(pid)?;
    Ok(Memory {
        idle_kib,
        pulled_kib,
        ran_kib,
        peak_kib,
        lazy_mounts,
    })
}
