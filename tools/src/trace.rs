//! `brisk trace` and `brisk status`: a client of the snapshotter daemon's control API (on the
//! same unix socket as containerd's snapshots API), plus moving traces to and from the
//! registry as OCI artifacts next to their image.

use std::path::Path;

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::RegistryClient;
use brisk_blobcache::Digest;
use brisk_proto::brisk::v1 as api;
use brisk_proto::brisk::v1::control_client::ControlClient;
use brisk_trace_recorder::Trace;
use tonic::transport::Channel;

use crate::pull::resolve::{host_platform, resolve};
use crate::{Error, Result};

/// The daemon's default socket (`brisk-snapshotter --address`).
pub const DEFAULT_SOCKET: &str = "/run/brisk/brisk.sock";

pub async fn connect(socket: &Path) -> Result<ControlClient<Channel>> {
    std::os::unix::net::UnixStream::connect(socket).map_err(|e| Error::io(socket, e))?;
    let channel = containerd_client::connect(socket)
        .await
        .map_err(|e| Error::Containerd {
            op: "connect",
            source: tonic::Status::from_error(Box::new(e)),
        })?;
    Ok(ControlClient::new(channel))
}

fn failed(op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |source| Error::Containerd { op, source }
}

/// The manifest digest a trace is kept under for `image`: the digest itself, or the image
/// manifest for this host's platform that the reference resolves to.
pub async fn image_digest(
    client: &RegistryClient,
    image: &str,
) -> Result<(Digest, Option<Reference>)> {
    if let Ok(d) = image.parse::<Digest>() {
        return Ok((d, None));
    }
    let reference: Reference = image.parse()?;
    let resolved = resolve(client, &reference, &host_platform()).await?;
    Ok((resolved.manifest.digest, Some(reference)))
}

pub async fn list(socket: &Path) -> Result<api::ListTracesResponse> {
    let mut c = connect(socket).await?;
    Ok(c.list_traces(api::ListTracesRequest {})
        .await
        .map_err(failed("ListTraces"))?
        .into_inner())
}

pub async fn get(socket: &Path, image: &Digest) -> Result<Trace> {
    let mut c = connect(socket).await?;
    let bytes = c
        .get_trace(api::GetTraceRequest {
            image: image.to_string(),
        })
        .await
        .map_err(failed("GetTrace"))?
        .into_inner()
        .trace;
    Ok(Trace::decode(&bytes, Some(image))?)
}

pub async fn import(socket: &Path, trace: &Trace) -> Result<api::TraceSummary> {
    let mut c = connect(socket).await?;
    let resp = c
        .import_trace(api::ImportTraceRequest {
            trace: trace.encode(),
        })
        .await
        .map_err(failed("ImportTrace"))?;
    resp.into_inner()
        .summary
        .ok_or_else(|| Error::invalid("ImportTrace reply", "no summary"))
}

/// Reads a trace file, refusing anything that is not a valid trace.
pub fn read_file(path: &Path) -> Result<Trace> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Trace::decode(&bytes, None)?)
}

pub async fn push(client: &RegistryClient, socket: &Path, image: &str) -> Result<Digest> {
    let (digest, reference) = image_digest(client, image).await?;
    let reference = reference.ok_or_else(|| {
        Error::invalid(
            format!("image {image:?}"),
            "push needs a registry reference",
        )
    })?;
    let trace = get(socket, &digest).await?;
    Ok(brisk_trace_recorder::share::push(client, &reference, &trace).await?)
}

pub async fn pull(
    client: &RegistryClient,
    socket: &Path,
    image: &str,
) -> Result<api::TraceSummary> {
    let (digest, reference) = image_digest(client, image).await?;
    let reference = reference.ok_or_else(|| {
        Error::invalid(
            format!("image {image:?}"),
            "pull needs a registry reference",
        )
    })?;
    let trace = brisk_trace_recorder::share::fetch(client, &reference, &digest)
        .await?
        .ok_or_else(|| {
            Error::invalid(format!("image {image}"), "the registry has no trace for it")
        })?;
    import(socket, &trace).await
}

/// The readable form of `brisk trace show`.
pub fn render(trace: &Trace) -> String {
    let mut out = format!(
        "image {}: {} chunks, {} files, {} ms, {} start(s)\n",
        trace.image,
        trace.entries.len(),
        trace.files().len(),
        trace.duration_ms(),
        trace.starts
    );
    if trace.files.is_empty() {
        // Traces written before files were listed: the chunks' first readers.
        let mut last = "";
        for e in &trace.entries {
            if e.path != last {
                out += &format!("  {:>6} ms  {}\n", e.at_ms, e.path);
                last = &e.path;
            }
        }
    }
    for f in &trace.files {
        out += &format!("  {:>6} ms  {}\n", f.at_ms, f.path);
    }
    out
}

pub async fn status(socket: &Path) -> Result<api::StatusResponse> {
    let mut c = connect(socket).await?;
    Ok(c.status(api::StatusRequest {})
        .await
        .map_err(failed("Status"))?
        .into_inner())
}
