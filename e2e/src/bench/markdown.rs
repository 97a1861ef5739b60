//! `BENCHMARKS-snapshotter.md`, rendered from a `Report`: tables of medians with their range,
//! the ratios against this run's baselines next to their targets, every failure, and how the
//! figures were taken. It states only what the report holds.

use std::fmt::Write;

use super::cold::ColdStart;
use super::images::{BIG_FILE, BIG_FILE_BYTES, SMALL_IMAGES};
use super::memory::Memory;
use super::reads::mib_per_sec;
use super::report::{
    figures, origin_fetches, Attempt, Binaries, Machine, Report, Spread, TARGET_GAP_CLOSED,
    TARGET_LAZY_RATIO, TARGET_LOCAL_SHARE, TARGET_READ_RATIO, TARGET_RSS_MIB,
};
use serde_json::Value;

pub fn render(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Snapshotter benchmarks\n");
    let _ = writeln!(
        md,
        "Produced by `{}`, started {} and done in {:.0} s. Every figure below was measured in \
         that run, and every ratio compares figures of that same run. Within each repetition \
         the modes ran one after another (order below, alternated between repetitions); each \
         figure is the median of {} repetition(s), with the range in brackets. A mode that \
         failed says so. Targets are printed next to the figures and not enforced.\n",
        r.command, r.started_utc, r.wall_seconds, r.repetitions
    );

    let _ = writeln!(md, "## Machine and setup\n");
    machine_rows(&mut md, &r.machine);
    if let Some(link) = &r.link {
        let _ = writeln!(
            md,
            "| emulated WAN | {} ms RTT ({} ms each way, one more RTT per new connection), {} Mbit/s \
             registry → client shared by all connections; a user-space relay on loopback between \
             every measured client and the registry |",
            link.rtt.as_millis(),
            link.rtt.as_millis() / 2,
            link.bits_per_sec / 1_000_000
        );
    }
    build_and_load_rows(&mut md, &r.binaries, &r.machine);

    images_table(&mut md, r);
    cold_section(&mut md, r);
    reads_section(&mut md, r);

    memory_section(&mut md, r);

    failures_section(&mut md, &r.failures(), "cold-start.json");

    method_section(&mut md);
    md
}

/// Every failure, by the first lines of its error; the whole errors are in `json`.
pub(super) fn failures_section(md: &mut String, failures: &[(String, String)], json: &str) {
    let _ = writeln!(md, "## Failures\n");
    if failures.is_empty() {
        let _ = writeln!(md, "None: every mode succeeded in every repetition.\n");
        return;
    }
    for (what, err) in failures {
        let first: String = err.lines().take(3).collect::<Vec<_>>().join(" / ");
        let _ = writeln!(md, "- {what}: {}", shorten(&first, 400));
    }
    let _ = writeln!(md, "\nThe full errors are in `{json}`.\n");
}

/// The head of a report's machine table: hardware, kernel, containerd, runc, registry.
pub(super) fn machine_rows(md: &mut String, m: &Machine) {
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| CPU | {} cores, {} |", m.cores, m.cpu);
    let _ = writeln!(md, "| memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(md, "| kernel (`uname -r`) | {} |", m.kernel);
    let _ = writeln!(md, "| containerd / runc | {} / {} |", m.containerd, m.runc);
    let _ = writeln!(
        md,
        "| registry | docker-registry {} on loopback |",
        m.registry
    );
}

/// The tail of a report's machine table: which Brisk binaries ran, and the load around the run.
pub(super) fn build_and_load_rows(md: &mut String, b: &Binaries, m: &Machine) {
    let _ = writeln!(
        md,
        "| Brisk binaries | `{}`, `{}`, built {}; workspace at commit {}{} when the run started |",
        b.brisk,
        b.snapshotter,
        b.built_utc,
        b.commit,
        if b.uncommitted_changes {
            " with uncommitted changes"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| load average (1/5/15 min) | {} at start, {} at end |\n",
        m.load_at_start, m.load_at_end
    );
}

fn images_table(md: &mut String, r: &Report) {
    if r.images.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "| image | layers | `:v1` (gzip, umoci) | `:lazy` (`brisk convert`) |\n|---|---|---|---|"
    );
    let (small, named): (Vec<_>, Vec<_>) =
        r.images.iter().partition(|i| i.name.starts_with("small-"));
    for i in named {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} |",
            i.name,
            i.layers,
            bytes(i.v1_bytes),
            bytes(i.lazy_bytes)
        );
    }
    if let (Some(first), Some(last)) = (small.first(), small.last()) {
        let range = |f: fn(&&super::images::ImageSizes) -> u64| {
            let lo = small.iter().map(f).min().unwrap_or(0);
            let hi = small.iter().map(f).max().unwrap_or(0);
            if bytes(lo) == bytes(hi) {
                bytes(lo)
            } else {
                format!("{}–{}", bytes(lo), bytes(hi))
            }
        };
        let _ = writeln!(
            md,
            "| `{}` … `{}` ({} images, each) | {} | {} | {} |",
            first.name,
            last.name,
            small.len(),
            first.layers,
            range(|i| i.v1_bytes),
            range(|i| i.lazy_bytes)
        );
    }
    let _ = writeln!(md);
}

