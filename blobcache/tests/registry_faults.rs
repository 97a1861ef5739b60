//! The registry client against registries that misbehave in ways no real registry can be told
//! to: a proxy that must carry every request, ranges that trickle or dribble in, preloaded
//! spans that hold wrong bytes, a source with two faces. A minimal HTTP responder on a loopback
//! port plays each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::chunk::ChunkRef;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_blobcache::source::{ChunkSource, Priority};
use brisk_blobcache::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).unwrap()
}

fn client(timeout: Duration, retries: u32) -> Arc<RegistryClient> {
    Arc::new(
        RegistryClient::new(RegistryConfig {
            plain_http: true,
            timeout,
            retries,
            backoff: Duration::from_millis(10),
            ..RegistryConfig::default()
        })
        .unwrap(),
    )
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

/// Answers every request with `body` as a manifest; returns the address and a request counter.
async fn manifest_server(body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                if read_head(&mut sock).await.is_none() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, count)
}

/// With `proxy` set, every registry request goes to the proxy (as an absolute-URI request), so
/// a P2P daemon or caching proxy can sit in front of the registry. The registry's host here
/// does not exist: only the proxy can answer.
#[tokio::test]
async fn a_configured_http_proxy_carries_every_registry_request() {
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let (proxy, count) = manifest_server(body).await;
    let client =
        brisk_blobcache::registry::RegistryClient::new(brisk_blobcache::registry::RegistryConfig {
            plain_http: true,
            retries: 0,
            proxy: Some(format!("http://{proxy}")),
            ..Default::default()
        })
        .unwrap();
    let reference = "registry.invalid:5000/app:v1".parse().unwrap();
    let manifest = client.get_manifest(&reference).await.unwrap();
    assert_eq!(manifest.bytes.as_ref(), body.as_bytes());
    assert!(count.load(Ordering::SeqCst) >= 1);

    let direct =
        brisk_blobcache::registry::RegistryClient::new(brisk_blobcache::registry::RegistryConfig {
            plain_http: true,
            retries: 0,
            ..Default::default()
        })
        .unwrap();
    assert!(
        direct.get_manifest(&reference).await.is_err(),
        "without the proxy the made-up host cannot answer"
    );
}

/// Answers every request with a 206 holding `body`, of which only the first `first` bytes are
/// sent until `release` fires: a large range read still on its way.
async fn trickling_registry(
    body: Vec<u8>,
    first: usize,
    release: tokio::sync::oneshot::Receiver<()>,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        if read_head(&mut sock).await.is_none() {
            return;
        }
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {len}\r\ncontent-range: bytes 0-{}/{len}\r\n\r\n",
            body.len() - 1,
            len = body.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(&body[..first]).await.unwrap();
        sock.flush().await.unwrap();
        let _ = release.await;
        let _ = sock.write_all(&body[first..]).await;
        // Held open until the client has read it all.
        let _ = sock.read(&mut [0u8; 64]).await;
    });
    addr
}

/// A registry level for the responder at `addr`, and the reference of its test repository.
fn registry_source(addr: &str) -> (brisk_blobcache::reference::Reference, Arc<RegistrySource>) {
    let source = RegistrySource::new(client(Duration::from_secs(5), 0), RemoteConfig::default());
    (
        format!("{addr}/test/app").parse().unwrap(),
        Arc::new(source),
    )
}

/// Two zstd chunks of one blob behind `trickling_registry`, which holds the second back until
/// `release` fires; `source` knows the blob's repository.
struct Trickled {
    plain: [Vec<u8>; 2],
    chunks: Vec<ChunkRef>,
    blob: Digest,
    blob_len: u64,
    reference: brisk_blobcache::reference::Reference,
    source: Arc<RegistrySource>,
    release: tokio::sync::oneshot::Sender<()>,
}

async fn trickled(fill: [u8; 2]) -> Trickled {
    let plain = fill.map(|b| vec![b; 50_000]);
    let frames = [zstd(&plain[0]), zstd(&plain[1])];
    let body = frames.concat();
    let blob = Digest::sha256(&body);
    let (release, held) = tokio::sync::oneshot::channel();
    let addr = trickling_registry(body.clone(), frames[0].len(), held).await;
    let (reference, source) = registry_source(&addr);
    source.register_blob(blob, &reference);
    let (l0, l1) = (frames[0].len() as u64, frames[1].len() as u64);
    let chunks = vec![
        ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(&plain[0]),
            blob,
            compressed: 0..l0,
            uncompressed_len: plain[0].len() as u64,
        },
        ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(&plain[1]),
            blob,
            compressed: l0..l0 + l1,
            uncompressed_len: plain[1].len() as u64,
        },
    ];
    Trickled {
        plain,
        chunks,
        blob,
        blob_len: body.len() as u64,
        reference,
        source,
        release,
    }
}

#[tokio::test]
async fn a_chunk_at_the_front_of_a_range_is_handed_over_before_the_rest_arrives() {
    let t = trickled([1, 2]).await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let each = move |i: usize, answer: brisk_blobcache::source::Answer| {
        let bytes = answer.ok().flatten().map(|f| f.bytes().to_vec());
        seen_tx.send((i, bytes)).unwrap();
    };
    let fetch = t.source.fetch(&t.chunks, Priority::Prefetch, &each);
    tokio::pin!(fetch);
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            first = seen.recv() => first,
            _ = &mut fetch => panic!("the range cannot be complete yet"),
        }
    })
    .await
    .expect("the first chunk must come before the rest of the range");
    assert_eq!(first, Some((0, Some(t.plain[0].clone()))));
    t.release.send(()).unwrap();
    fetch.await;
    assert_eq!(seen.recv().await, Some((1, Some(t.plain[1].clone()))));
    assert_eq!(
        t.source.stats().requests.load(Ordering::SeqCst),
        1,
        "one range request"
    );
}

