//! Shared fakes for this crate's unit tests: a minimal HTTP responder on a loopback port, for
//! registries and mirrors that lie, stall or send too much (no real registry can be told to).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::registry::{RegistryClient, RegistryConfig};

/// What the responder was asked.
pub(crate) struct Request {
    /// The `Range` header's inclusive byte bounds, if there was one.
    pub range: Option<(u64, u64)>,
    /// The `Authorization` header, as sent.
    pub authorization: Option<String>,
}

/// What the responder answers.
pub(crate) enum Reply {
    /// A status, extra header lines (each ending in `\r\n`) and a body with its length.
    Body(u16, String, Vec<u8>),
    /// A 200 without a length whose body is `byte` forever, in 64 KiB pieces.
    Endless(u8),
    /// Nothing, ever.
    Hang,
}

impl Reply {
    /// A 206 of `bytes[a..=b]` (or a 200 of all of `bytes` without a range).
    pub fn range_of(bytes: &[u8], range: Option<(u64, u64)>) -> Self {
        match range {
            Some((a, b)) => {
                let b = b.min(bytes.len() as u64 - 1);
                Reply::Body(
                    206,
                    format!("content-range: bytes {a}-{b}/{}\r\n", bytes.len()),
                    bytes[a as usize..=b as usize].to_vec(),
                )
            }
            None => Reply::Body(200, String::new(), bytes.to_vec()),
        }
    }
}

/// A responder on 127.0.0.1 and how many requests it has had.
pub(crate) struct Responder {
    /// `127.0.0.1:<port>`, a registry host (loopback, so reached over plain HTTP).
    pub host: String,
    pub requests: Arc<AtomicUsize>,
}

impl Responder {
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Answers every request with `reply(request)`, one connection per request.
pub(crate) async fn respond(
    reply: impl Fn(&Request) -> Reply + Send + Sync + 'static,
) -> Responder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(AtomicUsize::new(0));
    let (count, reply) = (requests.clone(), Arc::new(reply));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (count, reply) = (count.clone(), reply.clone());
            tokio::spawn(async move {
                let Some(request) = read_request(&mut sock).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                match reply(&request) {
                    Reply::Body(status, headers, body) => {
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.write_all(&body).await;
                    }
                    Reply::Endless(byte) => {
                        let head = "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n";
                        let _ = sock.write_all(head.as_bytes()).await;
                        let piece = vec![byte; 64 * 1024];
                        while sock.write_all(&piece).await.is_ok() {}
                    }
                    Reply::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    Responder { host, requests }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let raw = String::from_utf8_lossy(&seen).into_owned();
    let authorization = raw.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_owned())
    });
    let head = raw.to_lowercase();
    let range = head
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.trim().split_once('-'))
        .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()));
    Some(Request {
        range,
        authorization,
    })
}

/// A client with no retries, and `mirrors` (hosts) in front of `registry`.
pub(crate) fn client(registry: &str, mirrors: &[&str]) -> Arc<RegistryClient> {
    let mirrors = std::collections::HashMap::from([(
        registry.to_owned(),
        mirrors.iter().map(|m| m.to_string()).collect(),
    )]);
    Arc::new(
        RegistryClient::new(RegistryConfig {
            retries: 0,
            timeout: Duration::from_secs(5),
            mirrors,
            ..RegistryConfig::default()
        })
        .unwrap(),
    )
}
