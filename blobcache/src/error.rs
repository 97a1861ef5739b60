//! The crate's one error type.

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("Invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },
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
    #[error("Bad TOC: {0}")]
    BadToc(String),
    #[error("TOC digest is {actual}, but the manifest vouches for {expected}")]
    TocDigestMismatch { expected: Digest, actual: Digest },
    #[error("Chunk {index} ({digest}) failed verification")]
    CorruptChunk { index: usize, digest: Digest },
    #[error("{what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("Unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("Invalid JSON in {what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Registry returned {status} for {method} {url}")]
    RegistryStatus {
        method: &'static str,
        url: String,
        status: u16,
    },
    #[error("Registry request {method} {url} failed")]
    Http {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Authentication with {registry} failed: {reason}")]
    Auth { registry: String, reason: String },
    #[error("Blob {0} not found")]
    BlobNotFound(Digest),
    #[error("Manifest {0} not found")]
    ManifestNotFound(String),
    #[error("Image index {index} has no manifest for platform {platform}")]
    NoPlatform { index: Digest, platform: String },
    #[error("Chunk {digest} could not be read from any cache level: {reason}")]
    ChunkUnavailable {
        digest: Digest,
        reason: crate::layered::ReadFailure,
    },
    #[error("No source sent the right bytes for chunk {digest}")]
    NoRightBytes { digest: Digest },
    #[error("Zone: {0}")]
    Zone(String),
    #[error("Invalid configuration: {0}")]
    Config(String),
    #[error("I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A size or count from an image, a TOC or a registry broke one of the crate's bounds;
    /// nothing was allocated from it.
    #[error("{what}: {limit} {value} is over the limit of {max}")]
    OverLimit {
        what: String,
        limit: Limit,
        value: u64,
        max: u64,
    },
}

/// The bounds untrusted input is held to (values in `toc` and `registry`), for `OverLimit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    TocCompressedSize,
    TocSize,
    Entries,
    Chunks,
    ChunkSize,
    ChunkCompressedSize,
    PathLength,
    PathDepth,
    NameLength,
    LinkLength,
    Xattrs,
    TocXattrs,
    XattrNameLength,
    XattrValueSize,
    Prefetch,
    RangeLength,
    ResponseSize,
    Layers,
    IndexManifests,
    TarMetadata,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::TocCompressedSize => "compressed TOC size",
            Limit::TocSize => "TOC size",
            Limit::Entries => "entry count",
            Limit::Chunks => "chunk count",
            Limit::ChunkSize => "chunk size",
            Limit::ChunkCompressedSize => "compressed chunk size",
            Limit::PathLength => "path length",
            Limit::PathDepth => "path depth",
            Limit::NameLength => "name length",
            Limit::LinkLength => "link target length",
            Limit::Xattrs => "xattr count",
            Limit::TocXattrs => "xattr count of the TOC",
            Limit::XattrNameLength => "xattr name length",
            Limit::XattrValueSize => "xattr value size",
            Limit::Prefetch => "prefetch list length",
            Limit::RangeLength => "range length",
            Limit::ResponseSize => "response size",
            Limit::Layers => "layer count",
            Limit::IndexManifests => "manifest count",
            Limit::TarMetadata => "metadata entry size",
        })
    }
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Json {
            what: what.into(),
            source,
        }
    }

    /// `OverLimit` unless `value <= max`; `what` names the input and is only built on failure.
    pub(crate) fn check_limit(
        what: impl FnOnce() -> String,
        limit: Limit,
        value: u64,
        max: u64,
    ) -> Result<()> {
        if value <= max {
            return Ok(());
        }
        Err(Self::OverLimit {
            what: what(),
            limit,
            value,
            max,
        })
    }

    /// A TOC that is malformed or lies about the blob.
    pub fn bad_toc(reason: impl Into<String>) -> Self {
        Self::BadToc(reason.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `name` cut to its first 64 characters, for messages about names that may be any length.
pub(crate) fn short(name: &str) -> std::borrow::Cow<'_, str> {
    match name.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &name[..end]).into(),
        None => name.into(),
    }
}

/// An error and its causes on one line, for log fields.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
