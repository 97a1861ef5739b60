//! The crate's one error type, and its two conversions: to a gRPC status for containerd
//! (`From<Error> for tonic::Status`, in `service`) and to an errno for the kernel
//! (`Error::errno`, used only by `fs`).

use fuser::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshots API request refused the way containerd's own snapshotters refuse it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
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
    /// The answer to opens and flushes: the layer keeps nothing per open, and ENOSYS makes the
    /// kernel do them alone from then on.
    #[error("Opens and flushes need no request")]
    Stateless,
    /// The answer to xattr requests on a layer that has none: ENOSYS makes the kernel answer
    /// every later one itself (EOPNOTSUPP, which overlayfs reads as "no such mark").
    #[error("The layer has no extended attributes")]
    NoXattrs,
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
    #[error("No trace for image {0}")]
    NoTrace(brisk_blobcache::Digest),
    #[error("A snapshot task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("Metadata record is corrupt")]
    MetaRecord(#[source] serde_json::Error),
    #[error("I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// containerd's own CRI service, behind the image-service proxy, could not be reached.
    #[error("containerd's CRI service is not reachable")]
    Upstream(#[source] tonic::transport::Error),
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
            Error::NoEntry => Errno::ENOENT,
            Error::Refused(r) => r.errno(),
            Error::NotDir => Errno::ENOTDIR,
            Error::IsDir => Errno::EISDIR,
            // ENODATA, not ENOSYS: ENOSYS would make the kernel stop asking for any xattr on
            // the whole mount, and overlayfs needs `trusted.overlay.opaque` answered.
            Error::NoAttr => Errno::NO_XATTR,
            Error::ReadOnly => Errno::EROFS,
            Error::Range => Errno::ERANGE,
            Error::Stateless | Error::NoXattrs => Errno::ENOSYS,
            Error::InvalidArgument(_) | Error::FailedPrecondition(_) => Errno::EINVAL,
            // The kernel only gets EIO; the log line carries the whole error chain.
            Error::Cache(_)
            | Error::Refuted
            | Error::Handover(_)
            | Error::Trace(_)
            | Error::NoTrace(_)
            | Error::Task(_)
            | Error::Meta(_)
            | Error::MetaRecord(_)
            | Error::Io { .. }
            | Error::Mount { .. }
            | Error::Upstream(_) => Errno::EIO,
        }
    }
}

/// Why a snapshots API request was refused, worded as containerd's overlayfs snapshotter and
/// its metastore word it (lower case, Go's `%q` quoting), not in this crate's own style:
/// containerd's client keeps the message and only swaps the trailing error class, so an
/// operator reading `ctr` output or logs sees the same text whichever snapshotter answered.
/// `service` adds the class (": not found") as containerd's server does.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Stat, Update, Usage and Commit of a key that does not exist.
    #[error("snapshot does not exist")]
    Missing,
    #[error("failed to get active mount: snapshot does not exist")]
    MissingMount,
    #[error("failed to remove: snapshot {0}")]
    MissingRemove(String),
    #[error("failed to create snapshot: missing parent {0:?} bucket")]
    MissingParent(String),
    #[error("failed to create snapshot: snapshot {0}")]
    Exists(String),
    #[error("failed to commit snapshot: committed snapshot {0}")]
    CommittedExists(String),
    /// A remote snapshotter's answer to Prepare: the layer it names is already here (or now
    /// served lazily), so containerd skips its download.
    #[error("target snapshot {0:?}")]
    TargetExists(String),
    #[error("failed to create snapshot: parent {0:?} is not committed snapshot")]
    ParentNotCommitted(String),
    #[error("cannot update {field:?} field on snapshot {key:?}")]
    Immutable { field: String, key: String },
    /// containerd's metadata store checks every label before its snapshotter sees it; a
    /// client of this socket gets the same bound.
    #[error(
        "info.Labels: label key and value greater than maximum size ({LABEL_MAX} bytes), key: {0}"
    )]
    LabelTooLarge(String),
    #[error("filters: parse error: {0}")]
    Filter(String),
    #[error("failed to remove: cannot remove snapshot with child")]
    HasChild,
    #[error("failed to commit snapshot: snapshot {0:?} is not active")]
    NotActive(String),
    #[error("failed to get active mount: requested snapshot {0} not active or view")]
    NoMounts(String),
}

/// The most bytes a label's key and value may have together (containerd's `labels.Validate`).
pub const LABEL_MAX: usize = 4096;

/// The gRPC class of a refusal: which of containerd's error classes it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
}

impl Refusal {
    pub fn class(&self) -> Class {
        match self {
            Refusal::Missing
            | Refusal::MissingMount
            | Refusal::MissingRemove(_)
            | Refusal::MissingParent(_) => Class::NotFound,
            Refusal::Exists(_) | Refusal::CommittedExists(_) | Refusal::TargetExists(_) => {
                Class::AlreadyExists
            }
            Refusal::ParentNotCommitted(_)
            | Refusal::Immutable { .. }
            | Refusal::LabelTooLarge(_)
            | Refusal::Filter(_) => Class::InvalidArgument,
            Refusal::HasChild | Refusal::NotActive(_) | Refusal::NoMounts(_) => {
                Class::FailedPrecondition
            }
        }
    }

    fn errno(&self) -> Errno {
        match self.class() {
            Class::NotFound => Errno::ENOENT,
            Class::AlreadyExists => Errno::EEXIST,
            Class::InvalidArgument | Class::FailedPrecondition => Errno::EINVAL,
        }
    }
}

/// Refuses labels containerd would refuse (key and value over `LABEL_MAX` bytes together);
/// the key is named by its first 10 bytes, as containerd names it.
pub fn check_labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<()> {
    for (k, v) in labels {
        if k.len() + v.len() > LABEL_MAX {
            let end = (0..=10.min(k.len()))
                .rev()
                .find(|&i| k.is_char_boundary(i))
                .unwrap_or(0);
            return Err(Refusal::LabelTooLarge(k[..end].to_owned()).into());
        }
    }
    Ok(())
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