fn memory_section(md: &mut String, r: &Report) {
    let s = &r.summary;
    let _ = writeln!(md, "## Snapshotter memory (`VmRSS`)\n");
    let _ = writeln!(md, "| state | VmRSS | target |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| idle, just started | {} | |",
        spread(s.rss_idle_mib, r.memory.len(), "MiB", 1)
    );
    let rss_target = |v: Option<Spread>, each: &dyn Fn(&Memory) -> u64| {
        target(
            v.map(|v| v.median),
            &figures(&r.memory, |m| each(m) as f64 / 1024.0),
            |x| x <= TARGET_RSS_MIB,
            &format!("≤ {TARGET_RSS_MIB:.0} MiB"),
        )
    };
    let mounts = r
        .memory
        .iter()
        .filter_map(|a| a.ok.as_ref())
        .map(|m| m.lazy_mounts)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        md,
        "| {SMALL_IMAGES} lazy images pulled ({mounts} FUSE mounts) | {} | {} |",
        spread(s.rss_pulled_mib, r.memory.len(), "MiB", 1),
        rss_target(s.rss_pulled_mib, &|m| m.pulled_kib)
    );
    let _ = writeln!(
        md,
        "| and one container run on each | {} | {} |",
        spread(s.rss_ran_mib, r.memory.len(), "MiB", 1),
        rss_target(s.rss_ran_mib, &|m| m.ran_kib)
    );
    let _ = writeln!(
        md,
        "| peak over the run (`VmHWM`) | {} | |\n",
        spread(s.rss_peak_mib, r.memory.len(), "MiB", 1)
    );
}

/// One mode's line in the cold-start table.
struct Row<'a> {
    name: &'a str,
    attempts: &'a [Attempt<ColdStart>],
    seconds: Option<Spread>,
    ratio: Option<String>,
    to_warm: Option<f64>,
    target: String,
}

