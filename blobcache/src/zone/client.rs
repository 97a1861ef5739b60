//! The peer level (L3) of the read path: asks each chunk's home in the zone, verifies what
//! comes back, and steps aside (a clean miss) whenever a peer cannot help in time.
//!
//! A peer proves it is alive by accepting a request at once and by sending progress while it
//! waits on its own sources. Only silence counts against it: a home that is waiting on a slow
//! registry is waited for, since going around it would fetch the same bytes twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_proto::brisk::v1::fetch_reply::Event;
use brisk_proto::brisk::v1::peer_client::PeerClient;
use brisk_proto::brisk::v1::{ChunkCodec, ChunkLocator, FetchRequest, PeerTraceRequest};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use super::auth::ZoneKey;
use super::limits::{self, Bound};
use super::Zone;
use crate::chunk::{ChunkRef, Codec, VerifiedChunk};
use crate::remote::RegistrySource;
use crate::source::{Answer, ChunkSource, Found, Priority};
use crate::Digest;

#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// A peer must accept a request (or connect) within this long.
    pub ack_timeout: Duration,
    /// Longest silence tolerated from a peer that accepted; it sends progress every second.
    pub idle_timeout: Duration,
    /// How long a peer that served wrong bytes is passed over.
    pub avoid_liar: Duration,
    /// How long a peer that did not answer is passed over (gossip usually decides sooner).
    pub avoid_silent: Duration,
    /// Uncompressed bytes asked of a peer in one request.
    pub request_bytes: u64,
    /// Requests in flight to one peer.
    pub streams_per_peer: usize,
    /// Candidates tried per chunk before the registry: the home, then the next in rank.
    pub candidates: usize,
    /// Mutual TLS to peers; plain HTTP/2 when unset.
    pub tls: Option<super::ZoneTls>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(5),
            avoid_liar: Duration::from_secs(60),
            avoid_silent: Duration::from_secs(5),
            request_bytes: 8 << 20,
            streams_per_peer: 8,
            candidates: 2,
            tls: None,
        }
    }
}

/// Counters for tests and status.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub requests: AtomicU64,
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    /// Answers dropped because a chunk in them failed verification (the rest of such an
    /// answer is not read: the peer has lost its turn).
    pub corrupt: AtomicU64,
    /// Requests a peer did not accept or finish.
    pub failures: AtomicU64,
}

pub struct PeerSource {
    zone: Arc<Zone>,
    key: ZoneKey,
    registry: Arc<RegistrySource>,
    config: PeerConfig,
    /// Connections and request slots by peer. A std mutex: held only to look up or insert.
    peers: Mutex<HashMap<SocketAddr, (Channel, Arc<Semaphore>)>>,
    stats: PeerStats,
}

/// How one request to a peer ended, chunk by chunk.
enum Outcome {
    Got(VerifiedChunk),
    /// The peer said it will not send it: go to the registry.
    Refused,
    /// Not received: try the next candidate.
    Lost,
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("peer {0} did not answer in time")]
    Silent(SocketAddr),
    #[error("peer {peer} failed: {status}")]
    Call {
        peer: SocketAddr,
        status: tonic::Status,
    },
    #[error("peer {0} could not prove it belongs to the zone")]
    NoProof(SocketAddr),
    #[error("peer {peer} broke the protocol: {what}")]
    Protocol { peer: SocketAddr, what: String },
}

impl PeerSource {
    pub fn new(
        zone: Arc<Zone>,
        key: ZoneKey,
        registry: Arc<RegistrySource>,
        config: PeerConfig,
    ) -> Self {
        Self {
            zone,
            key,
            registry,
            config,
            peers: Mutex::default(),
            stats: PeerStats::default(),
        }
    }

    pub fn zone(&self) -> &Arc<Zone> {
        &self.zone
    }

    pub fn stats(&self) -> &PeerStats {
        &self.stats
    }

