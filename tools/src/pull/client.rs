//! A connection to containerd's gRPC API, scoped to one namespace and, once created, one
//! lease.
//!
//! containerd reads both from request metadata (`containerd-namespace`, `containerd-lease`),
//! not from the messages, so every request is built here. It does not interpret any answer:
//! what a gRPC code means for a pull is decided by the callers.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{CreateRequest, DeleteRequest};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::{Error, Result};

/// Label that lets containerd's garbage collector drop a lease this process never deleted
/// (it was killed, or the connection broke before the end of the pull).
const LABEL_EXPIRE: &str = "containerd.io/gc.expire";

/// Longer than any pull should take: a lease that expires mid-pull would let the collector
/// take blobs and snapshots the image does not reference yet.
const LEASE_LIFETIME: Duration = Duration::from_secs(60 * 60);

#[derive(Clone)]
pub(crate) struct Session {
    channel: Channel,
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

/// Wraps a failed call; `op` names it for the error message.
pub(crate) fn failed(op: &'static str) -> impl FnOnce(Status) -> Error {
    move |source| Error::Containerd { op, source }
}

/// True when `result` failed with `code`.
pub(crate) fn is_code<T>(result: &std::result::Result<T, Status>, code: Code) -> bool {
    matches!(result, Err(status) if status.code() == code)
}

impl Session {
    pub(crate) async fn connect(socket: &Path, namespace: &str) -> Result<Self> {
        let namespace = AsciiMetadataValue::try_from(namespace)
            .map_err(|e| Error::invalid(format!("containerd namespace {namespace:?}"), e))?;
        // A plain connect first: it reports a missing socket or a permission problem as an
        // I/O error on the path, which says more than a gRPC transport error.
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| Error::io(socket, e))?;
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| failed("connect")(Status::from_error(Box::new(e))))?;
        Ok(Self {
            channel,
            namespace,
            lease: None,
        })
    }

    /// A request carrying the namespace and, if there is one, the lease.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert("containerd-lease", lease.clone());
        }
        request
    }

    pub(crate) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    pub(crate) fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    pub(crate) fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }

    pub(crate) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }

    /// Creates a lease that expires on its own, and returns a session whose requests hold it:
    /// everything written or prepared through that session is safe from garbage collection
    /// until the image record references it.
    pub(crate) async fn with_new_lease(&self) -> Result<(Self, String)> {
        let now = SystemTime::now();
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let id = format!(
            "brisk-pull-{}-{}",
            since_epoch.as_nanos(),
            std::process::id()
        );
        let labels = HashMap::from([(
            LABEL_EXPIRE.to_owned(),
            rfc3339(since_epoch + LEASE_LIFETIME),
        )]);
        let request = self.request(CreateRequest {
            id: id.clone(),
            labels,
        });
        LeasesClient::new(self.channel.clone())
            .create(request)
            .await
            .map_err(failed("lease create"))?;
        let value =
            AsciiMetadataValue::try_from(id.as_str()).map_err(|e| Error::invalid("lease id", e))?;
        let session = Self {
            lease: Some(value),
            ..self.clone()
        };
        Ok((session, id))
    }

    /// Deletes a lease without waiting for garbage collection to run.
    pub(crate) async fn delete_lease(&self, id: &str) -> Result<()> {
        let request = self.request(DeleteRequest {
            id: id.to_owned(),
            sync: false,
        });
        LeasesClient::new(self.channel.clone())
            .delete(request)
            .await
            .map_err(failed("lease delete"))?;
        Ok(())
    }
}

/// `since_epoch` as an RFC 3339 UTC time (`2023-11-14T22:13:20Z`), the form containerd
/// parses in `containerd.io/gc.expire`.
fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_as_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        // A leap day, to check the month arithmetic.
        assert_eq!(
            rfc3339(Duration::from_secs(1_709_208_000)),
            "2024-02-29T12:00:00Z"
        );
    }
}
