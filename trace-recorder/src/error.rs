//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Not a Brisk trace")]
    Format(#[source] serde_json::Error),
    #[error("Trace version {0} is not supported")]
    Version(u32),
    #[error("Trace is for image {found}, not {expected}")]
    WrongImage { expected: String, found: String },
    #[error("Trace is invalid: {0}")]
    Invalid(String),
    #[error("Registry access for the trace failed")]
    Registry(#[source] Box<brisk_blobcache::Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
