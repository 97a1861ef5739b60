//! What can be wrong with a layer's tar stream, its conversion, or a TOC and the chunks it vouches for.

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("Tar entry {0:?} escapes the layer root")]
    EscapingPath(String),
    #[error("Tar entry {name:?} is a hardlink to {target:?}, which is not an earlier entry of the layer")]
    DanglingHardlink { name: String, target: String },
    #[error("Tar entry {name:?} is not supported: {reason}")]
    UnsupportedEntry { name: String, reason: &'static str },
    #[error("Reading the layer's tar stream failed")]
    Tar(#[source] std::io::Error),
    #[error("Writing the converted layer failed")]
    Write(#[source] std::io::Error),
    /// A TOC, footer or chunk reference that is malformed or contradicts the blob; the reason
    /// names the field and the values.
    #[error("Bad TOC: {0}")]
    Malformed(String),
    #[error("TOC digest is {actual}, but the manifest vouches for {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("Chunk {index} ({digest}) failed verification")]
    CorruptChunk { index: usize, digest: Digest },
}
