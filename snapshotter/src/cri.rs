//! The CRI image-service proxy a Kubernetes node's kubelet is pointed at
//! (`--image-service-endpoint`): every `runtime.v1.ImageService` call goes on to
//! containerd's CRI, and a `PullImage`'s credentials are handed to this daemon's registry
//! client first, so the pulled image's layers are read lazily with the pod's own secret.
//!
//! Credentials are kept for the image's registry host and repository only (`Keychain`),
//! before the pull is forwarded: containerd calls Prepare, which reads the layer's TOC,
//! while the pull is still in flight. A pull that fails puts the previous credentials back.
//! Messages pass as bytes (only a PullImage is decoded as well), so fields newer than the
//! CRI API Brisk was built with reach containerd and the kubelet intact. It serves no
//! RuntimeService (the kubelet sends that to containerd directly) and keeps nothing of the
//! requests but the credentials; it never logs them.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use brisk_blobcache::registry::{Credentials, Keychain};
use brisk_proto::runtime::v1 as cri;
use bytes::{Buf, BufMut, Bytes};
use futures::future::BoxFuture;
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::Error;

const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
const STREAM_IMAGES: &str = "/runtime.v1.ImageService/StreamImages";

/// Forwards every `runtime.v1.ImageService` call to `upstream` as the bytes it came in, so
/// no field is lost whatever CRI version either side speaks; a PullImage is decoded too, for
/// its credentials, which go to `keychain` first.
#[derive(Clone)]
pub struct ImageProxy {
    upstream: Channel,
    keychain: Arc<Keychain>,
}

impl ImageProxy {
    /// A proxy to containerd's socket `upstream`. The connection is made at the first call,
    /// so the daemon starts before containerd does (containerd waits for its snapshotter).
    pub fn new(upstream: &Path, keychain: Arc<Keychain>) -> Self {
        Self {
            upstream: unix_channel(upstream.to_owned()),
            keychain,
        }
    }

    async fn unary(
        self,
        path: http::uri::PathAndQuery,
        body: Bytes,
    ) -> Result<Response<Bytes>, Status> {
        let replaced = if path.path() == PULL_IMAGE {
            // What containerd will decode; a message that does not decode fails there too.
            cri::PullImageRequest::decode(body.clone())
                .ok()
                .and_then(|req| match (req.image, req.auth) {
                    (Some(image), Some(auth)) => {
                        keep_credentials(&self.keychain, &image.image, &auth)
                    }
                    _ => None,
                })
        } else {
            None
        };
        let mut client = tonic::client::Grpc::new(self.upstream.clone());
        let answer = match client.ready().await {
            Ok(()) => client.unary(Request::new(body), path, RawCodec).await,
            Err(e) => Err(Error::Upstream(e).into()),
        };
        if answer.is_err() {
            if let Some(replaced) = replaced {
                self.keychain.restore(replaced);
            }
        }
        answer
    }

    async fn server_streaming(
        self,
        path: http::uri::PathAndQuery,
        body: Bytes,
    ) -> Result<Response<tonic::Streaming<Bytes>>, Status> {
        let mut client = tonic::client::Grpc::new(self.upstream.clone());
        client.ready().await.map_err(Error::Upstream)?;
        client
            .server_streaming(Request::new(body), path, RawCodec)
            .await
    }
}

impl NamedService for ImageProxy {
    const NAME: &'static str = "runtime.v1.ImageService";
}

impl<B> tonic::codegen::Service<http::Request<B>> for ImageProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            // The only server-streaming call of the service; every other one is unary.
            if path.path() == STREAM_IMAGES {
                Ok(grpc.server_streaming(Streamed { proxy, path }, req).await)
            } else {
                Ok(grpc.unary(Unary { proxy, path }, req).await)
            }
        })
    }
}

struct Unary {
    proxy: ImageProxy,
    path: http::uri::PathAndQuery,
}

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(proxy.unary(path, request.into_inner()))
    }
}

struct Streamed {
    proxy: ImageProxy,
    path: http::uri::PathAndQuery,
}

impl tonic::server::ServerStreamingService<Bytes> for Streamed {
    type Response = Bytes;
    type ResponseStream = tonic::Streaming<Bytes>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(proxy.server_streaming(path, request.into_inner()))
    }
}

/// Messages as bytes, both ways: decoding and encoding are left to the two ends. The
/// server's message size limit (4 MiB) still bounds what is read.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn unix_channel(path: PathBuf) -> Channel {
    // The URI is required but unused: every connection goes to the socket.
    Endpoint::from_static("http://[::1]:0").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        },
    ))
}