#[tokio::test]
async fn preloaded_spans_serve_their_chunks_without_another_request() {
    // The responder takes one connection and answers one request: a second one would hang.
    let t = trickled([3, 4]).await;
    t.source.preload(
        t.blob,
        &t.reference,
        std::iter::once(0..t.blob_len).collect(),
    );
    let get = |i: usize| t.source.get_many(std::slice::from_ref(&t.chunks[i]));
    let got = tokio::time::timeout(Duration::from_secs(5), get(0))
        .await
        .expect("the front of the preload is in");
    assert_eq!(
        got[0].as_ref().unwrap().as_ref().unwrap().bytes(),
        &t.plain[0][..]
    );
    t.release.send(()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), get(1))
        .await
        .expect("the rest of the preload arrives");
    assert_eq!(
        got[0].as_ref().unwrap().as_ref().unwrap().bytes(),
        &t.plain[1][..]
    );
    assert_eq!(
        t.source.stats().requests.load(Ordering::SeqCst),
        1,
        "the preload's request only"
    );
}

/// Serves byte ranges of `good`, except that the first request gets the same range of `bad`;
/// returns the address and a request counter.
async fn two_faced_registry(bad: Vec<u8>, good: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (bad, good, counter) = (bad.clone(), good.clone(), counter.clone());
            tokio::spawn(async move {
                let Some(seen) = read_head(&mut sock).await else {
                    return;
                };
                let request = String::from_utf8_lossy(&seen).to_lowercase();
                let (a, b): (usize, usize) = request
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().split_once('-'))
                    .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
                    .unwrap_or((0, good.len() - 1));
                let body = if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    &bad
                } else {
                    &good
                };
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {a}-{b}/{}\r\nconnection: close\r\n\r\n",
                    b + 1 - a,
                    good.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body[a..=b]).await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn wrong_preloaded_bytes_are_never_served_and_the_chunk_is_fetched_afresh() {
    let plain: Vec<u8> = (0..60_000u32).map(|i| (i % 97) as u8).collect();
    let good = zstd(&plain);
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x5a;
    let blob = Digest::sha256(&good);
    let (addr, requests) = two_faced_registry(bad, good.clone()).await;
    let (reference, source) = registry_source(&addr);
    source.preload(
        blob,
        &reference,
        std::iter::once(0..good.len() as u64).collect(),
    );
    while requests.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // What opening the layer does once its TOC checked: a preload alone makes no repository
    // a source of the blob's chunks.
    source.register_blob(blob, &reference);
    let layered = brisk_blobcache::layered::Layered::builder()
        .origin(source.clone(), Duration::from_secs(5))
        .build();
    let chunk = ChunkRef {
        codec: Default::default(),
        digest: Digest::sha256(&plain),
        blob,
        compressed: 0..good.len() as u64,
        uncompressed_len: plain.len() as u64,
    };
    let read = layered.read(&chunk, Priority::OnDemand).await.unwrap();
    assert_eq!(
        read.data(),
        &plain[..],
        "the right bytes, from a fresh request"
    );
    assert_eq!(
        requests.load(Ordering::SeqCst),
        2,
        "the preload, then one more"
    );
}

/// Answers one request with a 206 of `body`, sent in 512-byte pieces with pauses: many small
/// arrivals for whoever waits on the range.
async fn dribbling_registry(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.set_nodelay(true).unwrap();
        if read_head(&mut sock).await.is_none() {
            return;
        }
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {len}\r\ncontent-range: bytes 0-{}/{len}\r\n\r\n",
            body.len() - 1,
            len = body.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        for (n, piece) in body.chunks(512).enumerate() {
            if sock.write_all(piece).await.is_err() {
                return;
            }
            if n % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let _ = sock.read(&mut [0u8; 64]).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_readers_of_a_preload_that_arrives_in_small_pieces_all_get_their_chunks() {
    // Readers on several threads wait on the preload's progress while it grows piece by piece.
    let plain: Vec<Vec<u8>> = (0..120u32)
        .map(|i| (0..3000u32).map(|j| ((i * 31 + j) % 251) as u8).collect())
        .collect();
    let frames: Vec<Vec<u8>> = plain.iter().map(|p| zstd(p)).collect();
    let body = frames.concat();
    let blob = Digest::sha256(&body);
    let addr = dribbling_registry(body.clone()).await;
    let (reference, source) = registry_source(&addr);
    source.preload(
        blob,
        &reference,
        std::iter::once(0..body.len() as u64).collect(),
    );
    let mut at = 0u64;
    let mut readers = Vec::new();
    for (p, f) in plain.iter().zip(&frames) {
        let chunk = ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(p),
            blob,
            compressed: at..at + f.len() as u64,
            uncompressed_len: p.len() as u64,
        };
        at += f.len() as u64;
        let (source, expected) = (source.clone(), p.clone());
        readers.push(tokio::spawn(async move {
            let got = source.get_many(std::slice::from_ref(&chunk)).await;
            assert_eq!(
                got[0].as_ref().unwrap().as_ref().unwrap().bytes(),
                &expected[..]
            );
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(readers))
        .await
        .expect("every reader gets its chunk")
        .into_iter()
        .for_each(|r| r.unwrap());
    assert_eq!(
        source.stats().requests.load(Ordering::SeqCst),
        1,
        "all from the preload"
    );
}
