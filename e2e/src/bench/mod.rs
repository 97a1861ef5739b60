//! `brisk-bench cold-start`: the snapshotter benchmark, run against a real containerd, runc,
//! `docker-registry` and fuse3 on this machine, with the registry behind an emulated WAN link.
//!
//! It measures, in one run and with modes interleaved: the cold start of a Python image on
//! overlayfs, on Brisk on a first start, on Brisk with a warm chunk cache (`cold`), and on Brisk
//! with an empty cache prefetching from a recorded or a baked start-up trace (`prefetch`); reads
//! of a large file inside a container on both (`reads`); and the daemon's memory with ten lazy
//! images mounted (`memory`). It reports medians and ratios to baselines of the same run and
//! prints targets next to them, but asserts nothing: a figure that misses its target is still a
//! result, and a mode that fails is reported as failed while the others go on.
//!
//! It is not a test and not a `cargo bench`: it needs root and takes minutes, and it writes
//! `cold-start.json` plus the Markdown report (`markdown`). `brisk-bench compare` (`compare`)
//! and `brisk-bench zone` (`zone`) are built from the same pieces.

pub mod chart;
pub mod cold;
pub mod compare;
pub mod compare_md;
pub mod images;
pub mod markdown;
pub mod memory;
pub mod prefetch;
pub mod pyapp;
pub mod reads;
pub mod report;
pub mod restart;
pub mod stack;
pub mod stargz;
pub mod wan;
pub mod workload;
pub mod zone;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use self::report::{Attempt, Binaries, Machine, Report};
use self::wan::{Link, Wan};
use crate::cmd::run;
use crate::daemons::snapshotter_bin;
use crate::registry::Registry;
use crate::{brisk_bin, find_on_path, workspace_root};

/// Everything `cold_start` needs to know.
#[derive(Clone, Debug)]
pub struct Options {
    pub repetitions: usize,
    /// Where `cold-start.json` and the image cache go.
    pub out: PathBuf,
    pub link: Link,
    /// The command line to print in the report.
    pub command: String,
    /// Only the cold starts: the reads and memory phases are skipped.
    pub cold_only: bool,
}

const TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "runc",
    "docker-registry",
    "skopeo",
    "umoci",
    "mmdebstrap",
    "tar",
    "sync",
];

/// The cold-start modes, in the order of the report's letters.
#[derive(Clone, Copy)]
enum Mode {
    /// overlayfs, full pull.
    A,
    /// Brisk, first start on an empty root.
    B,
    /// Brisk, warm L2 left by (b).
    C,
    /// Brisk, empty root holding the trace (b) recorded.
    D,
    /// Brisk, empty root, trace baked into the image.
    E,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::A => "a",
            Mode::B => "b",
            Mode::C => "c",
            Mode::D => "d",
            Mode::E => "e",
        }
    }
}