    fn peer(&self, addr: SocketAddr) -> (PeerClient<Channel>, Arc<Semaphore>) {
        let mut peers = self.peers.lock().expect("not poisoned");
        let (channel, slots) = peers.entry(addr).or_insert_with(|| {
            let scheme = if self.config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                .expect("a socket address is a valid URI authority")
                .connect_timeout(self.config.ack_timeout)
                .tcp_nodelay(true);
            if let Some(tls) = &self.config.tls {
                // A bad certificate shows at connection time, as a failed request.
                endpoint = endpoint
                    .tls_config(tls.client(&addr))
                    .expect("TLS settings apply to an https endpoint");
            }
            let channel = endpoint.connect_lazy();
            (
                channel,
                Arc::new(Semaphore::new(self.config.streams_per_peer)),
            )
        });
        // Replies are bounded like requests: a member is not trusted to keep them small.
        let client = PeerClient::new(channel.clone())
            .max_decoding_message_size(limits::MAX_REPLY_MESSAGE)
            .max_encoding_message_size(limits::MAX_REQUEST_MESSAGE);
        (client, slots.clone())
    }

    /// The peers to ask for `key`, best first: those ranked above this host, up to the
    /// configured number. This host ranked first means it is the home: ask nobody.
    fn candidates(&self, key: &[u8]) -> Vec<SocketAddr> {
        let me = self.zone.me();
        self.zone
            .ranked(key)
            .into_iter()
            .take_while(|a| *a != me)
            .take(self.config.candidates)
            .collect()
    }

    fn locator(&self, chunk: &ChunkRef) -> ChunkLocator {
        let repository = self
            .registry
            .repository_of(&chunk.blob)
            .map(|r| format!("{}/{}", r.registry, r.repository))
            // Too long to send: the peer fetches the blob only if it knows where it lives.
            .filter(|r| r.len() <= limits::MAX_REPOSITORY_LEN)
            .unwrap_or_default();
        ChunkLocator {
            digest: chunk.digest.to_string(),
            blob: chunk.blob.to_string(),
            repository,
            compressed_offset: chunk.compressed.start,
            compressed_length: chunk.compressed.end - chunk.compressed.start,
            uncompressed_length: chunk.uncompressed_len,
            codec: match chunk.codec {
                Codec::Zstd => ChunkCodec::Zstd,
                Codec::GzipPrefix => ChunkCodec::GzipPrefix,
                Codec::ZstdPrefix => ChunkCodec::ZstdPrefix,
            } as i32,
        }
    }

    /// Whether a peer may be asked for `chunk` at all: its locator is within the bounds a
    /// server checks (a chunk that is not goes to the registry).
    fn askable(&self, chunk: &ChunkRef) -> bool {
        let compressed = chunk.compressed.end.saturating_sub(chunk.compressed.start);
        compressed <= limits::max_compressed(chunk.codec, chunk.uncompressed_len)
            && chunk.uncompressed_len <= self.config.request_bytes
    }

    /// A request for `method` at member `to` carrying a fresh stamp; the stamp, to check the
    /// answer's proof.
    fn stamped<T: prost::Message>(
        &self,
        message: T,
        method: &str,
        to: SocketAddr,
    ) -> (tonic::Request<T>, String) {
        let mut request = tonic::Request::new(message);
        let stamp = self.key.sign(&mut request, method, to);
        (request, stamp)
    }

    /// One request to one peer for `chunks`.
    async fn fetch(
        &self,
        peer: SocketAddr,
        chunks: &[&ChunkRef],
        prefetch: bool,
    ) -> (Vec<Outcome>, Option<PeerError>) {
        let mut out: Vec<Outcome> = chunks.iter().map(|_| Outcome::Lost).collect();
        let err = self
            .fetch_into(peer, chunks, prefetch, &mut out)
            .await
            .err();
        if let Some(err) = &err {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("brisk_peer_failures_total").increment(1);
            tracing::warn!(%peer, %err, "zone peer failed; trying elsewhere");
            let period = match err {
                PeerError::Protocol { .. } | PeerError::NoProof(_) => self.config.avoid_liar,
                _ => self.config.avoid_silent,
            };
            self.zone.avoid(peer, period);
        }
        (out, err)
    }

