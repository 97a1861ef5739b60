//! (d) and (e): cold starts of `py` on a snapshotter with an empty root (empty L1 and L2) that
//! prefetches from a start-up trace as soon as `Prepare` sees the image:
//!
//! - (d) recorded trace: the trace that (b) of the same repetition recorded, taken out with
//!   `brisk trace export` and given to a fresh daemon with `brisk trace import` before the pull;
//! - (e) baked trace: `py:baked`, converted once per run from `py:v1` with `brisk convert
//!   --trace` and the first trace a (b) recorded. The daemon holds no trace; it prefetches the
//!   chunks the TOC lists.
//!
//! Moving a trace and baking it are setup: not timed, and they talk to the registry directly,
//! not through the link. Nothing here waits for prefetch to finish before the run: it works
//! alongside the start, as it would on a host.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::cold::{ColdStart, FirstStart, PageCache, RecordedTrace, Setup};
use super::images::layer_bytes;
use super::report::Attempt;
use super::stack::scratch;
use crate::brisk;
use crate::daemons::{Containerd, Snapshotter};

/// How long (b)'s recording may take to end: a second after the last read with the config of
/// this measurement, and at most `max_secs` (60 s by default) after the first read.
const TRACE_TIMEOUT: Duration = Duration::from_secs(90);

/// The one conversion of `NAME:v1` to `NAME:baked` in a run (per workload and link in the
/// comparison).
#[derive(Clone, Debug, Serialize)]
pub struct Bake {
    /// The repetition whose (b) recorded the trace baked in.
    pub from_repetition: usize,
    /// Its `brisk trace ls --json` entry.
    pub trace: Value,
    /// `brisk convert --trace`, registry to registry on loopback.
    pub seconds: f64,
    pub layers: usize,
    /// Sum of the compressed layer sizes of `NAME:baked`.
    pub bytes: u64,
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Every trace the daemon on `socket` holds (`brisk trace ls --json`).
fn traces(socket: &Path) -> Result<Vec<Value>> {
    let out = brisk(&["trace", "ls", "--json", "--snapshotter", utf8(socket)?])?;
    let listing: Value = serde_json::from_str(&out).context("Parsing `brisk trace ls --json`")?;
    Ok(listing["traces"].as_array().cloned().unwrap_or_default())
}

/// Waits until the daemon, which has seen one image start, holds its trace; the trace's entry.
fn wait_for_trace(snapshotter: &Snapshotter) -> Result<Value> {
    let deadline = Instant::now() + TRACE_TIMEOUT;
    while Instant::now() < deadline {
        let mut list = traces(&snapshotter.socket)?;
        ensure!(list.len() <= 1, "More than one trace recorded: {list:?}");
        if let Some(trace) = list.pop() {
            return Ok(trace);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("No trace was recorded within {TRACE_TIMEOUT:?} of the first start")
}

/// After (b): waits for the recording to end and exports the trace of `py:lazy` to `file`.
pub fn export_trace(
    setup: &Setup,
    snapshotter: &Snapshotter,
    file: &Path,
) -> Result<RecordedTrace> {
    let listing = wait_for_trace(snapshotter)?;
    brisk(&[
        "trace",
        "export",
        &setup
            .registry
            .image(&format!("{}:lazy", setup.workload.name)),
        utf8(file)?,
        "--snapshotter",
        utf8(&snapshotter.socket)?,
    ])
    .context("Exporting the trace")?;
    // Kept with the daemons' logs when asked (see `daemons::Snapshotter`).
    if let Some(keep) = std::env::var_os("BRISK_E2E_KEEP_LOGS") {
        let keep = std::path::PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(file, keep.join("trace.json"));
    }
    Ok(RecordedTrace {
        file: file.to_owned(),
        listing,
    })
}

impl Setup<'_> {
    /// A fresh snapshotter and containerd under a new scratch directory named `name`.
    fn fresh(&self, name: &str) -> Result<(tempfile::TempDir, Snapshotter, Containerd)> {
        let dir = scratch(self.base, name)?;
        let snapshotter = self.snapshotter(&dir.path().join("brisk"))?;
        let containerd = Containerd::start(
            &dir.path().join("containerd"),
            &snapshotter.socket,
            &self.namespace(),
        )?;
        Ok((dir, snapshotter, containerd))
    }

    /// `NAME:TAG` started on a daemon with an empty root: nothing of the image on the host.
    pub fn fresh_start(&self, tag: &str) -> Result<ColdStart> {
        let (_dir, snapshotter, containerd) = self.fresh("fresh-")?;
        self.brisk_start(&snapshotter, &containerd, tag, PageCache::Drop)
    }

    /// (d): the trace (b) recorded, imported into a daemon with an empty root before the pull.
    pub fn recorded(&self, first: Option<&FirstStart>) -> Result<ColdStart> {
        let trace = match first.map(|f| &f.trace) {
            None => bail!("Not run: (b) failed"),
            Some(Err(err)) => bail!("Not run: (b) left no trace: {err:#}"),
            Some(Ok(trace)) => trace,
        };
        let (_dir, snapshotter, containerd) = self.fresh("recorded-")?;
        brisk(&[
            "trace",
            "import",
            utf8(&trace.file)?,
            "--snapshotter",
            utf8(&snapshotter.socket)?,
        ])
        .context("Importing the trace")?;
        let held = traces(&snapshotter.socket)?;
        ensure!(
            held.len() == 1,
            "The daemon holds {} traces, not 1",
            held.len()
        );
        let mut cold = self.brisk_start(&snapshotter, &containerd, "lazy", PageCache::Drop)?;
        cold.trace = held.into_iter().next();
        Ok(cold)
    }

    /// (e): `py:baked` on a daemon with an empty root and no trace.
    pub fn baked(&self, bake: Option<&Attempt<Bake>>) -> Result<ColdStart> {
        match bake {
            None => bail!("Not run: no trace recorded yet to bake in"),
            Some(Attempt { ok: None, .. }) => bail!("Not run: baking the trace failed"),
            Some(_) => {}
        }
        let (_dir, snapshotter, containerd) = self.fresh("baked-")?;
        let held = traces(&snapshotter.socket)?;
        ensure!(held.is_empty(), "A fresh daemon holds a trace: {held:?}");
        self.brisk_start(&snapshotter, &containerd, "baked", PageCache::Drop)
    }

    /// Converts `NAME:v1` to `NAME:baked` with `trace` baked in, on the registry directly.
    pub fn bake(&self, trace: &RecordedTrace, from_repetition: usize) -> Result<Bake> {
        let direct = |tag: &str| {
            self.registry
                .image(&format!("{}:{tag}", self.workload.name))
        };
        let baked = direct("baked");
        let started = Instant::now();
        brisk(&[
            "convert",
            "--trace",
            utf8(&trace.file)?,
            &direct("v1"),
            &baked,
        ])
        .with_context(|| format!("Converting {} with the trace baked in", direct("v1")))?;
        let seconds = started.elapsed().as_secs_f64();
        let (layers, bytes) = layer_bytes(&baked)?;
        Ok(Bake {
            from_repetition,
            trace: trace.listing.clone(),
            seconds,
            layers,
            bytes,
        })
    }
}
