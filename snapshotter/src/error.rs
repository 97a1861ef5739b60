//! The crate's one error type, and its two conversions: to a gRPC status for containerd
//! (`From<Error> for tonic::Status`, in `service`) and to an errno for the kernel
//! (`Error::errno`, used only by `fs`).

use fuser::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Snapshot {0} not found")]
    NotFound(String),
    #[error("Snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("Invalid argument: {0}")]
    InvalidArgument(String),
    #[error("No such file or directory")]
    NoEntry,
    #[error("Not a directory")]
    NotDir,
    #[error("Is a directory")]
    IsDir,
    #[error("No such attribute")]
    NoAttr,
    #[error("Read-only file system")]
    ReadOnly,
    #[error("Buffer too small")]
    Range,
    #[error("The layer's content does not match the chain ID it was committed under")]
    Refuted,
    #[error("Hand-over of FUSE connections failed: {0}")]
    Handover(String),
    #[error("Chunk cache could not serve the read")]
    Cache(#[from] brisk_blobcache::Error),
    #[error("Snapshot metadata store failed")]
    Meta(#[source] sled::Error),
    #[error("Trace rejected")]
    Trace(#[from] brisk_trace_recorder::Error),
    #[error("Metadata record is corrupt")]
    MetaRecord(#[source] serde_json::Error),
    #[error("I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Mounting {path} failed")]
    Mount {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// The single place a failure becomes an errno for the kernel.
    pub(crate) fn errno(&self) -> Errno {
        match self {
            Error::NotFound(_) | Error::NoEntry => Errno::ENOENT,
            Error::AlreadyExists(_) => Errno::EEXIST,
            Error::NotDir => Errno::ENOTDIR,
            Error::IsDir => Errno::EISDIR,
            // ENODATA, not ENOSYS: ENOSYS would make the kernel stop asking for any xattr on
            // the whole mount, and overlayfs needs `trusted.overlay.opaque` answered.
            Error::NoAttr => Errno::NO_XATTR,
            Error::ReadOnly => Errno::EROFS,
            Error::Range => Errno::ERANGE,
            Error::InvalidArgument(_) | Error::FailedPrecondition(_) => Errno::EINVAL,
            // The kernel only gets EIO; the log line carries the whole error chain.
            Error::Cache(_)
            | Error::Refuted
            | Error::Handover(_)
            | Error::Trace(_)
            | Error::Meta(_)
            | Error::MetaRecord(_)
            | Error::Io { .. }
            | Error::Mount { .. } => Errno::EIO,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
