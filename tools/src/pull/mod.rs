//! `brisk pull`: an image into containerd the way containerd's own unpacker puts it there,
//! so that a remote snapshotter (Brisk's) can serve layers lazily instead of having them
//! downloaded and extracted.
//!
//! The steps, all under one lease so the garbage collector leaves half-pulled images alone:
//! resolve the reference with the registry (`resolve`); make a snapshot for each layer in
//! order (`unpack`), which a lazy layer gets without a download; store the index, manifest
//! and config with the labels that keep their blobs and snapshots alive (`content`); point an
//! image record at the top descriptor. It is a client only: it never mounts, extracts or
//! serves anything itself, and pulling an image twice changes nothing the second time.

mod chain;
mod client;
mod content;
pub(crate) mod resolve;
mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::Digest;
use containerd_client::services::v1::{CreateImageRequest, Image, UpdateImageRequest};
use containerd_client::types::Descriptor;
use serde::Serialize;
use tonic::Code;

use self::client::{failed, is_code, Session};
use self::content::Labels;
use self::resolve::{Blob, Resolved};
use self::unpack::{Outcome, Unpacker};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct PullOptions {
    /// containerd's gRPC socket.
    pub containerd: PathBuf,
    pub namespace: String,
    /// The snapshotter to unpack into; layers are lazy only with a remote one.
    pub snapshotter: String,
    /// `os/arch` to pick from an index; defaults to linux and this machine's architecture.
    pub platform: Option<String>,
    pub registry: RegistryConfig,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            containerd: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "default".to_owned(),
            snapshotter: "brisk".to_owned(),
            platform: None,
            registry: RegistryConfig::default(),
        }
    }
}

/// What a pull did, for the one-line summary and `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct PullSummary {
    pub image: String,
    /// The digest the image record points at (the index, if the reference named one).
    pub digest: Digest,
    /// The platform manifest that was unpacked.
    pub manifest: Digest,
    pub snapshotter: String,
    /// Chain id of the top layer: the snapshot a container of this image starts from.
    pub chain_id: Option<Digest>,
    pub layers: usize,
    /// Layers the snapshotter served without a download.
    pub lazy: usize,
    /// Layers fetched (or taken from the content store) and applied.
    pub downloaded: usize,
    /// Layers whose snapshot already existed.
    pub present: usize,
    /// Compressed layer bytes fetched from the registry.
    pub bytes_downloaded: u64,
    pub seconds: f64,
}

impl std::fmt::Display for PullSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {} layers into {}: {} lazy, {} downloaded ({} bytes), {} present, {:.1}s",
            self.image,
            self.digest,
            self.layers,
            self.snapshotter,
            self.lazy,
            self.downloaded,
            self.bytes_downloaded,
            self.present,
            self.seconds
        )
    }
}

