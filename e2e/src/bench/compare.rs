//! `brisk-bench compare`: Brisk side by side with a full pull on overlayfs and with
//! stargz-snapshotter, on the same machine, images and emulated links, in one run.
//!
//! For every network profile and workload it runs each mode once per repetition, the modes
//! interleaved (the order alternates between repetitions), and keeps every attempt: its
//! figures, or why it failed. Medians and ratios to the overlayfs full pull of the same run
//! are computed here; `compare_md` and `chart` only present them. Conversions (Brisk's and
//! stargz's) are setup and not timed. Nothing is asserted: targets are printed, not enforced.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::cold::{ColdStart, FirstStart, Setup};
use super::images::{self, ImageSizes};
use super::report::{figures, paired, Attempt, Binaries, Machine, Spread};
use super::stargz::{self, Conversions, Daemon, Laziness};
use super::wan::{Link, Wan};
use super::workload::{self, Workload};
use crate::cmd::run;
use crate::find_on_path;
use crate::registry::Registry;

/// One emulated network between the host and the registry.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub link: Link,
}

/// Stands for "no limit": the loopback profile still goes through the relay, so that its
/// traffic is counted the same way, but the relay adds neither delay nor a rate limit.
pub const UNLIMITED: u64 = u64::MAX;

pub const LOOPBACK: Profile = Profile {
    name: "loopback",
    link: Link {
        rtt: Duration::ZERO,
        bits_per_sec: UNLIMITED,
    },
};
pub const WAN: Profile = Profile {
    name: "WAN",
    link: Link {
        rtt: Duration::from_millis(20),
        bits_per_sec: 100_000_000,
    },
};
pub const SLOW_WAN: Profile = Profile {
    name: "slow WAN",
    link: Link {
        rtt: Duration::from_millis(50),
        bits_per_sec: 25_000_000,
    },
};

impl Profile {
    pub fn describe(&self) -> String {
        if self.link.bits_per_sec == UNLIMITED {
            "relay on loopback, no added delay, no rate limit".to_owned()
        } else {
            format!(
                "{} ms RTT, {} Mbit/s",
                self.link.rtt.as_millis(),
                self.link.bits_per_sec / 1_000_000
            )
        }
    }
}

/// The ways of getting a workload running that the comparison measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Overlay,
    /// The image pulled into overlayfs beforehand, page cache dropped: a warm host's baseline.
    OverlayLocal,
    /// Right after `OverlayLocal`, with the page cache kept.
    OverlayHot,
    StargzLazy,
    StargzOptimized,
    BriskLazy,
    BriskTrace,
    /// A trace baked into the image (`brisk convert --trace`), no trace held: Brisk's
    /// counterpart of `ctr-remote image optimize`.
    BriskBaked,
    BriskWarm,
    BriskHot,
    /// Brisk serving the image `ctr-remote image optimize` made, as it is: the peer's own
    /// format and prefetch landmark, no Brisk conversion.
    BriskEstargz,
}

impl Mode {
    pub const ALL: [Mode; 11] = [
        Mode::Overlay,
        Mode::OverlayLocal,
        Mode::OverlayHot,
        Mode::StargzLazy,
        Mode::StargzOptimized,
        Mode::BriskLazy,
        Mode::BriskTrace,
        Mode::BriskBaked,
        Mode::BriskWarm,
        Mode::BriskHot,
        Mode::BriskEstargz,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Mode::Overlay => "overlayfs, full pull",
            Mode::OverlayLocal => "overlayfs, image local",
            Mode::OverlayHot => "overlayfs hot",
            Mode::StargzLazy => "stargz, eStargz lazy",
            Mode::StargzOptimized => "stargz, eStargz optimized",
            Mode::BriskLazy => "Brisk lazy (no trace)",
            Mode::BriskTrace => "Brisk with trace",
            Mode::BriskBaked => "Brisk baked trace",
            Mode::BriskWarm => "Brisk warm (L2)",
            Mode::BriskHot => "Brisk hot",
            Mode::BriskEstargz => "Brisk, eStargz optimized",
        }
    }

    pub fn is_stargz(self) -> bool {
        matches!(self, Mode::StargzLazy | Mode::StargzOptimized)
    }

    pub fn is_overlay(self) -> bool {
        matches!(self, Mode::Overlay | Mode::OverlayLocal | Mode::OverlayHot)
    }

    /// A Brisk start with nothing of the image on the host: the modes the limit is for.
    pub fn is_brisk_cold(self) -> bool {
        matches!(
            self,
            Mode::BriskLazy | Mode::BriskTrace | Mode::BriskBaked | Mode::BriskEstargz
        )
    }
}

