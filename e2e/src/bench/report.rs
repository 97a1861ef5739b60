//! What a benchmark run found, as it is written to `cold-start.json`: every attempt of every
//! mode with its figures or its error, the machine it ran on, and the medians and ratios the
//! Markdown report shows. The ratios are computed here, from this run's figures only.

use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use super::cold::ColdStart;
use super::images::ImageSizes;
use super::memory::Memory;
use super::prefetch::Bake;
use super::reads::{mib_per_sec, BriskReads, Setup as ReadsSetup, TwoReads};
use super::wan::Link;
use crate::cmd::run;

/// One repetition of one mode: its figures, or why there are none.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt<T> {
    /// 1-based.
    pub repetition: usize,
    pub ok: Option<T>,
    pub error: Option<String>,
}

impl<T> Attempt<T> {
    pub fn new(repetition: usize, result: anyhow::Result<T>) -> Self {
        match result {
            Ok(v) => Self {
                repetition,
                ok: Some(v),
                error: None,
            },
            Err(err) => Self {
                repetition,
                ok: None,
                error: Some(format!("{err:#}")),
            },
        }
    }
}

/// The figures of the successful attempts, by `f`.
pub fn figures<T>(attempts: &[Attempt<T>], f: impl Fn(&T) -> f64) -> Vec<f64> {
    attempts
        .iter()
        .filter_map(|a| a.ok.as_ref())
        .map(f)
        .collect()
}

/// `num(b) / den(a)` for every repetition in which both `a` and `b` succeeded: the paired
/// ratios, to show how often a single repetition missed a target the medians meet.
pub fn paired<A, B>(
    den: &[Attempt<A>],
    fa: impl Fn(&A) -> f64,
    num: &[Attempt<B>],
    fb: impl Fn(&B) -> f64,
) -> Vec<f64> {
    den.iter()
        .filter_map(|a| {
            let b = num.iter().find(|b| b.repetition == a.repetition)?;
            Some(fb(b.ok.as_ref()?) / fa(a.ok.as_ref()?))
        })
        .collect()
}

/// Median (the mean of the middle two for an even count), minimum and maximum.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub containerd: String,
    pub runc: String,
    pub registry: String,
    pub load_at_start: String,
    pub load_at_end: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            memory_gib: mem_kib / (1 << 20) as f64,
            kernel: version(&["uname", "-r"], 0),
            containerd: version(&["containerd", "--version"], 2),
            runc: version(&["runc", "--version"], 2),
            registry: version(&["docker-registry", "--version"], 2),
            load_at_start: load(),
            load_at_end: String::new(),
        }
    }
}

