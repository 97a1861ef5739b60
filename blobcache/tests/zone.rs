//! The peer service's attack surface with real servers on loopback: request stamps bound to
//! one member and one body, per-source connection and request caps that refuse the excess
//! and serve everyone else, silent connections closed, message bounds, rate-limited refusal
//! logs, and an honest zone (gossip and peers) working through all of it. Then the peer
//! level, the client, against real and scripted members: homes serve verified chunks and
//! the origin is not asked; a member that proves itself but sends wrong bytes, one that
//! never answers and one that goes quiet after accepting are stepped around, counted and
//! avoided; one that keeps sending progress is waited for. No root needed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brisk_blobcache::chunk::{ChunkRef, VerifiedChunk};
use brisk_blobcache::layered::Layered;
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_blobcache::source::{Answer, ChunkSource, Found, Priority};
use brisk_blobcache::zone::auth::{Verifier, ZoneKey, PROOF_HEADER, STAMP_HEADER};
use brisk_blobcache::zone::client::{PeerConfig, PeerSource};
use brisk_blobcache::zone::limits::MAX_FETCH_CHUNKS;
use brisk_blobcache::zone::listen::{ListenLimits, PeerPort};
use brisk_blobcache::zone::server::{PeerService, ServeLimits};
use brisk_blobcache::zone::{gossip, Zone};
use brisk_blobcache::Digest;
use brisk_proto::brisk::v1::fetch_reply::Event;
use brisk_proto::brisk::v1::peer_client::PeerClient;
use brisk_proto::brisk::v1::peer_server::{Peer as PeerRpc, PeerServer};
use brisk_proto::brisk::v1::{
    Accepted, ChunkLocator, FetchReply, FetchRequest, HasReply, HasRequest, Missing,
    PeerTraceReply, PeerTraceRequest, Piece, Progress,
};
use bytes::Bytes;
use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

fn key() -> ZoneKey {
    ZoneKey::new(b"zone-secret-for-the-tests-0123").unwrap()
}

fn chunk(seed: u8, len: usize) -> (ChunkRef, VerifiedChunk) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let r = ChunkRef {
        codec: Default::default(),
        digest: Digest::sha256(&data),
        blob: Digest::sha256(b"layer"),
        compressed: 0..len as u64,
        uncompressed_len: len as u64,
    };
    let v = VerifiedChunk::check(&r, Bytes::from(data)).unwrap();
    (r, v)
}

fn locator(c: &ChunkRef) -> ChunkLocator {
    ChunkLocator {
        digest: c.digest.to_string(),
        blob: c.blob.to_string(),
        repository: String::new(),
        compressed_offset: c.compressed.start,
        compressed_length: c.compressed.end - c.compressed.start,
        uncompressed_length: c.uncompressed_len,
        codec: 0,
    }
}

fn fetch_of(chunks: &[&ChunkRef]) -> FetchRequest {
    FetchRequest {
        chunks: chunks.iter().map(|c| locator(c)).collect(),
        prefetch: false,
    }
}

/// A level that never answers: a fetch of anything not in memory stays open.
struct Hang;

#[async_trait::async_trait]
impl ChunkSource for Hang {
    fn name(&self) -> &'static str {
        "hang"
    }

    async fn fetch(
        &self,
        _chunks: &[ChunkRef],
        _priority: Priority,
        _each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        futures::future::pending().await
    }
}

/// A real peer server on 127.0.0.1:0 holding `held` in memory; stops when dropped.
struct Peer {
    addr: SocketAddr,
    /// Its memory level, for chunks chosen once the zone (and so their home) is known.
    memory: Arc<MemoryCache>,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_peer(held: &[&VerifiedChunk], listen: ListenLimits, serve: ServeLimits) -> Peer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let memory = Arc::new(MemoryCache::new(16 << 20));
    for c in held {
        memory.put(c).await;
    }
    let cache = Layered::builder()
        .memory(memory.clone(), Duration::from_secs(1))
        .origin(Arc::new(Hang), Duration::from_secs(600))
        .build();
    let client = RegistryClient::new(RegistryConfig::default()).unwrap();
    let registry = Arc::new(RegistrySource::new(
        Arc::new(client),
        RemoteConfig::default(),
    ));
    // The member's identity is the address it listens on, as the zone config says.
    let service = PeerService::new(cache, registry, key(), addr, None, serve);
    let port = PeerPort::new(None, listen).unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(port.serve(listener, service, cancel.clone().cancelled_owned()));
    Peer {
        addr,
        memory,
        _stop: cancel.drop_guard(),
    }
}