/// The two orders the modes run in, alternating between repetitions. Brisk lazy comes before
/// the modes that use what it leaves (its trace, its chunk cache), and hot right after warm,
/// on the same daemons (overlayfs hot right after overlayfs with the image local).
const ORDERS: [[Mode; 11]; 2] = [
    Mode::ALL,
    [
        Mode::BriskEstargz,
        Mode::BriskLazy,
        Mode::BriskWarm,
        Mode::BriskHot,
        Mode::BriskTrace,
        Mode::BriskBaked,
        Mode::StargzOptimized,
        Mode::StargzLazy,
        Mode::OverlayLocal,
        Mode::OverlayHot,
        Mode::Overlay,
    ],
];

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub workloads: Vec<Workload>,
    pub profiles: Vec<Profile>,
    pub repetitions: usize,
    /// Where `compare.json`, the image cache and the stargz daemon go.
    pub out: PathBuf,
    pub command: String,
}

impl CompareOptions {
    /// The quick comparison (`full == false`) or the whole one.
    pub fn new(full: bool, out: PathBuf, command: String) -> Self {
        Self {
            workloads: workload::ALL
                .iter()
                .filter(|w| full || w.quick)
                .copied()
                .collect(),
            profiles: if full {
                vec![LOOPBACK, WAN, SLOW_WAN]
            } else {
                vec![WAN]
            },
            repetitions: if full { 3 } else { 2 },
            out,
            command,
        }
    }
}

/// One start: its figures, and for the lazy modes whether it really was lazy.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    #[serde(flatten)]
    pub start: ColdStart,
    /// Layers served lazily, out of all; `None` for overlayfs.
    pub laziness: Option<Laziness>,
}

impl Run {
    /// A lazy mode whose layers were downloaded after all.
    pub fn fell_back(&self) -> bool {
        self.laziness.is_some_and(|l| !l.all())
    }
}

/// Medians of one mode in one cell, over the attempts that succeeded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeSummary {
    pub ready_seconds: Option<Spread>,
    pub pull_seconds: Option<Spread>,
    /// Median time to ready over the overlayfs median of the same cell.
    pub ratio_to_overlay: Option<f64>,
    pub ratio_to_overlay_per_repetition: Vec<f64>,
    pub registry_bytes: Option<Spread>,
    pub registry_requests: Option<Spread>,
    /// Registry bytes over the compressed weight of what the container read (the daemon's
    /// count from FUSE reads); Brisk modes only.
    pub fetched_per_read: Option<Spread>,
    /// For the Brisk cold modes, each start's limit: max(T_local, T_meta + WS/B), with
    /// T_local the median of overlayfs with the image local, T_meta the start's pull (manifest,
    /// config, TOCs, mounts), WS the compressed weight of what it read and B the link's rate.
    pub limit_seconds: Option<Spread>,
    /// Median of each start's time to ready over its limit.
    pub ratio_to_limit: Option<f64>,
    pub rss_mib: Option<Spread>,
    /// Attempts that succeeded, and of those, lazy ones that fell back to a full pull.
    pub ok: usize,
    pub fell_back: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModeResults {
    pub mode: Mode,
    pub attempts: Vec<Attempt<Run>>,
    pub summary: ModeSummary,
}

