//! `BENCHMARKS.md`, rendered from a `CompareReport`: the chart, the machine and versions, the
//! targets with their verdicts, one table per workload and profile, every repetition, every
//! failure, and how the figures were taken. It states only what the report holds.

use std::fmt::Write;

use super::compare::{
    failures, Cell, CompareReport, Mode, ModeResults, Run, BAKED_OVER_LIMIT, TARGETS,
    TARGET_PROFILE,
};
use super::markdown::{
    build_and_load_rows, bytes, failures_section, machine_rows, shorten, spread,
};
use super::report::{Attempt, Spread};

pub fn render(r: &CompareReport, chart: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks: Brisk, overlayfs and stargz-snapshotter\n"
    );
    let _ = writeln!(
        md,
        "Produced by `{}`, started {} and done in {:.0} s ({:.1} min). Every figure below was \
         measured in that run on this machine, and every ratio compares figures of that same \
         run. Each figure is the median of {} repetition(s), with the range in brackets; the \
         modes ran interleaved within each repetition (orders below). A mode that failed, or a \
         lazy start that fell back to a full pull, says so and is left out of the medians. \
         Targets are printed next to the figures and not enforced.\n",
        r.command,
        r.started_utc,
        r.wall_seconds,
        r.wall_seconds / 60.0,
        r.repetitions
    );
    let _ = writeln!(
        md,
        "![Time to ready per workload, network profile and mode]({chart})\n"
    );
    machine_section(&mut md, r);
    workloads_section(&mut md, r);
    targets_section(&mut md, r);
    for cell in &r.cells {
        cell_section(&mut md, r, cell);
    }
    stargz_section(&mut md, r);
    failures_section(&mut md, &failures(r), "compare.json");
    method_section(&mut md);
    md
}

fn machine_section(md: &mut String, r: &CompareReport) {
    let _ = writeln!(md, "## Machine and versions\n");
    machine_rows(md, &r.machine);
    match (&r.stargz, &r.stargz_error) {
        (Some(d), _) => {
            let _ = writeln!(
                md,
                "| stargz-snapshotter | daemon `containerd-stargz-grpc` built by \
                 `e2e/stargz/build.sh` from Debian's packaged library; {} |",
                d.versions.join("; ")
            );
        }
        (None, err) => {
            let _ = writeln!(
                md,
                "| stargz-snapshotter | the daemon did not build: {} |",
                shorten(err.as_deref().unwrap_or(""), 200)
            );
        }
    }
    build_and_load_rows(md, &r.binaries, &r.machine);
    let _ = writeln!(
        md,
        "| network profile | link between the host and the registry |\n|---|---|"
    );
    for p in &r.profiles {
        let _ = writeln!(md, "| {} | {} |", p.name, p.describe());
    }
    let _ = writeln!(md);
}

fn workloads_section(md: &mut String, r: &CompareReport) {
    let _ = writeln!(md, "## Workloads and images\n");
    let _ = writeln!(
        md,
        "| workload | image | ready when | command | layers | `:v1` (gzip) | uncompressed | \
         Brisk `:lazy` | eStargz | eStargz optimized | eStargz convert / optimize (setup) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for w in &r.workloads {
        let wl = &w.workload;
        let packages = if wl.packages.is_empty() {
            "python3 (the cold-start benchmark's `py`)".to_owned()
        } else {
            wl.packages.join(" ")
        };
        let packages = wl
            .generated
            .iter()
            .fold(packages, |text, g| format!("{text}, {}", g.describe()));
        let size = |x: Option<u64>| x.map_or("–".to_owned(), bytes);
        let s = w.sizes.as_ref();
        let c = w.stargz.as_ref();
        let _ =
            writeln!(
            md,
            "| {} | Debian bookworm minbase + {} | {} | `{}` | {} | {} | {} | {} | {} | {} | {} |",
            wl.title,
            packages,
            wl.ready.describe(),
            wl.cmd
                .iter()
                .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.to_string() })
                .collect::<Vec<_>>()
                .join(" "),
            s.map_or("–".to_owned(), |s| s.layers.to_string()),
            size(s.map(|s| s.v1_bytes)),
            size(w.uncompressed_bytes),
            size(s.map(|s| s.lazy_bytes)),
            size(c.map(|c| c.lazy_bytes)),
            size(c.map(|c| c.optimized_bytes)),
            c.map_or("failed".to_owned(), |c| format!(
                "{:.0} s / {:.0} s",
                c.convert_seconds, c.optimize_seconds
            )),
        );
    }
    let _ = writeln!(md);
}

