//! A fault-injecting HTTP/1.1 reverse proxy between Brisk and a test registry.
//!
//! It forwards every request to the registry and counts what it served, separately for blob
//! GETs (the only requests that move layer bytes) and for everything else. A test can set one
//! fault at a time, for blob GETs or for every request, to break responses the ways a real
//! registry or network does: error statuses, stalls, cut connections, flipped bits, bytes from
//! the wrong offset, an ignored `Range` and redirects.
//!
//! It does not speak TLS or HTTP/2, and it buffers each response whole before answering:
//! blobs in tests are a few MiB. It runs on its own runtime thread, so the tests that drive
//! it stay synchronous, and it stops when dropped.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::server_thread::ServerThread;

/// Where a redirected blob request goes: the proxy itself serves paths under this prefix,
/// honoring `Range`, with no fault.
const REDIRECT_PREFIX: &str = "/redirected";

/// How long a cut connection's first half is left to reach the client before the cut.
const CUT_AFTER: Duration = Duration::from_millis(100);

/// One way to break a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a registry-style error body instead of forwarding.
    Status(u16),
    /// Read the request and never answer.
    Stall,
    /// Send the headers, then never send the body.
    StallBody,
    /// Send the headers (with the full length) and half of the body, then drop the connection.
    CloseMidBody,
    /// Flip one bit in the middle of the body.
    FlipBit,
    /// Answer a range request with as many bytes of the same blob, taken `len` bytes further
    /// on (wrapping at the blob's end): for a one-chunk read, the next chunk's bytes.
    WrongChunk,
    /// Drop the `Range` header, so the registry answers 200 with the whole blob.
    IgnoreRange,
    /// Answer 302 to the same path under `/redirected` on the proxy.
    Redirect,
    /// Answer correctly, after this pause.
    Delay(Duration),
}

/// Which requests a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `GET /v2/<name>/blobs/<digest>` only: TOC and chunk reads.
    Blobs,
    /// Every request, manifests and the `/v2/` ping included.
    All,
    /// `/v2/<name>/manifests/sha256:…` only: manifests asked for by digest (the snapshotter
    /// does; a pull by tag does not).
    ManifestsByDigest,
}

/// A fault, the requests it applies to, and how many more times it fires (`None`: forever).
#[derive(Clone, Debug)]
pub struct Injection {
    pub fault: Fault,
    pub scope: Scope,
    pub times: Option<u32>,
}

impl Injection {
    /// `fault` on every blob GET from now on.
    pub fn blobs(fault: Fault) -> Self {
        Self {
            fault,
            scope: Scope::Blobs,
            times: None,
        }
    }

    /// `fault` on every request from now on.
    pub fn all(fault: Fault) -> Self {
        Self {
            fault,
            scope: Scope::All,
            times: None,
        }
    }

    /// Fire only for the next `n` matching requests, then pass requests through.
    pub fn times(self, n: u32) -> Self {
        Self {
            times: Some(n),
            ..self
        }
    }
}

/// One blob GET as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRequest {
    /// The request path, `/redirected/v2/…` for a followed redirect.
    pub path: String,
    /// The `Range` header, verbatim.
    pub range: Option<String>,
    /// The fault applied to it, if any.
    pub fault: Option<Fault>,
}

/// What the proxy served since it started or since `reset_counts`.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub blob_requests: u64,
    /// Response body bytes sent (or handed to the connection before a cut) for blob GETs.
    pub blob_bytes: u64,
    pub other_requests: u64,
    pub other_bytes: u64,
    /// Responses a fault changed.
    pub faults: u64,
    /// Every blob GET, in arrival order.
    pub blobs: Vec<BlobRequest>,
    /// The path of every request, in arrival order.
    pub paths: Vec<String>,
}

#[derive(Default)]
struct State {
    injection: Option<Injection>,
    counts: Counts,
}

/// Shared between the test thread and the proxy's runtime. A std mutex: it is held only to
/// read or update a few fields, never across an await.
type Shared = Arc<Mutex<State>>;

pub struct Proxy {
    addr: SocketAddr,
    state: Shared,
    server: ServerThread,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Result<Self> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("Building the proxy runtime")?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .context("Building the proxy's HTTP client")?;
        let state = Shared::default();
        let forward = Forward {
            client,
            upstream: format!("http://{upstream}"),
            state: state.clone(),
        };
        let server = ServerThread::spawn(
            "fault-proxy",
            runtime,
            listener,
            move |listener, stopped| accept_until(listener, forward, stopped),
        )?;
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference that goes through the proxy.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// A reference to `name` (`repo:tag`) through the proxy.
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.addr())
    }

    /// Sets the fault for the following requests, replacing any earlier one.
    pub fn inject(&self, injection: Injection) {
        self.lock().injection = Some(injection);
    }

    /// Forwards everything unchanged from now on.
    pub fn clear(&self) {
        self.lock().injection = None;
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts.clone()
    }

    pub fn reset_counts(&self) {
        self.lock().counts = Counts::default();
    }

    /// Closes the port and every connection: from now on the registry is unreachable
    /// through the proxy. Counts stay readable.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }
}

