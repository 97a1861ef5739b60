//! Starting on a root a previous daemon served: refuse if that daemon still runs, reach (or
//! start) the holder of FUSE connections, take over every lazy layer whose connection it
//! kept, mount the others again, and survive what a crash leaves behind (a damaged cache
//! index, dead mounts).
//!
//! Layers are taken over or mounted again concurrently, each within a deadline, so the
//! socket opens in seconds even when a registry is slow; a layer that misses its deadline is
//! reported, and stacking on it fails clearly (`Snapshotter::check_lower`).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::config::Config;
use crate::handover::{Client, Held};
use crate::meta::Kind;
use crate::snapshots::Snapshotter;
use crate::{Error, Result};

/// Layers taken over or mounted again at once.
const CONCURRENT: usize = 8;

/// How long one layer may take to be taken over or mounted again (a TOC fetch from a slow
/// registry, when the local copy is gone).
const LAYER_DEADLINE: Duration = Duration::from_secs(20);

/// The root's lock: held for the daemon's life (the kernel drops it when the process dies,
/// however it dies). A second daemon on the same root refuses before touching any mount.
pub struct RootLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

pub fn lock_root(root: &Path) -> Result<RootLock> {
    let path = root.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = std::fs::write(root.join("daemon.pid"), std::process::id().to_string());
            Ok(RootLock(lock))
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(root.join("daemon.pid")).unwrap_or_default();
            Err(Error::FailedPrecondition(format!(
                "another brisk-snapshotter (pid {}) serves {}; it must stop first",
                pid.trim(),
                root.display()
            )))
        }
        Err((_, e)) => Err(Error::io(&path, e.into())),
    }
}

fn holder_socket(config: &Config) -> PathBuf {
    config
        .handover
        .holder_socket
        .clone()
        .unwrap_or_else(|| config.root.join("holder.sock"))
}

/// Live FUSE connections the holder kept, by snapshot id.
pub type Kept = HashMap<u64, (Held, OwnedFd)>;

/// The holder and the connections it kept. With hand-over off: none.
pub fn holder(config: &Config) -> Result<(Option<Client>, Kept)> {
    if !config.handover.enabled {
        return Ok((None, HashMap::new()));
    }
    let socket = holder_socket(config);
    let client = match Client::connect(&socket)? {
        Some(c) => c,
        None if config.handover.spawn_holder => spawn_holder(config, &socket)?,
        None => {
            tracing::warn!(socket = %socket.display(), "no holder of FUSE connections answers: lazy layers will not survive a restart of the daemon");
            return Ok((None, HashMap::new()));
        }
    };
    let held = client
        .take()?
        .into_iter()
        .map(|(h, fd)| (h.id, (h, fd)))
        .collect::<HashMap<_, _>>();
    if !held.is_empty() {
        tracing::info!(
            connections = held.len(),
            "the holder kept FUSE connections of a previous daemon"
        );
    }
    Ok((Some(client), held))
}

