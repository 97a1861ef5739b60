//! An OCI distribution API client: manifests, blobs (whole, streamed to disk, or by byte
//! range) and uploads, with token and basic auth and bounded, jittered retries.
//!
//! Every blob and manifest fetched by digest is verified before it is returned or left on
//! disk. It does not cache: caching is the job of the levels built on top of it.

mod auth;
mod error;
pub mod hosts;
pub mod keychain;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{header, Method, RequestBuilder, Response, StatusCode};
use tokio::io::AsyncWriteExt;

pub use auth::{Challenge, Credentials};
pub use error::{AuthFailure, RegistryError};
pub use keychain::Keychain;

use crate::digest::Hasher;
use crate::error::chain;
use crate::reference::Reference;
use crate::{media, Digest, Error, Limit, Result};

/// Manifests and configs are small; anything larger is refused rather than buffered.
const MAX_MANIFEST_SIZE: usize = 8 * 1024 * 1024;

/// The longest byte range one read may ask for; a longer one is refused before the request,
/// since its buffer is sized from it. It covers every legitimate caller: the registry level's
/// coalesced spans (16 MiB by default, clamped to this), preloaded spans (at most 64 MiB a
/// blob) and a TOC (at most `toc::MAX_TOC_COMPRESSED_SIZE`).
pub const MAX_RANGE_BYTES: u64 = 64 << 20;

const _: () = assert!(crate::toc::MAX_TOC_COMPRESSED_SIZE <= MAX_RANGE_BYTES);
const _: () = assert!(crate::toc::MAX_CHUNK_COMPRESSED_SIZE <= MAX_RANGE_BYTES);

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Use plain HTTP for every registry, not only loopback ones.
    pub plain_http: bool,
    /// Registries (`host[:port]`) reached over plain HTTP besides loopback ones.
    pub plain_http_hosts: Vec<String>,
    /// Mirrors (`host[:port]`) tried in order before a registry, for reads, by registry.
    pub mirrors: std::collections::HashMap<String, Vec<String>>,
    /// A request that sends no bytes for this long is abandoned (and retried).
    pub timeout: Duration,
    /// Retries after the first attempt, for 429, 5xx, timeouts and broken connections.
    pub retries: u32,
    /// First backoff; doubles each retry, with up to 50% random jitter.
    pub backoff: Duration,
    /// Send every request through this HTTP proxy (`http://host:port`).
    pub proxy: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            plain_http: false,
            plain_http_hosts: Vec::new(),
            mirrors: std::collections::HashMap::new(),
            timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(200),
            proxy: None,
        }
    }
}

/// A manifest as the registry served it: the exact bytes (their digest is the manifest's
/// identity) and the media type it declared.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// Bearer tokens by (registry, scope), with the generation of the pull credentials they
    /// were fetched with (0: the node's docker config). A std mutex: it is never held across
    /// an await.
    tokens: Mutex<HashMap<(String, String), (String, u64)>>,
    /// Registries that asked for basic auth.
    basic: Mutex<HashMap<String, bool>>,
    /// Credentials image pulls handed over, by registry and repository; they go before the
    /// node's docker config, and only to the registry and repository they were given for.
    keychain: Option<Arc<Keychain>>,
}