fn cold_section(md: &mut String, r: &Report) {
    let s = &r.summary;
    let c = &r.cold_start;
    let _ = writeln!(
        md,
        "## Cold start of `py`: from the start of the pull to the container's first line\n"
    );
    let _ = writeln!(md, "| mode | pull to `ready` | ratio to (a) | target | ratio to (c) | of which pull | bytes from the registry | requests | connections | chunk reads from registry / L2 |\n|---|---|---|---|---|---|---|---|---|---|");
    let lazy_target = target(
        s.lazy_ratio,
        &s.lazy_ratio_per_repetition,
        |x| x <= TARGET_LAZY_RATIO,
        &format!("≤ {TARGET_LAZY_RATIO}× (a)"),
    );
    let two = |x: Option<f64>| x.map(|x| format!("{x:.2}"));
    let rows = [
        Row {
            name: "(a) overlayfs, full pull (`ctr image pull`)",
            attempts: &c.overlay,
            seconds: s.overlay_seconds,
            ratio: s.overlay_seconds.map(|_| "1 (baseline)".to_owned()),
            to_warm: s.to_warm[0],
            target: String::new(),
        },
        Row {
            name: "(b) Brisk lazy, first start (`brisk pull`, empty snapshotter root)",
            attempts: &c.lazy,
            seconds: s.lazy_seconds,
            ratio: two(s.lazy_ratio),
            to_warm: s.to_warm[1],
            target: lazy_target,
        },
        Row {
            name: "(d) Brisk, recorded trace (empty L1/L2, trace of (b) imported before the pull)",
            attempts: &c.recorded,
            seconds: s.recorded_seconds,
            ratio: two(s.recorded_ratio),
            to_warm: s.to_warm[2],
            target: String::new(),
        },
        Row {
            name: "(e) Brisk, baked trace (`py:baked`, empty L1/L2, no trace held)",
            attempts: &c.baked,
            seconds: s.baked_seconds,
            ratio: two(s.baked_ratio),
            to_warm: s.to_warm[3],
            target: String::new(),
        },
        Row {
            name: "(c) Brisk, warm L2 (chunk cache kept, no trace, restarted)",
            attempts: &c.warm,
            seconds: s.warm_seconds,
            ratio: two(s.warm_ratio),
            to_warm: s.warm_seconds.map(|_| 1.0),
            target: String::new(),
        },
    ];
    for row in rows {
        let pull = Spread::of(&figures(row.attempts, |a| a.pull_seconds));
        let median = median_attempt(row.attempts);
        let traffic = median.map(|m| m.traffic);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            spread(row.seconds, row.attempts.len(), "s", 2),
            row.ratio.unwrap_or_else(|| "–".to_owned()),
            row.target,
            two(row.to_warm).unwrap_or_else(|| "–".to_owned()),
            spread(pull, row.attempts.len(), "s", 2),
            traffic.map_or("–".into(), |t| bytes(t.bytes_down)),
            traffic.map_or("–".into(), |t| t.requests.to_string()),
            traffic.map_or("–".into(), |t| t.connections.to_string()),
            median
                .and_then(|m| chunk_hits(m.status.as_ref()?))
                .unwrap_or_else(|| "–".to_owned()),
        );
    }
    prefetch_table(md, r);
    let _ = writeln!(md, "Every repetition, in the order run (seconds; traffic and cache hits in `cold-start.json`):\n");
    let _ = writeln!(
        md,
        "| repetition | order | (a) | (b) | (c) | (d) | (e) |\n|---|---|---|---|---|---|---|"
    );
    for (i, order) in c.order.iter().enumerate() {
        let cell = |a: &[Attempt<ColdStart>]| match a.iter().find(|a| a.repetition == i + 1) {
            Some(Attempt { ok: Some(v), .. }) => format!("{:.2}", v.seconds),
            Some(_) => "failed".to_owned(),
            None => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            order.join(" "),
            cell(&c.overlay),
            cell(&c.lazy),
            cell(&c.warm),
            cell(&c.recorded),
            cell(&c.baked)
        );
    }
    let _ = writeln!(md);
}

/// The prefetch table alone, for a partial run (`--cold-only`) to print.
pub fn prefetch_summary(r: &Report) -> String {
    let mut md = String::new();
    prefetch_table(&mut md, r);
    md
}