/// Word `word` of the first line `args` prints, or "unknown".
fn version(args: &[&str], word: usize) -> String {
    run(Command::new(args[0]).args(&args[1..]))
        .ok()
        .and_then(|out| {
            out.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(word))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The 1-, 5- and 15-minute load averages.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Binaries {
    /// Where `brisk` and `brisk-snapshotter` came from, relative to the workspace.
    pub brisk: String,
    pub snapshotter: String,
    /// When the snapshotter binary was written (its mtime), in UTC.
    pub built_utc: String,
    pub commit: String,
    /// Whether the working tree differed from the commit when the run started.
    pub uncommitted_changes: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ColdResults {
    /// The order the modes ran in, per repetition.
    pub order: Vec<Vec<&'static str>>,
    pub overlay: Vec<Attempt<ColdStart>>,
    pub lazy: Vec<Attempt<ColdStart>>,
    pub warm: Vec<Attempt<ColdStart>>,
    /// (d): empty root, holding the trace (b) of the same repetition recorded.
    pub recorded: Vec<Attempt<ColdStart>>,
    /// (e): empty root, no trace, `py:baked`.
    pub baked: Vec<Attempt<ColdStart>>,
    /// The conversion to `py:baked`, once per run, after the first (b) that left a trace.
    pub bake: Option<Attempt<Bake>>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReadResults {
    pub file_bytes: u64,
    pub setup: Option<ReadsSetup>,
    pub setup_error: Option<String>,
    pub overlay: Vec<Attempt<TwoReads>>,
    pub brisk: Vec<Attempt<BriskReads>>,
}

/// The headline figures: medians over the successful attempts, and their ratios.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub overlay_seconds: Option<Spread>,
    pub lazy_seconds: Option<Spread>,
    pub warm_seconds: Option<Spread>,
    /// (b) / (a), target at most 0.3.
    pub lazy_ratio: Option<f64>,
    /// (b) / (a) within each repetition.
    pub lazy_ratio_per_repetition: Vec<f64>,
    /// (c) / (a).
    pub warm_ratio: Option<f64>,
    pub recorded_seconds: Option<Spread>,
    pub baked_seconds: Option<Spread>,
    /// (d) / (a) and (e) / (a).
    pub recorded_ratio: Option<f64>,
    pub baked_ratio: Option<f64>,
    /// Each mode's median over that of (c), in the order (a), (b), (d), (e).
    pub to_warm: [Option<f64>; 4],
    /// ((b) − (d)) / ((b) − (c)) of the medians: the share of the cold-to-warm gap that a
    /// recorded trace closes. Target at least 0.9.
    pub recorded_gap_closed: Option<f64>,
    pub recorded_gap_closed_per_repetition: Vec<f64>,
    /// The same for (e).
    pub baked_gap_closed: Option<f64>,
    pub baked_gap_closed_per_repetition: Vec<f64>,
    /// 1 − on-demand / (on-demand + prefetch) chunk fetches from the registry, over the
    /// repetitions of (b), (d) and (e). Target at least 0.95 for (d) and (e).
    pub lazy_local_share: Option<Spread>,
    pub recorded_local_share: Option<Spread>,
    pub baked_local_share: Option<Spread>,
    pub overlay_first_mib_s: Option<Spread>,
    pub overlay_second_mib_s: Option<Spread>,
    pub brisk_first_mib_s: Option<Spread>,
    pub brisk_second_mib_s: Option<Spread>,
    /// Brisk / overlayfs throughput, target at least 0.8.
    pub first_read_ratio: Option<f64>,
    pub second_read_ratio: Option<f64>,
    pub first_read_ratio_per_repetition: Vec<f64>,
    pub second_read_ratio_per_repetition: Vec<f64>,
    pub rss_idle_mib: Option<Spread>,
    /// Target at most 64.
    pub rss_pulled_mib: Option<Spread>,
    pub rss_ran_mib: Option<Spread>,
    pub rss_peak_mib: Option<Spread>,
}

pub const TARGET_LAZY_RATIO: f64 = 0.3;
pub const TARGET_READ_RATIO: f64 = 0.8;
pub const TARGET_RSS_MIB: f64 = 64.0;
pub const TARGET_GAP_CLOSED: f64 = 0.9;
pub const TARGET_LOCAL_SHARE: f64 = 0.95;

/// Chunks fetched from the registry while a reader waited, and by prefetch before any reader
/// asked for them, from `brisk status --json`.
pub fn origin_fetches(status: &Value) -> Option<(u64, u64)> {
    Some((
        status["on_demand_fetches"].as_u64()?,
        status["prefetch_fetches"].as_u64()?,
    ))
}

/// The share of first-touch chunk reads that did not wait on the registry:
/// 1 − on-demand / (on-demand + prefetch). `None` when nothing was fetched at all.
pub fn local_share(status: &Value) -> Option<f64> {
    let (on_demand, prefetch) = origin_fetches(status)?;
    let all = on_demand + prefetch;
    (all > 0).then(|| 1.0 - on_demand as f64 / all as f64)
}

/// ((b) − (x)) / ((b) − (c)) within each repetition in which all three succeeded.
fn gap_closed_per_repetition(
    lazy: &[Attempt<ColdStart>],
    warm: &[Attempt<ColdStart>],
    x: &[Attempt<ColdStart>],
) -> Vec<f64> {
    let at = |a: &[Attempt<ColdStart>], rep: usize| {
        a.iter()
            .find(|a| a.repetition == rep)
            .and_then(|a| a.ok.as_ref())
            .map(|c| c.seconds)
    };
    lazy.iter()
        .filter_map(|b| {
            let b_s = b.ok.as_ref()?.seconds;
            let (c_s, x_s) = (at(warm, b.repetition)?, at(x, b.repetition)?);
            Some((b_s - x_s) / (b_s - c_s))
        })
        .collect()
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub command: String,
    pub started_utc: String,
    pub wall_seconds: f64,
    pub repetitions: usize,
    pub machine: Machine,
    pub binaries: Binaries,
    pub link: Option<Link>,
    pub images: Vec<ImageSizes>,
    pub cold_start: ColdResults,
    pub reads: ReadResults,
    pub memory: Vec<Attempt<Memory>>,
    pub summary: Summary,
}

impl Report {
    /// Fills `summary` from the attempts.
    pub fn summarize(&mut self) {
        let c = &self.cold_start;
        let secs = |a: &[Attempt<ColdStart>]| Spread::of(&figures(a, |s| s.seconds));
        let r = &self.reads;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let ratio = |x: Option<Spread>, y: Option<Spread>| Some(x?.median / y?.median);
        let mut s = Summary {
            overlay_seconds: secs(&c.overlay),
            lazy_seconds: secs(&c.lazy),
            warm_seconds: secs(&c.warm),
            overlay_first_mib_s: Spread::of(&figures(&r.overlay, |t| mib_per_sec(t.first))),
            overlay_second_mib_s: Spread::of(&figures(&r.overlay, |t| mib_per_sec(t.second))),
            brisk_first_mib_s: Spread::of(&figures(&r.brisk, |b| mib_per_sec(b.reads.first))),
            brisk_second_mib_s: Spread::of(&figures(&r.brisk, |b| mib_per_sec(b.reads.second))),
            rss_idle_mib: Spread::of(&figures(&self.memory, |m| mib(m.idle_kib))),
            rss_pulled_mib: Spread::of(&figures(&self.memory, |m| mib(m.pulled_kib))),
            rss_ran_mib: Spread::of(&figures(&self.memory, |m| mib(m.ran_kib))),
            rss_peak_mib: Spread::of(&figures(&self.memory, |m| mib(m.peak_kib))),
            ..Summary::default()
        };
        s.recorded_seconds = secs(&c.recorded);
        s.baked_seconds = secs(&c.baked);
        s.lazy_ratio = ratio(s.lazy_seconds, s.overlay_seconds);
        s.warm_ratio = ratio(s.warm_seconds, s.overlay_seconds);
        s.recorded_ratio = ratio(s.recorded_seconds, s.overlay_seconds);
        s.baked_ratio = ratio(s.baked_seconds, s.overlay_seconds);
        s.to_warm = [
            s.overlay_seconds,
            s.lazy_seconds,
            s.recorded_seconds,
            s.baked_seconds,
        ]
        .map(|x| ratio(x, s.warm_seconds));
        let gap = |x: Option<Spread>| {
            let (b, c, x) = (s.lazy_seconds?.median, s.warm_seconds?.median, x?.median);
            Some((b - x) / (b - c))
        };
        s.recorded_gap_closed = gap(s.recorded_seconds);
        s.baked_gap_closed = gap(s.baked_seconds);
        s.recorded_gap_closed_per_repetition =
            gap_closed_per_repetition(&c.lazy, &c.warm, &c.recorded);
        s.baked_gap_closed_per_repetition = gap_closed_per_repetition(&c.lazy, &c.warm, &c.baked);
        let share = |a: &[Attempt<ColdStart>]| {
            let each: Vec<f64> = a
                .iter()
                .filter_map(|a| local_share(a.ok.as_ref()?.status.as_ref()?))
                .collect();
            Spread::of(&each)
        };
        s.lazy_local_share = share(&c.lazy);
        s.recorded_local_share = share(&c.recorded);
        s.baked_local_share = share(&c.baked);
        s.first_read_ratio = ratio(s.brisk_first_mib_s, s.overlay_first_mib_s);
        s.second_read_ratio = ratio(s.brisk_second_mib_s, s.overlay_second_mib_s);
        s.lazy_ratio_per_repetition = paired(&c.overlay, |a| a.seconds, &c.lazy, |b| b.seconds);
        // Throughput ratios: the inverse of the time ratios.
        s.first_read_ratio_per_repetition =
            paired(&r.brisk, |b| b.reads.first, &r.overlay, |o| o.first);
        s.second_read_ratio_per_repetition =
            paired(&r.brisk, |b| b.reads.second, &r.overlay, |o| o.second);
        self.summary = s;
    }

    /// Every error of the run, labelled with its mode and repetition.
    pub fn failures(&self) -> Vec<(String, String)> {
        fn collect<T>(out: &mut Vec<(String, String)>, what: &str, attempts: &[Attempt<T>]) {
            for a in attempts {
                if let Some(e) = &a.error {
                    out.push((format!("{what}, repetition {}", a.repetition), e.clone()));
                }
            }
        }
        let mut out = Vec::new();
        collect(
            &mut out,
            "(a) overlayfs cold start",
            &self.cold_start.overlay,
        );
        collect(&mut out, "(b) Brisk lazy cold start", &self.cold_start.lazy);
        collect(
            &mut out,
            "(c) Brisk warm-L2 cold start",
            &self.cold_start.warm,
        );
        collect(
            &mut out,
            "(d) Brisk cold start with a recorded trace",
            &self.cold_start.recorded,
        );
        if let Some(bake) = &self.cold_start.bake {
            collect(
                &mut out,
                "baking the trace into `py:baked`",
                std::slice::from_ref(bake),
            );
        }
        collect(
            &mut out,
            "(e) Brisk cold start with a baked trace",
            &self.cold_start.baked,
        );
        if let Some(e) = &self.reads.setup_error {
            out.push(("reads: pulling `big`".to_owned(), e.clone()));
        }
        collect(&mut out, "reads on overlayfs", &self.reads.overlay);
        collect(&mut out, "reads on Brisk", &self.reads.brisk);
        collect(&mut out, "snapshotter memory", &self.memory);
        out
    }
}