/// One workload on one profile.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub workload: &'static str,
    pub profile: &'static str,
    pub order: Vec<Vec<Mode>>,
    pub modes: Vec<ModeResults>,
}

impl Cell {
    /// A cell with a slot, still empty, for every mode.
    pub fn empty(workload: &'static str, profile: &'static str) -> Self {
        Self {
            workload,
            profile,
            order: Vec::new(),
            modes: Mode::ALL
                .iter()
                .map(|&mode| ModeResults {
                    mode,
                    attempts: Vec::new(),
                    summary: ModeSummary::default(),
                })
                .collect(),
        }
    }

    pub fn mode(&self, mode: Mode) -> &ModeResults {
        self.modes
            .iter()
            .find(|m| m.mode == mode)
            .expect("every cell holds every mode")
    }
}

/// What one workload's images are, and how their conversions went.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadInfo {
    pub workload: Workload,
    pub sizes: Option<ImageSizes>,
    /// The layers' tar streams, uncompressed.
    pub uncompressed_bytes: Option<u64>,
    pub stargz: Option<Conversions>,
    pub setup_error: Option<String>,
    pub stargz_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub command: String,
    pub started_utc: String,
    pub wall_seconds: f64,
    pub repetitions: usize,
    pub machine: Machine,
    pub binaries: Binaries,
    pub stargz: Option<Daemon>,
    pub stargz_error: Option<String>,
    pub profiles: Vec<Profile>,
    pub workloads: Vec<WorkloadInfo>,
    pub cells: Vec<Cell>,
}

/// A target on a ratio of two modes' medians, on the WAN profile.
pub struct Target {
    pub mode: Mode,
    pub over: Mode,
    pub at_most: f64,
}

pub const TARGETS: [Target; 6] = [
    Target {
        mode: Mode::BriskTrace,
        over: Mode::Overlay,
        at_most: 0.15,
    },
    Target {
        mode: Mode::BriskTrace,
        over: Mode::StargzOptimized,
        at_most: 0.5,
    },
    Target {
        mode: Mode::BriskTrace,
        over: Mode::BriskWarm,
        at_most: 1.3,
    },
    Target {
        mode: Mode::BriskWarm,
        over: Mode::OverlayLocal,
        at_most: 1.1,
    },
    Target {
        mode: Mode::BriskHot,
        over: Mode::OverlayHot,
        at_most: 1.05,
    },
    // At least as fast as the peer on the peer's own optimized image.
    Target {
        mode: Mode::BriskEstargz,
        over: Mode::StargzOptimized,
        at_most: 1.0,
    },
];

/// The baked trace's start over its limit (`ModeSummary::limit_seconds`), at most.
pub const BAKED_OVER_LIMIT: f64 = 1.3;

/// The profile the targets are stated for.
pub const TARGET_PROFILE: &str = WAN.name;

impl Target {
    /// The ratio of the medians in `cell`, and the ratio within each repetition.
    pub fn ratio(&self, cell: &Cell) -> (Option<f64>, Vec<f64>) {
        let secs = |r: &Run| r.start.seconds;
        let (num, den) = (cell.mode(self.mode), cell.mode(self.over));
        let median = |m: &ModeResults| m.summary.ready_seconds.map(|s| s.median);
        let ratio = median(num).zip(median(den)).map(|(n, d)| n / d);
        let each = paired(
            &lazy_only(&den.attempts),
            secs,
            &lazy_only(&num.attempts),
            secs,
        );
        (ratio, each)
    }
}

/// The attempts that succeeded and, for a lazy mode, really were lazy: the only ones medians
/// and ratios are taken over.
fn lazy_only(attempts: &[Attempt<Run>]) -> Vec<Attempt<Run>> {
    attempts
        .iter()
        .map(|a| match &a.ok {
            Some(run) if run.fell_back() => Attempt {
                repetition: a.repetition,
                ok: None,
                error: Some("fell back to a full pull".to_owned()),
            },
            _ => a.clone(),
        })
        .collect()
}

