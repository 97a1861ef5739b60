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

#[tonic::async_trait]
impl api::control_server::Control for ControlService {
    async fn status(
        &self,
        _req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        let remote = self.inner.remote();
        let snapshots = self.inner.store().all().map_err(Status::from)?.len() as u64;
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
        }))
    }
}
