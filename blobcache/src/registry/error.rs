//! How a request to a registry failed: its answer, the transport, or authentication.

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Registry returned {status} for {method} {url}")]
    Status {
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
    Auth {
        registry: String,
        reason: AuthFailure,
    },
    #[error("Blob {0} not found")]
    BlobNotFound(Digest),
    #[error("Manifest {0} not found")]
    ManifestNotFound(String),
    #[error("Registry proxy {proxy:?} is not usable")]
    Proxy {
        proxy: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Registry hosts file {path} is invalid")]
    HostsFile {
        path: String,
        #[source]
        source: toml::de::Error,
    },
}

/// Why authentication with a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    #[error("the token request failed")]
    TokenRequest(#[source] reqwest::Error),
    #[error("the token endpoint returned {0}")]
    TokenStatus(u16),
    #[error("the token response could not be read")]
    TokenBody(#[source] Box<crate::Error>),
    #[error("the token response is not valid JSON")]
    TokenJson(#[source] serde_json::Error),
    #[error("the token response has no token")]
    NoToken,
    #[error("{method} {url} returned {status}")]
    Refused {
        method: &'static str,
        url: String,
        status: u16,
    },
}
