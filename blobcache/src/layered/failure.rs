//! Why a chunk could not be read, as data: which level failed how, or what was wrong with
//! the reference. Shared by every reader of one fetch, so it is cheap to clone.

use std::sync::Arc;
use std::time::Duration;

use crate::source::SourceError;
use crate::Digest;

/// How a read through the cache levels failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Chunk {digest} could not be read from any cache level: {reason}")]
    ChunkUnavailable { digest: Digest, reason: ReadFailure },
    #[error("No source sent the right bytes for chunk {digest}")]
    NoRightBytes { digest: Digest },
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadFailure {
    #[error("no cache level has it")]
    NowhereFound,
    #[error("the {level} level did not answer in {deadline:?}")]
    TooSlow {
        level: &'static str,
        deadline: Duration,
    },
    #[error("bytes from the {level} level failed verification")]
    Corrupt { level: &'static str },
    #[error("the {level} level failed")]
    LevelFailed {
        level: &'static str,
        #[source]
        error: Arc<SourceError>,
    },
    /// The level holds the digest's true bytes, but the reference claims another length: the
    /// reference is wrong, and no level can do better.
    #[error("the reference claims {claimed} bytes, the chunk has {actual}")]
    WrongLength { claimed: u64, actual: u64 },
    /// The reference is outside the limits (`ChunkRef::check`); no level was asked.
    #[error("the reference is refused")]
    Refused(#[source] Arc<crate::Error>),
    /// The task fetching it ended without an answer (it panicked, or was dropped).
    #[error("the fetch ended without an answer")]
    Abandoned,
}