/// What prefetch from a trace achieved: the share of the cold-to-warm gap it closes, and the
/// share of first-touch chunk reads it served without a wait on the registry.
fn prefetch_table(md: &mut String, r: &Report) {
    let s = &r.summary;
    let c = &r.cold_start;
    let _ = writeln!(
        md,
        "\nPrefetch from a start-up trace, against the first start (b) and the warm L2 (c):\n"
    );
    let _ = writeln!(md, "| mode | gap closed, ((b) − X) / ((b) − (c)) | target | chunks fetched from the registry: on demand / by prefetch | first-touch reads served locally, 1 − on demand / (on demand + prefetch) | target |\n|---|---|---|---|---|---|");
    let gap_target = |x: Option<f64>, each: &[f64]| {
        target(
            x,
            each,
            |x| x >= TARGET_GAP_CLOSED,
            &format!("≥ {:.0}%", TARGET_GAP_CLOSED * 100.0),
        )
    };
    let share_target = |x: Option<Spread>, a: &[Attempt<ColdStart>]| {
        let each: Vec<f64> = a
            .iter()
            .filter_map(|a| super::report::local_share(a.ok.as_ref()?.status.as_ref()?))
            .collect();
        target(
            x.map(|x| x.median),
            &each,
            |x| x >= TARGET_LOCAL_SHARE,
            &format!("≥ {:.0}%", TARGET_LOCAL_SHARE * 100.0),
        )
    };
    let percent = |x: Option<f64>| x.map_or("–".to_owned(), |x| format!("{:.0}%", x * 100.0));
    let share = |x: Option<Spread>, of: usize| match x {
        Some(x) => {
            let mut text = format!("{:.0}%", x.median * 100.0);
            if x.n > 1 {
                text += &format!(" ({:.0}–{:.0}%)", x.min * 100.0, x.max * 100.0);
            }
            if x.n < of {
                text += &format!(", {} of {of} ok", x.n);
            }
            text
        }
        None => "–".to_owned(),
    };
    let fetches = |a: &[Attempt<ColdStart>]| {
        median_attempt(a)
            .and_then(|m| origin_fetches(m.status.as_ref()?))
            .map_or("–".to_owned(), |(d, p)| format!("{d} / {p}"))
    };
    let _ = writeln!(
        md,
        "| (b) first start, for comparison | 0% | | {} | {} | |",
        fetches(&c.lazy),
        share(s.lazy_local_share, c.lazy.len())
    );
    let _ = writeln!(
        md,
        "| (d) recorded trace | {} | {} | {} | {} | {} |",
        percent(s.recorded_gap_closed),
        gap_target(s.recorded_gap_closed, &s.recorded_gap_closed_per_repetition),
        fetches(&c.recorded),
        share(s.recorded_local_share, c.recorded.len()),
        share_target(s.recorded_local_share, &c.recorded)
    );
    let _ = writeln!(
        md,
        "| (e) baked trace | {} | {} | {} | {} | {} |\n",
        percent(s.baked_gap_closed),
        gap_target(s.baked_gap_closed, &s.baked_gap_closed_per_repetition),
        fetches(&c.baked),
        share(s.baked_local_share, c.baked.len()),
        share_target(s.baked_local_share, &c.baked)
    );
    let _ = writeln!(
        md,
        "The gap closed is computed from the medians; the repetitions that miss a target are \
         counted from each repetition's own (b), (c) and (d) or (e). The fetch counts are the \
         daemon's (`brisk status --json`, read after the container exited) in the repetition \
         with the median time. A chunk counts as prefetched only if prefetch fetched it before \
         any reader asked for it: a chunk a reader needed while its prefetch was still in flight \
         counts as on demand. Prefetch may also fetch chunks the start never reads, which count \
         on the prefetch side.\n"
    );
    // For scale: the transfer time alone of what prefetch modes moved, and the time a 90%
    // share of the gap asks for, both from this run's figures.
    let crossing = |a: &[Attempt<ColdStart>]| {
        let link = r.link?;
        let moved = median_attempt(a)?.traffic.bytes_down as f64;
        Some(moved * 8.0 / link.bits_per_sec as f64)
    };
    let needed = s
        .lazy_seconds
        .zip(s.warm_seconds)
        .map(|(b, c)| b.median - TARGET_GAP_CLOSED * (b.median - c.median));
    if let (Some(d), Some(e), Some(needed), Some(link)) =
        (crossing(&c.recorded), crossing(&c.baked), needed, r.link)
    {
        let _ = writeln!(
            md,
            "For scale: at the link's {} Mbit/s, the bytes (d) and (e) moved take at least \
             {d:.2} s and {e:.2} s to cross it, pull and program start not included; closing \
             {:.0}% of the gap asks for a start in at most {needed:.2} s.\n",
            link.bits_per_sec / 1_000_000,
            TARGET_GAP_CLOSED * 100.0
        );
    }
    if let Some(bake) = &c.bake {
        let _ = match (&bake.ok, &bake.error) {
            (Some(b), _) => writeln!(
                md,
                "`py:baked` was converted once, from `py:v1` with the trace recorded by (b) of \
                 repetition {} ({} chunks, {} files): {} layer(s), {}, in {:.1} s, directly on the \
                 registry.\n",
                b.from_repetition,
                b.trace["chunks"],
                b.trace["files"],
                b.layers,
                bytes(b.bytes),
                b.seconds
            ),
            (None, err) => writeln!(
                md,
                "Baking the trace into `py:baked` failed: {}\n",
                shorten(err.as_deref().unwrap_or(""), 300)
            ),
        };
    }
}