/// A connection to `peer` from the loopback address `from`.
async fn connect(peer: SocketAddr, from: [u8; 4]) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
        .unwrap()
        .local_address(Some(IpAddr::from(from)))
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn signed<T: prost::Message>(message: T, method: &str, to: SocketAddr) -> Request<T> {
    let mut request = Request::new(message);
    key().sign(&mut request, method, to);
    request
}

/// Copies `request`'s stamp onto a request for `message`.
fn restamped<T, U>(request: &Request<T>, message: U) -> Request<U> {
    let mut other = Request::new(message);
    let stamp = request.metadata().get(STAMP_HEADER).unwrap().clone();
    other.metadata_mut().insert(STAMP_HEADER, stamp);
    other
}

/// The bytes a fetch of one chunk returned.
async fn fetched(client: &mut PeerClient<Channel>, request: Request<FetchRequest>) -> Vec<u8> {
    let mut stream = client.fetch(request).await.unwrap().into_inner();
    let mut data = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        match message.event {
            Some(Event::Piece(p)) => {
                data.extend_from_slice(&p.data);
                if p.last {
                    break;
                }
            }
            Some(Event::Missing(m)) => panic!("missing: {}", m.reason),
            _ => {}
        }
    }
    data
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn honest_requests_are_served_and_their_stamps_work_once() {
    let (r, v) = chunk(3, 100_000);
    let a = start_peer(&[&v], ListenLimits::default(), ServeLimits::default()).await;
    let mut client = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
    let request = signed(fetch_of(&[&r]), "Fetch", a.addr);
    let replay = restamped(&request, fetch_of(&[&r]));
    assert_eq!(fetched(&mut client, request).await, v.data().to_vec());
    assert_eq!(code(client.fetch(replay).await), Code::Unauthenticated);
    let has = HasRequest {
        digests: vec![r.digest.to_string()],
    };
    let reply = client.has(signed(has, "Has", a.addr)).await.unwrap();
    assert_eq!(reply.get_ref().present, vec![true]);
}

#[tokio::test]
async fn a_stamp_replayed_to_another_member_is_refused() {
    let (r, v) = chunk(5, 10_000);
    let a = start_peer(&[&v], ListenLimits::default(), ServeLimits::default()).await;
    let b = start_peer(&[&v], ListenLimits::default(), ServeLimits::default()).await;
    let mut to_b = PeerClient::new(connect(b.addr, [127, 0, 0, 1]).await.unwrap());
    // Captured on its way to a, played to b first: b is not the member it was made for.
    let for_a = signed(fetch_of(&[&r]), "Fetch", a.addr);
    let captured = restamped(&for_a, fetch_of(&[&r]));
    assert_eq!(code(to_b.fetch(captured).await), Code::Unauthenticated);
    let has = |to| signed(HasRequest::default(), "Has", to);
    let captured = restamped(&has(a.addr), HasRequest::default());
    assert_eq!(code(to_b.has(captured).await), Code::Unauthenticated);
    // The same stamp is still good where it was meant to go, and b serves its own callers.
    let mut to_a = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
    assert_eq!(fetched(&mut to_a, for_a).await, v.data().to_vec());
    assert_eq!(code(to_b.has(has(b.addr)).await), Code::Ok);
}