fn targets_section(md: &mut String, r: &CompareReport) {
    let cells: Vec<&Cell> = r
        .cells
        .iter()
        .filter(|c| c.profile == TARGET_PROFILE)
        .collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Targets (time to ready, {TARGET_PROFILE} profile)\n");
    let _ = writeln!(md, "| workload | target | measured (ratio of medians) | per repetition | verdict |\n|---|---|---|---|---|");
    for cell in cells {
        for t in &TARGETS {
            let (ratio, each) = t.ratio(cell);
            let verdict = verdict(ratio, t.at_most);
            let _ = writeln!(
                md,
                "| {} | {} ≤ {}× {} | {} | {} | {verdict} |",
                title_of(r, cell.workload),
                t.mode.title(),
                t.at_most,
                t.over.title(),
                // Three decimals: a ratio just above the target must not print as equal to it.
                ratio.map_or("–".to_owned(), |x| format!("{x:.3}×")),
                each.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        let baked = &cell.mode(Mode::BriskBaked).summary;
        let ratio = baked.ratio_to_limit;
        let verdict = verdict(ratio, BAKED_OVER_LIMIT);
        let _ = writeln!(
            md,
            "| {} | {} ≤ {BAKED_OVER_LIMIT}× its limit | {} | | {verdict} |",
            title_of(r, cell.workload),
            Mode::BriskBaked.title(),
            ratio.map_or("–".to_owned(), |x| format!("{x:.3}×")),
        );
    }
    let _ = writeln!(
        md,
        "\nA cold start's limit is max(T_local, T_meta + WS/B): T_local the median of \
         overlayfs with the image local, T_meta the start's own pull (manifest, config, TOCs, \
         mounts), WS the compressed weight of the bytes its container read (the daemon's \
         count) and B the link's rate.\n"
    );
}

fn verdict(ratio: Option<f64>, at_most: f64) -> &'static str {
    match ratio {
        Some(x) if x <= at_most => "met",
        Some(_) => "not met",
        None => "no figure",
    }
}

fn title_of(r: &CompareReport, name: &str) -> &'static str {
    r.workloads
        .iter()
        .find(|w| w.workload.name == name)
        .map_or("?", |w| w.workload.title)
}

