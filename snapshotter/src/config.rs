//! Daemon configuration: a TOML file, with command-line flags on top. Every field has a
//! documented default, so an empty file (or none) gives a working daemon.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

pub const DEFAULT_ROOT: &str = "/var/lib/brisk";
pub const DEFAULT_ADDRESS: &str = "/run/brisk/brisk.sock";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// All state lives here: metadata, snapshot directories, caches.
    pub root: PathBuf,
    /// Unix socket for containerd's snapshots API and Brisk's control API (mode 0660).
    pub address: PathBuf,
    /// Numeric group given the socket; unset, only root reaches it.
    pub socket_group: Option<u32>,
    /// `tracing` filter, e.g. `info` or `brisk_snapshotter=debug`.
    pub log_level: String,
    /// Prometheus metrics endpoint (`host:port`); no port is opened unless set.
    pub metrics_address: Option<String>,
    pub cache: CacheConfig,
    pub registry: RegistrySettings,
    pub trace: TraceSettings,
    pub peer: PeerSettings,
    pub layers: LayerSettings,
    pub handover: HandoverSettings,
    pub cri: CriSettings,
}

/// The CRI image-service proxy for Kubernetes nodes (see `crate::cri`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriSettings {
    /// Serve the proxy on this unix socket (mode 0600: the kubelet runs as root); the
    /// kubelet's `--image-service-endpoint` points here. Unset, no proxy is served.
    pub listen: Option<PathBuf>,
    /// containerd's socket, whose CRI plugin the proxy forwards to.
    pub containerd: PathBuf,
}

impl Default for CriSettings {
    fn default() -> Self {
        Self {
            listen: None,
            containerd: "/run/containerd/containerd.sock".into(),
        }
    }
}

/// Keeping lazy layers' FUSE connections alive across restarts (see `crate::handover`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoverSettings {
    /// Hand every layer's connection to a holder, so a restarted, upgraded or crashed daemon's
    /// successor takes running containers over instead of leaving them ENOTCONN.
    pub enabled: bool,
    /// Start a holder (this binary, `--hold`) when none answers. Off under systemd, where
    /// `brisk-holder.service` runs it.
    pub spawn_holder: bool,
    /// The holder's socket; default `<root>/holder.sock`.
    pub holder_socket: Option<PathBuf>,
    /// With no daemon for this long, the holder lets the connections go (readers then get
    /// errors instead of waiting for a daemon that does not come back).
    pub orphan_secs: u64,
}

impl Default for HandoverSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            spawn_holder: true,
            holder_socket: None,
            orphan_secs: 600,
        }
    }
}

/// How lazy layers earn the chain IDs containerd commits them under (see `crate::proof`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LayerSettings {
    /// `background` (read each lazy layer whole, behind every on-demand read, and hash it),
    /// `cached` (hash a layer once all its chunks are in the local cache anyway) or `off`.
    pub verify: crate::proof::VerifyMode,
    /// Seconds between a layer's mount and its background hash: its container's start and
    /// start-up prefetch go first.
    pub verify_delay_secs: u64,
}

impl Default for LayerSettings {
    fn default() -> Self {
        Self {
            verify: crate::proof::VerifyMode::Background,
            verify_delay_secs: 10,
        }
    }
}

/// The zone cache peer service (L3). Off unless `listen` is set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerSettings {
    /// `host:port` for the peer service (TCP) and zone gossip (UDP). Other members reach this
    /// host there, so it must be an address they can route to, not a wildcard.
    pub listen: Option<String>,
    /// Seed members (`host:port`, this host's own address may be among them). Seeds that are
    /// down at start are tried again every second.
    pub peers: Vec<String>,
    /// File holding the zone's shared token (at least 16 bytes); required with `listen`.
    pub token_file: Option<PathBuf>,
    /// A peer must accept a request within this many milliseconds, or it is passed over.
    pub ack_timeout_ms: u64,
    /// Serve the zone only: no snapshots socket (a cache host for the zone).
    pub peer_only: bool,
    /// Mutual TLS for the peer service (all three or none): the zone CA, and this host's
    /// certificate (naming its peer address as an IP SAN) and key, PEM.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            listen: None,
            peers: Vec::new(),
            token_file: None,
            ack_timeout_ms: 500,
            peer_only: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSettings {
    /// Record a start-up trace for images that have none.
    pub record: bool,
    /// Prefetch from traces when an image's layers are prepared.
    pub prefetch: bool,
    /// Look for an image's trace in its registry on first sight.
    pub fetch_from_registry: bool,
    /// Push every newly recorded trace next to its image (needs write credentials).
    pub push_to_registry: bool,
    /// A recording ends this many seconds after the last read...
    pub quiet_secs: u64,
    /// ... or this many seconds after the first.
    pub max_secs: u64,
    /// Repositories (`host/name`) that are never prefetched.
    pub skip_prefetch: Vec<String>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            record: true,
            prefetch: true,
            fetch_from_registry: true,
            push_to_registry: false,
            quiet_secs: 5,
            max_secs: 60,
            skip_prefetch: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// L1: decompressed chunks in memory.
    pub memory_bytes: u64,
    /// L2: chunks on disk under `<root>/cache`.
    pub disk_bytes: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Registries (`host:port`) reached over plain HTTP besides loopback ones.
    pub plain_http: Vec<String>,
    /// Seconds a registry may stay silent before a request is retried.
    pub timeout_secs: Option<u64>,
    pub retries: Option<u32>,
    /// HTTP proxy for every registry request (`http://host:port`), e.g. a P2P distribution
    /// daemon in front of the registry. Unset: the `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`
    /// environment applies.
    pub proxy: Option<String>,
    /// containerd's registry host configuration directory (`/etc/containerd/certs.d`): the
    /// mirrors listed there are read through, in order, before the registry itself.
    pub config_path: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            socket_group: None,
            log_level: "info".into(),
            metrics_address: None,
            cache: CacheConfig::default(),
            registry: RegistrySettings::default(),
            trace: TraceSettings::default(),
            peer: PeerSettings::default(),
            layers: LayerSettings::default(),
            handover: HandoverSettings::default(),
            cri: CriSettings::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            disk_bytes: 20 << 30,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default location means "all defaults".
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("config {}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(c.layers.verify, crate::proof::VerifyMode::Background);
        let c: Config = toml::from_str(
            "root = \"state/brisk\"\n[cache]\nmemory_bytes = 5\n[registry]\nplain_http = [\"h:1\"]\n",
        )
        .unwrap();
        assert_eq!(
            (c.root, c.cache.memory_bytes, c.registry.plain_http),
            ("state/brisk".into(), 5, vec!["h:1".to_owned()])
        );
        assert!(toml::from_str::<Config>("nope = 1").is_err());
        let c: Config = toml::from_str("[layers]\nverify = \"cached\"\n").unwrap();
        assert_eq!(c.layers.verify, crate::proof::VerifyMode::Cached);
        assert!(toml::from_str::<Config>("[layers]\nverify = \"sometimes\"\n").is_err());
    }
}