/// Starts this binary as the holder, in a process group of its own (so signals meant for
/// the daemon do not reach it), logging beside the daemon's state.
fn spawn_holder(config: &Config, socket: &Path) -> Result<Client> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let log_path = config.root.join("holder.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let err = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
    let child = std::process::Command::new(exe)
        .arg("--hold")
        .arg(socket)
        .arg("--hold-orphan-secs")
        .arg(config.handover.orphan_secs.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("starting the holder", e))?;
    let pid = child.id();
    let _ = std::fs::write(config.root.join("holder.pid"), pid.to_string());
    // The holder outlives this process; it is nobody's child to wait for.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = Client::connect(socket)? {
            tracing::info!(pid, socket = %socket.display(), "holder of FUSE connections started");
            return Ok(c);
        }
        if Instant::now() > deadline {
            return Err(Error::Handover(format!(
                "the holder (pid {pid}) did not open {} in time",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

use std::os::unix::process::CommandExt as _;

/// Detaches every mount below `dir` (leftovers of a run killed before unmounting), deepest
/// first, but those in `live`: mounts whose connections the holder kept.
pub fn detach_dead_under(dir: &Path, live: &[PathBuf]) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .filter(|p| !live.iter().any(|l| Path::new(p) == l))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        tracing::info!(mountpoint = %p, "removing a stale mount");
        crate::remote::detach(Path::new(&p));
    }
}

/// Opens the chunk cache; one that cannot be opened (its index damaged by a crash) is set
/// aside and started empty: it is a cache, and every chunk read from it is verified anyway.
pub fn open_cache(dir: &Path, capacity: u64) -> Result<brisk_blobcache::disk::DiskCache> {
    match brisk_blobcache::disk::DiskCache::open(dir, capacity) {
        Ok(c) => Ok(c),
        Err(err) => {
            tracing::error!(err = %brisk_blobcache::error_chain(&err), dir = %dir.display(), "the chunk cache cannot be opened; starting it empty");
            let aside = dir.with_extension(format!(
                "damaged-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            ));
            std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
            // Its chunks are not needed any more; freeing the space is not worth failing for.
            let _ = std::fs::remove_dir_all(&aside);
            Ok(brisk_blobcache::disk::DiskCache::open(dir, capacity)?)
        }
    }
}

/// Takes over every committed lazy layer whose connection the holder kept, and mounts the
/// others again, before the socket accepts requests.
pub async fn remount(snapshotter: &Snapshotter, config: &Config, held: &mut Kept) -> Result<()> {
    let snapshots: Vec<_> = snapshotter
        .store()
        .all()?
        .into_iter()
        .filter(|s| s.kind == Kind::Committed && s.remote.is_some())
        .collect();
    let mut work = Vec::new();
    for s in snapshots {
        let connection = held.remove(&s.id);
        work.push((s, connection));
    }
    // Connections the holder kept for snapshots that are gone.
    for (id, _) in held.drain() {
        snapshotter.remote().forget_connection(id);
        crate::remote::detach(
            &config
                .root
                .join("snapshots")
                .join(id.to_string())
                .join("fs"),
        );
    }
    let remote = snapshotter.remote();
    let results = futures::stream::iter(work.into_iter().map(|(s, connection)| async move {
        let path = config
            .root
            .join("snapshots")
            .join(s.id.to_string())
            .join("fs");
        let layer = s.remote.clone().expect("filtered on remote layers");
        let attempt = async {
            if let Some((h, fd)) = connection {
                let c = crate::fs::Connection {
                    abi: h.abi,
                    capabilities: h.capabilities,
                };
                match remote.adopt(s.id, &path, &layer, fd, c).await {
                    Ok(toc) => return Ok(("taken over", toc)),
                    Err(err) => {
                        tracing::warn!(snapshot = %s.key, err = %brisk_blobcache::error_chain(&err), "the kept FUSE connection could not be taken over; mounting the layer again");
                        remote.forget_connection(s.id);
                    }
                }
            }
            remote.remount(s.id, &path, &layer).await.map(|toc| ("mounted again", toc))
        };
        let outcome = tokio::time::timeout(LAYER_DEADLINE, attempt).await;
        (s, outcome)
    }))
    .buffer_unordered(CONCURRENT)
    .collect::<Vec<_>>()
    .await;
    for (s, outcome) in results {
        match outcome {
            Ok(Ok((how, toc))) => {
                let proof = s.remote.as_ref().map_or("", |r| r.proof.as_str());
                tracing::info!(snapshot = %s.key, proof, "lazy layer {how}");
                snapshotter.prove(&s, toc);
            }
            // Never left as an empty directory to stack on: Prepare, View and Mounts over
            // it fail, naming it, until it is removed.
            Ok(Err(err)) => {
                tracing::error!(snapshot = %s.key, err = %brisk_blobcache::error_chain(&err), "lazy layer could not be mounted again")
            }
            Err(_) => {
                tracing::error!(snapshot = %s.key, secs = LAYER_DEADLINE.as_secs(), "lazy layer was not mounted again within its deadline")
            }
        }
    }
    Ok(())
}
