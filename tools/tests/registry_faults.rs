//! A conversion from a registry that misbehaves: each fault ends in a clear error (after
//! bounded retries where a retry can help), and nothing is written at the destination. The
//! registry client's own faults (proxies, ranges, preloads, lying sources) are tested in
//! `blobcache/tests/registry_faults.rs`.
//!
//! The faults come from a minimal HTTP responder on a loopback port: no real registry can be
//! told to answer 500, to hang or to hold back part of a body, and these tests need no more.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use brisk_tools::convert::{convert, ConvertConfig};
use brisk_tools::store::Store;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Fault {
    Status(u16, &'static str),
    Hang,
    /// Answers every manifest request with this body.
    Body(&'static str),
}

/// Reads a request up to the end of its head; `None` if the client went away first.
async fn read_head(sock: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    Some(seen)
}

/// Serves `fault` to every request; returns the address and a request counter.
async fn faulty_registry(fault: Fault) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                if read_head(&mut sock).await.is_none() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let response = match fault {
                    Fault::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    Fault::Status(code, extra) => {
                        format!("HTTP/1.1 {code} Fault\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n")
                    }
                    Fault::Body(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                };
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, count)
}

async fn convert_from(src: &str, timeout: Duration, retries: u32) -> (String, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:x", out.path().join("dst").display());
    let client = client(timeout, retries);
    let src = Store::open(src.parse().unwrap(), client.clone());
    let dst = Store::open(dst.parse().unwrap(), client);
    let err = convert(&src, &dst, &ConvertConfig::default())
        .await
        .unwrap_err();
    assert!(
        !out.path().join("dst/index.json").exists(),
        "a failed conversion wrote index.json"
    );
    (chain(&err), out)
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let (addr, count) = faulty_registry(Fault::Status(503, "")).await;
    let (err, _out) = convert_from(&format!("{addr}/app:v1"), Duration::from_secs(5), 2).await;
    assert!(err.contains("returned 503"), "{err}");
    assert_eq!(
        count.load(Ordering::SeqCst),
        3,
        "one attempt and two retries"
    );
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let (addr, count) = faulty_registry(Fault::Status(429, "")).await;
    let (err, _out) = convert_from(&format!("{addr}/app:v1"), Duration::from_secs(5), 1).await;
    assert!(err.contains("returned 429"), "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn missing_image_is_not_found_without_retries() {
    let (addr, count) = faulty_registry(Fault::Status(404, "")).await;
    let (err, _out) = convert_from(&format!("{addr}/app:v1"), Duration::from_secs(5), 3).await;
    assert!(
        err.contains("Manifest") && err.contains("not found"),
        "{err}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unauthorized_without_credentials_is_an_auth_error() {
    let (addr, _) = faulty_registry(Fault::Status(
        401,
        "www-authenticate: Basic realm=\"brisk\"\r\n",
    ))
    .await;
    // No docker config: point DOCKER_CONFIG at an empty directory for this process.
    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("DOCKER_CONFIG", empty.path());
    let (err, _out) = convert_from(&format!("{addr}/app:v1"), Duration::from_secs(5), 3).await;
    assert!(err.contains("Authentication"), "{err}");
}

#[tokio::test]
async fn a_hanging_registry_times_out() {
    let (addr, count) = faulty_registry(Fault::Hang).await;
    let started = std::time::Instant::now();
    let (err, _out) = convert_from(&format!("{addr}/app:v1"), Duration::from_millis(300), 1).await;
    assert!(err.contains("failed"), "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn a_manifest_that_does_not_match_its_digest_is_rejected() {
    let (addr, _) = faulty_registry(Fault::Body(r#"{"schemaVersion":2,"layers":[]}"#)).await;
    let wanted = brisk_blobcache::Digest::sha256(b"the manifest we asked for");
    let (err, _out) =
        convert_from(&format!("{addr}/app@{wanted}"), Duration::from_secs(5), 0).await;
    assert!(
        err.contains("manifest") && err.contains(&wanted.to_string()),
        "{err}"
    );
}
