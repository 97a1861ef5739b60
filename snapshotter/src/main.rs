//! Entry point: parse flags, load config, hand over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "brisk-snapshotter",
    version,
    about = "containerd remote snapshotter serving lazy layers"
)]
struct Args {
    /// TOML config file (all keys optional).
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (overrides the config).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket for containerd (overrides the config).
    #[arg(long)]
    address: Option<PathBuf>,
    /// Serve the zone cache peer service at HOST:PORT (TCP, and UDP for gossip).
    #[arg(long, value_name = "HOST:PORT")]
    peer_listen: Option<String>,
    /// Zone seed members, comma separated (may include this host's own address).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// File holding the zone's shared token.
    #[arg(long, value_name = "FILE")]
    peer_token_file: Option<PathBuf>,
    /// Serve only the zone (no snapshots socket): a cache host for the other members.
    #[arg(long)]
    peer_only: bool,
    /// How lazy layers are hashed to prove their chain IDs: background, cached or off.
    #[arg(long, value_name = "MODE")]
    verify: Option<String>,
    /// Seconds between a lazy layer's mount and its background hash.
    #[arg(long, value_name = "SECS")]
    verify_delay_secs: Option<u64>,
    /// Serve the CRI image-service proxy (the kubelet's --image-service-endpoint) here.
    #[arg(long, value_name = "SOCKET")]
    cri_listen: Option<PathBuf>,
    /// containerd's socket, which the CRI proxy forwards to.
    #[arg(long, value_name = "SOCKET")]
    cri_containerd: Option<PathBuf>,
    /// Run as the holder of FUSE connections on this socket (what the daemon starts, or
    /// `brisk-holder.service` runs), instead of as the daemon.
    #[arg(long, value_name = "SOCKET")]
    hold: Option<PathBuf>,
    /// As the holder: let the connections go after this long without a daemon.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    hold_orphan_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = brisk_snapshotter::config::Config::load(args.config.as_deref())
        .with_context(|| format!("Reading config {:?}", args.config))?;
    if let Some(root) = args.root {
        config.root = root;
    }
    if let Some(address) = args.address {
        config.address = address;
    }
    if let Some(listen) = args.peer_listen {
        config.peer.listen = Some(listen);
    }
    if let Some(peers) = args.peers {
        config.peer.peers = peers;
    }
    if let Some(file) = args.peer_token_file {
        config.peer.token_file = Some(file);
    }
    config.peer.peer_only |= args.peer_only;
    if let Some(mode) = args.verify {
        config.layers.verify = mode.parse().context("--verify")?;
    }
    if let Some(secs) = args.verify_delay_secs {
        config.layers.verify_delay_secs = secs;
    }
    if let Some(socket) = args.cri_listen {
        config.cri.listen = Some(socket);
    }
    if let Some(socket) = args.cri_containerd {
        config.cri.containerd = socket;
    }
    if let Some(socket) = args.hold {
        init_logging("info")?;
        return brisk_snapshotter::handover::serve(
            &socket,
            std::time::Duration::from_secs(args.hold_orphan_secs),
        )
        .context("Holding FUSE connections");
    }
    keep_large_buffers_lazy();
    init_logging(&config.log_level)?;
    // SIGTERM (systemctl stop and restart) hands the layers over to the next daemon;
    // SIGINT (Ctrl-C, or `systemctl kill -s INT`) is the clean stop that unmounts them.
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = term.recv() => brisk_snapshotter::Stop::HandOver,
            _ = tokio::signal::ctrl_c() => brisk_snapshotter::Stop::Clean,
        }
    };
    let stop = brisk_snapshotter::run(config, shutdown)
        .await
        .context("brisk-snapshotter failed")?;
    if stop == brisk_snapshotter::Stop::HandOver {
        // Without dropping the runtime: reads still in flight are resent to the successor,
        // not answered EIO as their tasks are dropped.
        std::process::exit(0);
    }
    Ok(())
}

/// RUST_LOG, when set, wins over the config's `log_level`, as for most Rust daemons.
fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .context("Bad log filter (RUST_LOG or log_level)")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

/// Every FUSE mount holds a 16 MiB receive buffer that the kernel only ever fills a little.
/// glibc raises its mmap threshold as large blocks are freed, after which such buffers come
/// from the heap and are zeroed there, page by page: 16 MiB of resident memory per mount. A
/// fixed threshold keeps allocations of 1 MiB and more in fresh mappings, resident only where
/// written (10 mounts: about 19 MiB instead of 47 to 79 MiB in the cold-start benchmark).
fn keep_large_buffers_lazy() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning and takes glibc's own locks; it is
    // called before any FUSE mount or registry fetch allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
