//! Cold start: the time from the start of a pull until a workload's container is ready
//! (`py`'s first line in `cold-start`; any `workload` in `compare`), across the emulated
//! link, for the ways of getting it running:
//!
//! - (a) overlayfs: `ctr image pull` downloads and unpacks every layer, then `ctr run`;
//! - (b) Brisk, first start: `brisk pull` of the converted image on a snapshotter with an
//!   empty root, then `ctr run` on Brisk; the daemon records a start-up trace, which is
//!   exported for (d) and for the bake of (e);
//! - (c) Brisk with a warm L2: as (b), on a snapshotter that kept the chunk cache (`cache/`)
//!   and the TOCs (`meta/`) of the (b) of the same repetition, but no images, snapshots or
//!   start-up trace; optionally followed by a hot start, the same image again on the same
//!   daemons with the page cache kept;
//! - (d) and (e), Brisk prefetching from a trace on an empty root, are in `prefetch`;
//! - overlayfs with the image local: pulled and unpacked beforehand, then a run with the page
//!   cache dropped (the baseline of a warm host) and one with it kept (hot).
//!
//! Every run gets a fresh containerd root and a dropped page cache, so nothing is reused that
//! its mode does not name. Traffic is counted at the link from the start of the pull until the
//! container has exited. Setting up a mode (starting daemons, moving a trace) is not timed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::stack::{
    brisk_pull, brisk_status, ctr, drop_caches, memory_kib, scratch, unique, unused_socket, watch,
    STEP_TIMEOUT,
};
use super::wan::{Traffic, Wan};
use super::workload::Workload;
use crate::daemons::{mounts_under, Containerd, Snapshotter};
use crate::registry::Registry;

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
    /// `brisk status --json` after the run (hits per cache level, chunks fetched on demand
    /// and by prefetch), for the Brisk modes.
    pub status: Option<Value>,
    /// The `brisk trace ls --json` entry of the trace involved: the one (b) recorded, or the
    /// one (d) was given.
    pub trace: Option<Value>,
    /// `VmRSS` of the snapshotter daemon right after the run, for the Brisk modes.
    pub rss_kib: Option<u64>,
}

/// Whether a start begins with a dropped page cache (every cold and warm start) or with
/// whatever the run before it left in memory (a hot start).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PageCache {
    Drop,
    Keep,
}

/// What the modes share in one benchmark run.
pub struct Setup<'a> {
    pub wan: &'a Wan,
    /// The registry itself, for what is not measured: exporting a trace, baking one in.
    pub registry: &'a Registry,
    /// Scratch space for daemons' state.
    pub base: &'a Path,
    /// The config every Brisk snapshotter of this measurement starts with (`SNAPSHOTTER_CONFIG`).
    pub config: PathBuf,
    /// What is started, from which repository.
    pub workload: Workload,
}

/// A recording ends one second after the last read instead of five, so that (b) hands its
/// trace to (d) sooner. The start of `py` reads without a pause that long, so the recording
/// still covers all of it (every chunk (b) fetched is in the trace).
const SNAPSHOTTER_CONFIG: &str = "[trace]\nquiet_secs = 1\n";

/// What (b) leaves for the modes after it in the same repetition.
pub struct FirstStart {
    /// Holds the snapshotter directory (its root) until the repetition ends.
    _dir: tempfile::TempDir,
    brisk_dir: PathBuf,
    /// Whether the root was reduced to the chunk cache and TOCs, for (c).
    kept_cache: Result<()>,
    /// The trace (b) recorded, for (d) and the bake.
    pub trace: Result<RecordedTrace>,
}

/// A start-up trace exported to a file.
pub struct RecordedTrace {
    pub file: PathBuf,
    /// The daemon's `brisk trace ls --json` entry for it (chunks, files, duration).
    pub listing: Value,
}

impl<'a> Setup<'a> {
    pub fn new(
        wan: &'a Wan,
        registry: &'a Registry,
        base: &'a Path,
        workload: Workload,
    ) -> Result<Self> {
        let config = base.join("brisk.toml");
        std::fs::write(&config, SNAPSHOTTER_CONFIG)?;
        Ok(Self {
            wan,
            registry,
            base,
            config,
            workload,
        })
    }

    /// `NAME:TAG` of this workload's image, across the link.
    pub fn reference(&self, tag: &str) -> String {
        self.wan.image(&format!("{}:{tag}", self.workload.name))
    }

    pub fn namespace(&self) -> String {
        unique("brisk-bench")
    }

