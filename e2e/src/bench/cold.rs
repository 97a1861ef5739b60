//! Cold start: the time from the start of a pull to the first line the container prints,
//! across the emulated WAN, for the three ways of getting `py` running:
//!
//! - (a) overlayfs: `ctr image pull` downloads and unpacks every layer, then `ctr run`;
//! - (b) Brisk, first start: `brisk pull` of the converted image on a snapshotter with an
//!   empty root, then `ctr run` on Brisk;
//! - (c) Brisk with a warm L2: as (b), on a snapshotter that kept the chunk cache (`cache/`)
//!   and the TOCs (`meta/`) of an earlier (b) run, but no images, snapshots or start-up trace.
//!
//! Every run gets a fresh containerd root and a dropped page cache, so nothing is reused that
//! its mode does not name. Traffic is counted at the link from the start of the pull until the
//! container has exited.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::images::PY_CMD;
use super::stack::{
    brisk_pull, brisk_status, ctr, drop_caches, scratch, unique, unused_socket, watch, STEP_TIMEOUT,
};
use super::wan::{Traffic, Wan};
use crate::daemons::{mounts_under, Containerd, Snapshotter};

/// One cold start.
#[derive(Clone, Debug, Serialize)]
pub struct ColdStart {
    /// Start of the pull to the container's `ready`.
    pub seconds: f64,
    /// The pull alone.
    pub pull_seconds: f64,
    pub traffic: Traffic,
    /// `brisk pull --json` (lazy and downloaded layer counts), for the Brisk modes.
    pub pull: Option<Value>,
    /// `brisk status --json` after the run (hits per cache level), for the Brisk modes.
    pub status: Option<Value>,
}

/// What the three modes share in one benchmark run.
pub struct Setup<'a> {
    pub wan: &'a Wan,
    /// Scratch space for daemons' state.
    pub base: &'a Path,
}

impl Setup<'_> {
    fn reference(&self, tag: &str) -> String {
        self.wan.image(&format!("py:{tag}"))
    }

    fn namespace(&self) -> String {
        unique("brisk-bench")
    }

    /// `ctr run --rm` of `image` on `snapshotter`, until it prints `ready`; the instant it did.
    fn run_until_ready(
        &self,
        containerd: &Containerd,
        snapshotter: &str,
        image: &str,
    ) -> Result<Instant> {
        let id = unique("cold");
        let mut args = vec!["run", "--rm", "--snapshotter", snapshotter, image, &id];
        args.extend_from_slice(PY_CMD);
        let out = watch(&mut ctr(containerd, &args), Some("ready"), STEP_TIMEOUT)?;
        out.line_at.context("no ready line")
    }

    /// (a): a full pull into overlayfs, then a run.
    pub fn overlay(&self) -> Result<ColdStart> {
        let dir = scratch(self.base, "overlay-")?;
        let containerd = Containerd::start(
            &dir.path().join("containerd"),
            &unused_socket(dir.path()),
            &self.namespace(),
        )?;
        let image = self.reference("v1");
        drop_caches()?;
        self.wan.reset();
        let started = Instant::now();
        watch(
            &mut ctr(
                &containerd,
                &[
                    "image",
                    "pull",
                    "--plain-http",
                    "--snapshotter",
                    "overlayfs",
                    &image,
                ],
            ),
            None,
            STEP_TIMEOUT,
        )?;
        let pulled = started.elapsed();
        let ready = self.run_until_ready(&containerd, "overlayfs", &image)?;
        Ok(ColdStart {
            seconds: (ready - started).as_secs_f64(),
            pull_seconds: pulled.as_secs_f64(),
            traffic: self.wan.traffic(),
            pull: None,
            status: None,
        })
    }

    /// (b) then (c): a first start on an empty snapshotter root; then, keeping only its chunk
    /// cache and TOCs, a start on a restarted snapshotter. (c) needs (b) to have filled the
    /// cache, so it fails when (b) does.
    pub fn lazy_then_warm(&self) -> (Result<ColdStart>, Result<ColdStart>) {
        let dir = match scratch(self.base, "brisk-") {
            Ok(dir) => dir,
            Err(err) => return (Err(err), Err(anyhow::anyhow!("Not run: (b) failed"))),
        };
        let brisk_dir = dir.path().join("brisk");
        let first = Snapshotter::start(&brisk_dir, &[]).and_then(|s| {
            let result = self.brisk_start(&s, &dir.path().join("containerd-b"), true);
            result.map(|r| (s, r))
        });
        let (snapshotter, lazy) = match first {
            Ok(pair) => pair,
            Err(err) => return (Err(err), Err(anyhow::anyhow!("Not run: (b) failed"))),
        };
        let warm = (|| {
            keep_only_cache(snapshotter)?;
            let s = Snapshotter::start(&brisk_dir, &[])?;
            self.brisk_start(&s, &dir.path().join("containerd-c"), false)
        })();
        (Ok(lazy), warm)
    }

    /// Pull and run on `snapshotter` with a fresh containerd. After a first start (`first`),
    /// the image is removed again, so that only the cache levels keep anything.
    fn brisk_start(
        &self,
        snapshotter: &Snapshotter,
        containerd_dir: &Path,
        first: bool,
    ) -> Result<ColdStart> {
        let containerd = Containerd::start(containerd_dir, &snapshotter.socket, &self.namespace())?;
        let image = self.reference("lazy");
        drop_caches()?;
        self.wan.reset();
        let started = Instant::now();
        let pull = brisk_pull(&containerd, &image)?;
        let pulled = started.elapsed();
        let ready = self
            .run_until_ready(&containerd, "brisk", &image)
            .with_context(|| format!("snapshotter log:\n{}", tail(&snapshotter.log(), 20)))?;
        let traffic = self.wan.traffic();
        let status = brisk_status(&snapshotter.socket).ok();
        if first {
            // The image and its snapshots go; containerd's GC asks Brisk to remove them.
            watch(
                &mut ctr(&containerd, &["images", "rm", "--sync", &image]),
                None,
                STEP_TIMEOUT,
            )?;
            let left = watch(
                &mut ctr(&containerd, &["snapshots", "--snapshotter", "brisk", "ls"]),
                None,
                STEP_TIMEOUT,
            )?;
            ensure!(
                left.stdout.lines().count() <= 1,
                "Snapshots left after removing the image:\n{}",
                left.stdout
            );
        }
        Ok(ColdStart {
            seconds: (ready - started).as_secs_f64(),
            pull_seconds: pulled.as_secs_f64(),
            traffic,
            pull: Some(pull),
            status,
        })
    }
}

/// Stops the snapshotter cleanly (its cache index is flushed) and deletes everything under its
/// root but the chunk cache and the TOC store: metadata (snapshot records and start-up traces)
/// and snapshot directories go.
fn keep_only_cache(snapshotter: Snapshotter) -> Result<()> {
    let mut s = snapshotter;
    s.terminate()?;
    let root = s.root.clone();
    drop(s);
    ensure!(
        mounts_under(&root).is_empty(),
        "Mounts left under the snapshotter root: {:?}",
        mounts_under(&root)
    );
    for entry in std::fs::read_dir(&root)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "cache" || name == "meta" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    ensure!(
        root.join("cache").is_dir(),
        "The first start left no chunk cache to keep"
    );
    Ok(())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