/// What a failed attempt means for the retry loop.
enum Attempt<T> {
    Done(T),
    Retry(Error),
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(config.timeout)
            .user_agent(concat!("brisk/", env!("CARGO_PKG_VERSION")));
        if let Some(proxy) = &config.proxy {
            let proxy = reqwest::Proxy::all(proxy).map_err(|source| RegistryError::Proxy {
                proxy: proxy.clone(),
                source,
            })?;
            builder = builder.proxy(proxy);
        }
        let http = builder.build().map_err(|source| {
            Error::Registry(RegistryError::Http {
                method: "INIT",
                url: String::new(),
                source,
            })
        })?;
        Ok(Self {
            http,
            config,
            tokens: Mutex::default(),
            basic: Mutex::default(),
            keychain: None,
        })
    }

    /// Uses the credentials `keychain` holds for a reference's registry and repository
    /// before the node's docker config.
    pub fn with_keychain(mut self, keychain: Arc<Keychain>) -> Self {
        self.keychain = Some(keychain);
        self
    }

    /// The credentials for `r`, and their keychain generation (0 for the docker config's).
    /// A mirror's reference names the mirror's host, so pull credentials never go there.
    fn credentials(&self, r: &Reference) -> (Option<Credentials>, u64) {
        match self.pulled(r) {
            Some((creds, generation)) => (Some(creds), generation),
            None => (auth::lookup_off_worker(&r.registry), 0),
        }
    }

    fn pulled(&self, r: &Reference) -> Option<(Credentials, u64)> {
        self.keychain
            .as_ref()
            .and_then(|k| k.get(&r.registry, &r.repository))
    }

    fn base(&self, r: &Reference) -> String {
        let plain = self.config.plain_http
            || r.is_loopback()
            || self.config.plain_http_hosts.contains(&r.registry);
        let scheme = if plain { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", r.registry, r.repository)
    }

    /// A GET or HEAD of `r`'s manifest accepting every manifest type; a 404 is
    /// `ManifestNotFound`. Returns the response and its URL.
    async fn manifest_request(&self, r: &Reference, method: Method) -> Result<(Response, String)> {
        let url = format!("{}/manifests/{}", self.base(r), r.manifest_ref());
        let resp = self
            .send(r, "pull", method, &url, &|b| {
                b.header(header::ACCEPT, media::MANIFEST_ACCEPT)
            })
            .await
            .map_err(|e| match e {
                Error::Registry(RegistryError::Status { status: 404, .. }) => {
                    Error::Registry(RegistryError::ManifestNotFound(r.to_string()))
                }
                e => e,
            })?;
        Ok((resp, url))
    }

    /// Fetches the manifest `r` names. When `r` has a digest the bytes must match it.
    async fn get_manifest_direct(&self, r: &Reference) -> Result<FetchedManifest> {
        let (resp, url) = self.manifest_request(r, Method::GET).await?;
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned())
            .unwrap_or_default();
        let bytes = read_limited(resp, &url, MAX_MANIFEST_SIZE).await?;
        let digest = Digest::sha256(&bytes);
        if let Some(expected) = r.digest {
            if expected != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {r}"),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The digest a tag points to, from a HEAD request (no manifest bytes are transferred).
    /// `None` when the registry does not say (no `Docker-Content-Digest` header).
    async fn head_manifest_direct(&self, r: &Reference) -> Result<Option<Digest>> {
        let (resp, _) = self.manifest_request(r, Method::HEAD).await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// Fetches a small blob (a config) into memory, verified.
    async fn get_blob_bytes_direct(&self, r: &Reference, digest: &Digest) -> Result<Bytes> {
        self.retrying(|| async {
            let url = format!("{}/blobs/{digest}", self.base(r));
            let resp = self.send_once(r, "pull", Method::GET, &url, &|b| b).await?;
            let resp = match resp {
                Attempt::Done(resp) => resp,
                Attempt::Retry(e) => return Ok(Attempt::Retry(map_blob_404(e, digest))),
            };
            let bytes = match read_limited(resp, &url, MAX_MANIFEST_SIZE).await {
                Ok(b) => b,
                Err(e @ Error::Registry(RegistryError::Http { .. })) => {
                    return Ok(Attempt::Retry(e))
                }
                Err(e) => return Err(e),
            };
            let actual = Digest::sha256(&bytes);
            if actual != *digest {
                return Ok(Attempt::Retry(Error::DigestMismatch {
                    what: format!("blob {digest}"),
                    expected: *digest,
                    actual,
                }));
            }
            Ok(Attempt::Done(bytes))
        })
        .await
        .map_err(|e| map_blob_404(e, digest))
    }

    /// Streams a blob into the file at `path` (created or truncated), verified against its
    /// digest and size. On failure the file's content is unspecified; callers use temp files.
    async fn get_blob_to_file_direct(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<()> {
        self.retrying(|| async {
            let url = format!("{}/blobs/{digest}", self.base(r));
            let resp = match self.send_once(r, "pull", Method::GET, &url, &|b| b).await? {
                Attempt::Done(resp) => resp,
                Attempt::Retry(e) => return Ok(Attempt::Retry(e)),
            };
            let mut file = tokio::fs::File::create(path)
                .await
                .map_err(|e| Error::io(path, e))?;
            let mut hasher = Hasher::new();
            let mut written = 0u64;
            let mut stream = resp.bytes_stream();
            while let Some(piece) = stream.next().await {
                let piece = match piece {
                    Ok(p) => p,
                    Err(source) => {
                        return Ok(Attempt::Retry(Error::Registry(RegistryError::Http {
                            method: "GET",
                            url: url.clone(),
                            source,
                        })))
                    }
                };
                written += piece.len() as u64;
                if written > size {
                    break;
                }
                hasher.update(&piece);
                file.write_all(&piece)
                    .await
                    .map_err(|e| Error::io(path, e))?;
            }
            file.flush().await.map_err(|e| Error::io(path, e))?;
            if written != size {
                return Ok(Attempt::Retry(Error::SizeMismatch {
                    what: format!("blob {digest}"),
                    expected: size,
                    actual: written,
                }));
            }
            let actual = hasher.finish();
            if actual != *digest {
                return Ok(Attempt::Retry(Error::DigestMismatch {
                    what: format!("blob {digest}"),
                    expected: *digest,
                    actual,
                }));
            }
            Ok(Attempt::Done(()))
        })
        .await
        .map_err(|e| map_blob_404(e, digest))
    }

    /// Reads `range` of a blob. A registry that ignores `Range` and sends the whole blob is
    /// handled by reading up to the end of the range and dropping the connection. The bytes
    /// are not verified here: a range has no digest of its own, the caller checks chunks.
    async fn get_blob_range_direct(
        &self,
        r: &Reference,
        digest: &Digest,
        range: Range<u64>,
        progress: &(dyn Fn(&[u8]) + Send + Sync),
    ) -> Result<Bytes> {
        let len = range.end.saturating_sub(range.start);
        if len == 0 {
            return Ok(Bytes::new());
        }
        Error::check_limit(
            || format!("Range {}..{} of blob {digest}", range.start, range.end),
            Limit::RangeLength,
            len,
            MAX_RANGE_BYTES,
        )?;
        let url = format!("{}/blobs/{digest}", self.base(r));
        let value = format!("bytes={}-{}", range.start, range.end - 1);
        self.retrying(|| async {
            let resp = match self
                .send_once(r, "pull", Method::GET, &url, &|b| {
                    b.header(header::RANGE, &value)
                })
                .await?
            {
                Attempt::Done(resp) => resp,
                Attempt::Retry(e) => return Ok(Attempt::Retry(e)),
            };
            let skip = if resp.status() == StatusCode::PARTIAL_CONTENT {
                0
            } else {
                range.start
            };
            // A whole blob too short to hold the range is not read through to find that out.
            if let Some(body) = resp.content_length().filter(|&l| l < skip + len) {
                return Ok(Attempt::Retry(Error::SizeMismatch {
                    what: format!(
                        "response to range {}..{} of blob {digest}",
                        range.start, range.end
                    ),
                    expected: skip + len,
                    actual: body,
                }));
            }
            match read_window(resp, skip, len, progress).await {
                Ok(b) if b.len() as u64 == len => Ok(Attempt::Done(b)),
                Ok(b) => Ok(Attempt::Retry(Error::SizeMismatch {
                    what: format!("range {}..{} of blob {digest}", range.start, range.end),
                    expected: len,
                    actual: b.len() as u64,
                })),
                Err(source) => Ok(Attempt::Retry(Error::Registry(RegistryError::Http {
                    method: "GET",
                    url: url.clone(),
                    source,
                }))),
            }
        })
        .await
        .map_err(|e| map_blob_404(e, digest))
    }

    async fn blob_exists_direct(&self, r: &Reference, digest: &Digest) -> Result<bool> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        match self.send(r, "pull", Method::HEAD, &url, &|b| b).await {
            Ok(_) => Ok(true),
            Err(Error::Registry(RegistryError::Status { status: 404, .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads the file at `path` as blob `digest` (a monolithic upload: one POST, one PUT).
    pub async fn push_blob_file(&self, r: &Reference, digest: &Digest, path: &Path) -> Result<()> {
        let start = format!("{}/blobs/uploads/", self.base(r));
        let size = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        self.retrying(|| async {
            let resp = match self
                .send_once(r, "pull,push", Method::POST, &start, &|b| {
                    b.header(header::CONTENT_LENGTH, 0)
                })
                .await?
            {
                Attempt::Done(resp) => resp,
                Attempt::Retry(e) => return Ok(Attempt::Retry(e)),
            };
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Error::Registry(RegistryError::Status {
                        method: "POST",
                        url: start.clone(),
                        status: resp.status().as_u16(),
                    })
                })?;
            let mut put = resp.url().join(location).map_err(|_| {
                Error::Registry(RegistryError::Status {
                    method: "POST",
                    url: start.clone(),
                    status: resp.status().as_u16(),
                })
            })?;
            put.query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                tokio::fs::File::from_std(file),
            ));
            let body = std::sync::Mutex::new(Some(body));
            let build = |b: RequestBuilder| {
                let b = b
                    .header(header::CONTENT_LENGTH, size)
                    .header(header::CONTENT_TYPE, "application/octet-stream");
                match body.lock().expect("not poisoned").take() {
                    Some(body) => b.body(body),
                    None => b,
                }
            };
            self.send_once(r, "pull,push", Method::PUT, put.as_str(), &build)
                .await
                .map(|a| match a {
                    Attempt::Done(_) => Attempt::Done(()),
                    Attempt::Retry(e) => Attempt::Retry(e),
                })
        })
        .await
    }

    /// Uploads a manifest under `tag_or_digest`.
    /// The OCI 1.1 referrers index of `digest`, or `None` when the registry has no referrers
    /// API (404), in which case callers use the tag-schema fallback.
    async fn get_referrers_direct(&self, r: &Reference, digest: &Digest) -> Result<Option<Bytes>> {
        let url = format!("{}/referrers/{digest}", self.base(r));
        match self
            .send(r, "pull", Method::GET, &url, &|b| {
                b.header(header::ACCEPT, media::OCI_INDEX)
            })
            .await
        {
            Ok(resp) => Ok(Some(read_limited(resp, &url, MAX_MANIFEST_SIZE).await?)),
            Err(Error::Registry(RegistryError::Status { status: 404, .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fetches the manifest `r` names (through a mirror if one answers). When `r` has a
    /// digest the bytes must match it.
    pub async fn get_manifest(&self, r: &Reference) -> Result<FetchedManifest> {
        self.via_mirrors(r, |r| async move { self.get_manifest_direct(&r).await })
            .await
    }

    /// The digest a tag points to, from a HEAD request; `None` if the registry does not say.
    pub async fn head_manifest(&self, r: &Reference) -> Result<Option<Digest>> {
        self.via_mirrors(r, |r| async move { self.head_manifest_direct(&r).await })
            .await
    }

    /// A small blob (a config) in memory, verified.
    pub async fn get_blob_bytes(&self, r: &Reference, digest: &Digest) -> Result<Bytes> {
        self.via_mirrors(r, |r| async move {
            self.get_blob_bytes_direct(&r, digest).await
        })
        .await
    }

    /// A blob streamed into the file at `path`, verified against digest and size.
    pub async fn get_blob_to_file(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<()> {
        self.via_mirrors(r, |r| async move {
            self.get_blob_to_file_direct(&r, digest, size, path).await
        })
        .await
    }

    /// A byte range of a blob (unverified: the caller checks what it decodes).
    pub async fn get_blob_range(
        &self,
        r: &Reference,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes> {
        self.get_blob_range_streamed(r, digest, range, &|_| {})
            .await
    }

    /// `get_blob_range` that shows `progress` the bytes received so far after every piece
    /// of the body, so a caller can use the front of a large range before the rest arrives.
    /// A retried attempt starts again from an empty prefix; the bytes are the same range.
    pub async fn get_blob_range_streamed(
        &self,
        r: &Reference,
        digest: &Digest,
        range: Range<u64>,
        progress: &(dyn Fn(&[u8]) + Send + Sync),
    ) -> Result<Bytes> {
        self.via_mirrors(r, |r| {
            let range = range.clone();
            async move {
                self.get_blob_range_direct(&r, digest, range, progress)
                    .await
            }
        })
        .await
    }

    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool> {
        self.blob_exists_direct(r, digest).await
    }

    /// The OCI 1.1 referrers index of `digest`, or `None` without the referrers API.
    pub async fn get_referrers(&self, r: &Reference, digest: &Digest) -> Result<Option<Bytes>> {
        self.via_mirrors(
            r,
            |r| async move { self.get_referrers_direct(&r, digest).await },
        )
        .await
    }

    /// Where reads of `r` go, in order: each configured mirror of its registry (as `r` with
    /// the mirror's host), then `r` itself, always last.
    pub fn read_sources(&self, r: &Reference) -> Vec<Reference> {
        let mirrors = self.config.mirrors.get(&r.registry).into_iter().flatten();
        mirrors
            .map(|mirror| Reference {
                registry: mirror.clone(),
                ..r.clone()
            })
            .chain(std::iter::once(r.clone()))
            .collect()
    }

    /// `get_blob_range_streamed` from exactly `source` (one of `read_sources`), with no other
    /// source to fall back on: for callers that check the bytes themselves and pass a source
    /// that served wrong ones over for the next.
    pub async fn get_blob_range_from(
        &self,
        source: &Reference,
        digest: &Digest,
        range: Range<u64>,
        progress: &(dyn Fn(&[u8]) + Send + Sync),
    ) -> Result<Bytes> {
        self.get_blob_range_direct(source, digest, range, progress)
            .await
    }

    /// Runs a read against each of `read_sources(r)` in turn. A mirror that fails (`op`
    /// may fail it for bytes that do not check) is only logged: the next candidate is tried.
    pub async fn via_mirrors<T, F, Fut>(&self, r: &Reference, op: F) -> Result<T>
    where
        F: Fn(Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut sources = self.read_sources(r);
        let last = sources.pop().expect("the registry is always a source");
        for via in sources {
            let mirror = via.registry.clone();
            match op(via).await {
                Ok(v) => return Ok(v),
                Err(err) => {
                    tracing::warn!(mirror, err = %chain(&err), "mirror failed, trying the next source")
                }
            }
        }
        op(last).await
    }

    /// Uploads a small blob held in memory.
    pub async fn push_blob_bytes(
        &self,
        r: &Reference,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<()> {
        if self.blob_exists(r, digest).await? {
            return Ok(());
        }
        let tmp = tempfile_for_upload(bytes)?;
        self.push_blob_file(r, digest, tmp.path()).await
    }

    pub async fn push_manifest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()> {
        let url = format!("{}/manifests/{tag_or_digest}", self.base(r));
        self.send(r, "pull,push", Method::PUT, &url, &|b| {
            b.header(header::CONTENT_TYPE, media_type)
                .body(bytes.clone())
        })
        .await
        .map(drop)
    }

    /// One request with auth and retries, returning a successful response.
    async fn send(
        &self,
        r: &Reference,
        actions: &str,
        method: Method,
        url: &str,
        build: &(dyn Fn(RequestBuilder) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        self.retrying(|| self.send_once(r, actions, method.clone(), url, build))
            .await
    }

    /// Runs `attempt` until it is done, fails for good, or the retries run out; waits with
    /// exponential, jittered backoff in between.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>>>,
    {
        let mut delay = self.config.backoff;
        for n in 0.. {
            match attempt().await? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(err) if n >= self.config.retries => return Err(err),
                Attempt::Retry(err) => {
                    let jitter = delay.mul_f64(fastrand_fraction() * 0.5);
                    tracing::warn!(%err, attempt = n + 1, "registry request failed, retrying");
                    tokio::time::sleep(delay + jitter).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        unreachable!("the loop only ends by returning")
    }

    /// One attempt: authenticate if challenged, and classify the outcome. Errors that more
    /// attempts cannot fix (404, 401 after auth, bad requests) are returned as `Err`.
    async fn send_once(
        &self,
        r: &Reference,
        actions: &str,
        method: Method,
        url: &str,
        build: &(dyn Fn(RequestBuilder) -> RequestBuilder + Sync),
    ) -> Result<Attempt<Response>> {
        let scope = format!("repository:{}:{actions}", r.repository);
        let method_name = method_str(&method);
        let mut authenticated = false;
        loop {
            let mut req = build(self.http.request(method.clone(), url));
            req = self.authorize(req, r, &scope);
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(source) => {
                    return Ok(Attempt::Retry(Error::Registry(RegistryError::Http {
                        method: method_name,
                        url: url.to_owned(),
                        source,
                    })))
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(Attempt::Done(resp));
            }
            let status_err = Error::Registry(RegistryError::Status {
                method: method_name,
                url: url.to_owned(),
                status: status.as_u16(),
            });
            // A challenge is answered only from the host the request was sent to: a redirect
            // target on another host (a blob store, or a registry that hands reads to a host
            // it does not control) must never be handed the pull's credentials, so its 401 is
            // a refusal like any other.
            if status == StatusCode::UNAUTHORIZED && !authenticated && same_origin(url, resp.url())
            {
                authenticated = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                match challenge {
                    Some(Challenge::Basic) => {
                        self.basic
                            .lock()
                            .expect("not poisoned")
                            .insert(r.registry.clone(), true);
                    }
                    Some(Challenge::Bearer { realm, service, .. }) => {
                        let (creds, generation) = self.credentials(r);
                        let token = auth::fetch_token(
                            &self.http,
                            &r.registry,
                            &realm,
                            service.as_deref(),
                            &scope,
                            creds.as_ref(),
                        )
                        .await?;
                        self.tokens
                            .lock()
                            .expect("not poisoned")
                            .insert((r.registry.clone(), scope.clone()), (token, generation));
                    }
                    None => return Err(status_err),
                }
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                return Ok(Attempt::Retry(status_err));
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(Error::Registry(RegistryError::Auth {
                    registry: r.registry.clone(),
                    reason: AuthFailure::Refused {
                        method: method_name,
                        url: url.to_owned(),
                        status: status.as_u16(),
                    },
                }));
            }
            return Err(status_err);
        }
    }

    /// Adds the token or basic credentials `r` is read with. A token fetched with pull
    /// credentials that have since been replaced is not sent: the registry's challenge then
    /// gets a new one with the newest credentials (rotation).
    fn authorize(&self, req: RequestBuilder, r: &Reference, scope: &str) -> RequestBuilder {
        let pulled = self.pulled(r);
        let generation = pulled.as_ref().map_or(0, |p| p.1);
        let token = self
            .tokens
            .lock()
            .expect("not poisoned")
            .get(&(r.registry.clone(), scope.to_owned()))
            .filter(|(_, fetched_with)| *fetched_with == generation)
            .map(|(token, _)| token.clone());
        if let Some(token) = token {
            return req.bearer_auth(token);
        }
        if self
            .basic
            .lock()
            .expect("not poisoned")
            .contains_key(&r.registry)
        {
            let creds = match pulled {
                Some((creds, _)) => Some(creds),
                None => auth::lookup_off_worker(&r.registry),
            };
            if let Some(Credentials::Basic { username, password }) = creds {
                return req.basic_auth(username, Some(password));
            }
        }
        req
    }
}

/// Whether `answered` (where redirects led) is the scheme, host and port `asked` named.
fn same_origin(asked: &str, answered: &reqwest::Url) -> bool {
    reqwest::Url::parse(asked).is_ok_and(|asked| asked.origin() == answered.origin())
}

/// A temporary file holding `bytes`, for the file-based upload path.
fn tempfile_for_upload(bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    use std::io::Write as _;
    let mut f = tempfile::NamedTempFile::new().map_err(|e| Error::io("temporary file", e))?;
    f.write_all(bytes).map_err(|e| Error::io(f.path(), e))?;
    Ok(f)
}

fn method_str(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "REQUEST",
    }
}

fn map_blob_404(e: Error, digest: &Digest) -> Error {
    match e {
        Error::Registry(RegistryError::Status { status: 404, .. }) => {
            Error::Registry(RegistryError::BlobNotFound(*digest))
        }
        e => e,
    }
}

/// A uniform fraction in [0, 1) for backoff jitter; quality does not matter, only spread.
fn fastrand_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The whole body of `resp`, refused (`OverLimit`) as soon as it is known to pass `limit`
/// bytes: from its `Content-Length`, or once that many have arrived. Nothing past the limit
/// is buffered.
async fn read_limited(resp: Response, url: &str, limit: usize) -> Result<Bytes> {
    let over = |value: u64| Error::OverLimit {
        what: format!("Response of {url}"),
        limit: Limit::ResponseSize,
        value,
        max: limit as u64,
    };
    if let Some(len) = resp.content_length().filter(|&l| l > limit as u64) {
        return Err(over(len));
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|source| {
            Error::Registry(RegistryError::Http {
                method: "GET",
                url: url.to_owned(),
                source,
            })
        })?;
        if out.len() + piece.len() > limit {
            return Err(over((out.len() + piece.len()) as u64));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.into())
}

/// Reads `len` bytes after skipping `skip`, then stops reading: whatever else the server
/// sends is never fetched, let alone buffered. `len` is at most `MAX_RANGE_BYTES`; the
/// buffer starts at no more than the body the server announced.
async fn read_window(
    resp: Response,
    mut skip: u64,
    len: u64,
    progress: &(dyn Fn(&[u8]) + Send + Sync),
) -> std::result::Result<Bytes, reqwest::Error> {
    debug_assert!(len <= MAX_RANGE_BYTES);
    let announced = resp.content_length().unwrap_or(0).saturating_sub(skip);
    let mut out = Vec::with_capacity(len.min(announced) as usize);
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let mut piece = piece?;
        if skip > 0 {
            let n = skip.min(piece.len() as u64);
            skip -= n;
            piece = piece.slice(n as usize..);
        }
        let want = (len - out.len() as u64).min(piece.len() as u64) as usize;
        out.extend_from_slice(&piece[..want]);
        if want > 0 {
            progress(&out);
        }
        if out.len() as u64 == len {
            break;
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests;
