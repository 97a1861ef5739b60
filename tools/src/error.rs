//! The crate's one error type.

use brisk_blobcache::Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Blob(#[from] brisk_blobcache::Error),
    #[error("Layer {index} ({digest})")]
    Layer {
        index: usize,
        digest: Digest,
        #[source]
        source: Box<Error>,
    },
    #[error("Image manifest {digest}")]
    Manifest {
        digest: Digest,
        #[source]
        source: Box<Error>,
    },
    #[error("Invalid image location {location:?}: {reason}")]
    Location {
        location: String,
        reason: &'static str,
    },
    #[error("Invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("The uncompressed layer has digest {actual}, but the image config says {expected}")]
    DiffIdMismatch { expected: Digest, actual: Digest },
    #[error("No image in the index matches platform {0}")]
    NoPlatform(String),
    #[error("Layer {0} is not in the lazy format (no TOC annotation)")]
    NotLazy(Digest),
    #[error("OCI layout {path}: {reason}")]
    Layout { path: String, reason: String },
    #[error("I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Trace(#[from] brisk_trace_recorder::Error),
    #[error("A conversion task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("The containerd {op} call failed")]
    Containerd {
        op: &'static str,
        #[source]
        source: tonic::Status,
    },
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl ToString) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn layer(index: usize, digest: Digest, source: impl Into<Error>) -> Self {
        Self::Layer {
            index,
            digest,
            source: Box::new(source.into()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