async fn accept_until(listener: TcpListener, forward: Forward, mut stopped: oneshot::Receiver<()>) {
    let forward = Arc::new(forward);
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let forward = forward.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let forward = forward.clone();
                async move { Ok::<_, Infallible>(forward.handle(req).await) }
            });
            // A connection ends with an error whenever a fault cuts it; that is the point.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Forward {
    client: reqwest::Client,
    /// `http://host:port` of the registry.
    upstream: String,
    state: Shared,
}

/// A forwarded response, buffered whole so a fault can rewrite it.
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Forward {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().to_owned();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or(path.clone(), |p| p.to_string());
        let redirected = path.starts_with(REDIRECT_PREFIX);
        let upstream_path = path_and_query
            .strip_prefix(REDIRECT_PREFIX)
            .unwrap_or(&path_and_query)
            .to_owned();
        let is_blob = req.method() == Method::GET && is_blob_path(&upstream_path);
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let fault = self.record(&path, is_blob, range.clone(), redirected);

        let answer = match fault {
            Some(Fault::Status(code)) => Ok(status_response(code)),
            Some(Fault::Stall) => std::future::pending().await,
            Some(Fault::Redirect) => Ok(redirect_response(&path_and_query)),
            Some(Fault::Delay(pause)) => {
                tokio::time::sleep(pause).await;
                self.forward(req, &upstream_path, true).await.map(whole)
            }
            Some(Fault::IgnoreRange) => self.forward(req, &upstream_path, false).await.map(whole),
            Some(Fault::WrongChunk) => self
                .forward(req, &upstream_path, false)
                .await
                .map(|up| wrong_chunk(up, range.as_deref())),
            Some(Fault::FlipBit) => self.forward(req, &upstream_path, true).await.map(|mut up| {
                up.body = flip_middle_bit(&up.body);
                whole(up)
            }),
            Some(Fault::CloseMidBody) => self
                .forward(req, &upstream_path, true)
                .await
                .map(|up| broken(up, Then::Cut)),
            Some(Fault::StallBody) => self
                .forward(req, &upstream_path, true)
                .await
                .map(|up| broken(up, Then::Hang)),
            None => self.forward(req, &upstream_path, true).await.map(whole),
        };
        // The registry itself unreachable: say so, as a gateway would.
        let (resp, sent) = answer.unwrap_or_else(|err| {
            let text = format!("proxy: {err:#}");
            let sent = text.len() as u64;
            response(
                StatusCode::BAD_GATEWAY,
                HeaderMap::new(),
                text_body(text),
                sent,
            )
        });
        let mut state = self.state.lock().expect("not poisoned");
        if is_blob {
            state.counts.blob_bytes += sent;
        } else {
            state.counts.other_bytes += sent;
        }
        resp
    }

    /// Counts the request and picks the fault for it, using up one of its `times`.
    fn record(
        &self,
        path: &str,
        is_blob: bool,
        range: Option<String>,
        redirected: bool,
    ) -> Option<Fault> {
        let mut state = self.state.lock().expect("not poisoned");
        let in_scope = |scope: Scope| match scope {
            Scope::All => true,
            Scope::Blobs => is_blob,
            Scope::ManifestsByDigest => path.contains("/manifests/sha256:"),
        };
        let applies = |i: &Injection| !redirected && in_scope(i.scope) && i.times != Some(0);
        let fault = match state.injection.as_mut() {
            Some(i) if applies(i) => {
                if let Some(n) = i.times.as_mut() {
                    *n -= 1;
                }
                Some(i.fault.clone())
            }
            _ => None,
        };
        let counts = &mut state.counts;
        counts.paths.push(path.to_owned());
        if fault.is_some() {
            counts.faults += 1;
        }
        if is_blob {
            counts.blob_requests += 1;
            counts.blobs.push(BlobRequest {
                path: path.to_owned(),
                range,
                fault: fault.clone(),
            });
        } else {
            counts.other_requests += 1;
        }
        fault
    }

    /// Sends the request on to the registry, with its `Range` header only if `keep_range`.
    async fn forward(
        &self,
        req: Request<Incoming>,
        path_and_query: &str,
        keep_range: bool,
    ) -> Result<Upstream> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        if !keep_range {
            headers.remove(header::RANGE);
        }
        let resp = self
            .client
            .request(
                parts.method.clone(),
                format!("{}{path_and_query}", self.upstream),
            )
            .headers(headers)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let mut headers = resp.headers().clone();
        strip_hop_by_hop(&mut headers);
        // Hyper sets the length from the body; a HEAD answer keeps the registry's.
        if parts.method != Method::HEAD {
            headers.remove(header::CONTENT_LENGTH);
        }
        let body = resp.bytes().await?;
        Ok(Upstream {
            status,
            headers,
            body,
        })
    }
}