    async fn fetch_into(
        &self,
        peer: SocketAddr,
        chunks: &[&ChunkRef],
        prefetch: bool,
        out: &mut [Outcome],
    ) -> Result<(), PeerError> {
        let (mut client, slots) = self.peer(peer);
        let _slot = slots.acquire().await.expect("semaphore is never closed");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (request, stamp) = self.stamped(
            FetchRequest {
                chunks: chunks.iter().map(|c| self.locator(c)).collect(),
                prefetch,
            },
            "Fetch",
            peer,
        );
        let call = |status| PeerError::Call { peer, status };
        let silent = || PeerError::Silent(peer);
        let response = tokio::time::timeout(self.config.ack_timeout, client.fetch(request))
            .await
            .map_err(|_| silent())?
            .map_err(call)?;
        if !self.key.proven(&response, &stamp) {
            return Err(PeerError::NoProof(peer));
        }
        let mut stream = response.into_inner();
        let first = tokio::time::timeout(self.config.ack_timeout, stream.message())
            .await
            .map_err(|_| silent())?
            .map_err(call)?;
        let protocol = |what: String| PeerError::Protocol { peer, what };
        if !matches!(first.and_then(|m| m.event), Some(Event::Accepted(_))) {
            return Err(protocol("the first message was not an acceptance".into()));
        }
        let mut partial: Vec<Vec<u8>> = chunks.iter().map(|_| Vec::new()).collect();
        loop {
            let message = tokio::time::timeout(self.config.idle_timeout, stream.message())
                .await
                .map_err(|_| silent())?
                .map_err(call)?;
            let Some(event) = message.map(|m| m.event) else {
                return Ok(());
            };
            match event {
                Some(Event::Piece(p)) => {
                    let i = p.index as usize;
                    let (Some(chunk), Some(buf)) = (chunks.get(i), partial.get_mut(i)) else {
                        return Err(protocol(format!(
                            "a piece for chunk {i}, which was not asked for"
                        )));
                    };
                    if p.offset != buf.len() as u64
                        || buf.len() as u64 + p.data.len() as u64 > chunk.uncompressed_len
                    {
                        return Err(protocol(format!("a piece of chunk {i} out of place")));
                    }
                    buf.extend_from_slice(&p.data);
                    if p.last {
                        let data = bytes::Bytes::from(std::mem::take(buf));
                        match VerifiedChunk::check(chunk, data) {
                            Some(v) => {
                                self.stats.chunks.fetch_add(1, Ordering::Relaxed);
                                self.stats
                                    .bytes
                                    .fetch_add(chunk.uncompressed_len, Ordering::Relaxed);
                                out[i] = Outcome::Got(v);
                            }
                            None => {
                                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                                metrics::counter!("brisk_peer_corrupt_total").increment(1);
                                return Err(protocol(format!(
                                    "chunk {} failed verification",
                                    chunk.digest
                                )));
                            }
                        }
                    }
                }
                Some(Event::Missing(m)) => {
                    if let Some(o) = out.get_mut(m.index as usize) {
                        tracing::debug!(%peer, reason = m.reason, "peer will not send a chunk");
                        *o = Outcome::Refused;
                    }
                }
                Some(Event::Progress(_)) | Some(Event::Accepted(_)) | None => {}
            }
        }
    }