fn reads_section(md: &mut String, r: &Report) {
    let s = &r.summary;
    let _ = writeln!(
        md,
        "## Reading a {} MiB file inside a container (`cat {BIG_FILE} > /dev/null`)\n",
        BIG_FILE_BYTES >> 20
    );
    let _ = writeln!(
        md,
        "| read | overlayfs | Brisk | Brisk / overlayfs | target |\n|---|---|---|---|---|"
    );
    let tgt = |x: Option<f64>, each: &[f64]| {
        target(
            x,
            each,
            |x| x >= TARGET_READ_RATIO,
            &format!("≥ {TARGET_READ_RATIO}×"),
        )
    };
    let _ = writeln!(
        md,
        "| first read: page cache dropped; overlayfs reads the disk, Brisk its L2 on disk (L1 empty after a restart) | {} | {} | {} | {} |",
        spread(s.overlay_first_mib_s, r.reads.overlay.len(), "MiB/s", 0), spread(s.brisk_first_mib_s, r.reads.brisk.len(), "MiB/s", 0),
        s.first_read_ratio.map_or("–".into(), |x| format!("{x:.2}")), tgt(s.first_read_ratio, &s.first_read_ratio_per_repetition)
    );
    let _ = writeln!(
        md,
        "| second read, page cache warm | {} | {} | {} | {} |\n",
        spread(s.overlay_second_mib_s, r.reads.overlay.len(), "MiB/s", 0),
        spread(s.brisk_second_mib_s, r.reads.brisk.len(), "MiB/s", 0),
        s.second_read_ratio
            .map_or("–".into(), |x| format!("{x:.2}")),
        tgt(s.second_read_ratio, &s.second_read_ratio_per_repetition)
    );
    if let Some(setup) = &r.reads.setup {
        let brisk_traffic: u64 = r
            .reads
            .brisk
            .iter()
            .filter_map(|a| a.ok.as_ref())
            .map(|b| b.traffic.bytes_down)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "For information (one run each, not targets): `ctr image pull` of `big:v1` into overlayfs took \
             {:.1} s and moved {} across the link; `brisk pull` of `big:lazy` took {:.2} s. The first read \
             on Brisk, with nothing cached, fetched the file across the link at {:.1} MiB/s ({} moved); \
             the read right after it, page cache warm, ran at {:.0} MiB/s. The timed Brisk repetitions \
             moved at most {} across the link. Starting `cat` itself (`cat /dev/null`, fastest of five) \
             took {:.1} ms on overlayfs and {:.1} ms on Brisk (medians); it is included in every read \
             figure.\n",
            setup.overlay_pull_seconds, bytes(setup.overlay_pull_traffic.bytes_down), setup.brisk_pull_seconds,
            mib_per_sec(setup.brisk_network.first), bytes(setup.brisk_network_traffic.bytes_down),
            mib_per_sec(setup.brisk_network.second), bytes(brisk_traffic),
            spawn_ms(&figures(&r.reads.overlay, |t| t.spawn)),
            spawn_ms(&figures(&r.reads.brisk, |b| b.reads.spawn)),
        );
    }
}

