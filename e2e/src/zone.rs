//! Zone hosts for the peer tests and benchmark: each host is a `brisk-snapshotter` on its own
//! loopback address (127.0.0.N) sharing the zone's token, plus the calls containerd makes to
//! mount an image lazily (Prepare every layer with the remote-snapshot labels, then View the
//! top), so many hosts can run at once without a containerd each.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use brisk_proto::brisk::v1::control_client::ControlClient;
use brisk_proto::brisk::v1::StatusRequest;
use brisk_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use brisk_proto::containerd::services::snapshots::v1::{
    PrepareSnapshotRequest, ViewSnapshotRequest,
};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

use crate::cmd::run;
use crate::daemons::Snapshotter;

/// containerd's labels for a remote snapshot (as in the snapshotter's `remote` module).
const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// Writes a fresh random zone token to `path`.
pub fn write_token(path: &Path) -> Result<()> {
    std::fs::write(path, hex::encode(rand::random::<[u8; 32]>()))?;
    Ok(())
}

/// A free port on `ip` for both TCP (peer service) and UDP (gossip).
pub fn free_addr(ip: Ipv4Addr) -> Result<SocketAddr> {
    for _ in 0..20 {
        let tcp = std::net::TcpListener::bind((ip, 0))?;
        let addr = tcp.local_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no port free for both TCP and UDP on {ip}")
}

/// One zone host.
pub struct Host {
    pub snapshotter: Snapshotter,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Host {
    /// Starts host `n` (address 127.0.0.`n`) under `dir` with the given seeds and token.
    pub fn start(dir: &Path, addr: SocketAddr, seeds: &[SocketAddr], token: &Path) -> Result<Self> {
        Self::start_with(dir, addr, seeds, token, "")
    }

    /// As `start`, with more lines for the daemon's config file (keys of `[peer]`).
    pub fn start_with(
        dir: &Path,
        addr: SocketAddr,
        seeds: &[SocketAddr],
        token: &Path,
        peer_config: &str,
    ) -> Result<Self> {
        let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        let addr_s = addr.to_string();
        let seeds_s = seeds.join(",");
        let token_s = token.to_str().context("token path")?;
        // A start-up trace ends one second after the last read, so a test can use it soon.
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!("[trace]\nquiet_secs = 1\n[peer]\n{peer_config}\n"),
        )?;
        let config_s = config.to_str().context("config path")?;
        let snapshotter = Snapshotter::start(
            dir,
            &[
                "--config",
                config_s,
                "--peer-listen",
                &addr_s,
                "--peers",
                &seeds_s,
                "--peer-token-file",
                token_s,
            ],
        )?;
        Ok(Self {
            snapshotter,
            addr,
            dir: dir.to_owned(),
        })
    }

    /// Images this host holds a start-up trace for.
    pub async fn traces(&self) -> Result<Vec<String>> {
        let mut client = ControlClient::new(connect(&self.snapshotter.socket).await?);
        Ok(client
            .list_traces(brisk_proto::brisk::v1::ListTracesRequest {})
            .await?
            .into_inner()
            .traces
            .into_iter()
            .map(|t| t.image)
            .collect())
    }

    pub async fn status(&self) -> Result<brisk_proto::brisk::v1::StatusResponse> {
        let mut client = ControlClient::new(connect(&self.snapshotter.socket).await?);
        Ok(client.status(StatusRequest {}).await?.into_inner())
    }

    /// Other members this host believes alive.
    pub async fn members(&self) -> Result<Vec<String>> {
        let mut m = self
            .status()
            .await?
            .zone
            .map(|z| z.members)
            .unwrap_or_default();
        m.sort();
        Ok(m)
    }
}

pub async fn connect(socket: &Path) -> Result<Channel> {
    containerd_client::connect(socket)
        .await
        .with_context(|| format!("Connecting to {}", socket.display()))
}

/// An image's manifest digest, layer digests and diff_ids, read from the registry.
pub struct ImageInfo {
    pub reference: String,
    pub manifest: String,
    pub layers: Vec<String>,
    pub diff_ids: Vec<String>,
}

pub async fn image_info(reference: &str) -> Result<ImageInfo> {
    let (host, rest) = reference
        .split_once('/')
        .context("reference has no registry")?;
    let (repo, tag) = rest.rsplit_once(':').context("reference has no tag")?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let manifest = http
        .get(format!("http://{host}/v2/{repo}/manifests/{tag}"))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let digest = format!("sha256:{:x}", Sha256::digest(&manifest));
    let m: serde_json::Value = serde_json::from_slice(&manifest)?;
    let config = m["config"]["digest"].as_str().context("config digest")?;
    let config: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("http://{host}/v2/{repo}/blobs/{config}"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?,
    )?;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect()
    };
    let layers = m["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect();
    Ok(ImageInfo {
        reference: reference.to_owned(),
        manifest: digest,
        layers,
        diff_ids: strings(&config["rootfs"]["diff_ids"]),
    })
}

/// The chain ids of an image's layers, bottom first (OCI image spec).
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{:x}", Sha256::digest(format!("{prev} {d}"))),
        };
        out.push(next);
    }
    out
}