    /// The start-up trace a zone member holds for `image`, asking the members ranked first
    /// for it. The caller checks it (a trace for another image is refused on import).
    pub async fn trace(&self, image: &Digest) -> Option<Vec<u8>> {
        let me = self.zone.me();
        let asked: Vec<SocketAddr> = self
            .zone
            .ranked(image.to_string().as_bytes())
            .into_iter()
            .filter(|a| *a != me)
            .take(3)
            .collect();
        for peer in asked {
            let (mut client, _) = self.peer(peer);
            let (request, stamp) = self.stamped(
                PeerTraceRequest {
                    image: image.to_string(),
                },
                "GetTrace",
                peer,
            );
            let reply = tokio::time::timeout(self.config.idle_timeout, client.get_trace(request));
            match reply.await {
                Ok(Ok(r)) => {
                    if !self.key.proven(&r, &stamp) {
                        tracing::warn!(%peer, "trace from a peer without zone proof ignored");
                        continue;
                    }
                    let r = r.into_inner();
                    let size = r.trace.len() as u64;
                    let max = limits::MAX_TRACE_BYTES as u64;
                    if let Err(over) = limits::check(Bound::TraceBytes, size, max) {
                        tracing::warn!(%peer, %over, "trace from a peer ignored");
                        continue;
                    }
                    if r.found {
                        return Some(r.trace);
                    }
                }
                Ok(Err(status)) => tracing::debug!(%peer, %status, "trace lookup at a peer"),
                Err(_) => tracing::debug!(%peer, "trace lookup at a peer timed out"),
            }
        }
        None
    }
}

#[async_trait::async_trait]
impl ChunkSource for PeerSource {
    fn name(&self) -> &'static str {
        "peer"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        let answers = self
            .fetch_many(chunks, priority == Priority::Prefetch)
            .await;
        for (i, answer) in answers.into_iter().enumerate() {
            each(i, answer);
        }
    }

    fn forwards(&self, chunk: &ChunkRef) -> bool {
        self.askable(chunk) && !self.candidates(chunk.digest.as_bytes()).is_empty()
    }
}

impl PeerSource {
    async fn fetch_many(&self, chunks: &[ChunkRef], prefetch: bool) -> Vec<Answer> {
        let mut answers: Vec<Answer> = chunks.iter().map(|_| Ok(None)).collect();
        let candidates: Vec<Vec<SocketAddr>> = chunks
            .iter()
            .map(|c| match self.askable(c) {
                true => self.candidates(c.digest.as_bytes()),
                false => Vec::new(),
            })
            .collect();
        let mut pending: Vec<usize> = (0..chunks.len()).collect();
        for round in 0..self.config.candidates {
            // Requests by peer, each within the size and count bounds.
            let mut requests: Vec<(SocketAddr, Vec<usize>, u64)> = Vec::new();
            for &i in &pending {
                let Some(&peer) = candidates[i].get(round) else {
                    continue;
                };
                let size = chunks[i].uncompressed_len;
                match requests.iter_mut().find(|(p, idx, b)| {
                    *p == peer
                        && b + size <= self.config.request_bytes
                        && idx.len() < limits::MAX_FETCH_CHUNKS
                }) {
                    Some((_, idx, bytes)) => {
                        idx.push(i);
                        *bytes += size;
                    }
                    None => requests.push((peer, vec![i], size)),
                }
            }
            if requests.is_empty() {
                break;
            }
            let results =
                futures::future::join_all(requests.into_iter().map(|(peer, idx, _)| async move {
                    let refs: Vec<&ChunkRef> = idx.iter().map(|&i| &chunks[i]).collect();
                    let (outcomes, _) = self.fetch(peer, &refs, prefetch).await;
                    (idx, outcomes)
                }))
                .await;
            let mut lost = Vec::new();
            for (idx, outcomes) in results {
                for (i, outcome) in idx.into_iter().zip(outcomes) {
                    match outcome {
                        Outcome::Got(v) => answers[i] = Ok(Some(Found::Verified(v))),
                        Outcome::Refused => {}
                        Outcome::Lost => lost.push(i),
                    }
                }
            }
            pending = lost;
        }
        answers
    }
}
