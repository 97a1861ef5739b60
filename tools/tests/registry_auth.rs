//! Token auth negotiated from a registry's `WWW-Authenticate` challenge, with credentials from
//! the docker config named by `DOCKER_CONFIG`.
//!
//! One test in its own binary: it sets `DOCKER_CONFIG` for the whole process.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::RegistryError;
use brisk_blobcache::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A registry front that demands a bearer token and a token endpoint that demands basic auth
/// `brisk:s3cret`. Every request's first line and Authorization header are recorded.
async fn token_registry() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (log2, addr2) = (log.clone(), addr.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (log, addr) = (log2.clone(), addr2.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&seen).to_string();
                let first = text.lines().next().unwrap_or_default().to_owned();
                let auth = text
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                    .map(|l| l.split_once(':').unwrap().1.trim().to_owned())
                    .unwrap_or_default();
                log.lock().unwrap().push(format!("{first} | {auth}"));
                // base64("brisk:s3cret") == "YnJpc2s6czNjcmV0"
                let response = if first.starts_with("GET /token") {
                    if auth == "Basic YnJpc2s6czNjcmV0"
                        && first.contains("scope=repository%3Aapp%3Apull")
                    {
                        let body = r#"{"token":"tok-123"}"#;
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n".to_owned()
                    }
                } else if auth == "Bearer tok-123" {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned()
                } else {
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nwww-authenticate: Bearer realm=\"http://{addr}/token\",service=\"test\",scope=\"repository:app:pull\"\r\n\r\n"
                    )
                };
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn bearer_token_is_fetched_with_docker_config_credentials() {
    let (addr, log) = token_registry().await;
    let client = common::client(Duration::from_secs(5), 0);
    let reference: Reference = format!("{addr}/app:v1").parse().unwrap();

    // Without credentials the token endpoint refuses: a clear auth error.
    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("DOCKER_CONFIG", empty.path());
    let err = client.get_manifest(&reference).await.unwrap_err();
    assert!(
        matches!(err, Error::Registry(RegistryError::Auth { .. })),
        "{err}"
    );

    // With credentials in the docker config the token is obtained and used.
    let config = tempfile::tempdir().unwrap();
    let auths = format!(r#"{{"auths":{{"{addr}":{{"auth":"YnJpc2s6czNjcmV0"}}}}}}"#);
    std::fs::write(config.path().join("config.json"), auths).unwrap();
    std::env::set_var("DOCKER_CONFIG", config.path());
    log.lock().unwrap().clear();
    let err = client.get_manifest(&reference).await.unwrap_err();
    assert!(
        matches!(err, Error::Registry(RegistryError::ManifestNotFound(_))),
        "{err}"
    );
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "{log:#?}");
    assert!(
        log[0].starts_with("GET /v2/app/manifests/v1") && log[0].ends_with("| "),
        "{log:#?}"
    );
    assert!(
        log[1].starts_with("GET /token") && log[1].ends_with("Basic YnJpc2s6czNjcmV0"),
        "{log:#?}"
    );
    assert!(log[2].ends_with("Bearer tok-123"), "{log:#?}");
}