/// Does what containerd does to pull an image onto a remote snapshotter, then mounts a
/// read-only view of the whole image at `target`. Fails if any layer was not served lazily.
pub async fn mount_image(
    socket: &Path,
    image: &ImageInfo,
    target: &Path,
    view: &str,
) -> Result<()> {
    let mut client = SnapshotsClient::new(connect(socket).await?);
    let chains = chain_ids(&image.diff_ids);
    let mut parent = String::new();
    for (i, (layer, chain)) in image.layers.iter().zip(&chains).enumerate() {
        let labels: std::collections::HashMap<String, String> = BTreeMap::from([
            (LABEL_TARGET.to_owned(), chain.clone()),
            (LABEL_IMAGE_REF.to_owned(), image.reference.clone()),
            (LABEL_LAYER.to_owned(), layer.clone()),
            (LABEL_MANIFEST.to_owned(), image.manifest.clone()),
        ])
        .into_iter()
        .collect();
        let answer = client
            .prepare(PrepareSnapshotRequest {
                snapshotter: "brisk".into(),
                key: format!("extract-{view}-{i}"),
                parent: parent.clone(),
                labels,
            })
            .await;
        match answer {
            Err(status) if status.code() == tonic::Code::AlreadyExists => {}
            Ok(_) => bail!("layer {layer} was not served lazily"),
            Err(status) => bail!("Prepare of layer {layer}: {status}"),
        }
        parent = chain.clone();
    }
    let mounts = client
        .view(ViewSnapshotRequest {
            snapshotter: "brisk".into(),
            key: view.into(),
            parent,
            labels: Default::default(),
        })
        .await?
        .into_inner()
        .mounts;
    std::fs::create_dir_all(target)?;
    for m in mounts {
        let mut cmd = Command::new("mount");
        cmd.arg("-t")
            .arg(&m.r#type)
            .arg("-o")
            .arg(m.options.join(","))
            .arg(&m.source)
            .arg(target);
        run(&mut cmd).context("Mounting the image view")?;
    }
    Ok(())
}

/// A zone CA and, for each address, a certificate naming it (IP SAN) with its key, made with
/// the `openssl` CLI under `dir`. Returns `[peer]` config lines per address.
pub fn zone_certificates(dir: &Path, addrs: &[SocketAddr]) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=brisk zone CA"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.pem")))?;
    let mut out = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let (key, csr, pem, ext) = (
            dir.join(format!("h{i}.key")),
            dir.join(format!("h{i}.csr")),
            dir.join(format!("h{i}.pem")),
            dir.join(format!("h{i}.ext")),
        );
        std::fs::write(
            &ext,
            format!(
                "subjectAltName = IP:{}\nextendedKeyUsage = serverAuth, clientAuth\nbasicConstraints = CA:FALSE\n",
                a.ip()
            ),
        )?;
        run(Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-subj", &format!("/CN={}", a.ip())])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr))?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(dir.join("ca.pem"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&pem))?;
        out.push(format!(
            "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}",
            dir.join("ca.pem"),
            pem,
            key
        ));
    }
    Ok(out)
}