    /// A snapshotter with this measurement's config, its state under `dir`.
    pub(super) fn snapshotter(&self, dir: &Path) -> Result<Snapshotter> {
        let config = self.config.to_str().context("Config path is not UTF-8")?;
        Snapshotter::start(dir, &["--config", config])
    }

    /// A containerd of its own for an overlayfs mode, its state in a scratch directory.
    fn overlay_containerd(&self, prefix: &str) -> Result<(tempfile::TempDir, Containerd)> {
        let dir = scratch(self.base, prefix)?;
        let containerd = Containerd::start(
            &dir.path().join("containerd"),
            &unused_socket(dir.path()),
            &self.namespace(),
        )?;
        Ok((dir, containerd))
    }

    /// `ctr image pull` of `image` into overlayfs: download and unpack every layer.
    fn overlay_pull(containerd: &Containerd, image: &str) -> Result<()> {
        let args = [
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            image,
        ];
        watch(&mut ctr(containerd, &args), None, STEP_TIMEOUT)?;
        Ok(())
    }

    /// (a): a full pull into overlayfs, then a run.
    pub fn overlay(&self) -> Result<ColdStart> {
        let (_dir, containerd) = self.overlay_containerd("overlay-")?;
        let image = self.reference("v1");
        drop_caches()?;
        self.wan.reset();
        let started = Instant::now();
        Self::overlay_pull(&containerd, &image)?;
        let pulled = started.elapsed();
        let ready = self
            .workload
            .start_until_ready(&containerd, "overlayfs", &image)?;
        Ok(ColdStart {
            seconds: (ready - started).as_secs_f64(),
            pull_seconds: pulled.as_secs_f64(),
            traffic: self.wan.traffic(),
            pull: None,
            status: None,
            trace: None,
            rss_kib: None,
        })
    }

    /// The baseline of a warm host: the image pulled into overlayfs beforehand (not timed),
    /// the page cache dropped, then a run; and right after it, a second run with the page
    /// cache kept (overlayfs hot).
    pub fn overlay_local_then_hot(&self) -> (Result<ColdStart>, Result<ColdStart>) {
        let image = self.reference("v1");
        let local = self
            .overlay_containerd("overlay-local-")
            .and_then(|(dir, containerd)| {
                Self::overlay_pull(&containerd, &image)?;
                let local = self.overlay_run(&containerd, &image, PageCache::Drop)?;
                Ok((local, dir, containerd))
            });
        match local {
            Ok((local, _dir, containerd)) => {
                let hot = self.overlay_run(&containerd, &image, PageCache::Keep);
                (Ok(local), hot)
            }
            Err(err) => {
                let hot = Err(anyhow::anyhow!("Not run: {err:#}"));
                (Err(err), hot)
            }
        }
    }

    /// A run of `image`, already in `containerd`'s overlayfs snapshots.
    fn overlay_run(
        &self,
        containerd: &Containerd,
        image: &str,
        page_cache: PageCache,
    ) -> Result<ColdStart> {
        if page_cache == PageCache::Drop {
            drop_caches()?;
        }
        self.wan.reset();
        let started = Instant::now();
        let ready = self
            .workload
            .start_until_ready(containerd, "overlayfs", image)?;
        Ok(ColdStart {
            seconds: (ready - started).as_secs_f64(),
            pull_seconds: 0.0,
            traffic: self.wan.traffic(),
            pull: None,
            status: None,
            trace: None,
            rss_kib: None,
        })
    }

    /// (b): a first start on an empty snapshotter root. Afterwards the recorded trace is
    /// exported, the image removed and the snapshotter stopped with only its chunk cache and
    /// TOCs left, for (c). Without the (b) figure nothing is left for the others.
    pub fn lazy(&self) -> (Result<ColdStart>, Option<FirstStart>) {
        let dir = match scratch(self.base, "brisk-") {
            Ok(dir) => dir,
            Err(err) => return (Err(err), None),
        };
        let brisk_dir = dir.path().join("brisk");
        let snapshotter = match self.snapshotter(&brisk_dir) {
            Ok(s) => s,
            Err(err) => return (Err(err), None),
        };
        let containerd = Containerd::start(
            &dir.path().join("containerd-b"),
            &snapshotter.socket,
            &self.namespace(),
        );
        let lazy = containerd.and_then(|c| {
            let cold = self.brisk_start(&snapshotter, &c, "lazy", PageCache::Drop)?;
            Ok((cold, c))
        });
        let (mut cold, containerd) = match lazy {
            Ok(pair) => pair,
            Err(err) => return (Err(err), None),
        };
        let trace =
            super::prefetch::export_trace(self, &snapshotter, &dir.path().join("trace.json"));
        if let Ok(t) = &trace {
            cold.trace = Some(t.listing.clone());
        }
        let kept_cache = remove_image(&containerd, &self.reference("lazy")).and_then(|()| {
            drop(containerd);
            keep_only_cache(snapshotter)
        });
        (
            Ok(cold),
            Some(FirstStart {
                _dir: dir,
                brisk_dir,
                kept_cache,
                trace,
            }),
        )
    }