/// Copies `brisk` and `brisk-snapshotter` (from `BRISK_BIN` and `BRISK_SNAPSHOTTER_BIN`) to
/// `OUT/bin` and points those variables at the copies, so that a rebuild of the workspace
/// during a long run cannot swap the binaries half-way. Call it before any thread starts: it
/// sets environment variables.
pub fn pin_binaries(out: &Path) -> Result<()> {
    let dir = out.join("bin");
    std::fs::create_dir_all(&dir)?;
    for (var, bin) in [
        ("BRISK_BIN", crate::brisk_bin()?),
        ("BRISK_SNAPSHOTTER_BIN", crate::daemons::snapshotter_bin()?),
    ] {
        let copy = dir.join(bin.file_name().context("A binary path has no file name")?);
        // A new file rather than an overwrite: a copy still running elsewhere is not touched.
        let _ = std::fs::remove_file(&copy);
        // `cp -p` keeps the build time, which the report shows.
        run(Command::new("cp").arg("-p").arg(&bin).arg(&copy))?;
        std::env::set_var(var, &copy);
    }
    Ok(())
}

/// Fails naming everything missing that the cold-start benchmark needs. `ctr-remote` is not
/// among them: `e2e/stargz/build.sh` installs it, and without it only the stargz modes fail.
fn check_prerequisites() -> Result<()> {
    if find_on_path("ctr-remote").is_none() {
        eprintln!("note: `ctr-remote` is not on PATH yet; e2e/stargz/build.sh installs it");
    }
    super::check_prerequisites()
}

