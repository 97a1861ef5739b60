//! The daemon's life: open state under the root, clear what a crash left mounted, mount every
//! committed lazy layer again, then serve the snapshots and control APIs on one unix socket
//! until shutdown, and unmount and flush on the way out.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::layered::Layered;
use brisk_blobcache::lazy::LazyImages;
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::meta::MetaStore;
use brisk_blobcache::registry::{Keychain, RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_proto::brisk::v1::control_server::ControlServer;
use brisk_proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use tonic::codegen::tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::control::ControlService;
use crate::meta::SnapshotStore;
use crate::remote::{RemoteLayers, TracePolicy};
use crate::service::SnapshotService;
use crate::snapshots::Snapshotter;
use crate::traces::Traces;
use crate::{Error, Result};
use brisk_trace_recorder::recorder::Limits;

/// How the daemon stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Leave every lazy layer mounted, its connection kept by the holder, for a successor
    /// (a restart or an upgrade): running containers wait instead of failing.
    HandOver,
    /// Unmount everything and stop the holder.
    Clean,
}

/// Serves until `shutdown` says how to stop; returns how it stopped. After `Stop::HandOver`
/// the caller must exit at once, without dropping the runtime: a read still in flight would
/// otherwise be answered EIO as its task is dropped, instead of being resent to the successor.
pub async fn run(config: Config, shutdown: impl Future<Output = Stop>) -> Result<Stop> {
    let root = &config.root;
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(root, e))?;
    // Before anything under the root is touched: one daemon per root.
    let _lock = crate::takeover::lock_root(root)?;
    let (holder, mut held) = crate::takeover::holder(&config)?;
    // A previous run killed before unmounting leaves dead FUSE mounts that fail every access;
    // those whose connections the holder kept are alive, and are taken over below.
    let live: Vec<std::path::PathBuf> = held
        .keys()
        .map(|id| root.join("snapshots").join(id.to_string()).join("fs"))
        .collect();
    crate::takeover::detach_dead_under(&root.join("snapshots"), &live);

    let mirrors = match &config.registry.config_path {
        Some(dir) => brisk_blobcache::registry::hosts::load(dir)?,
        None => brisk_blobcache::registry::hosts::Mirrors::default(),
    };
    let registry = RegistryConfig {
        plain_http_hosts: [config.registry.plain_http.clone(), mirrors.plain_http].concat(),
        mirrors: mirrors.by_registry,
        timeout: Duration::from_secs(config.registry.timeout_secs.unwrap_or(30)),
        proxy: config.registry.proxy.clone(),
        retries: config.registry.retries.unwrap_or(4),
        ..RegistryConfig::default()
    };
    // Pull credentials from the CRI proxy; memory only, shared with nothing but the client.
    let keychain = Arc::new(Keychain::new());
    let client = Arc::new(RegistryClient::new(registry.clone())?.with_keychain(keychain.clone()));
    let source = Arc::new(RegistrySource::new(client.clone(), RemoteConfig::default()));
    let disk = Arc::new(crate::takeover::open_cache(
        &root.join("cache"),
        config.cache.disk_bytes,
    )?);
    let origin_deadline = registry.timeout * (registry.retries + 1) + Duration::from_secs(15);
    let mut zone = crate::zone::join(&config.peer, source.clone()).await?;
    let mut levels = Layered::builder()
        .memory(
            Arc::new(MemoryCache::new(config.cache.memory_bytes)),
            Duration::from_secs(1),
        )
        .disk(disk.clone(), Duration::from_secs(5));
    if let Some(zone) = &zone {
        // The peer level keeps its own time: it waits on a home that shows progress, so
        // only a home that is itself waiting on the registry can take this long.
        levels = levels.peer(zone.source.clone(), origin_deadline);
    }
    let cache = levels.origin(source.clone(), origin_deadline).build();
    let images = Arc::new(
        LazyImages::new(client.clone(), Some(MetaStore::open(root.join("meta"))?))
            .serving(source.clone()),
    );
    let store = SnapshotStore::open(&root.join("metadata"))?;
    for (key, err) in store.set_aside_damaged()? {
        tracing::error!(snapshot = %key, %err, "snapshot record is damaged and cannot be recovered; it was set aside");
    }
    let t = &config.trace;
    let limits = Limits {
        quiet: Duration::from_secs(t.quiet_secs),
        max: Duration::from_secs(t.max_secs),
        ..Limits::default()
    };
    let push = t.push_to_registry.then(|| crate::traces::Push {
        client: client.clone(),
        rt: tokio::runtime::Handle::current(),
    });
    let traces = Traces::open(store.db(), limits, push)?;
    let policy = TracePolicy {
        record: t.record,
        prefetch: t.prefetch,
        fetch_from_registry: t.fetch_from_registry,
        skip: t.skip_prefetch.clone(),
    };
    if let Some(zone) = &mut zone {
        zone.serve(cache.clone(), source.clone(), traces.clone())?;
    }
    let remote = Arc::new(
        RemoteLayers::new(
            images,
            source,
            cache,
            tokio::runtime::Handle::current(),
            traces,
            policy,
        )
        .with_zone(zone.as_ref().map(|z| z.source.clone())),
    );
    let prover = Arc::new(crate::proof::Prover::new(
        config.layers.verify,
        Duration::from_secs(config.layers.verify_delay_secs),
        store.clone(),
        remote.clone(),
    ));
    let snapshotter = Arc::new(Snapshotter::new(root, store, remote.clone(), prover)?);
    remote.set_holder(holder);

    if let Some(addr) = &config.metrics_address {
        crate::metrics::serve(addr)?;
        // Per-image figures are sums over the snapshot records, so they are gauges brought
        // up to date now and then rather than counters bumped on every read. The task ends
        // with the runtime.
        let snapshotter = snapshotter.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::usage::PUBLISH_EVERY);
            loop {
                every.tick().await;
                let s = snapshotter.clone();
                // The records are read from the metadata store: a blocking read.
                let published = tokio::task::spawn_blocking(move || {
                    let all = s.store().all()?;
                    let layers = crate::usage::of_layers(&all, s.remote());
                    crate::usage::publish(&crate::usage::by_image(&all, &layers));
                    Ok::<_, Error>(())
                })
                .await;
                if let Ok(Err(err)) = published {
                    tracing::warn!(error = %brisk_blobcache::error_chain(&err), "per-image metrics not updated");
                }
            }
        });
    }
    if config.peer.peer_only {
        if zone.is_none() {
            return Err(Error::InvalidArgument(
                "peer-only needs a peer listen address".into(),
            ));
        }
        tracing::info!(root = %root.display(), "serving the zone only");
        let _ = shutdown.await;
        tracing::info!("shutting down");
        if let Some(zone) = zone {
            zone.leave().await;
        }
        disk.flush()?;
        return Ok(Stop::Clean);
    }
    let started = std::time::Instant::now();
    crate::takeover::remount(&snapshotter, &config, &mut held).await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "lazy layers taken over or mounted again"
    );
    // Manifests and TOCs of images removed while the daemon was down.
    remote.forget_unheld(&snapshotter.lazy_layers()?);

    let address = &config.address;
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    match std::fs::remove_file(address) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(address, e)),
        _ => {}
    }
    let listener = bind_socket(address, config.socket_group)?;
    let cri = match &config.cri.listen {
        Some(path) => Some(serve_cri(path, &config.cri.containerd, keychain)?),
        None => None,
    };
    tracing::info!(address = %address.display(), root = %root.display(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let served = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotService::new(
            snapshotter.clone(),
        )))
        .add_service(ControlServer::new(ControlService::new(snapshotter.clone())))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_tx.send(shutdown.await);
        })
        .await;
    let stop = stop_rx.await.unwrap_or(Stop::HandOver);
    tracing::info!(?stop, "shutting down");
    if let Some((stop_cri, path)) = cri {
        stop_cri.cancel();
        let _ = std::fs::remove_file(path);
    }
    if let Some(zone) = zone {
        zone.leave().await;
    }
    match stop {
        Stop::Clean => remote.unmount_all(),
        Stop::HandOver => remote.leave_all(),
    }
    disk.flush()?;
    let _ = std::fs::remove_file(address);
    served.map_err(|e| Error::io(address, std::io::Error::other(e)))?;
    Ok(stop)
}

/// Serves the CRI image-service proxy on `path` (mode 0600) until the token is cancelled.
fn serve_cri(
    path: &std::path::Path,
    containerd: &std::path::Path,
    keychain: Arc<Keychain>,
) -> Result<(tokio_util::sync::CancellationToken, std::path::PathBuf)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
        _ => {}
    }
    let listener = bind_socket(path, None)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(path, e))?;
    let proxy = crate::cri::ImageProxy::new(containerd, keychain);
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    tracing::info!(address = %path.display(), containerd = %containerd.display(), "serving the CRI image service");
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(proxy)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped.cancelled())
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "the CRI image service stopped");
        }
    });
    Ok((stop, path.to_owned()))
}

/// Binds the API socket with mode 0660 whatever the umask (created under a 0077 umask, then
/// opened to the owner's group), owned by root and `group` when one is configured: local
/// users outside that group cannot reach the snapshots or control API.
fn bind_socket(address: &std::path::Path, group: Option<u32>) -> Result<tokio::net::UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o077) };
    let bound = tokio::net::UnixListener::bind(address);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| Error::io(address, e))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(address, None, Some(gid)).map_err(|e| Error::io(address, e))?;
    }
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io(address, e))?;
    Ok(listener)
}
