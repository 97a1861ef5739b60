//! `brisk-bench restart`: what a running reader sees when the snapshotter daemon dies, and how
//! long a successor takes to take over many lazy layers.
//!
//! Fifty small lazy images are pulled (fifty FUSE mounts). A reader on the host reads the files
//! of one of them through its lazy mount, one new file every few milliseconds (each read is a
//! lookup, an open and a read that reach the daemon; the chunks are in its cache), and notes
//! how long each took. The daemon is then killed with SIGKILL and started again, and later
//! stopped with SIGTERM and replaced by another binary. Reported: the longest single read
//! across each event against the median read with the daemon up (the baseline of the same
//! run), whether any read failed, and the daemon's time from start to serving with the
//! fifty layers to take over. It asserts nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use super::stack::{brisk_pull, scratch, unique};
use crate::daemons::{mounts_under, snapshotter_bin, Containerd, Snapshotter};
use crate::layout::{raw_tar, single_layer_layout};
use crate::Registry;

/// Lazy layers on the node when the daemon is taken over.
pub const LAYERS: usize = 50;
/// Files of the image the reader reads: enough for every event to find fresh ones.
const FILES: usize = 4000;
const FILE_SIZE: usize = 2048;

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub what: String,
    /// The longest single read while the event happened (from just before the signal to the
    /// end of the window).
    pub longest_read_ms: f64,
    /// Reads that failed (any error) in the window.
    pub failed_reads: usize,
    pub reads: usize,
    /// From the signal to the successor serving its socket.
    pub daemon_down_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestartReport {
    pub layers: usize,
    /// Median single read with the daemon up: the baseline.
    pub median_read_ms: f64,
    pub events: Vec<Event>,
    /// The successor's own count, from its log: taking the layers over.
    pub takeover_ms: Vec<u64>,
    pub command: String,
}

fn file(i: usize) -> Vec<u8> {
    crate::image::seeded_bytes(FILE_SIZE, 7_000 + i as u64)
}

/// Pushes `LAYERS` lazy images; image 0 carries the reader's files.
fn push_images(registry: &Registry, dir: &Path) -> Result<Vec<String>> {
    let mut refs = Vec::new();
    for n in 0..LAYERS {
        let count = if n == 0 { FILES } else { 8 };
        let names: Vec<String> = (0..count).map(|i| format!("f{n}-{i}")).collect();
        let data: Vec<Vec<u8>> = (0..count).map(|i| file(n * FILES + i)).collect();
        let files: Vec<(&str, &[u8])> = names
            .iter()
            .map(String::as_str)
            .zip(data.iter().map(Vec::as_slice))
            .collect();
        let layout = single_layer_layout(&dir.join(format!("layout-{n}")), "t", &raw_tar(&files)?)?;
        let reference = registry.image(&format!("restart-{n}:lazy"));
        crate::brisk(&["convert", &layout.transport(), &reference])?;
        refs.push(reference);
    }
    Ok(refs)
}