    /// (c): after (b), the snapshotter started again on the root (b) left.
    pub fn warm(&self, first: Option<&FirstStart>) -> Result<ColdStart> {
        self.warm_then_hot(first, false).0
    }

    /// (c), and if `hot`, right after it a second start of the same image on the same
    /// daemons with the page cache kept: everything a start needs is already on the host.
    pub fn warm_then_hot(
        &self,
        first: Option<&FirstStart>,
        hot: bool,
    ) -> (Result<ColdStart>, Option<Result<ColdStart>>) {
        let daemons = first.context("Not run: (b) failed").and_then(|first| {
            if let Err(err) = &first.kept_cache {
                bail!("Not run: the cache of (b) could not be kept: {err:#}");
            }
            let snapshotter = self.snapshotter(&first.brisk_dir)?;
            let containerd = Containerd::start(
                &first.brisk_dir.with_file_name("containerd-c"),
                &snapshotter.socket,
                &self.namespace(),
            )?;
            Ok((snapshotter, containerd))
        });
        let (snapshotter, containerd) = match daemons {
            Ok(d) => d,
            Err(err) => {
                let hot = hot.then(|| Err(anyhow::anyhow!("Not run: {err:#}")));
                return (Err(err), hot);
            }
        };
        let warm = self.brisk_start(&snapshotter, &containerd, "lazy", PageCache::Drop);
        let hot = hot.then(|| match &warm {
            Ok(_) => self.brisk_start(&snapshotter, &containerd, "lazy", PageCache::Keep),
            Err(_) => Err(anyhow::anyhow!("Not run: the warm start before it failed")),
        });
        (warm, hot)
    }

    /// Pulls `NAME:TAG` into `containerd` and runs it on `snapshotter`: the timed part of every
    /// Brisk mode. The link's counters are reset first, and the page cache dropped unless
    /// `page_cache` keeps it.
    pub(super) fn brisk_start(
        &self,
        snapshotter: &Snapshotter,
        containerd: &Containerd,
        tag: &str,
        page_cache: PageCache,
    ) -> Result<ColdStart> {
        let image = self.reference(tag);
        if page_cache == PageCache::Drop {
            drop_caches()?;
        }
        self.wan.reset();
        let started = Instant::now();
        let pull = brisk_pull(containerd, &image)?;
        let pulled = started.elapsed();
        let ready = self
            .workload
            .start_until_ready(containerd, "brisk", &image)
            .with_context(|| format!("snapshotter log:\n{}", tail(&snapshotter.log(), 20)))?;
        let traffic = self.wan.traffic();
        let status = brisk_status(&snapshotter.socket).ok();
        let rss_kib = snapshotter
            .pid()
            .and_then(|pid| memory_kib(pid).ok())
            .map(|(rss, _)| rss);
        Ok(ColdStart {
            seconds: (ready - started).as_secs_f64(),
            pull_seconds: pulled.as_secs_f64(),
            traffic,
            pull: Some(pull),
            status,
            trace: None,
            rss_kib,
        })
    }
}

/// Removes `image` from `containerd` and checks that its snapshots went too (containerd's GC
/// asks Brisk to remove them), so that only the cache levels keep anything.
fn remove_image(containerd: &Containerd, image: &str) -> Result<()> {
    watch(
        &mut ctr(containerd, &["images", "rm", "--sync", image]),
        None,
        STEP_TIMEOUT,
    )?;
    let left = watch(
        &mut ctr(containerd, &["snapshots", "--snapshotter", "brisk", "ls"]),
        None,
        STEP_TIMEOUT,
    )?;
    ensure!(
        left.stdout.lines().count() <= 1,
        "Snapshots left after removing the image:\n{}",
        left.stdout
    );
    Ok(())
}

/// Stops the snapshotter cleanly (its cache index is flushed) and deletes everything under its
/// root but the chunk cache and the TOC store: metadata (snapshot records and start-up traces)
/// and snapshot directories go.
fn keep_only_cache(snapshotter: Snapshotter) -> Result<()> {
    let mut s = snapshotter;
    s.stop_clean()?;
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