#[tokio::test]
async fn a_stamp_with_another_body_or_an_old_version_is_refused() {
    let (r, v) = chunk(7, 10_000);
    let (other, _) = chunk(9, 10_000);
    let a = start_peer(&[&v], ListenLimits::default(), ServeLimits::default()).await;
    let mut client = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
    let honest = signed(fetch_of(&[&r]), "Fetch", a.addr);
    for body in [
        fetch_of(&[&other]),
        fetch_of(&[&r, &r]),
        FetchRequest {
            prefetch: true,
            ..fetch_of(&[&r])
        },
    ] {
        let tampered = restamped(&honest, body);
        assert_eq!(code(client.fetch(tampered).await), Code::Unauthenticated);
    }
    let mut old = Request::new(HasRequest::default());
    let v1 = format!("v1:{}:{}:{}", now(), "0".repeat(32), "0".repeat(64));
    old.metadata_mut().insert(STAMP_HEADER, v1.parse().unwrap());
    assert_eq!(code(client.has(old).await), Code::Unauthenticated);
    assert_eq!(fetched(&mut client, honest).await, v.data().to_vec());
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_source_over_its_connection_cap_is_refused_and_others_are_served() {
    let limits = ListenLimits {
        connections_per_source: 2,
        ..ListenLimits::default()
    };
    let a = start_peer(&[], limits, ServeLimits::default()).await;
    let has = || signed(HasRequest::default(), "Has", a.addr);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
        assert_eq!(code(c.has(has()).await), Code::Ok);
        held.push(c);
    }
    // A third connection from the same source is closed as soon as it is accepted.
    let third = connect(a.addr, [127, 0, 0, 1]).await;
    if let Ok(channel) = third {
        assert_ne!(code(PeerClient::new(channel).has(has()).await), Code::Ok);
    }
    // Another source is served, and so are the connections the first one holds.
    let mut other = PeerClient::new(connect(a.addr, [127, 0, 0, 2]).await.unwrap());
    assert_eq!(code(other.has(has()).await), Code::Ok);
    for c in &mut held {
        assert_eq!(code(c.has(has()).await), Code::Ok);
    }
    // A closed connection gives its slot back.
    held.pop();
    let started = Instant::now();
    loop {
        if let Ok(channel) = connect(a.addr, [127, 0, 0, 1]).await {
            if code(PeerClient::new(channel).has(has()).await) == Code::Ok {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(5), "slot not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_silent_connection_is_closed_and_frees_its_slot() {
    let limits = ListenLimits {
        connections_per_source: 1,
        first_byte_timeout: Duration::from_millis(200),
        ..ListenLimits::default()
    };
    let a = start_peer(&[], limits, ServeLimits::default()).await;
    let mut silent = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        // The server may send its HTTP/2 settings first; then it hangs up.
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection that said nothing stayed open");
    let mut c = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
    let has = signed(HasRequest::default(), "Has", a.addr);
    assert_eq!(code(c.has(has).await), Code::Ok);
}

#[tokio::test]
async fn a_caller_over_its_request_share_is_refused_and_others_are_served() {
    let (fast, v) = chunk(11, 10_000);
    let (slow, _) = chunk(13, 10_000);
    let serve = ServeLimits {
        streams_per_caller: 2,
        ..ServeLimits::default()
    };
    let a = start_peer(&[&v], ListenLimits::default(), serve).await;
    let mut greedy = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
    let fetch = |c: &ChunkRef| signed(fetch_of(&[c]), "Fetch", a.addr);
    // Two requests the server cannot finish (the chunk is on a level that never answers).
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(greedy.fetch(fetch(&slow)).await.unwrap());
    }
    let status = greedy.fetch(fetch(&fast)).await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    let mut other = PeerClient::new(connect(a.addr, [127, 0, 0, 3]).await.unwrap());
    assert_eq!(fetched(&mut other, fetch(&fast)).await, v.data().to_vec());
    // Giving up a request gives its share back.
    drop(open.pop());
    let started = Instant::now();
    loop {
        match greedy.fetch(fetch(&fast)).await {
            Ok(_) => break,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "share not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn counts_and_sizes_over_their_bounds_are_refused() {
    let (r, v) = chunk(17, 1000);
    let a = start_peer(&[&v], ListenLimits::default(), ServeLimits::default()).await;
    let mut client = PeerClient::new(connect(a.addr, [127, 0, 0, 1]).await.unwrap());
    let many = FetchRequest {
        chunks: vec![locator(&r); MAX_FETCH_CHUNKS + 1],
        prefetch: false,
    };
    let status = client
        .fetch(signed(many, "Fetch", a.addr))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("chunks in a fetch"), "{status}");
    let mut huge = locator(&r);
    huge.compressed_length = 1 << 40;
    let request = FetchRequest {
        chunks: vec![huge],
        prefetch: false,
    };
    let status = client
        .fetch(signed(request, "Fetch", a.addr))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    let digests = vec![r.digest.to_string(); 1025];
    let has = signed(HasRequest { digests }, "Has", a.addr);
    assert_eq!(code(client.has(has).await), Code::InvalidArgument);
    // A message larger than any honest request is refused before it is decoded.
    let digests = vec!["x".repeat(1 << 10); 2048];
    let has = signed(HasRequest { digests }, "Has", a.addr);
    assert_ne!(code(client.has(has).await), Code::Ok);
    // And the caller is still served.
    assert_eq!(
        fetched(&mut client, signed(fetch_of(&[&r]), "Fetch", a.addr)).await,
        v.data().to_vec()
    );
}

/// Log lines written by every test of this binary. One global subscriber, not one per test:
/// a thread-scoped one misses events whose callsite another test's thread registered first
/// with no subscriber (tracing caches that interest), which made the test below flaky.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn global() -> &'static Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
            logs
        })
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn refusals_are_logged_with_their_reason_once_a_period_per_source() {
    let logs = Logs::global();
    let a = start_peer(&[], ListenLimits::default(), ServeLimits::default()).await;
    let b = start_peer(&[], ListenLimits::default(), ServeLimits::default()).await;
    let mut flood = PeerClient::new(connect(b.addr, [127, 0, 0, 1]).await.unwrap());
    for _ in 0..200 {
        let captured = signed(HasRequest::default(), "Has", a.addr);
        assert_eq!(code(flood.has(captured).await), Code::Unauthenticated);
    }
    let mut other = PeerClient::new(connect(b.addr, [127, 0, 0, 4]).await.unwrap());
    let honest = signed(HasRequest::default(), "Has", b.addr);
    let tampered = restamped(
        &honest,
        HasRequest {
            digests: vec!["x".into()],
        },
    );
    assert_eq!(code(other.has(tampered).await), Code::Unauthenticated);
    let text = logs.text();
    // Other tests' refusals are in the log too: this test's are the ones naming its peers
    // (`a`'s address in the reason, the only caller from 127.0.0.4).
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("zone peer traffic refused"))
        .filter(|l| l.contains(&a.addr.to_string()) || l.contains("127.0.0.4"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("127.0.0.1"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("Made for another member, {}", a.addr)),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("127.0.0.4"), "{}", lines[1]);
    assert!(lines[1].contains("another request body"), "{}", lines[1]);
}

/// A host with gossip and the peer service on one loopback address, and its peer level.
struct Host {
    source: Arc<PeerSource>,
    peer: Peer,
    _gossip: tokio_util::sync::DropGuard,
}

async fn start_host(held: &[&VerifiedChunk], seeds: Vec<SocketAddr>, config: PeerConfig) -> Host {
    let peer = start_peer(held, ListenLimits::default(), ServeLimits::default()).await;
    // Gossip uses the same port over UDP; the member's identity is that one address.
    let zone = Arc::new(Zone::new(peer.addr));
    let cancel = CancellationToken::new();
    gossip::start(zone.clone(), key(), seeds, cancel.clone())
        .await
        .unwrap();
    let client = RegistryClient::new(RegistryConfig::default()).unwrap();
    let registry = Arc::new(RegistrySource::new(
        Arc::new(client),
        RemoteConfig::default(),
    ));
    let source = Arc::new(PeerSource::new(zone, key(), registry, config));
    Host {
        source,
        peer,
        _gossip: cancel.drop_guard(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_zone_serves_more_chunks_than_one_request_may_ask_for() {
    let chunks: Vec<(ChunkRef, VerifiedChunk)> = (0..3000u32)
        .map(|i| {
            let data = Bytes::from(format!("chunk {i}").into_bytes());
            let r = ChunkRef {
                codec: Default::default(),
                digest: Digest::sha256(&data),
                blob: Digest::sha256(b"layer"),
                compressed: 0..data.len() as u64,
                uncompressed_len: data.len() as u64,
            };
            let v = VerifiedChunk::check(&r, data).unwrap();
            (r, v)
        })
        .collect();
    let held: Vec<&VerifiedChunk> = chunks.iter().map(|(_, v)| v).collect();
    let a = start_host(&held, Vec::new(), PeerConfig::default()).await;
    let a_addr = a.source.zone().me();
    let b = start_host(&[], vec![a_addr], PeerConfig::default()).await;
    let started = Instant::now();
    while b.source.zone().members() != vec![a_addr] {
        assert!(started.elapsed() < Duration::from_secs(10), "b never saw a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refs: Vec<ChunkRef> = chunks.iter().map(|(r, _)| r.clone()).collect();
    let homed_at_a = refs.iter().filter(|r| b.source.forwards(r)).count();
    assert!(
        homed_at_a > MAX_FETCH_CHUNKS,
        "{homed_at_a} chunks homed at a"
    );
    let answers = b.source.get_many(&refs).await;
    let got = answers
        .iter()
        .filter(|a| matches!(a, Ok(Some(Found::Verified(_)))))
        .count();
    let stats = b.source.stats();
    assert_eq!(got, homed_at_a);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert!(
        stats.requests.load(Ordering::Relaxed) >= 2,
        "split by count"
    );
}

/// Waits until `host`'s view of the zone is exactly `members` (gossip takes a moment).
async fn until_members(host: &Host, members: &[SocketAddr]) {
    let mut want = members.to_vec();
    want.sort();
    let started = Instant::now();
    while host.source.zone().members() != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the zone never became {want:?}: {:?}",
            host.source.zone().members()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Chunk `i` of a family of small, distinct chunks.
fn numbered(label: &str, i: u32) -> (ChunkRef, VerifiedChunk) {
    let data = Bytes::from(format!("{label} chunk {i} ").repeat(64).into_bytes());
    let r = ChunkRef {
        codec: Default::default(),
        digest: Digest::sha256(&data),
        blob: Digest::sha256(b"layer"),
        compressed: 0..data.len() as u64,
        uncompressed_len: data.len() as u64,
    };
    let v = VerifiedChunk::check(&r, data).unwrap();
    (r, v)
}

/// `n` chunks whose ranking in `host`'s zone begins with `order`: with the default two
/// candidates, the members a read of them asks, in the order it asks them.
fn ranked(
    host: &Host,
    order: &[SocketAddr],
    label: &str,
    n: usize,
) -> Vec<(ChunkRef, VerifiedChunk)> {
    let zone = host.source.zone();
    let found: Vec<_> = (0u32..100_000)
        .map(|i| numbered(label, i))
        .filter(|(r, _)| zone.ranked(r.digest.as_bytes()).starts_with(order))
        .take(n)
        .collect();
    assert_eq!(found.len(), n, "chunks ranked {order:?}");
    found
}

fn verified(answer: &Answer) -> Option<&VerifiedChunk> {
    match answer {
        Ok(Some(Found::Verified(v))) => Some(v),
        _ => None,
    }
}

/// Gossip for a member whose peer port something other than `PeerService` answers.
async fn gossip_as(addr: SocketAddr) -> tokio_util::sync::DropGuard {
    let cancel = CancellationToken::new();
    gossip::start(Arc::new(Zone::new(addr)), key(), Vec::new(), cancel.clone())
        .await
        .unwrap();
    cancel.drop_guard()
}

/// What a scripted peer does with a fetch it authenticated.
#[derive(Clone, Copy)]
enum Script {
    /// Sends every chunk asked for at its full length, with its first byte changed.
    Lie,
    /// Accepts, then sends nothing more while the caller waits.
    Stall,
    /// Accepts, sends progress every `every` for `wait`, then the right bytes.
    Slow { every: Duration, wait: Duration },
}

/// A zone member that checks stamps and proves itself exactly like `PeerService`, so the
/// caller's only reason to doubt it is what it sends (or does not).
struct Scripted {
    verifier: Verifier,
    held: Held,
    script: Script,
    fetches: Arc<AtomicUsize>,
}

/// A scripted member's chunks by digest, chosen once the zone (and so their home) is known.
type Held = Arc<std::sync::Mutex<HashMap<String, Bytes>>>;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<FetchReply, Status>> + Send>>;

fn reply(event: Event) -> Result<FetchReply, Status> {
    Ok(FetchReply { event: Some(event) })
}

#[tonic::async_trait]
impl PeerRpc for Scripted {
    type FetchStream = ReplyStream;

    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<ReplyStream>, Status> {
        let proof = self
            .verifier
            .authorize(&request, "Fetch")
            .map_err(|why| Status::unauthenticated(why.to_string()))?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let chunks: Vec<Option<Bytes>> = request
            .get_ref()
            .chunks
            .iter()
            .map(|l| self.held.lock().unwrap().get(&l.digest).cloned())
            .collect();
        let script = self.script;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            if tx.send(reply(Event::Accepted(Accepted {}))).await.is_err() {
                return;
            }
            match script {
                Script::Stall => return tx.closed().await,
                Script::Slow { every, wait } => {
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        tokio::time::sleep(every).await;
                        if tx.send(reply(Event::Progress(Progress {}))).await.is_err() {
                            return;
                        }
                    }
                }
                Script::Lie => {}
            }
            for (i, data) in chunks.into_iter().enumerate() {
                let index = i as u32;
                let event = match data {
                    Some(data) if matches!(script, Script::Lie) => {
                        let mut wrong = data.to_vec();
                        wrong[0] ^= 0xff;
                        Event::Piece(Piece {
                            index,
                            offset: 0,
                            data: Bytes::from(wrong),
                            last: true,
                        })
                    }
                    Some(data) => Event::Piece(Piece {
                        index,
                        offset: 0,
                        data,
                        last: true,
                    }),
                    None => Event::Missing(Missing {
                        index,
                        reason: "not held".into(),
                    }),
                };
                if tx.send(reply(event)).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut response = Response::new(Box::pin(stream) as ReplyStream);
        response
            .metadata_mut()
            .insert(PROOF_HEADER, proof.parse().unwrap());
        Ok(response)
    }

    async fn has(&self, _request: Request<HasRequest>) -> Result<Response<HasReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn get_trace(
        &self,
        _request: Request<PeerTraceRequest>,
    ) -> Result<Response<PeerTraceReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// A scripted member on 127.0.0.1:0, gossiping on its port; stops when dropped.
struct Fake {
    addr: SocketAddr,
    held: Held,
    /// Fetches that reached it past authentication (for a mute member, connections).
    fetches: Arc<AtomicUsize>,
    _stop: tokio_util::sync::DropGuard,
    _gossip: tokio_util::sync::DropGuard,
}

impl Fake {
    fn hold(&self, chunk: &VerifiedChunk) {
        let mut held = self.held.lock().unwrap();
        held.insert(chunk.digest().to_string(), chunk.data().clone());
    }
}

async fn start_scripted(script: Script) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fetches = Arc::new(AtomicUsize::new(0));
    let held = Held::default();
    let service = Scripted {
        verifier: Verifier::new(key(), addr),
        held: held.clone(),
        script,
        fetches: fetches.clone(),
    };
    let incoming = futures::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| s);
        Some((accepted, l))
    });
    let cancel = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(PeerServer::new(service))
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    tokio::spawn(server);
    Fake {
        addr,
        held,
        fetches,
        _stop: cancel.drop_guard(),
        _gossip: gossip_as(addr).await,
    }
}

/// A member whose gossip is alive but whose peer port accepts connections and never says a
/// word on them.
async fn start_mute() -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fetches = Arc::new(AtomicUsize::new(0));
    let connections = fetches.clone();
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        connections.fetch_add(1, Ordering::Relaxed);
                        open.push(stream);
                    }
                }
            }
        }
    });
    Fake {
        addr,
        held: Held::default(),
        fetches,
        _stop: cancel.drop_guard(),
        _gossip: gossip_as(addr).await,
    }
}