/// Pulls `image` (`host[:port]/repo[:tag|@digest]`) into containerd; the image record is
/// named exactly `image`.
pub async fn pull(image: &str, opts: &PullOptions) -> Result<PullSummary> {
    let started = Instant::now();
    let reference: Reference = image.parse()?;
    let registry = RegistryClient::new(opts.registry.clone())?;
    let session = Session::connect(&opts.containerd, &opts.namespace).await?;
    let platform = opts.platform.clone().unwrap_or_else(resolve::host_platform);
    // Resolving writes nothing to containerd, so it needs no lease yet.
    let resolved = resolve::resolve(&registry, &reference, &platform).await?;

    let (leased, lease) = session.with_new_lease().await?;
    let result = unpack_and_record(&leased, &registry, &reference, image, opts, &resolved).await;
    // The lease only protects the pull while it runs; once the image record exists, the
    // records' labels keep everything alive. A lease left behind expires on its own, so
    // failing to delete it is not worth failing the pull for.
    if let Err(err) = session.delete_lease(&lease).await {
        tracing::warn!(%lease, err = %format!("{err:#}"), "could not delete the pull's lease");
    }
    let mut summary = result?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn unpack_and_record(
    session: &Session,
    registry: &RegistryClient,
    reference: &Reference,
    image: &str,
    opts: &PullOptions,
    resolved: &Resolved,
) -> Result<PullSummary> {
    let diff_ids: Vec<Digest> = resolved.layers.iter().map(|l| l.diff_id).collect();
    let chain = chain::chain_ids(&diff_ids);
    let tmp = tempfile::tempdir().map_err(|e| Error::io("temporary directory", e))?;
    let unpacker = Unpacker {
        session,
        registry,
        reference,
        image,
        snapshotter: &opts.snapshotter,
        manifest: resolved.manifest.digest,
        tmp: tmp.path(),
    };
    let mut summary = PullSummary {
        image: image.to_owned(),
        digest: resolved.top().digest,
        manifest: resolved.manifest.digest,
        snapshotter: opts.snapshotter.clone(),
        chain_id: chain.last().copied(),
        layers: resolved.layers.len(),
        lazy: 0,
        downloaded: 0,
        present: 0,
        bytes_downloaded: 0,
        seconds: 0.0,
    };
    // One layer at a time, and no fetch ahead: whether a layer needs its blob at all is only
    // known once its `Prepare` has answered, and a lazy layer must cost no download.
    for (i, layer) in resolved.layers.iter().enumerate() {
        let outcome = unpacker
            .layer(&resolved.layers, &chain, i)
            .await
            .map_err(|e| Error::layer(i, layer.digest, e))?;
        tracing::info!(layer = i, digest = %layer.digest, chain_id = %chain[i], ?outcome, "layer ready");
        match outcome {
            Outcome::Present => summary.present += 1,
            Outcome::Lazy => summary.lazy += 1,
            Outcome::Downloaded { bytes } => {
                summary.downloaded += 1;
                summary.bytes_downloaded += bytes;
            }
        }
    }
    store_records(session, resolved, &opts.snapshotter, chain.last()).await?;
    put_image(session, image, resolved.top()).await?;
    Ok(summary)
}

/// Stores config, manifest and index, children first, each with the labels that make its
/// parent keep it: the config holds the snapshot chain, the manifest its config and every
/// layer blob the content store has, the index the manifest.
async fn store_records(
    session: &Session,
    resolved: &Resolved,
    snapshotter: &str,
    top_chain: Option<&Digest>,
) -> Result<()> {
    let mut labels = Labels::new();
    if let Some(top) = top_chain {
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
            top.to_string(),
        );
    }
    put_blob(session, &resolved.config, labels).await?;

    let mut labels = Labels::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        resolved.config.digest.to_string(),
    )]);
    // Lazy layers have no blob in the store, and a reference to a missing blob is only noise.
    for (i, layer) in resolved.layers.iter().enumerate() {
        if content::exists(session, &layer.digest).await? {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.to_string(),
            );
        }
    }
    put_blob(session, &resolved.manifest, labels).await?;

    if let Some(index) = &resolved.index {
        // Numbered by position in the index, so labels for other platforms' manifests, added
        // by later pulls of the same index, never overwrite this one.
        let labels = Labels::from([(
            format!("containerd.io/gc.ref.content.m.{}", resolved.index_position),
            resolved.manifest.digest.to_string(),
        )]);
        put_blob(session, index, labels).await?;
    }
    Ok(())
}

async fn put_blob(session: &Session, blob: &Blob, labels: Labels) -> Result<()> {
    content::put_bytes(session, &blob.digest, &blob.bytes, labels).await?;
    Ok(())
}

/// Creates the image record, or points an existing one at `top`, keeping its labels.
async fn put_image(session: &Session, name: &str, top: &Blob) -> Result<()> {
    let image = Image {
        name: name.to_owned(),
        labels: HashMap::new(),
        target: Some(Descriptor {
            media_type: top.media_type.clone(),
            digest: top.digest.to_string(),
            size: top.size() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let create = session.request(CreateImageRequest {
        image: Some(image.clone()),
        source_date_epoch: None,
    });
    let created = session.images().create(create).await;
    if !is_code(&created, Code::AlreadyExists) {
        created.map_err(failed("image create"))?;
        return Ok(());
    }
    let update = session.request(UpdateImageRequest {
        image: Some(image),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["target".to_owned()],
        }),
        source_date_epoch: None,
    });
    session
        .images()
        .update(update)
        .await
        .map_err(failed("image update"))?;
    Ok(())
}