/// `/v2/<name>/blobs/<algorithm>:<hex>`; upload paths (`/blobs/uploads/`) are not blobs.
fn is_blob_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    path.strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once("/blobs/"))
        .is_some_and(|(name, digest)| !name.is_empty() && digest.starts_with("sha256:"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

type ProxyBody = http_body_util::combinators::BoxBody<Bytes, io::Error>;

fn text_body(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response and the number of body bytes it carries.
type Answer = (Response<ProxyBody>, u64);

fn response(status: StatusCode, headers: HeaderMap, body: ProxyBody, sent: u64) -> Answer {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    (resp, sent)
}

fn whole(up: Upstream) -> Answer {
    let sent = up.body.len() as u64;
    response(up.status, up.headers, text_body(up.body), sent)
}

/// An error in the registry's own format, so clients parse it as they would a real one.
fn status_response(code: u16) -> Answer {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = format!(
        "{{\"errors\":[{{\"code\":\"UNKNOWN\",\"message\":\"injected {code} by the test proxy\"}}]}}"
    );
    let sent = body.len() as u64;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response(status, headers, text_body(body), sent)
}

fn redirect_response(path_and_query: &str) -> Answer {
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("{REDIRECT_PREFIX}{path_and_query}")) {
        headers.insert(header::LOCATION, location);
    }
    response(StatusCode::FOUND, headers, text_body(Bytes::new()), 0)
}

fn flip_middle_bit(body: &Bytes) -> Bytes {
    let mut bytes = body.to_vec();
    if let Some(b) = bytes.get_mut(body.len() / 2) {
        *b ^= 0x10;
    }
    bytes.into()
}

/// `Range: bytes=a-b` as a start and a length.
fn parse_range(range: &str) -> Option<(u64, u64)> {
    let (a, b) = range.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (b >= a).then(|| (a, b - a + 1))
}

/// Answers a range request from `up`, the whole blob, with the bytes `len` further on.
fn wrong_chunk(up: Upstream, range: Option<&str>) -> Answer {
    let size = up.body.len() as u64;
    let requested = range.and_then(parse_range);
    let Some((start, len)) = requested.filter(|_| up.status == StatusCode::OK && size > 0) else {
        return whole(up);
    };
    let len = len.min(size);
    let shift = if len % size == 0 { size / 2 } else { len };
    let body: Bytes = (0..len)
        .map(|i| up.body[((start + shift + i) % size) as usize])
        .collect::<Vec<u8>>()
        .into();
    let mut headers = up.headers;
    let end = start + len - 1;
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
        headers.insert(header::CONTENT_RANGE, v);
    }
    response(StatusCode::PARTIAL_CONTENT, headers, text_body(body), len)
}

/// What a broken body does after sending its first part.
enum Then {
    /// Fail, which makes hyper drop the connection.
    Cut,
    /// Never send anything more.
    Hang,
}

/// Headers announcing the whole body, then half of it (`Cut`) or none of it (`Hang`).
fn broken(up: Upstream, then: Then) -> Answer {
    let full = up.body.len();
    let head = match then {
        Then::Cut => up.body.slice(..full / 2),
        Then::Hang => Bytes::new(),
    };
    let sent = head.len() as u64;
    let mut headers = up.headers;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(full));
    let body = BrokenBody {
        head: Some(head),
        cut: match then {
            Then::Cut => Some(Box::pin(tokio::time::sleep(CUT_AFTER))),
            Then::Hang => None,
        },
    };
    response(up.status, headers, BodyExt::boxed(body), sent)
}

struct BrokenBody {
    head: Option<Bytes>,
    /// When set, the body fails once this fires; until then, and forever when unset, it is
    /// pending. The pause lets hyper flush the head before the failure drops the connection.
    cut: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for BrokenBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(head) = self.head.take().filter(|h| !h.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match self.cut.as_mut() {
            Some(cut) => {
                std::task::ready!(cut.as_mut().poll(cx));
                Poll::Ready(Some(Err(io::Error::other(
                    "connection cut by the test proxy",
                ))))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_are_told_from_the_rest() {
        assert!(is_blob_path("/v2/sample/blobs/sha256:abcd"));
        assert!(is_blob_path("/v2/a/b/blobs/sha256:abcd?x=1"));
        assert!(!is_blob_path("/v2/sample/manifests/lazy"));
        assert!(!is_blob_path("/v2/sample/blobs/uploads/123"));
        assert!(!is_blob_path("/v2/"));
    }

    #[test]
    fn ranges_parse_to_start_and_length() {
        assert_eq!(parse_range("bytes=10-19"), Some((10, 10)));
        assert_eq!(parse_range("bytes=5-4"), None);
        assert_eq!(parse_range("items=1-2"), None);
    }
}