/// An origin holding every chunk and counting what it is asked for: whatever it serves is
/// a read the peers did not answer.
struct Origin {
    chunks: HashMap<Digest, VerifiedChunk>,
    asked: AtomicUsize,
}

#[async_trait::async_trait]
impl ChunkSource for Origin {
    fn name(&self) -> &'static str {
        "registry"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        self.asked.fetch_add(chunks.len(), Ordering::Relaxed);
        for (i, c) in chunks.iter().enumerate() {
            each(
                i,
                Ok(self.chunks.get(&c.digest).cloned().map(Found::Verified)),
            );
        }
    }
}

/// Short enough that a test waiting on them is quick, long enough for a loaded machine.
fn short_timeouts() -> PeerConfig {
    PeerConfig {
        ack_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(1),
        avoid_liar: Duration::from_secs(600),
        avoid_silent: Duration::from_secs(600),
        ..PeerConfig::default()
    }
}

/// A read that does not end at all fails the test instead of hanging it.
const HUNG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_honest_peers_serve_their_homes_verified_and_the_origin_is_never_asked() {
    let a = start_host(&[], Vec::new(), PeerConfig::default()).await;
    let b = start_host(&[], Vec::new(), PeerConfig::default()).await;
    let (a_addr, b_addr) = (a.source.zone().me(), b.source.zone().me());
    let client = start_host(&[], vec![a_addr, b_addr], PeerConfig::default()).await;
    until_members(&client, &[a_addr, b_addr]).await;
    let at_a = ranked(&client, &[a_addr], "a", 3);
    let at_b = ranked(&client, &[b_addr], "b", 3);
    // Each peer holds only the chunks it is home for (and never answers for the others: its
    // origin hangs), so a verified answer for every chunk means each came from its home.
    for (host, chunks) in [(&a, &at_a), (&b, &at_b)] {
        for (_, v) in chunks {
            host.peer.memory.put(v).await;
        }
    }
    let all: Vec<&(ChunkRef, VerifiedChunk)> = at_a.iter().chain(&at_b).collect();
    let refs: Vec<ChunkRef> = all.iter().map(|(r, _)| r.clone()).collect();
    let answers = tokio::time::timeout(HUNG, client.source.get_many(&refs))
        .await
        .expect("the read hung");
    for ((r, v), answer) in all.iter().zip(&answers) {
        let got = verified(answer).unwrap_or_else(|| panic!("{}: {answer:?}", r.digest));
        assert_eq!(got.data(), v.data());
    }
    let stats = client.source.stats();
    assert_eq!(stats.requests.load(Ordering::Relaxed), 2, "one per home");
    assert_eq!(stats.chunks.load(Ordering::Relaxed), 6);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
    // Through the whole read path, with an origin that would serve everything too.
    let origin = Arc::new(Origin {
        chunks: all.iter().map(|(r, v)| (r.digest, v.clone())).collect(),
        asked: AtomicUsize::new(0),
    });
    let cache = Layered::builder()
        .memory(Arc::new(MemoryCache::new(16 << 20)), Duration::from_secs(1))
        .peer(client.source.clone(), Duration::from_secs(10))
        .origin(origin.clone(), Duration::from_secs(10))
        .build();
    let read = tokio::time::timeout(HUNG, cache.read_many(&refs, Priority::OnDemand))
        .await
        .expect("the read hung")
        .unwrap();
    for ((_, v), got) in all.iter().zip(&read) {
        assert_eq!(got.data(), v.data());
    }
    assert_eq!(origin.asked.load(Ordering::Relaxed), 0);
    assert_eq!(cache.origin_fetches(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_wrong_bytes_is_never_believed_counted_and_avoided() {
    let honest = start_host(&[], Vec::new(), PeerConfig::default()).await;
    let honest_addr = honest.source.zone().me();
    let liar = start_scripted(Script::Lie).await;
    let client = start_host(&[], vec![honest_addr, liar.addr], short_timeouts()).await;
    until_members(&client, &[honest_addr, liar.addr]).await;
    let order = [liar.addr, honest_addr];
    let (x, y, z) = (
        ranked(&client, &order, "x", 1).remove(0),
        // Homed at the liar with nobody else ranked above the client: no second candidate.
        ranked(&client, &[liar.addr, client.source.zone().me()], "y", 1).remove(0),
        ranked(&client, &order, "z", 1).remove(0),
    );
    for (_, v) in [&x, &z] {
        honest.peer.memory.put(v).await;
    }
    for (_, v) in [&x, &y, &z] {
        liar.hold(v);
    }
    let refs = [x.0.clone(), y.0.clone()];
    let answers = tokio::time::timeout(HUNG, client.source.get_many(&refs))
        .await
        .expect("the read hung");
    let got = verified(&answers[0]).unwrap_or_else(|| panic!("{:?}", answers[0]));
    assert_eq!(got.data(), x.1.data(), "x from the next candidate");
    assert!(
        matches!(answers[1], Ok(None)),
        "y, with no other candidate, is a clean miss: {:?}",
        answers[1]
    );
    let stats = client.source.stats();
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 1);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(liar.fetches.load(Ordering::Relaxed), 1);
    let zone = client.source.zone();
    assert!(zone.is_avoided(&liar.addr));
    assert!(!zone.is_avoided(&honest_addr));
    // Afterwards the liar is not asked: its chunks go to the next in rank, or to the origin.
    assert!(
        !client.source.forwards(&y.0),
        "y goes straight to the origin"
    );
    let answer = tokio::time::timeout(HUNG, client.source.get(&z.0))
        .await
        .expect("the read hung");
    let got = verified(&answer).unwrap_or_else(|| panic!("{answer:?}"));
    assert_eq!(got.data(), z.1.data());
    assert_eq!(liar.fetches.load(Ordering::Relaxed), 1);
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 1);
}

/// Reads `chunk` through `client`, whose home `silent` will not answer and whose next
/// candidate holds it, and checks the silence was stepped around in bounded time, counted
/// and remembered.
async fn stepped_around(
    client: &Host,
    silent: SocketAddr,
    next: SocketAddr,
    chunk: &VerifiedChunk,
    r: &ChunkRef,
) {
    let config = short_timeouts();
    let bound = (config.ack_timeout + config.idle_timeout) * 4 + Duration::from_secs(2);
    let started = Instant::now();
    let answer = tokio::time::timeout(HUNG, client.source.get(r))
        .await
        .expect("the read hung");
    let elapsed = started.elapsed();
    let got = verified(&answer).unwrap_or_else(|| panic!("{answer:?}"));
    assert_eq!(got.data(), chunk.data(), "from the next candidate");
    assert!(elapsed < bound, "{elapsed:?} waiting on a silent peer");
    let stats = client.source.stats();
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
    assert!(client.source.zone().is_avoided(&silent));
    assert!(!client.source.zone().is_avoided(&next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_is_stepped_around_in_bounded_time_and_avoided() {
    let honest = start_host(&[], Vec::new(), PeerConfig::default()).await;
    let honest_addr = honest.source.zone().me();
    let mute = start_mute().await;
    let client = start_host(&[], vec![honest_addr, mute.addr], short_timeouts()).await;
    until_members(&client, &[honest_addr, mute.addr]).await;
    let (r, v) = ranked(&client, &[mute.addr, honest_addr], "mute", 1).remove(0);
    honest.peer.memory.put(&v).await;
    stepped_around(&client, mute.addr, honest_addr, &v, &r).await;
    assert!(mute.fetches.load(Ordering::Relaxed) >= 1, "it was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_after_accepting_is_stepped_around_in_bounded_time_and_avoided() {
    let honest = start_host(&[], Vec::new(), PeerConfig::default()).await;
    let honest_addr = honest.source.zone().me();
    let stalled = start_scripted(Script::Stall).await;
    let client = start_host(&[], vec![honest_addr, stalled.addr], short_timeouts()).await;
    until_members(&client, &[honest_addr, stalled.addr]).await;
    let (r, v) = ranked(&client, &[stalled.addr, honest_addr], "stalled", 1).remove(0);
    stalled.hold(&v);
    honest.peer.memory.put(&v).await;
    stepped_around(&client, stalled.addr, honest_addr, &v, &r).await;
    assert_eq!(stalled.fetches.load(Ordering::Relaxed), 1, "it accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_progress_is_waited_for_past_the_idle_timeout() {
    let config = short_timeouts();
    let wait = config.idle_timeout * 3;
    let slow = start_scripted(Script::Slow {
        every: config.idle_timeout / 10,
        wait,
    })
    .await;
    let client = start_host(&[], vec![slow.addr], config).await;
    until_members(&client, &[slow.addr]).await;
    // Nobody to go to instead: a client that gave up would answer a miss.
    let (r, v) = ranked(&client, &[slow.addr, client.source.zone().me()], "slow", 1).remove(0);
    slow.hold(&v);
    let started = Instant::now();
    let answer = tokio::time::timeout(HUNG, client.source.get(&r))
        .await
        .expect("the read hung");
    let got = verified(&answer).unwrap_or_else(|| panic!("{answer:?}"));
    assert_eq!(got.data(), v.data());
    assert!(started.elapsed() >= wait, "the peer answered early");
    let stats = client.source.stats();
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 1);
    assert_eq!(slow.fetches.load(Ordering::Relaxed), 1);
    assert!(!client.source.zone().is_avoided(&slow.addr));
}
