//! containerd's snapshots gRPC service over `Snapshotter`, and the one conversion of crate
//! errors into gRPC statuses.
//!
//! containerd acts on the status code, not the message: AlreadyExists on Prepare is how a
//! remote snapshotter says "this layer needs no download". The snapshotter name in requests
//! is ignored: containerd sends whatever name the operator configured.

use brisk_blobcache::error_chain as chain;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use brisk_proto::containerd::services::snapshots::v1 as api;
use brisk_proto::containerd::types::Mount as ApiMount;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::Class;
use crate::meta::{Kind, Snapshot};
use crate::snapshots::{Mount, Snapshotter};
use crate::Error;

/// containerd's server words a status as its error chain ending in the error class
/// (`...: not found`); its client strips that class and adds it back, so the message a user
/// sees is the same whether or not it is there. It is added here so the statuses themselves
/// read as containerd's do.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let msg = chain(&err);
        if let Error::Upstream(_) = err {
            return Status::unavailable(msg);
        }
        let class = match &err {
            Error::Refused(r) => Some(r.class()),
            Error::FailedPrecondition(_) => Some(Class::FailedPrecondition),
            Error::InvalidArgument(_) | Error::Trace(_) => Some(Class::InvalidArgument),
            Error::NoTrace(_) => Some(Class::NotFound),
            _ => None,
        };
        match class {
            Some(Class::NotFound) => Status::not_found(format!("{msg}: not found")),
            Some(Class::AlreadyExists) => Status::already_exists(format!("{msg}: already exists")),
            Some(Class::InvalidArgument) => {
                Status::invalid_argument(format!("{msg}: invalid argument"))
            }
            Some(Class::FailedPrecondition) => {
                Status::failed_precondition(format!("{msg}: failed precondition"))
            }
            None => Status::internal(msg),
        }
    }
}

pub struct SnapshotService {
    inner: Arc<Snapshotter>,
}

impl SnapshotService {
    pub fn new(inner: Arc<Snapshotter>) -> Self {
        Self { inner }
    }

    /// Runs blocking metadata and filesystem work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(Error::Task)?
            .map_err(Status::from)
    }
}

fn mounts(m: Vec<Mount>) -> Vec<ApiMount> {
    m.into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn labels(l: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn timestamp((seconds, nanos): (i64, u32)) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds,
        nanos: nanos as i32,
    }
}

pub(crate) fn info(s: &Snapshot) -> api::Info {
    api::Info {
        name: s.key.clone(),
        parent: s.parent.clone(),
        kind: match s.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

/// Infos per streamed message: containerd's own service sends them in batches too.
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for SnapshotService {
    async fn prepare(
        &self,
        req: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "prepare");
        let m = self
            .inner
            .prepare(&r.key, &r.parent, labels(r.labels))
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .blocking(move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = self.blocking(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(api::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.blocking(move |s| s.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.blocking(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let s = self.blocking(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        // containerd's Info is never absent (a non-nullable field); missing, it names no
        // snapshot, and that is what Update answers.
        let given = r.info.unwrap_or_default();
        let fields = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = self
            .blocking(move |s| s.update(&given.name, labels(given.labels), &fields))
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        // Collected up front, so nothing is locked while the client reads the stream.
        let all = self.blocking(move |s| s.walk(&r.filters)).await?;
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = all
            .chunks(LIST_BATCH)
            .map(|c| {
                Ok(api::ListSnapshotsResponse {
                    info: c.iter().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let r = req.into_inner();
        let (size, inodes) = self.blocking(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(api::UsageResponse {
            size: size as i64,
            inodes: inodes as i64,
        }))
    }

    async fn cleanup(&self, _req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
