//! `brisk-bench`: benchmarks of Brisk against the real containerd, runc, registry and fuse3 of
//! this machine. Needs root. Parses flags, runs the library, writes the JSON and the report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use brisk_e2e::bench::{self, wan::Link, Options};
use brisk_e2e::workspace_root;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "brisk-bench",
    about = "Benchmarks of the Brisk snapshotter (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cold start (with and without a start-up trace), cached reads and daemon memory:
    /// overlayfs against Brisk across an emulated WAN. Writes DIR/cold-start.json and
    /// BENCHMARKS-snapshotter.md at the workspace root.
    ColdStart {
        /// One repetition instead of three.
        #[arg(long)]
        quick: bool,
        /// Repetitions of every mode (overrides --quick).
        #[arg(long)]
        repetitions: Option<usize>,
        /// Only the cold starts, (a) to (e): no reads, no memory; writes the JSON but leaves
        /// the Markdown report as it is (a partial run does not replace it).
        #[arg(long)]
        cold_only: bool,
        /// Output directory: the JSON, and the image cache reused by later runs.
        #[arg(long, default_value = "target/brisk-bench")]
        out: PathBuf,
        /// Round-trip time the link adds, in milliseconds.
        #[arg(long, default_value_t = 20)]
        rtt_ms: u64,
        /// Capacity of the link, registry to client, in Mbit/s.
        #[arg(long, default_value_t = 100)]
        mbit: u64,
    },
    /// Brisk against a full pull on overlayfs and against stargz-snapshotter: Python hello
    /// and Flask on the WAN profile, every mode, 2 repetitions (--full: also the data/ML job,
    /// loopback and slow WAN, 3 repetitions). Writes DIR/compare.json, BENCHMARKS.md and
    /// BENCHMARKS.svg at the workspace root.
    Compare {
        /// Every workload on every network profile, 3 repetitions.
        #[arg(long)]
        full: bool,
        /// Repetitions of every mode (overrides the default of the size chosen).
        #[arg(long)]
        repetitions: Option<usize>,
        /// Only these workloads (py, flask, ml, modules, clang, mmap), comma separated.
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        #[arg(long, default_value = "target/brisk-bench")]
        out: PathBuf,
    },
    /// Zone peers: N hosts start the same image at once behind one shared WAN link. Writes
    /// DIR/zone.json and BENCHMARKS-zone.md at the workspace root.
    Zone {
        /// Zone sizes, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8])]
        hosts: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        #[arg(long, default_value = "target/brisk-bench")]
        out: PathBuf,
        #[arg(long, default_value_t = 20)]
        rtt_ms: u64,
        #[arg(long, default_value_t = 100)]
        mbit: u64,
    },
    /// The daemon killed and restarted, and upgraded, under a running reader with 50 lazy
    /// layers mounted: the longest read, failures, and the takeover time. Writes
    /// DIR/restart.json and BENCHMARKS-restart.md at the workspace root.
    Restart {
        #[arg(long, default_value = "target/brisk-bench")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // Measurements use release binaries unless told otherwise. Set before any thread starts.
    for (var, name) in [
        ("BRISK_BIN", "brisk"),
        ("BRISK_SNAPSHOTTER_BIN", "brisk-snapshotter"),
    ] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, workspace_root().join("target/release").join(name));
        }
    }
    let invocation = format!(
        "cargo run -p brisk-e2e --release --bin brisk-bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let absolute = |out: PathBuf| {
        if out.is_relative() {
            workspace_root().join(out)
        } else {
            out
        }
    };
    let (quick, repetitions, cold_only, out, rtt_ms, mbit) = match command {
        Cmd::Restart { out } => {
            let out = absolute(out);
            std::fs::create_dir_all(&out)?;
            let report = bench::restart::run(&out, invocation.trim_end())
                .context("Restart benchmark failed")?;
            std::fs::write(
                out.join("restart.json"),
                serde_json::to_vec_pretty(&report)?,
            )?;
            let markdown = workspace_root().join("BENCHMARKS-restart.md");
            std::fs::write(&markdown, bench::restart::markdown(&report))?;
            eprintln!("wrote {}", markdown.display());
            return Ok(());
        }
        Cmd::ColdStart {
            quick,
            repetitions,
            cold_only,
            out,
            rtt_ms,
            mbit,
        } => (quick, repetitions, cold_only, absolute(out), rtt_ms, mbit),
        Cmd::Compare {
            full,
            repetitions,
            workloads,
            out,
        } => {
            let out = absolute(out);
            bench::compare::pin_binaries(&out)?;
            let mut opts = bench::compare::CompareOptions::new(
                full,
                out.clone(),
                invocation.trim_end().to_owned(),
            );
            if let Some(n) = repetitions {
                opts.repetitions = n.max(1);
            }
            if !workloads.is_empty() {
                opts.workloads = bench::workload::ALL
                    .iter()
                    .filter(|w| workloads.iter().any(|n| n == w.name))
                    .copied()
                    .collect();
            }
            let report = bench::compare::run_compare(&opts).context("Benchmark setup failed")?;
            let markdown = workspace_root().join("BENCHMARKS.md");
            let chart = workspace_root().join("BENCHMARKS.svg");
            bench::compare::write(&report, &out, &markdown, &chart)?;
            let failures = bench::compare::failures(&report);
            eprintln!(
                "wrote {}, {} and {} in {:.0} s ({} failure(s))",
                out.join("compare.json").display(),
                markdown.display(),
                chart.display(),
                report.wall_seconds,
                failures.len()
            );
            return Ok(());
        }
        Cmd::Zone {
            hosts,
            repetitions,
            out,
            rtt_ms,
            mbit,
        } => {
            let out = absolute(out);
            let opts = bench::zone::ZoneOptions {
                sizes: hosts,
                repetitions: repetitions.max(1),
                out: out.clone(),
                link: Link {
                    rtt: Duration::from_millis(rtt_ms),
                    bits_per_sec: mbit * 1_000_000,
                },
                command: invocation.trim_end().to_owned(),
            };
            let report = bench::zone::run(&opts).context("Benchmark setup failed")?;
            std::fs::write(out.join("zone.json"), serde_json::to_vec_pretty(&report)?)?;
            let markdown = workspace_root().join("BENCHMARKS-zone.md");
            std::fs::write(&markdown, bench::zone::markdown(&report))?;
            eprintln!(
                "wrote {} and {}",
                out.join("zone.json").display(),
                markdown.display()
            );
            return Ok(());
        }
    };
    let opts = Options {
        repetitions: repetitions.unwrap_or(if quick { 1 } else { 3 }).max(1),
        out: out.clone(),
        link: Link {
            rtt: Duration::from_millis(rtt_ms),
            bits_per_sec: mbit * 1_000_000,
        },
        command: invocation.trim_end().to_owned(),
        cold_only,
    };
    let report = bench::cold_start(&opts).context("Benchmark setup failed")?;
    let markdown = workspace_root().join("BENCHMARKS-snapshotter.md");
    if cold_only {
        bench::write_json(&report, &out)?;
        eprintln!("{}", bench::markdown::prefetch_summary(&report));
        eprintln!("wrote {}", out.join("cold-start.json").display());
        return Ok(());
    }
    bench::write(&report, &out, &markdown)?;
    let failures = report.failures();
    eprintln!(
        "wrote {} and {} ({} failure(s))",
        out.join("cold-start.json").display(),
        markdown.display(),
        failures.len()
    );
    if !failures.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