/// Fails naming everything missing at once: root, tools, files and the Brisk binaries.
pub fn check_prerequisites() -> Result<()> {
    let mut missing = Vec::new();
    // `/proc/self` belongs to the effective user of the process reading it.
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        missing.push("running as root".to_owned());
    }
    for tool in TOOLS {
        if find_on_path(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    for file in ["/dev/fuse", "/bin/busybox", "/proc/sys/vm/drop_caches"] {
        if !Path::new(file).exists() {
            missing.push(file.to_owned());
        }
    }
    for bin in [brisk_bin(), snapshotter_bin()] {
        if let Err(err) = bin {
            missing.push(format!("{err:#}"));
        }
    }
    if !missing.is_empty() {
        bail!("Prerequisites are missing:\n  - {}", missing.join("\n  - "));
    }
    Ok(())
}

/// Runs the whole benchmark. Only a failure before the first measurement (building or
/// publishing the images, starting the registry) is an error; later failures are in the report.
pub fn cold_start(opts: &Options) -> Result<Report> {
    check_prerequisites()?;
    let started = Instant::now();
    let progress = |what: &str| eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
    let mut report = Report {
        command: opts.command.clone(),
        started_utc: run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .map(|d| d.trim().to_owned())
            .unwrap_or_default(),
        repetitions: opts.repetitions,
        machine: Machine::probe(),
        binaries: binaries()?,
        link: Some(opts.link),
        ..Report::default()
    };

    std::fs::create_dir_all(&opts.out)?;
    let layout = images::build_or_reuse(&opts.out.join("images"))?;
    progress("images ready; starting the registry, pushing and converting");
    let registry = Registry::start()?;
    report.images = images::publish(&layout, &registry)?;
    let wan = Wan::start(&registry.addr(), opts.link)?;
    let base = tempfile::Builder::new().prefix("brisk-bench-").tempdir()?;

    let setup = cold::Setup::new(&wan, &registry, base.path(), workload::PY)?;
    for rep in 1..=opts.repetitions {
        // Alternate the order, so that a drift during the run does not favour one mode. (b)
        // comes before (c) and (d), which need what it leaves.
        let order = if rep % 2 == 1 {
            [Mode::A, Mode::B, Mode::C, Mode::D, Mode::E]
        } else {
            [Mode::B, Mode::E, Mode::D, Mode::C, Mode::A]
        };
        let c = &mut report.cold_start;
        c.order.push(order.iter().map(|m| m.label()).collect());
        let mut first = None;
        for mode in order {
            match mode {
                Mode::A => c.overlay.push(Attempt::new(rep, setup.overlay())),
                Mode::B => {
                    let (lazy, left) = setup.lazy();
                    c.lazy.push(Attempt::new(rep, lazy));
                    first = left;
                }
                Mode::C => c.warm.push(Attempt::new(rep, setup.warm(first.as_ref()))),
                Mode::D => c
                    .recorded
                    .push(Attempt::new(rep, setup.recorded(first.as_ref()))),
                Mode::E => {
                    // Baked once, from the first trace a (b) leaves; not timed.
                    let trace = first.as_ref().and_then(|f| f.trace.as_ref().ok());
                    if let (None, Some(trace)) = (&c.bake, trace) {
                        progress("baking the trace of (b) into py:baked");
                        c.bake = Some(Attempt::new(rep, setup.bake(trace, rep)));
                    }
                    c.baked
                        .push(Attempt::new(rep, setup.baked(c.bake.as_ref())));
                }
            }
        }
        // The snapshotter root of (b) goes before the next repetition.
        drop(first);
        let show = |a: &[Attempt<cold::ColdStart>]| match a.last().and_then(|a| a.ok.as_ref()) {
            Some(c) => format!("{:.2} s", c.seconds),
            None => "failed".to_owned(),
        };
        progress(&format!(
            "cold start {rep}/{}: (a) {}  (b) {}  (c) {}  (d) {}  (e) {}",
            opts.repetitions,
            show(&c.overlay),
            show(&c.lazy),
            show(&c.warm),
            show(&c.recorded),
            show(&c.baked)
        ));
    }

    if opts.cold_only {
        report.machine.load_at_end = report::load();
        report.wall_seconds = started.elapsed().as_secs_f64();
        report.summarize();
        return Ok(report);
    }
    progress("reads: pulling big both ways (the overlayfs pull moves the whole image)");
    report.reads.file_bytes = images::BIG_FILE_BYTES;
    match reads::Phase::start(&wan, base.path()) {
        Ok((mut phase, setup)) => {
            report.reads.setup = Some(setup);
            for rep in 1..=opts.repetitions {
                let r = &mut report.reads;
                if rep % 2 == 1 {
                    r.overlay.push(Attempt::new(rep, phase.overlay()));
                    r.brisk.push(Attempt::new(rep, phase.brisk()));
                } else {
                    r.brisk.push(Attempt::new(rep, phase.brisk()));
                    r.overlay.push(Attempt::new(rep, phase.overlay()));
                }
                progress(&format!("reads {rep}/{}", opts.repetitions));
            }
        }
        Err(err) => report.reads.setup_error = Some(format!("{err:#}")),
    }

    for rep in 1..=opts.repetitions {
        report
            .memory
            .push(Attempt::new(rep, memory::measure(&wan, base.path())));
        progress(&format!("memory {rep}/{}", opts.repetitions));
    }

    report.machine.load_at_end = report::load();
    report.wall_seconds = started.elapsed().as_secs_f64();
    report.summarize();
    Ok(report)
}

/// Which binaries ran, relative to the workspace, and the commit they were built from.
pub(crate) fn binaries() -> Result<Binaries> {
    let root = workspace_root();
    let show = |p: PathBuf| match p.strip_prefix(&root) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    };
    let git = |args: &[&str]| run(Command::new("git").arg("-C").arg(&root).args(args));
    let built_utc = run(Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC", "-r"])
        .arg(snapshotter_bin()?))
    .map(|d| d.trim().to_owned())
    .unwrap_or_default();
    Ok(Binaries {
        brisk: show(brisk_bin()?),
        snapshotter: show(snapshotter_bin()?),
        built_utc,
        commit: git(&["rev-parse", "--short", "HEAD"])
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned()),
        uncommitted_changes: git(&["status", "--porcelain", "--untracked-files=no"])
            .is_ok_and(|s| !s.trim().is_empty()),
    })
}

/// Writes `DIR/cold-start.json` and the Markdown report at `markdown`, with this machine's
/// directories replaced by neutral names.
pub fn write(report: &Report, out: &Path, markdown: &Path) -> Result<()> {
    write_json(report, out)?;
    std::fs::write(markdown, scrub(&markdown::render(report), out))
        .with_context(|| format!("Writing {}", markdown.display()))?;
    Ok(())
}

/// Writes `DIR/cold-start.json` alone, with this machine's directories replaced.
pub fn write_json(report: &Report, out: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("cold-start.json"), scrub(&json, out))
        .context("Writing cold-start.json")
}

/// `text` without the absolute paths of this machine: the output directory, the workspace and
/// the temporary directory become `<out>`, `<workspace>` and `<tmp>`.
pub(crate) fn scrub(text: &str, out: &Path) -> String {
    let mut text = text.to_owned();
    let tmp = std::env::temp_dir();
    for (path, name) in [
        (std::path::absolute(out).unwrap_or_default(), "<out>"),
        (workspace_root(), "<workspace>"),
        (tmp, "<tmp>"),
    ] {
        let p = path.display().to_string();
        let p = p.trim_end_matches('/');
        if p.len() > 1 {
            text = text.replace(p, name);
        }
    }
    text
}
