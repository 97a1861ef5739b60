//! `brisk-bench zone`: N hosts of one zone start the same image at once. Each host is a
//! `brisk-snapshotter` with the peer service on its own loopback address; hosts reach each
//! other directly (the fast link) and the registry only through the emulated WAN link they
//! share. A host's start is what containerd and runc would do: mount the image lazily through
//! the snapshots API, then run the image's Python command in it (chroot) until it prints
//! its first line.
//!
//! Reported per zone size: registry bytes as a ratio to one host's, and p50/p99 of the time
//! to first output over every host start of the run. Nothing is asserted.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::images::{self, ImageSizes, PY_CMD};
use super::report::{Binaries, Machine};
use super::wan::{Link, Wan};
use crate::registry::Registry;
use crate::zone::{free_addr, image_info, mount_image, write_token, Host, ImageInfo};

#[derive(Clone, Debug)]
pub struct ZoneOptions {
    pub sizes: Vec<usize>,
    pub repetitions: usize,
    pub out: PathBuf,
    pub link: Link,
    pub command: String,
}

/// One start of a zone of `hosts` hosts.
#[derive(Clone, Debug, Serialize)]
pub struct ZoneRun {
    pub hosts: usize,
    pub repetition: usize,
    /// From starting the first host's daemon until every host sees every other (the daemons
    /// are started one after the other, each waited for until it listens).
    pub converge_s: f64,
    /// Per host: mount through the snapshots API, then the command's first line.
    pub ready_s: Vec<f64>,
    pub registry_bytes: u64,
    pub registry_requests: u64,
    pub failed: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ZoneRow {
    pub hosts: usize,
    pub runs: usize,
    pub registry_bytes_median: f64,
    /// Registry bytes over the median for one host.
    pub bytes_ratio: f64,
    pub ready_p50_s: f64,
    pub ready_p99_s: f64,
    pub p99_over_p50: f64,
    pub converge_max_s: f64,
    pub failed_runs: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ZoneReport {
    pub command: String,
    pub started_utc: String,
    pub machine: Machine,
    pub binaries: Binaries,
    pub link: Link,
    pub image: ImageSizes,
    pub runs: Vec<ZoneRun>,
    pub rows: Vec<ZoneRow>,
}

pub fn run(opts: &ZoneOptions) -> Result<ZoneReport> {
    super::check_prerequisites()?;
    let started = Instant::now();
    let started_utc = crate::cmd::run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|d| d.trim().to_owned())
        .unwrap_or_default();
    let mut machine = Machine::probe();
    let progress = |what: &str| eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
    std::fs::create_dir_all(&opts.out)?;
    let layout = images::build_or_reuse(&opts.out.join("images"))?;
    let registry = Registry::start()?;
    let image = images::publish_one(&layout, &registry, "py")?;
    let wan = Wan::start(&registry.addr(), opts.link)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let info = rt.block_on(image_info(&wan.image("py:lazy")))?;
    let base = tempfile::Builder::new()
        .prefix("brisk-bench-zone")
        .tempdir()?;
    let mut runs = Vec::new();
    // Sizes interleaved within each repetition, so drift in the machine's load spreads
    // over all of them.
    for repetition in 0..opts.repetitions {
        for &hosts in &opts.sizes {
            progress(&format!("zone of {hosts}, repetition {}", repetition + 1));
            let dir = base.path().join(format!("n{hosts}-r{repetition}"));
            let run = match one_run(&rt, &wan, &info, &dir, hosts) {
                Ok(mut r) => {
                    r.repetition = repetition;
                    r
                }
                Err(err) => ZoneRun {
                    hosts,
                    repetition,
                    converge_s: 0.0,
                    ready_s: Vec::new(),
                    registry_bytes: 0,
                    registry_requests: 0,
                    failed: Some(format!("{err:#}")),
                },
            };
            if let Some(f) = &run.failed {
                eprintln!("  failed: {f}");
            } else {
                eprintln!(
                    "  registry {:.1} MiB, ready {:?}",
                    run.registry_bytes as f64 / (1 << 20) as f64,
                    run.ready_s
                );
            }
            runs.push(run);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let rows = summarize(&opts.sizes, &runs);
    machine.load_at_end = super::report::load();
    Ok(ZoneReport {
        command: opts.command.clone(),
        started_utc,
        machine,
        binaries: super::binaries()?,
        link: opts.link,
        image,
        runs,
        rows,
    })
}

fn one_run(
    rt: &tokio::runtime::Runtime,
    wan: &Wan,
    image: &ImageInfo,
    dir: &Path,
    n: usize,
) -> Result<ZoneRun> {
    std::fs::create_dir_all(dir)?;
    let token = dir.join("zone.token");
    write_token(&token)?;
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| free_addr(Ipv4Addr::new(127, 0, 1, 10 + i as u8)))
        .collect::<Result<_>>()?;
    let converge_started = Instant::now();
    let hosts: Vec<Host> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Host::start(&dir.join(format!("h{i}")), *a, &addrs, &token))
        .collect::<Result<_>>()?;
    rt.block_on(async {
        loop {
            let mut all = true;
            for h in &hosts {
                all &= h.members().await?.len() == n - 1;
            }
            if all {
                return Ok::<_, anyhow::Error>(());
            }
            if converge_started.elapsed() > Duration::from_secs(30) {
                bail!("the zone did not converge in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })?;
    let converge_s = converge_started.elapsed().as_secs_f64();
    wan.reset();
    let barrier = Arc::new(Barrier::new(n));
    let ready: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let view = h.snapshotter.root.join("view");
                    rt.block_on(mount_image(
                        &h.snapshotter.socket,
                        image,
                        &view,
                        &format!("bench-{i}"),
                    ))?;
                    first_line(&view)?;
                    Ok(started.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("host thread panicked")))
            })
            .collect()
    });
    let traffic = wan.traffic();
    let ready_s = ready.into_iter().collect::<Result<Vec<f64>>>()?;
    drop(hosts);
    Ok(ZoneRun {
        hosts: n,
        repetition: 0,
        converge_s,
        ready_s,
        registry_bytes: traffic.bytes_down,
        registry_requests: traffic.requests,
        failed: None,
    })
}

/// Runs the image's command inside `root` and waits for its first line of output.
fn first_line(root: &Path) -> Result<()> {
    use std::io::BufRead;
    let mut child = Command::new("chroot")
        .arg(root)
        .args(PY_CMD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("Starting the command in the image")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let status = child.wait()?;
    if line.trim() != "ready" {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("the command printed {line:?} ({status}): {err}");
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn summarize(sizes: &[usize], runs: &[ZoneRun]) -> Vec<ZoneRow> {
    let bytes_of = |n: usize| {
        median(
            runs.iter()
                .filter(|r| r.hosts == n && r.failed.is_none())
                .map(|r| r.registry_bytes as f64)
                .collect(),
        )
    };
    let single = bytes_of(1);
    sizes
        .iter()
        .map(|&n| {
            let ok: Vec<&ZoneRun> = runs
                .iter()
                .filter(|r| r.hosts == n && r.failed.is_none())
                .collect();
            let mut ready: Vec<f64> = ok.iter().flat_map(|r| r.ready_s.clone()).collect();
            ready.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&ready, 0.5), percentile(&ready, 0.99));
            let bytes = bytes_of(n);
            ZoneRow {
                hosts: n,
                runs: ok.len(),
                registry_bytes_median: bytes,
                bytes_ratio: bytes / single,
                ready_p50_s: p50,
                ready_p99_s: p99,
                p99_over_p50: p99 / p50,
                converge_max_s: ok.iter().map(|r| r.converge_s).fold(0.0, f64::max),
                failed_runs: runs
                    .iter()
                    .filter(|r| r.hosts == n && r.failed.is_some())
                    .count(),
            }
        })
        .collect()
}

/// The Markdown report.
pub fn markdown(r: &ZoneReport) -> String {
    let mut out = String::new();
    out.push_str("# Zone peers benchmark\n\n");
    out.push_str("Generated by `");
    out.push_str(&r.command);
    out.push_str("`; do not edit by hand.\n\n");
    out.push_str(&format!(
        "N hosts of one zone start the same image at once (`py`, {} layer(s), {:.1} MiB lazy). \
         Every host is a `brisk-snapshotter` with the peer service on its own loopback address; \
         hosts talk to each other directly and to the registry only through one emulated WAN \
         link they share ({} ms RTT, {} Mbit/s). A start is: mount the image through the \
         snapshots API as containerd would, then run its Python command (chroot) to its first \
         line. Sizes are interleaved in each of the repetitions.\n\n",
        r.image.layers,
        r.image.lazy_bytes as f64 / (1 << 20) as f64,
        r.link.rtt.as_millis(),
        r.link.bits_per_sec / 1_000_000
    ));
    out.push_str(&format!(
        "Machine: {} cores ({}), kernel {}, load {} at start, {} at end. Binaries: commit {}{}, built {}. Run started {}.\n\n",
        r.machine.cores,
        r.machine.cpu,
        r.machine.kernel,
        r.machine.load_at_start,
        r.machine.load_at_end,
        r.binaries.commit,
        if r.binaries.uncommitted_changes { " (with uncommitted changes)" } else { "" },
        r.binaries.built_utc,
        r.started_utc
    ));
    out.push_str("| hosts | runs | registry MiB (median) | ÷ one host | ready p50 | ready p99 | p99 ÷ p50 | zone formed in (max) | failed runs |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in &r.rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.2}× | {:.2} s | {:.2} s | {:.2} | {:.2} s | {} |\n",
            row.hosts,
            row.runs,
            row.registry_bytes_median / (1 << 20) as f64,
            row.bytes_ratio,
            row.ready_p50_s,
            row.ready_p99_s,
            row.p99_over_p50,
            row.converge_max_s,
            row.failed_runs
        ));
    }
    out.push_str(
        "\n\"Zone formed in\" runs from starting the first host's daemon (they start one \
         after another) until every host sees every other. \
         Targets: registry bytes at 8 hosts ≤ 1.1× one host's; p99 ÷ p50 ≤ 1.2. \
         p99 is taken over every host start of a size (N × repetitions samples), so with few \
         samples it is close to the slowest start.\n",
    );
    let failed: Vec<&ZoneRun> = r.runs.iter().filter(|x| x.failed.is_some()).collect();
    if !failed.is_empty() {
        out.push_str("\n## Failed runs\n\n");
        for f in failed {
            out.push_str(&format!(
                "- {} hosts, repetition {}: {}\n",
                f.hosts,
                f.repetition + 1,
                f.failed.as_deref().unwrap_or_default()
            ));
        }
    }
    out
}