/// Keeps the pull's credentials for the image's registry and repository, as containerd 1.6
/// reads them (`ParseAuth`): none when `server_address` names another host; user and
/// password, else the identity token, else `auth` (base64 `user:password`). containerd
/// ignores `registry_token`, so the pull it serves never uses one, and neither does Brisk.
fn keep_credentials(
    keychain: &Keychain,
    image: &str,
    auth: &cri::AuthConfig,
) -> Option<brisk_blobcache::registry::keychain::Replaced> {
    let (registry, repository) = normalize(image)?;
    if !auth.server_address.is_empty() && server_host(&auth.server_address) != registry {
        return None;
    }
    let creds = credentials(auth)?;
    let replaced = keychain.put(&registry, &repository, creds);
    // The scope is not secret; the credentials are never logged.
    tracing::info!(registry, repository, "pull credentials kept for lazy reads");
    replaced
}

fn credentials(auth: &cri::AuthConfig) -> Option<Credentials> {
    use base64::Engine as _;
    if !auth.username.is_empty() {
        return Some(Credentials::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.identity_token.is_empty() {
        return Some(Credentials::IdentityToken(auth.identity_token.clone()));
    }
    if auth.auth.is_empty()
        || auth.auth.len() > brisk_blobcache::registry::keychain::MAX_FIELD_BYTES
    {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.auth.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some(Credentials::Basic {
        username: username.to_owned(),
        password: password.trim_matches('\0').to_owned(),
    })
}

/// The host of a `server_address` given as a URL or as a bare `host[:port][/path]`.
fn server_host(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    rest.split('/').next().unwrap_or_default()
}

/// Registry host and repository of an image name as containerd normalizes it: a first
/// component without `.` or `:` (and not `localhost`) is a Docker Hub path, one-component
/// names live under `library/`. `None` for a name that is no reference.
fn normalize(image: &str) -> Option<(String, String)> {
    if image.is_empty() || image.len() > 4096 {
        return None;
    }
    let name = image.split('@').next()?;
    let (first, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), rest)
        }
        _ => ("docker.io".to_owned(), name),
    };
    // A tag follows the last ':' after the last '/'.
    let repository = match rest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => rest,
    };
    if repository.is_empty() {
        return None;
    }
    let repository = if first == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    Some((first, repository))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tonic::codegen::tokio_stream::wrappers::UnixListenerStream;

    /// containerd's side, raw: records each call's path, bytes, and whether the keychain
    /// already held the image's credentials when it arrived; answers with the same bytes,
    /// or fails every call.
    #[derive(Clone)]
    struct Upstream {
        seen: Arc<Mutex<Vec<(String, Bytes, bool)>>>,
        keychain: Arc<Keychain>,
        fail: bool,
    }

    impl NamedService for Upstream {
        const NAME: &'static str = "runtime.v1.ImageService";
    }

    impl<B> tonic::codegen::Service<http::Request<B>> for Upstream
    where
        B: tonic::codegen::Body + Send + 'static,
        B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            let echo = Echo(self.clone(), req.uri().path().to_owned());
            Box::pin(async move { Ok(tonic::server::Grpc::new(RawCodec).unary(echo, req).await) })
        }
    }

    struct Echo(Upstream, String);

    impl tonic::server::UnaryService<Bytes> for Echo {
        type Response = Bytes;
        type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

        fn call(&mut self, request: Request<Bytes>) -> Self::Future {
            let body = request.into_inner();
            let held = self.0.keychain.get("r.example", "app").is_some();
            self.0
                .seen
                .lock()
                .unwrap()
                .push((self.1.clone(), body.clone(), held));
            let fail = self.0.fail;
            Box::pin(async move {
                if fail {
                    return Err(Status::unauthenticated("wrong credentials"));
                }
                Ok(Response::new(body))
            })
        }
    }

    async fn call(socket: &Path, path: &'static str, body: Bytes) -> Result<Bytes, Status> {
        let mut client = tonic::client::Grpc::new(unix_channel(socket.to_owned()));
        client.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(path);
        Ok(client
            .unary(Request::new(body), path, RawCodec)
            .await?
            .into_inner())
    }

    fn serve<S>(socket: &Path, service: S)
    where
        S: tonic::codegen::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
    }

    #[tokio::test]
    async fn calls_pass_as_bytes_and_a_pulls_credentials_arrive_first() {
        let dir = tempfile::tempdir().unwrap();
        let (up, front) = (dir.path().join("up.sock"), dir.path().join("front.sock"));
        for fail in [false, true] {
            let _ = std::fs::remove_file(&up);
            let _ = std::fs::remove_file(&front);
            let keychain = Arc::new(Keychain::new());
            let upstream = Upstream {
                seen: Arc::default(),
                keychain: keychain.clone(),
                fail,
            };
            serve(&up, upstream.clone());
            serve(&front, ImageProxy::new(&up, keychain.clone()));
            let pull = cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: "r.example/app:v1".into(),
                    ..Default::default()
                }),
                auth: Some(cri::AuthConfig {
                    username: "u".into(),
                    password: "p".into(),
                    ..Default::default()
                }),
                sandbox_config: None,
            };
            // A field this build's CRI API does not know (number 99, varint 1).
            let mut body = pull.encode_to_vec();
            body.extend_from_slice(&[0x98, 0x06, 0x01]);
            let body = Bytes::from(body);
            let answer = call(&front, PULL_IMAGE, body.clone()).await;
            let list = call(&front, "/runtime.v1.ImageService/ListImages", Bytes::new()).await;
            let seen = upstream.seen.lock().unwrap().clone();
            assert_eq!(seen[0], (PULL_IMAGE.to_owned(), body.clone(), true));
            assert_eq!(seen[1].0, "/runtime.v1.ImageService/ListImages");
            if fail {
                assert_eq!(answer.unwrap_err().code(), tonic::Code::Unauthenticated);
                assert!(list.is_err());
                assert!(keychain.is_empty(), "a failed pull keeps no credentials");
            } else {
                assert_eq!(answer.unwrap(), body, "the unknown field came back");
                assert_eq!(list.unwrap(), Bytes::new());
                assert!(keychain.get("r.example", "app").is_some());
            }
        }
    }

    #[test]
    fn image_names_normalize_as_containerd_does() {
        let n = |s| normalize(s).map(|(h, r)| format!("{h} {r}"));
        assert_eq!(
            n("127.0.0.1:5000/team/app:v1").as_deref(),
            Some("127.0.0.1:5000 team/app")
        );
        assert_eq!(n("localhost/app").as_deref(), Some("localhost app"));
        assert_eq!(n("nginx").as_deref(), Some("docker.io library/nginx"));
        assert_eq!(n("nginx:1.2").as_deref(), Some("docker.io library/nginx"));
        assert_eq!(n("team/app:v1").as_deref(), Some("docker.io team/app"));
        let d = format!("r.example/app@sha256:{}", "a".repeat(64));
        assert_eq!(n(&d).as_deref(), Some("r.example app"));
        assert_eq!(n(""), None);
        assert_eq!(n("r.example/"), None);
    }

    #[test]
    fn credentials_are_read_as_containerd_reads_them() {
        let k = Keychain::new();
        let auth = |f: fn(&mut cri::AuthConfig)| {
            let mut a = cri::AuthConfig::default();
            f(&mut a);
            a
        };
        // Another host's credentials are not kept for this one.
        let other = auth(|a| {
            a.username = "u".into();
            a.password = "p".into();
            a.server_address = "https://other.example".into();
        });
        assert!(keep_credentials(&k, "r.example/app", &other).is_none());
        assert!(k.is_empty());
        let same = auth(|a| {
            a.username = "u".into();
            a.password = "p".into();
            a.server_address = "https://r.example/v2/".into();
        });
        assert!(keep_credentials(&k, "r.example/app:v1", &same).is_some());
        assert!(k.get("r.example", "app").is_some());

        let encoded = auth(|a| a.auth = "dXNlcjpwYXNzAA==".into()); // "user:pass\0"
        match credentials(&encoded) {
            Some(Credentials::Basic { username, password }) => {
                assert_eq!((username.as_str(), password.as_str()), ("user", "pass"))
            }
            other => panic!("{other:?}"),
        }
        let token = auth(|a| a.identity_token = "refresh".into());
        assert!(
            matches!(credentials(&token), Some(Credentials::IdentityToken(t)) if t == "refresh")
        );
        assert!(credentials(&auth(|a| a.registry_token = "bearer".into())).is_none());
        // A pull without credentials leaves the kept ones alone.
        assert!(keep_credentials(&k, "r.example/app:v1", &auth(|_| {})).is_none());
        assert!(k.get("r.example", "app").is_some());
        assert!(credentials(&auth(|a| a.auth = "not base64!".into())).is_none());
        assert!(credentials(&auth(|a| a.auth = "bm9jb2xvbg==".into())).is_none());
        // "nocolon"
    }
}