/// Reads file after file of `dir` (a lazy mount), recording each read's time and outcome.
struct Reader {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, Duration, bool)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn start(dir: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            for i in 0..FILES {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let started = Instant::now();
                let ok = std::fs::read(dir.join(format!("f0-{i}"))).is_ok_and(|d| d == file(i));
                out.lock()
                    .expect("not poisoned")
                    .push((started, started.elapsed(), ok));
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn since(&self, t: Instant) -> Vec<(Duration, bool)> {
        self.samples
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(at, took, _)| *at + *took >= t)
            .map(|&(_, took, ok)| (took, ok))
            .collect()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn takeover_ms(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("lazy layers taken over or mounted again"))?;
    line.split("ms=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(base: &Path, command: &str) -> Result<RestartReport> {
    let dir = scratch(base, "restart-")?;
    let registry = Registry::start()?;
    let refs = push_images(&registry, dir.path()).context("Building the images")?;
    let mut snapshotter = Snapshotter::start(&dir.path().join("brisk"), &["--verify", "off"])?;
    let containerd = Containerd::start(
        &dir.path().join("containerd"),
        &snapshotter.socket,
        &unique("brisk-bench"),
    )?;
    for r in &refs {
        brisk_pull(&containerd, r)?;
    }
    let mounts = mounts_under(&snapshotter.root);
    ensure!(mounts.len() >= LAYERS, "only {} lazy mounts", mounts.len());
    // The reader's image: the mount holding its first file.
    let mount = mounts
        .iter()
        .map(PathBuf::from)
        .find(|m| m.join("f0-0").exists())
        .context("no mount holds the reader's files")?;
    // Its chunks into the daemon's cache, and out of the page cache: every timed read then
    // reaches the daemon and none waits on the registry.
    for i in 0..FILES {
        std::fs::read(mount.join(format!("f0-{i}")))?;
    }
    super::stack::drop_caches()?;

    let reader = Reader::start(mount);
    std::thread::sleep(Duration::from_secs(2));
    let baseline: Vec<Duration> = {
        let mut all: Vec<Duration> = reader
            .since(Instant::now() - Duration::from_secs(2))
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        all.sort();
        all
    };
    ensure!(!baseline.is_empty(), "the reader read nothing");
    let median = baseline[baseline.len() / 2];

    let upgraded = dir.path().join("brisk-snapshotter-next");
    std::fs::copy(snapshotter_bin()?, &upgraded)?;
    let mut events = Vec::new();
    let mut takeovers = Vec::new();
    for what in ["SIGKILL and restart", "SIGTERM and upgrade"] {
        let t = Instant::now();
        if what.starts_with("SIGKILL") {
            snapshotter.kill9();
            snapshotter.respawn()?;
        } else {
            snapshotter.terminate()?;
            snapshotter.respawn_as(&upgraded)?;
        }
        let down = t.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let window = reader.since(t);
        takeovers.extend(takeover_ms(&snapshotter.log()));
        events.push(Event {
            what: what.to_owned(),
            longest_read_ms: window.iter().map(|(d, _)| ms(*d)).fold(0.0, f64::max),
            failed_reads: window.iter().filter(|(_, ok)| !ok).count(),
            reads: window.len(),
            daemon_down_ms: ms(down),
        });
    }
    drop(reader);
    drop(containerd);
    Ok(RestartReport {
        layers: LAYERS,
        median_read_ms: ms(median),
        events,
        takeover_ms: takeovers,
        command: command.to_owned(),
    })
}

pub fn markdown(r: &RestartReport) -> String {
    let mut out = String::new();
    out.push_str("# Restart benchmark\n\n");
    out.push_str(&format!(
        "Generated by `{}` (one run; figures from this machine, shared and noisy).\n\n",
        r.command
    ));
    out.push_str(&format!(
        "{} lazy layers mounted; a reader on the host reads a new file of one of them every 5 ms through its lazy mount (lookup and read reach the daemon; chunks in its cache). Baseline: the median read with the daemon up, {:.2} ms.\n\n",
        r.layers, r.median_read_ms
    ));
    out.push_str("| event | daemon down (signal to successor serving) | longest read | longest ÷ median read | reads in the window | failed |\n|---|---|---|---|---|---|\n");
    for e in &r.events {
        out.push_str(&format!(
            "| {} | {:.0} ms | {:.0} ms | {:.0}× | {} | {} |\n",
            e.what,
            e.daemon_down_ms,
            e.longest_read_ms,
            e.longest_read_ms / r.median_read_ms.max(0.001),
            e.reads,
            e.failed_reads
        ));
    }
    out.push_str(&format!(
        "\nTaking over {} layers (the successor's own count, from its log): {} ms.\n",
        r.layers,
        r.takeover_ms
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ms, ")
    ));
    out
}
