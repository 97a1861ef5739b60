//! The `brisk` command line: flag definitions, and for each subcommand opening the image
//! locations, calling the library and printing the result. Part of the binary, not the library.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::toc;
use brisk_tools::cat::{self, CatOptions};
use brisk_tools::convert::{self, ConvertConfig};
use brisk_tools::inspect;
use brisk_tools::pull::{self, PullOptions};
use brisk_tools::store::{Location, Store};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "brisk",
    version,
    about = "Lazy-loading container images: convert, inspect, check and pull"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct RegistryFlags {
    /// Use plain HTTP for every registry (loopback registries always use it).
    #[arg(long, global = true)]
    plain_http: bool,
    /// Seconds a registry may stay silent before a request is retried.
    #[arg(long, global = true, default_value_t = 30)]
    registry_timeout: u64,
    /// Retries for 429, 5xx, timeouts and broken connections.
    #[arg(long, global = true, default_value_t = 4)]
    retries: u32,
    /// containerd's registry host directory (`certs.d`): mirrors listed there are read first.
    #[arg(long, global = true)]
    hosts_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image to the lazy format: SRC and DST are `host[:port]/repo[:tag|@digest]` or `oci:DIR[:tag]`.
    Convert {
        src: String,
        dst: String,
        /// Only this platform of an index (`os/arch[/variant]`).
        #[arg(long)]
        platform: Option<String>,
        /// Target chunk size in bytes.
        #[arg(long, default_value_t = brisk_blobcache::toc::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// zstd compression level.
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// zstd level for the chunks a baked trace (--trace) lists for prefetch: every cold
        /// start fetches them first, so they are compressed harder, once.
        #[arg(long, default_value_t = brisk_blobcache::toc::DEFAULT_PREFETCH_LEVEL)]
        prefetch_level: i32,
        /// Chunk size inside the parts of large files a baked trace (--trace) lists: a start
        /// waits for whole chunks, so smaller ones let it begin while the rest streams in.
        #[arg(long, default_value_t = brisk_blobcache::toc::DEFAULT_PREFETCH_CHUNK_SIZE)]
        prefetch_chunk_size: u32,
        /// Chunk size for ELF executables and libraries of 1 MiB or more, which programs page
        /// in piece by piece; 0 (the default) keeps --chunk-size. Smaller chunks fetch fewer
        /// bytes but take more round trips: worth it on thin links with little latency.
        #[arg(long, default_value_t = toc::DEFAULT_SCATTERED.code_chunk_size)]
        code_chunk_size: u32,
        /// zstd level for those chunks: it wins back what the smaller frames cost in size.
        #[arg(long, default_value_t = toc::DEFAULT_SCATTERED.code_level)]
        code_level: i32,
        /// Chunk size for files of 1 MiB or more that do not compress (weights, archives,
        /// media), usually mapped or read at offsets; 0 keeps --chunk-size.
        #[arg(long, default_value_t = toc::DEFAULT_SCATTERED.data_chunk_size)]
        data_chunk_size: u32,
        /// Layers converted in parallel (default: number of cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print a machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
        /// A start-up trace (`brisk trace export`) to bake in: traced files move to the front
        /// of their layers and the TOC lists their chunks for prefetch.
        #[arg(long)]
        trace: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Show a converted image: layers, TOC summary, chunk counts and sizes.
    Inspect {
        image: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Print one file of a converted image, fetching only the chunks it needs.
    Cat {
        image: String,
        /// Path inside the image (with or without a leading `/`).
        path: String,
        /// Keep manifests, TOCs and chunks here; a repeat then reads from disk.
        #[arg(long)]
        cache_dir: Option<std::path::PathBuf>,
        /// Bound of the disk cache in bytes.
        #[arg(long, default_value_t = 10 << 30)]
        cache_bytes: u64,
        /// Platform to read from an index (`os/arch`).
        #[arg(long)]
        platform: Option<String>,
        /// Print per-level hits and bytes fetched to stderr as JSON.
        #[arg(long)]
        stats: bool,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Fetch and verify every TOC and chunk of an image; non-zero exit on the first bad one.
    Check {
        image: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Pull an image into containerd through a snapshotter, which may serve layers lazily.
    Pull {
        image: String,
        /// containerd's gRPC socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd: std::path::PathBuf,
        /// containerd namespace to pull into.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Snapshotter to unpack with; layers are lazy only with a remote one such as Brisk's.
        #[arg(long, default_value = "brisk")]
        snapshotter: String,
        /// Print a machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Start-up traces held by the snapshotter daemon, and their copies in registries.
    Trace {
        #[command(subcommand)]
        command: TraceCommand,
        /// The daemon's socket (its `--address`).
        #[arg(long, global = true, default_value = brisk_tools::trace::DEFAULT_SOCKET)]
        snapshotter: PathBuf,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// What the snapshotter daemon serves and how its chunk cache is doing.
    Status {
        #[arg(long, default_value = brisk_tools::trace::DEFAULT_SOCKET)]
        snapshotter: PathBuf,
        /// Print the whole answer as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Every trace the daemon holds.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One image's trace: chunks, duration and the files in first-touch order.
    Show {
        /// Image reference, or its manifest digest.
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Write an image's trace to FILE.
    Export { image: String, file: PathBuf },
    /// Give the daemon a trace file (merged with what it has for that image).
    Import {
        file: PathBuf,
        /// Refuse the file unless it is the trace of this image.
        #[arg(long)]
        image: Option<String>,
    },
    /// Push an image's trace to its registry, as an artifact referring to the image.
    Push { image: String },
    /// Fetch an image's trace from its registry into the daemon.
    Pull { image: String },
}

impl RegistryFlags {
    fn config(&self) -> anyhow::Result<RegistryConfig> {
        let mirrors = match &self.hosts_dir {
            Some(dir) => brisk_blobcache::registry::hosts::load(dir)?,
            None => Default::default(),
        };
        Ok(RegistryConfig {
            plain_http_hosts: mirrors.plain_http,
            mirrors: mirrors.by_registry,
            plain_http: self.plain_http,
            timeout: Duration::from_secs(self.registry_timeout),
            retries: self.retries,
            ..RegistryConfig::default()
        })
    }
}

fn open(location: &str, flags: &RegistryFlags) -> anyhow::Result<Store> {
    let location: Location = location.parse()?;
    let client = RegistryClient::new(flags.config()?)?;
    Ok(Store::open(location, Arc::new(client)))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert {
            src,
            dst,
            platform,
            chunk_size,
            level,
            prefetch_level,
            prefetch_chunk_size,
            code_chunk_size,
            code_level,
            data_chunk_size,
            jobs,
            json,
            trace,
            registry,
        } => {
            let (src_store, dst_store) = (open(&src, &registry)?, open(&dst, &registry)?);
            let (trace_files, trace_ranges) = match &trace {
                Some(file) => {
                    let t = brisk_tools::trace::read_file(file)
                        .with_context(|| format!("Reading {}", file.display()))?;
                    let files = t.files().into_iter().map(str::to_owned).collect();
                    (files, t.file_ranges())
                }
                None => Default::default(),
            };
            let defaults = ConvertConfig::default();
            let config = ConvertConfig {
                chunk_size,
                level,
                prefetch_level,
                prefetch_chunk_size,
                scattered: toc::Scattered {
                    code_chunk_size,
                    code_level,
                    data_chunk_size,
                },
                platform,
                jobs: jobs.unwrap_or(defaults.jobs),
                progress: !json && std::io::stderr().is_terminal(),
                tmp_dir: None,
                trace_files,
                trace_ranges,
            };
            let summary = convert::convert(&src_store, &dst_store, &config)
                .await
                .with_context(|| format!("Converting {src} to {dst}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                let (before, after, tar, chunks) = summary.totals();
                println!(
                    "{} -> {} ({}): {} image(s), {} -> {} bytes ({} uncompressed), {} chunks, {:.1}s",
                    summary.source,
                    summary.destination,
                    summary.digest,
                    summary.images.len(),
                    before,
                    after,
                    tar,
                    chunks,
                    summary.seconds
                );
            }
        }
        Command::Inspect {
            image,
            json,
            registry,
        } => {
            let store = open(&image, &registry)?;
            let reports = inspect::inspect(&store)
                .await
                .with_context(|| format!("Inspecting {image}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", inspect::render(&reports));
            }
        }
        Command::Cat {
            image,
            path,
            cache_dir,
            cache_bytes,
            platform,
            stats,
            registry,
        } => {
            let reference: brisk_blobcache::reference::Reference = image.parse()?;
            let opts = CatOptions {
                cache_dir,
                disk_bytes: cache_bytes,
                platform,
                registry: registry.config()?,
                ..CatOptions::default()
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let report = cat::cat(&reference, &path, &opts, &mut out)
                .await
                .with_context(|| format!("Reading {path} from {image}"))?;
            if stats {
                eprintln!("{}", serde_json::to_string(&report)?);
            }
        }
        Command::Check {
            image,
            json,
            registry,
        } => {
            let store = open(&image, &registry)?;
            let report = inspect::check(&store)
                .await
                .with_context(|| format!("Checking {image}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "ok: {} image(s), {} layers ({} lazy), {} chunks, {} bytes verified",
                    report.images, report.layers, report.lazy_layers, report.chunks, report.bytes
                );
            }
        }
        Command::Trace {
            command,
            snapshotter,
            registry,
        } => {
            let client = RegistryClient::new(registry.config()?)?;
            match command {
                TraceCommand::Ls { json } => {
                    let list = brisk_tools::trace::list(&snapshotter)
                        .await
                        .context("Listing traces")?;
                    if json {
                        let traces: Vec<_> = list
                            .traces
                            .iter()
                            .map(|t| serde_json::json!({"image": t.image, "chunks": t.chunks, "files": t.files, "duration_ms": t.duration_ms, "starts": t.starts}))
                            .collect();
                        println!(
                            "{}",
                            serde_json::json!({"traces": traces, "dropped_reads": list.dropped_reads})
                        );
                    } else {
                        for t in &list.traces {
                            println!(
                                "{} {} chunks {} files {} ms {} start(s)",
                                t.image, t.chunks, t.files, t.duration_ms, t.starts
                            );
                        }
                    }
                }
                TraceCommand::Show { image, json } => {
                    let (digest, _) = brisk_tools::trace::image_digest(&client, &image).await?;
                    let trace = brisk_tools::trace::get(&snapshotter, &digest)
                        .await
                        .with_context(|| format!("Reading the trace of {image}"))?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&trace)?);
                    } else {
                        print!("{}", brisk_tools::trace::render(&trace));
                    }
                }
                TraceCommand::Export { image, file } => {
                    let (digest, _) = brisk_tools::trace::image_digest(&client, &image).await?;
                    let trace = brisk_tools::trace::get(&snapshotter, &digest)
                        .await
                        .with_context(|| format!("Reading the trace of {image}"))?;
                    std::fs::write(&file, trace.encode())
                        .with_context(|| format!("Writing {}", file.display()))?;
                }
                TraceCommand::Import { file, image } => {
                    let trace = brisk_tools::trace::read_file(&file)
                        .with_context(|| format!("Reading {}", file.display()))?;
                    if let Some(image) = image {
                        let (digest, _) = brisk_tools::trace::image_digest(&client, &image).await?;
                        anyhow::ensure!(
                            trace.image == digest,
                            "{} is the trace of image {}, not of {image} ({digest})",
                            file.display(),
                            trace.image
                        );
                    }
                    let s = brisk_tools::trace::import(&snapshotter, &trace)
                        .await
                        .context("Importing the trace")?;
                    println!("{}: {} chunks, {} start(s)", s.image, s.chunks, s.starts);
                }
                TraceCommand::Push { image } => {
                    let d = brisk_tools::trace::push(&client, &snapshotter, &image)
                        .await
                        .with_context(|| format!("Pushing the trace of {image}"))?;
                    println!("{image}: trace pushed as {d}");
                }
                TraceCommand::Pull { image } => {
                    let s = brisk_tools::trace::pull(&client, &snapshotter, &image)
                        .await
                        .with_context(|| format!("Pulling the trace of {image}"))?;
                    println!("{}: {} chunks, {} start(s)", s.image, s.chunks, s.starts);
                }
            }
        }
        Command::Status { snapshotter, json } => {
            let s = brisk_tools::trace::status(&snapshotter)
                .await
                .context("Asking the snapshotter")?;
            if json {
                println!("{}", brisk_tools::status::to_json(&s));
            } else {
                print!("{}", brisk_tools::status::summary(&s));
            }
        }
        Command::Pull {
            image,
            containerd,
            namespace,
            snapshotter,
            json,
            registry,
        } => {
            let opts = PullOptions {
                containerd,
                namespace,
                snapshotter,
                platform: None,
                registry: registry.config()?,
            };
            let summary = pull::pull(&image, &opts)
                .await
                .with_context(|| format!("Pulling {image}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
        }
    }
    Ok(())
}
