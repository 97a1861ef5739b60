//! The crate's error: each module's own errors (`toc`, `registry`, the cache's `layered`,
//! `zone`) joined by `#[from]`, and the few every module shares (digests, references, JSON,
//! I/O, limits).

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Toc(#[from] crate::toc::TocError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Cache(#[from] crate::layered::CacheError),
    #[error(transparent)]
    Zone(#[from] crate::zone::ZoneError),
    #[error("Invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("Invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },
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
    #[error("Image index {index} has no manifest for platform {platform}")]
    NoPlatform { index: Digest, platform: String },
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
        crate::toc::TocError::Malformed(reason.into()).into()
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
