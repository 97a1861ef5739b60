//! Brisk's own control API (status and cache counters), served next to the snapshots API.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use brisk_proto::brisk::v1 as api;
use tonic::{Request, Response, Status};

use crate::snapshots::Snapshotter;

pub struct ControlService {
    inner: Arc<Snapshotter>,
}

impl ControlService {
    pub fn new(inner: Arc<Snapshotter>) -> Self {
        Self { inner }
    }
}

fn summary(t: &brisk_trace_recorder::Trace) -> api::TraceSummary {
    api::TraceSummary {
        image: t.image.to_string(),
        chunks: t.entries.len() as u64,
        files: t.files().len() as u64,
        duration_ms: t.duration_ms(),
        starts: t.starts,
    }
}

#[tonic::async_trait]
impl api::control_server::Control for ControlService {
    async fn list_traces(
        &self,
        _req: Request<api::ListTracesRequest>,
    ) -> Result<Response<api::ListTracesResponse>, Status> {
        let traces = self.inner.remote().traces();
        Ok(Response::new(api::ListTracesResponse {
            traces: traces
                .list()
                .map_err(Status::from)?
                .iter()
                .map(summary)
                .collect(),
            dropped_reads: traces.recorder().dropped(),
        }))
    }

    async fn get_trace(
        &self,
        req: Request<api::GetTraceRequest>,
    ) -> Result<Response<api::GetTraceResponse>, Status> {
        let image: brisk_blobcache::Digest =
            req.into_inner()
                .image
                .parse()
                .map_err(|e: brisk_blobcache::Error| {
                    Status::from(crate::Error::InvalidArgument(format!("image digest: {e}")))
                })?;
        let trace = self
            .inner
            .remote()
            .traces()
            .get(&image)
            .map_err(Status::from)?;
        let trace = trace.ok_or_else(|| Status::from(crate::Error::NoTrace(image)))?;
        Ok(Response::new(api::GetTraceResponse {
            trace: trace.encode(),
        }))
    }

    async fn import_trace(
        &self,
        req: Request<api::ImportTraceRequest>,
    ) -> Result<Response<api::ImportTraceResponse>, Status> {
        let trace = brisk_trace_recorder::Trace::decode(&req.into_inner().trace, None)
            .map_err(|e| Status::from(crate::Error::Trace(e)))?;
        let merged = self
            .inner
            .remote()
            .traces()
            .import(&trace)
            .map_err(Status::from)?;
        Ok(Response::new(api::ImportTraceResponse {
            summary: Some(summary(&merged)),
        }))
    }

    async fn status(
        &self,
        _req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        let remote = self.inner.remote();
        let all = self.inner.store().all().map_err(Status::from)?;
        let snapshots = all.len() as u64;
        let usage = crate::usage::of_layers(&all, remote);
        let images = crate::usage::by_image(&all, &usage)
            .iter()
            .map(|i| api::ImageStatus {
                image: i.image.clone(),
                manifest: i.manifest.to_string(),
                layers: i.layers,
                mounted: i.mounted,
                reads: Some(crate::usage::to_api(&i.usage)),
            })
            .collect();
        let layers = all
            .iter()
            .filter_map(|s| {
                let r = s.remote.as_ref()?;
                let used = usage.get(&s.id).copied().flatten();
                Some(api::LazyLayerStatus {
                    chain_id: s.key.clone(),
                    blob: r.blob.to_string(),
                    image: r.image.to_string(),
                    proof: r.proof.as_str().to_owned(),
                    mounted: used.is_some(),
                    manifest: r.manifest.to_string(),
                    reads: Some(crate::usage::to_api(&used.unwrap_or_default())),
                })
            })
            .collect();
        let stats = remote.source().stats();
        Ok(Response::new(api::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            snapshots,
            remote_layers: remote.mounted() as u64,
            cache: remote
                .cache()
                .report()
                .into_iter()
                .map(|l| api::CacheLevel {
                    level: l.level.to_owned(),
                    hits: l.hits,
                    misses: l.misses,
                    errors: l.errors,
                    corrupt: l.corrupt,
                    timeouts: l.timeouts,
                    bytes: l.bytes,
                })
                .collect(),
            registry_requests: stats.requests.load(Ordering::Relaxed),
            registry_bytes: stats.bytes.load(Ordering::Relaxed),
            on_demand_fetches: remote.cache().origin_fetches().0,
            prefetch_fetches: remote.cache().origin_fetches().1,
            prefetches_started: remote.traces().prefetches_started(),
            recordings: remote.traces().recordings_started(),
            layers,
            images,
            verify: self.inner.prover().mode().as_str().to_owned(),
            zone: remote.zone().map(|z| {
                let s = z.stats();
                api::ZoneStatus {
                    address: z.zone().me().to_string(),
                    members: z.zone().members().iter().map(|m| m.to_string()).collect(),
                    requests: s.requests.load(Ordering::Relaxed),
                    chunks: s.chunks.load(Ordering::Relaxed),
                    bytes: s.bytes.load(Ordering::Relaxed),
                    corrupt: s.corrupt.load(Ordering::Relaxed),
                    failures: s.failures.load(Ordering::Relaxed),
                }
            }),
        }))
    }
}