fn cell_section(md: &mut String, r: &CompareReport, cell: &Cell) {
    let profile = r.profiles.iter().find(|p| p.name == cell.profile);
    let _ = writeln!(
        md,
        "## {} on {} ({})\n",
        title_of(r, cell.workload),
        cell.profile,
        profile.map_or(String::new(), |p| p.describe())
    );
    let _ = writeln!(
        md,
        "| mode | time to ready | × overlayfs | of which pull | limit (× limit) | registry \
         bytes | registry requests | fetched ÷ read | snapshotter RSS after the run | lazy \
         starts |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for m in &cell.modes {
        let s = &m.summary;
        let n = m.attempts.len();
        let ratio = match (m.mode, s.ratio_to_overlay) {
            (Mode::Overlay, Some(_)) => "1 (baseline)".to_owned(),
            (_, Some(x)) => format!("{x:.2}"),
            (_, None) => "–".to_owned(),
        };
        let median = |x: Option<Spread>, f: &dyn Fn(f64) -> String| {
            x.map_or("–".to_owned(), |x| f(x.median))
        };
        let rss = match m.mode {
            mode if mode.is_overlay() => "– (in containerd)".to_owned(),
            _ => median(s.rss_mib, &|x| format!("{x:.0} MiB")),
        };
        let limit = match (s.limit_seconds, s.ratio_to_limit) {
            (Some(l), Some(x)) => format!("{:.2} s ({x:.2}×)", l.median),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.mode.title(),
            spread(s.ready_seconds, n, "s", 2),
            ratio,
            spread(s.pull_seconds, n, "s", 2),
            limit,
            median(s.registry_bytes, &|x| bytes(x as u64)),
            median(s.registry_requests, &|x| format!("{x:.0}")),
            median(s.fetched_per_read, &|x| format!("{x:.2}")),
            rss,
            laziness(m),
        );
    }
    let _ = writeln!(
        md,
        "\nEvery repetition, in the order run (time to ready in seconds):\n"
    );
    let _ = write!(md, "| repetition | order |");
    for mode in Mode::ALL {
        let _ = write!(md, " {} |", mode.title());
    }
    let _ = writeln!(md, "\n|---|---|{}", "---|".repeat(Mode::ALL.len()));
    for (i, order) in cell.order.iter().enumerate() {
        let letters: Vec<String> = order.iter().map(|m| letter(*m).to_owned()).collect();
        let _ = write!(md, "| {} | {} |", i + 1, letters.join(" "));
        for mode in Mode::ALL {
            let cell_text = match cell
                .mode(mode)
                .attempts
                .iter()
                .find(|a| a.repetition == i + 1)
            {
                Some(Attempt { ok: Some(run), .. }) => run_text(run),
                Some(_) => "failed".to_owned(),
                None => "–".to_owned(),
            };
            let _ = write!(md, " {cell_text} |");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\nOrder letters: {}.\n",
        Mode::ALL
            .iter()
            .map(|m| format!("{} {}", letter(*m), m.title()))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn letter(mode: Mode) -> &'static str {
    match mode {
        Mode::Overlay => "O",
        Mode::OverlayLocal => "OL",
        Mode::OverlayHot => "OH",
        Mode::StargzLazy => "SL",
        Mode::StargzOptimized => "SO",
        Mode::BriskLazy => "BL",
        Mode::BriskTrace => "BT",
        Mode::BriskBaked => "BB",
        Mode::BriskWarm => "BW",
        Mode::BriskHot => "BH",
        Mode::BriskEstargz => "BE",
    }
}

fn run_text(run: &Run) -> String {
    if run.fell_back() {
        format!("{:.2} (fell back to a full pull)", run.start.seconds)
    } else {
        format!("{:.2}", run.start.seconds)
    }
}

/// How many starts of a lazy mode served every layer lazily.
fn laziness(m: &ModeResults) -> String {
    match m.mode {
        Mode::Overlay => return "– (full pull)".to_owned(),
        Mode::OverlayLocal | Mode::OverlayHot => return "– (image local)".to_owned(),
        _ => {}
    }
    let s = &m.summary;
    let failed = m.attempts.len() - s.ok;
    let mut text = format!("{} of {}", s.ok - s.fell_back, m.attempts.len());
    if s.fell_back > 0 {
        text += &format!("; {} fell back to a full pull", s.fell_back);
    }
    if failed > 0 {
        text += &format!("; {failed} failed");
    }
    text
}

fn stargz_section(md: &mut String, r: &CompareReport) {
    let _ = writeln!(md, "## stargz-snapshotter: how it ran\n");
    let _ = writeln!(
        md,
        "- Conversions, once per run and not timed: `ctr-remote image convert --estargz --oci \
         REGISTRY/NAME:v1 REGISTRY/NAME:esgz` (no access record, so no prefetch), and `ctr-remote \
         image optimize --oci` (the workload runs under the tool, which records what it reads; \
         the recorded files go first in each layer and are prefetched after mounting). Both on \
         a containerd of their own, pushed with `ctr image push --plain-http`."
    );
    for w in &r.workloads {
        if let Some(c) = &w.stargz {
            let _ = writeln!(md, "  - {}: `{}`", w.workload.name, c.optimize_command);
        }
    }
    let _ = writeln!(
        md,
        "- Every stargz start runs on a new daemon (`--root` and socket in a fresh directory) \
         and a new containerd, because the daemon never reuses its layer caches across \
         processes and containerd must be reset with it. The timed part is `ctr-remote image \
         rpull --plain-http --snapshotter stargz` then `ctr run --snapshotter stargz`.\n\
         - A start counts as lazy only if, after the run, the daemon had one FUSE mount per \
         layer of the image under its root; otherwise it is reported as \"fell back to a full \
         pull\" and left out of the medians.\n\
         - The daemon ran with the library's defaults: no config file and no flags but `--root` \
         and `--address`. The registry is on a loopback address, which the daemon contacts over \
         plain HTTP without a setting. So background fetch (the rest of every layer downloaded \
         a few seconds after mounting) and prefetch of optimized images are on, as shipped. \
         The effective config (`containerd-stargz-grpc --print-config`):\n"
    );
    if let Some(d) = &r.stargz {
        let _ = writeln!(md, "```toml\n{}\n```\n", d.config.trim_end());
    }
}

fn method_section(md: &mut String) {
    let _ = writeln!(md, "## How it was measured\n");
    let _ = writeln!(
        md,
        "- Images are built from the Debian archive with `mmdebstrap` and packed with umoci \
         (one layer each), pushed as `NAME:v1` (gzip), converted to `NAME:lazy` with `brisk \
         convert` and to eStargz with `ctr-remote`, all directly on the registry before any \
         measurement.\n\
         - Every measured client (ctr, ctr-remote, `brisk pull`, both snapshotter daemons) \
         reaches the registry only through a user-space relay on loopback that adds the \
         profile's delay and shares its rate limit among all connections (the kernel here has \
         no netem). The relay counts the bytes and HTTP requests it carries; the loopback \
         profile uses the relay with no delay and no limit, so that it is counted the same way. \
         Registry bytes and requests are counted from the start of the pull until the container \
         was ready (for stargz, background fetch that starts later is not in them). Fetched ÷ \
         read (Brisk modes) is those registry bytes over the compressed weight of what the \
         container read, as the daemon counted it from FUSE reads (`brisk status`: each read's \
         share of its chunks' compressed sizes); 1 would be a fetcher that moves nothing the \
         container does not read, headers and HTTP overhead aside.\n\
         - Every start begins with a dropped page cache (`sync; echo 3 > \
         /proc/sys/vm/drop_caches`) and fresh daemons, except Brisk hot. Time to ready runs \
         from the start of the pull to the readiness signal: a line on the container's stdout \
         (seen by `ctr run` on the host), or the first HTTP 200 from the server, polled every \
         10 ms on the host's network. Pull time is the pull command alone.\n\
         - overlayfs: `ctr image pull --plain-http --snapshotter overlayfs` then `ctr run`.\n\
         - Brisk lazy: a snapshotter on an empty root (no trace, empty L1 and L2), `brisk pull` \
         then `ctr run --snapshotter brisk`; the daemon records a start-up trace. Brisk with \
         trace: an empty root that holds that trace (`brisk trace export`, then `brisk trace \
         import`, before the timed part); the daemon prefetches from it. Brisk baked trace: \
         `NAME:baked`, converted once per workload and link from `NAME:v1` with `brisk convert \
         --trace` and the first trace a Brisk lazy start recorded (not timed, on the registry \
         directly; Brisk's counterpart of `ctr-remote image optimize`), started on an empty \
         root that holds no trace: the daemon prefetches what the TOC lists. Brisk warm: the \
         snapshotter of Brisk lazy, restarted with only its chunk cache (L2) and TOCs kept, \
         and a new containerd. Brisk hot: right after warm, the same image again on the same \
         daemons, page cache kept: everything is on the host. Every Brisk snapshotter runs \
         with `[trace] quiet_secs = 1` and otherwise its defaults.\n\
         - Snapshotter RSS is `VmRSS` of `brisk-snapshotter` or `containerd-stargz-grpc` from \
         `/proc/PID/status`, read right after the run; overlayfs has no separate daemon.\n\
         - FUSE stall time (how long reads waited on the network) is not reported: neither \
         daemon exposes it, and subtracting a warm start from a cold one would double-count \
         the pull. The registry figures and the gap between a lazy and a warm start say what \
         the network cost.\n"
    );
}