/// Runs the whole comparison. Only a failure before the first measurement (prerequisites,
/// the registry) is an error; everything after it is in the report.
pub fn run_compare(opts: &CompareOptions) -> Result<CompareReport> {
    check_prerequisites()?;
    let started = Instant::now();
    let progress = |what: &str| eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
    std::fs::create_dir_all(&opts.out)?;
    let mut report = CompareReport {
        command: opts.command.clone(),
        started_utc: run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .map(|d| d.trim().to_owned())
            .unwrap_or_default(),
        wall_seconds: 0.0,
        repetitions: opts.repetitions,
        machine: Machine::probe(),
        binaries: super::binaries()?,
        stargz: None,
        stargz_error: None,
        profiles: opts.profiles.clone(),
        workloads: Vec::new(),
        cells: Vec::new(),
    };

    progress("building stargz-snapshotter's daemon");
    match stargz::build(&opts.out.join("stargz")) {
        Ok(d) => report.stargz = Some(d),
        Err(err) => report.stargz_error = Some(format!("{err:#}")),
    }
    let registry = Registry::start()?;
    let base = tempfile::Builder::new()
        .prefix("brisk-compare-")
        .tempdir()?;
    for w in &opts.workloads {
        progress(&format!("{}: image, Brisk and eStargz conversions", w.name));
        report
            .workloads
            .push(prepare(&registry, base.path(), &opts.out, w, &report));
    }

    for profile in &opts.profiles {
        let wan = Wan::start(&registry.addr(), profile.link)?;
        for info in &report.workloads {
            let w = info.workload;
            let setup = Setup::new(&wan, &registry, base.path(), w)?;
            let link = profile.link;
            let mut cell = Cell::empty(w.name, profile.name);
            // Baked once per workload and link, from the first trace a Brisk lazy start leaves.
            let mut bake = None;
            for rep in 1..=opts.repetitions {
                let order = ORDERS[(rep + 1) % 2];
                cell.order.push(order.to_vec());
                let runs = repetition(&setup, &report, info, &order, rep, &mut bake);
                for (mode, result) in runs {
                    let m = cell.modes.iter_mut().find(|m| m.mode == mode);
                    m.expect("every mode has a slot")
                        .attempts
                        .push(Attempt::new(rep, result));
                }
                progress(&format!(
                    "{} on {}, repetition {rep}/{}: {}",
                    w.name,
                    profile.name,
                    opts.repetitions,
                    cell.modes
                        .iter()
                        .map(|m| format!("{:?} {}", m.mode, show(m.attempts.last())))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            summarize(&mut cell, link);
            report.cells.push(cell);
        }
    }
    report.machine.load_at_end = super::report::load();
    report.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn show(attempt: Option<&Attempt<Run>>) -> String {
    match attempt.and_then(|a| a.ok.as_ref()) {
        Some(r) if r.fell_back() => format!("{:.2} s (full pull)", r.start.seconds),
        Some(r) => format!("{:.2} s", r.start.seconds),
        None => "failed".to_owned(),
    }
}

/// Builds (or reuses) the workload's image, publishes it as `NAME:v1`, converts it to
/// `NAME:lazy` with Brisk and to the two eStargz forms. A failure is kept in the result.
fn prepare(
    registry: &Registry,
    base: &Path,
    out: &Path,
    w: &Workload,
    report: &CompareReport,
) -> WorkloadInfo {
    let mut info = WorkloadInfo {
        workload: *w,
        sizes: None,
        uncompressed_bytes: None,
        stargz: None,
        setup_error: None,
        stargz_error: None,
    };
    let published = images::workload_layout(&out.join("images"), w).and_then(|layout| {
        let sizes = images::publish_one(&layout, registry, w.name)?;
        let v1 = registry.image(&format!("{}:v1", w.name));
        Ok((sizes, images::uncompressed_bytes(&layout, &v1).ok()))
    });
    match published {
        Ok((sizes, uncompressed)) => {
            info.sizes = Some(sizes);
            info.uncompressed_bytes = uncompressed;
        }
        Err(err) => {
            info.setup_error = Some(format!("{err:#}"));
            return info;
        }
    }
    match &report.stargz {
        Some(_) => match stargz::convert(registry, base, w) {
            Ok(c) => info.stargz = Some(c),
            Err(err) => info.stargz_error = Some(format!("{err:#}")),
        },
        None => info.stargz_error = Some("Not converted: the daemon did not build".to_owned()),
    }
    info
}

/// One repetition of every mode, in `order`.
fn repetition(
    setup: &Setup,
    report: &CompareReport,
    info: &WorkloadInfo,
    order: &[Mode],
    rep: usize,
    bake: &mut Option<Attempt<super::prefetch::Bake>>,
) -> Vec<(Mode, Result<Run>)> {
    let mut runs = Vec::new();
    if let Some(err) = &info.setup_error {
        for &mode in order {
            runs.push((mode, Err(anyhow::anyhow!("Not run: setup failed: {err}"))));
        }
        return runs;
    }
    let mut first: Option<FirstStart> = None;
    for &mode in order {
        let result = match mode {
            Mode::Overlay => setup.overlay().map(|start| Run {
                start,
                laziness: None,
            }),
            Mode::OverlayLocal => {
                let (local, hot) = setup.overlay_local_then_hot();
                let plain = |start| Run {
                    start,
                    laziness: None,
                };
                runs.push((mode, local.map(plain)));
                runs.push((Mode::OverlayHot, hot.map(plain)));
                continue;
            }
            // Runs right after the local start, above, on the same containerd.
            Mode::OverlayHot => continue,
            Mode::StargzLazy | Mode::StargzOptimized => stargz_run(setup, report, info, mode),
            Mode::BriskLazy => {
                let (lazy, left) = setup.lazy();
                first = left;
                lazy.map(brisk_run)
            }
            Mode::BriskTrace => setup.recorded(first.as_ref()).map(brisk_run),
            Mode::BriskBaked => {
                let trace = first.as_ref().and_then(|f| f.trace.as_ref().ok());
                if let (None, Some(trace)) = (&bake, trace) {
                    *bake = Some(Attempt::new(rep, setup.bake(trace, rep)));
                }
                setup.baked(bake.as_ref()).map(brisk_run)
            }
            Mode::BriskWarm => {
                let (warm, hot) = setup.warm_then_hot(first.as_ref(), true);
                runs.push((mode, warm.map(brisk_run)));
                let hot = hot.unwrap_or_else(|| Err(anyhow::anyhow!("Not run")));
                runs.push((Mode::BriskHot, hot.map(brisk_run)));
                continue;
            }
            // Runs right after the warm start, above, on the same daemons.
            Mode::BriskHot => continue,
            Mode::BriskEstargz => match &info.stargz_error {
                Some(err) => Err(anyhow::anyhow!(
                    "Not run: converting to eStargz failed: {err}"
                )),
                None => setup.fresh_start(stargz::OPTIMIZED_TAG).map(brisk_run),
            },
        };
        runs.push((mode, result));
    }
    runs
}

/// A Brisk start, with `brisk pull`'s count of layers served lazily (or already present).
fn brisk_run(start: ColdStart) -> Run {
    let count = |key: &str| {
        start
            .pull
            .as_ref()
            .and_then(|p| p[key].as_u64())
            .unwrap_or(0) as usize
    };
    let laziness = start.pull.as_ref().map(|_| Laziness {
        lazy_layers: count("lazy") + count("present"),
        layers: count("layers"),
    });
    Run { start, laziness }
}

fn stargz_run(
    setup: &Setup,
    report: &CompareReport,
    info: &WorkloadInfo,
    mode: Mode,
) -> Result<Run> {
    let Some(daemon) = &report.stargz else {
        anyhow::bail!(
            "Not run: the stargz daemon did not build: {}",
            report.stargz_error.as_deref().unwrap_or("")
        );
    };
    if let Some(err) = &info.stargz_error {
        anyhow::bail!("Not run: converting to eStargz failed: {err}");
    }
    let tag = match mode {
        Mode::StargzOptimized => stargz::OPTIMIZED_TAG,
        _ => stargz::LAZY_TAG,
    };
    let (start, laziness) = stargz::start(setup, daemon, tag)?;
    Ok(Run {
        start,
        laziness: Some(laziness),
    })
}

/// The compressed weight of the bytes a Brisk start's container read, as the daemon counted
/// them (`brisk status`); `None` for other modes or before a read.
fn compressed_read(r: &Run) -> Option<u64> {
    let images = r.start.status.as_ref()?["images"].as_array()?;
    let read: u64 = images
        .iter()
        .filter_map(|i| i["reads"]["compressed_bytes"].as_u64())
        .sum();
    (read > 0).then_some(read)
}

/// Registry bytes a Brisk start moved over the compressed weight of what its container read.
fn fetched_per_read(r: &Run) -> Option<f64> {
    compressed_read(r).map(|read| r.start.traffic.bytes_down as f64 / read as f64)
}

/// What a start could not beat: having the image local (`local`, seconds), or fetching its
/// metadata (the pull) and then exactly the compressed bytes it read over `link`.
fn limit(r: &Run, local: f64, link: Link) -> Option<f64> {
    let transfer = match link.bits_per_sec {
        UNLIMITED => 0.0,
        bits => compressed_read(r)? as f64 * 8.0 / bits as f64,
    };
    Some(local.max(r.start.pull_seconds + transfer))
}

/// Fills every mode's summary from its attempts; lazy attempts that fell back to a full pull
/// are left out of the figures and counted instead.
fn summarize(cell: &mut Cell, link: Link) {
    let counted: Vec<Vec<Attempt<Run>>> =
        cell.modes.iter().map(|m| lazy_only(&m.attempts)).collect();
    let overlay = counted[0].clone();
    let overlay_median = Spread::of(&figures(&overlay, |r| r.start.seconds)).map(|s| s.median);
    let local_at = Mode::ALL.iter().position(|&m| m == Mode::OverlayLocal);
    let local_median = local_at
        .and_then(|i| Spread::of(&figures(&counted[i], |r| r.start.seconds)))
        .map(|s| s.median);
    for (m, counted) in cell.modes.iter_mut().zip(counted) {
        let ready = Spread::of(&figures(&counted, |r| r.start.seconds));
        let s = &mut m.summary;
        s.ready_seconds = ready;
        s.pull_seconds = Spread::of(&figures(&counted, |r| r.start.pull_seconds));
        s.ratio_to_overlay = ready.zip(overlay_median).map(|(r, o)| r.median / o);
        let secs = |r: &Run| r.start.seconds;
        s.ratio_to_overlay_per_repetition = paired(&overlay, secs, &counted, secs);
        s.registry_bytes = Spread::of(&figures(&counted, |r| r.start.traffic.bytes_down as f64));
        s.registry_requests = Spread::of(&figures(&counted, |r| r.start.traffic.requests as f64));
        let ratios: Vec<f64> = counted
            .iter()
            .filter_map(|a| fetched_per_read(a.ok.as_ref()?))
            .collect();
        s.fetched_per_read = Spread::of(&ratios);
        if let (true, Some(local)) = (m.mode.is_brisk_cold(), local_median) {
            let runs: Vec<&Run> = counted.iter().filter_map(|a| a.ok.as_ref()).collect();
            let limits: Vec<(f64, f64)> = runs
                .iter()
                .filter_map(|r| Some((limit(r, local, link)?, r.start.seconds)))
                .collect();
            s.limit_seconds = Spread::of(&limits.iter().map(|l| l.0).collect::<Vec<_>>());
            s.ratio_to_limit = Spread::of(&limits.iter().map(|(l, t)| t / l).collect::<Vec<_>>())
                .map(|x| x.median);
        }
        let rss: Vec<f64> = counted
            .iter()
            .filter_map(|a| a.ok.as_ref()?.start.rss_kib)
            .map(|k| k as f64 / 1024.0)
            .collect();
        s.rss_mib = Spread::of(&rss);
        s.ok = m.attempts.iter().filter(|a| a.ok.is_some()).count();
        s.fell_back = m
            .attempts
            .iter()
            .filter(|a| a.ok.as_ref().is_some_and(Run::fell_back))
            .count();
    }
}

/// Writes `OUT/compare.json`, `BENCHMARKS.md` and the chart beside it, with this machine's
/// directories replaced by neutral names.
pub fn write(report: &CompareReport, out: &Path, markdown: &Path, chart: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("compare.json"), super::scrub(&json, out))
        .context("Writing compare.json")?;
    let chart_name = chart
        .file_name()
        .context("The chart path has no file name")?
        .to_string_lossy();
    std::fs::write(chart, super::chart::render(report))
        .with_context(|| format!("Writing {}", chart.display()))?;
    std::fs::write(
        markdown,
        super::scrub(&super::compare_md::render(report, &chart_name), out),
    )
    .with_context(|| format!("Writing {}", markdown.display()))?;
    Ok(())
}

/// Every failed attempt and setup step, labelled.
pub fn failures(report: &CompareReport) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(err) = &report.stargz_error {
        out.push((
            "building stargz-snapshotter's daemon".to_owned(),
            err.clone(),
        ));
    }
    for w in &report.workloads {
        for (what, err) in [
            ("setup", &w.setup_error),
            ("eStargz conversion", &w.stargz_error),
        ] {
            if let Some(err) = err {
                out.push((format!("{}: {what}", w.workload.name), err.clone()));
            }
        }
    }
    for cell in &report.cells {
        for m in &cell.modes {
            for a in &m.attempts {
                if let Some(err) = &a.error {
                    out.push((
                        format!(
                            "{} on {}, {}, repetition {}",
                            cell.workload,
                            cell.profile,
                            m.mode.title(),
                            a.repetition
                        ),
                        err.clone(),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::wan::Traffic;

    fn start(seconds: f64, lazy: Option<(usize, usize)>) -> anyhow::Result<Run> {
        Ok(Run {
            start: ColdStart {
                seconds,
                pull_seconds: 0.0,
                traffic: Traffic::default(),
                pull: None,
                status: None,
                trace: None,
                rss_kib: None,
            },
            laziness: lazy.map(|(lazy_layers, layers)| Laziness {
                lazy_layers,
                layers,
            }),
        })
    }

    #[test]
    fn a_start_that_fell_back_is_counted_but_left_out_of_the_figures() {
        let mut cell = Cell::empty("py", WAN.name);
        let attempts = [
            (Mode::Overlay, 1, start(10.0, None)),
            (Mode::Overlay, 2, start(12.0, None)),
            (Mode::StargzLazy, 1, start(2.0, Some((1, 1)))),
            (Mode::StargzLazy, 2, start(9.0, Some((0, 1)))),
            (Mode::BriskLazy, 1, Err(anyhow::anyhow!("no daemon"))),
        ];
        for (mode, rep, result) in attempts {
            let slot = cell.modes.iter_mut().find(|m| m.mode == mode).unwrap();
            slot.attempts.push(Attempt::new(rep, result));
        }
        summarize(&mut cell, WAN.link);

        let s = &cell.mode(Mode::StargzLazy).summary;
        assert_eq!((s.ok, s.fell_back), (2, 1));
        assert_eq!(s.ready_seconds.map(|s| (s.median, s.n)), Some((2.0, 1)));
        assert_eq!(s.ratio_to_overlay, Some(2.0 / 11.0));
        assert_eq!(s.ratio_to_overlay_per_repetition, vec![0.2]);
        let failed = &cell.mode(Mode::BriskLazy).summary;
        assert!(failed.ready_seconds.is_none() && failed.ok == 0);
        let (ratio, each) = TARGETS[0].ratio(&cell);
        assert_eq!((ratio, each), (None, Vec::new()));
    }

    #[test]
    fn a_cold_start_s_limit_is_the_local_start_or_its_metadata_then_its_reads_over_the_link() {
        let mut cell = Cell::empty("py", WAN.name);
        let baked = |seconds: f64, read: u64| {
            let mut run = start(seconds, Some((1, 1))).unwrap();
            run.start.pull_seconds = 0.5;
            run.start.status = Some(serde_json::json!({
                "images": [{"reads": {"compressed_bytes": read}}]
            }));
            run
        };
        let attempts = [
            (Mode::OverlayLocal, 1, start(2.0, None)),
            (Mode::OverlayLocal, 2, start(2.2, None)),
            // 12.5 MB take 1 s at 100 Mbit/s: the local start, 2.1 s, is the limit.
            (Mode::BriskBaked, 1, Ok(baked(4.2, 12_500_000))),
            // 50 MB take 4 s: the pull and the transfer, 4.5 s, are.
            (Mode::BriskBaked, 2, Ok(baked(9.0, 50_000_000))),
            (Mode::BriskWarm, 1, Ok(baked(1.0, 12_500_000))),
        ];
        for (mode, rep, result) in attempts {
            let slot = cell.modes.iter_mut().find(|m| m.mode == mode).unwrap();
            slot.attempts.push(Attempt::new(rep, result));
        }
        summarize(&mut cell, WAN.link);

        let s = &cell.mode(Mode::BriskBaked).summary;
        let limits = s.limit_seconds.unwrap();
        assert!((limits.min - 2.1).abs() < 1e-9 && (limits.max - 4.5).abs() < 1e-9);
        assert!((s.ratio_to_limit.unwrap() - 2.0).abs() < 1e-9);
        let warm = &cell.mode(Mode::BriskWarm).summary;
        assert!(
            warm.limit_seconds.is_none(),
            "a warm start has no such limit"
        );

        // Without an image-local figure there is no limit to print.
        let mut alone = Cell::empty("py", WAN.name);
        let slot = alone.modes.iter_mut().find(|m| m.mode == Mode::BriskBaked);
        slot.unwrap()
            .attempts
            .push(Attempt::new(1, Ok(baked(4.2, 12_500_000))));
        summarize(&mut alone, WAN.link);
        assert!(alone
            .mode(Mode::BriskBaked)
            .summary
            .ratio_to_limit
            .is_none());
    }
}