fn method_section(md: &mut String) {
    let _ = writeln!(md, "## How it was measured\n");
    let _ = writeln!(
        md,
        "- `py` is Debian bookworm minbase with python3 (`mmdebstrap`, packed with umoci); its command, \
         `python3 -c \"import json, http.server, email, sqlite3; print('ready')\"`, prints `ready`. \
         `big` is `py` plus a layer with one file of incompressible bytes. The small images are busybox \
         plus a file of their own, so each is a different lazy layer. All are pushed as `:v1` and \
         converted to `:lazy` with `brisk convert` before any measurement, directly on the registry.\n\
         - Every measured client (ctr, `brisk pull`, the snapshotter) reaches the registry only through the \
         emulated link, and the link counts the bytes and request heads it carries.\n\
         - Cold start: each run starts a containerd with a fresh root, drops the page cache \
         (`sync; echo 3 > /proc/sys/vm/drop_caches`), then times from the start of the pull to the \
         moment `ctr run --rm` prints `ready`. (a) is `ctr image pull --plain-http --snapshotter overlayfs` \
         then `ctr run --snapshotter overlayfs`. (b) starts a snapshotter on an empty root (a first start: \
         no trace to prefetch from; it records one) and runs `brisk pull` then `ctr run --snapshotter brisk`. \
         (c) follows (b) of the same repetition: the image is removed (`ctr images rm --sync`), the \
         snapshotter stopped with SIGTERM, everything under its root but `cache/` and `meta/` deleted \
         (snapshot records and the recorded trace go), and it is started again before the run. \
         (d) starts a snapshotter on an empty root, gives it the trace (b) of the same repetition \
         recorded (`brisk trace ls` until it lists it, `brisk trace export`, then `brisk trace \
         import` on the new daemon, all before the timed part), and runs `py:lazy` as (b) did; the \
         daemon prefetches the traced chunks from the moment `Prepare` sees the image's layers. \
         (e) runs `py:baked` on a snapshotter with an empty root and no trace; the daemon \
         prefetches the chunks the TOC lists. `py:baked` is converted once per run with \
         `brisk convert --trace FILE REGISTRY/py:v1 REGISTRY/py:baked`, directly on the registry, \
         from the first trace a (b) recorded. Every Brisk snapshotter of this section runs with \
         `[trace] quiet_secs = 1` (a recording ends one second after the last read instead of \
         five) and otherwise the default configuration.\n\
         - Reads: one containerd and one snapshotter with start-up traces off for the phase. Python in the \
         container times `cat FILE > /dev/null` twice with `time.perf_counter`; each figure includes \
         starting `cat`. Before an overlayfs container the page cache is dropped; before a Brisk \
         container the snapshotter is restarted cleanly (empty L1) and the page cache dropped.\n\
         - Memory: `VmRSS` and `VmHWM` of the daemon from `/proc/PID/status`, default configuration \
         (its in-memory chunk cache, L1, may grow to 256 MiB and counts in RSS), read after two quiet \
         seconds. Each repetition starts a new daemon on an empty root, pulls the ten small images \
         with `brisk pull`, then runs `cat /etc/hostname` in one container of each.\n"
    );
}

fn spawn_ms(seconds: &[f64]) -> f64 {
    Spread::of(seconds).map_or(f64::NAN, |s| s.median * 1000.0)
}

/// Whether the median `value` meets a target, and how many single repetitions (`each`) miss it.
fn target(value: Option<f64>, each: &[f64], ok: impl Fn(f64) -> bool, text: &str) -> String {
    let verdict = match value {
        Some(v) if ok(v) => format!("{text}: met"),
        Some(_) => format!("{text}: not met"),
        None => return format!("{text}: no figure"),
    };
    let missed = each.iter().filter(|&&x| !ok(x)).count();
    if each.len() > 1 && missed > 0 {
        format!("{verdict} ({missed} of {} repetitions miss it)", each.len())
    } else {
        verdict
    }
}

/// The attempt with the median time (the upper one of an even count), for its traffic.
fn median_attempt(attempts: &[Attempt<ColdStart>]) -> Option<&ColdStart> {
    let mut ok: Vec<&ColdStart> = attempts.iter().filter_map(|a| a.ok.as_ref()).collect();
    ok.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    ok.get(ok.len() / 2).copied()
}

/// "registry hits / disk hits" from `brisk status --json`.
fn chunk_hits(status: &Value) -> Option<String> {
    let hits = |level: &str| {
        status["cache"]
            .as_array()?
            .iter()
            .find(|l| l["level"] == level)?["hits"]
            .as_u64()
    };
    Some(format!("{} / {}", hits("registry")?, hits("disk")?))
}

pub(super) fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A median with its range, e.g. `2.76 s (2.70–2.90)`, and how many of `of` attempts it
/// covers when some failed.
pub(super) fn spread(s: Option<Spread>, of: usize, unit: &str, decimals: usize) -> String {
    let Some(s) = s else {
        return "failed".to_owned();
    };
    let d = decimals;
    let mut text = format!("{:.d$} {unit}", s.median);
    if s.n > 1 {
        text += &format!(" ({:.d$}–{:.d$})", s.min, s.max);
    }
    if s.n < of {
        text += &format!(", {} of {of} ok", s.n);
    }
    text
}

pub(super) fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}
