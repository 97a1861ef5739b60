//! The CRI image-service proxy a Kubernetes node's kubelet is pointed at
//! (`--image-service-endpoint`): every `runtime.v1.ImageService` call goes on to
//! containerd's CRI, and a `PullImage`'s credentials are handed to this daemon's registry
//! client first, so the pulled image's layers are read lazily with the pod's own secret.
//!
//! Credentials are kept for the image's registry host and repository only (`Keychain`),
//! before the pull is forwarded: containerd calls Prepare, which reads the layer's TOC,
//! while the pull is still in flight. A pull that fails puts the previous credentials back.
//! It serves no RuntimeService (the kubelet sends that to containerd directly) and keeps
//! nothing of the requests but the credentials; it never logs them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use brisk_blobcache::registry::{Credentials, Keychain};
use brisk_proto::runtime::v1 as cri;
use cri::image_service_client::ImageServiceClient;
use cri::image_service_server::ImageService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Forwards ImageService to `upstream`, keeping pull credentials in `keychain`.
pub struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    keychain: Arc<Keychain>,
}

impl ImageProxy {
    /// A proxy to containerd's socket `upstream`. The connection is made at the first call,
    /// so the daemon starts before containerd does (containerd waits for its snapshotter).
    pub fn new(upstream: &Path, keychain: Arc<Keychain>) -> Self {
        Self {
            upstream: ImageServiceClient::new(unix_channel(upstream.to_owned())),
            keychain,
        }
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

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.upstream.clone().list_images(req.into_inner()).await
    }

    type StreamImagesStream = tonic::Streaming<cri::StreamImagesResponse>;

    async fn stream_images(
        &self,
        req: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        self.upstream.clone().stream_images(req.into_inner()).await
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.upstream.clone().image_status(req.into_inner()).await
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let replaced = match (&req.image, &req.auth) {
            (Some(image), Some(auth)) => keep_credentials(&self.keychain, &image.image, auth),
            _ => None,
        };
        let pulled = self.upstream.clone().pull_image(req).await;
        if pulled.is_err() {
            if let Some(replaced) = replaced {
                self.keychain.restore(replaced);
            }
        }
        pulled
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        self.upstream.clone().remove_image(req.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.upstream.clone().image_fs_info(req.into_inner()).await
    }
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
