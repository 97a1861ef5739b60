//! The peer service: serves this host's chunks (and what it fetches for the zone as a home)
//! and its start-up traces to authenticated zone members.
//!
//! Memory is bounded per caller: a request may ask for a bounded number of chunks and bytes
//! (`zone::limits`, checked before anything is looked up or fetched), a caller may hold a
//! bounded number of requests, all callers together a bounded number more, and replies go
//! out through a small queue that waits for the caller to read. Every refusal is logged
//! through a rate limit. What reaches this service before a stamp is checked (connections,
//! streams, message sizes) is bounded in `zone::listen`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_proto::brisk::v1::fetch_reply::Event;
use brisk_proto::brisk::v1::peer_server::Peer;
use brisk_proto::brisk::v1::{
    Accepted, ChunkCodec, FetchReply, FetchRequest, HasReply, HasRequest, Missing, PeerTraceReply,
    PeerTraceRequest, Piece, Progress,
};
use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use super::auth::{Verifier, ZoneKey, PROOF_HEADER};
use super::limits::{self, Bound, OverBound};
use super::refusals::RefusalLog;
use crate::chunk::{ChunkRef, Codec, VerifiedChunk};
use crate::layered::{Layered, Priority};
use crate::reference::Reference;
use crate::remote::RegistrySource;
use crate::Digest;

/// Traces this host holds, by image manifest digest, as exported documents.
pub trait TraceLookup: Send + Sync {
    fn trace(&self, image: &Digest) -> Option<Vec<u8>>;
}

#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Requests served at once, all callers together; more wait their turn.
    pub streams: usize,
    /// Requests one caller (by address) may have open; more are refused.
    pub streams_per_caller: usize,
    /// Uncompressed bytes one request may ask for.
    pub request_bytes: u64,
    /// Bytes per reply message.
    pub piece_bytes: usize,
    /// Reply messages queued per request before the sender waits for the caller.
    pub queue: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            streams: 32,
            streams_per_caller: 16,
            request_bytes: 8 << 20,
            piece_bytes: 256 << 10,
            queue: 4,
        }
    }
}

const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Callers remembered with their request counts before idle ones are forgotten.
const CALLERS: usize = 1024;

pub struct PeerService {
    cache: Arc<Layered>,
    registry: Arc<RegistrySource>,
    verifier: Arc<Verifier>,
    traces: Option<Arc<dyn TraceLookup>>,
    limits: ServeLimits,
    streams: Arc<Semaphore>,
    /// Open requests by caller. A std mutex: held only to look up or insert.
    callers: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    refusals: RefusalLog,
}

impl PeerService {
    /// The service of the member whose identity (peer address, `Zone::me()`) is `me`: only
    /// stamps made for `me` are accepted.
    pub fn new(
        cache: Arc<Layered>,
        registry: Arc<RegistrySource>,
        key: ZoneKey,
        me: SocketAddr,
        traces: Option<Arc<dyn TraceLookup>>,
        limits: ServeLimits,
    ) -> Self {
        Self {
            cache,
            registry,
            verifier: Arc::new(Verifier::new(key, me)),
            traces,
            streams: Arc::new(Semaphore::new(limits.streams)),
            limits,
            callers: Mutex::default(),
            refusals: RefusalLog::default(),
        }
    }

    /// Checks the caller's stamp; the proof for the reply on success.
    fn authorize<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<String, Status> {
        self.verifier.authorize(request, method).map_err(|why| {
            let reason = why.reason();
            let why = format!("{method}: {why}");
            self.refusals.refuse(source(request), reason, &why);
            Status::unauthenticated("zone authentication required")
        })
    }

    /// Logs (rate-limited) and returns a request refused for being over a bound.
    fn over<T>(&self, request: &Request<T>, over: OverBound) -> Status {
        self.refusals.refuse(source(request), "over_limit", &over);
        over.into()
    }

    fn caller_slot<T>(&self, request: &Request<T>) -> Result<OwnedSemaphorePermit, Status> {
        let ip = source(request).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let per_caller = self.limits.streams_per_caller;
        let slots = {
            let mut callers = self.callers.lock().expect("not poisoned");
            if callers.len() >= CALLERS && !callers.contains_key(&ip) {
                // Forget callers with nothing open, so the table does not grow forever.
                callers.retain(|_, s| s.available_permits() < per_caller);
            }
            callers
                .entry(ip)
                .or_insert_with(|| Arc::new(Semaphore::new(per_caller)))
                .clone()
        };
        slots.try_acquire_owned().map_err(|_| {
            let over = OverBound {
                bound: Bound::CallerRequests,
                got: per_caller as u64 + 1,
                max: per_caller as u64,
            };
            self.over(request, over)
        })
    }

    /// The chunks `request` asks for, once every size and count in it is within bounds.
    fn chunk_refs(&self, request: &FetchRequest) -> Result<Vec<ChunkRef>, Status> {
        check_fetch(request, self.limits.request_bytes)?;
        let mut refs = Vec::with_capacity(request.chunks.len());
        for l in &request.chunks {
            let bad = |what: &str| Status::invalid_argument(format!("chunk locator: {what}"));
            let digest: Digest = l.digest.parse().map_err(|_| bad("digest"))?;
            let blob: Digest = l.blob.parse().map_err(|_| bad("blob"))?;
            let end = l
                .compressed_offset
                .checked_add(l.compressed_length)
                .ok_or_else(|| bad("range"))?;
            if !l.repository.is_empty() && self.registry.repository_of(&blob).is_none() {
                if let Ok(r) = l.repository.parse::<Reference>() {
                    self.registry.register_blob(blob, &r);
                }
            }
            let codec = match ChunkCodec::try_from(l.codec) {
                Ok(ChunkCodec::Zstd) => Codec::Zstd,
                Ok(ChunkCodec::GzipPrefix) => Codec::GzipPrefix,
                Ok(ChunkCodec::ZstdPrefix) => Codec::ZstdPrefix,
                Err(_) => return Err(bad("codec")),
            };
            refs.push(ChunkRef {
                codec,
                digest,
                blob,
                compressed: l.compressed_offset..end,
                uncompressed_len: l.uncompressed_length,
            });
        }
        Ok(refs)
    }
}

/// Checks a fetch's counts and sizes against [`limits`], before any of it is used: the
/// caller (`PeerSource`) applies the same checks before it asks.
fn check_fetch(request: &FetchRequest, request_bytes: u64) -> Result<(), OverBound> {
    let chunks = &request.chunks;
    limits::check(
        Bound::FetchChunks,
        chunks.len() as u64,
        limits::MAX_FETCH_CHUNKS as u64,
    )?;
    let mut total = 0u64;
    for l in chunks {
        limits::check(
            Bound::RepositoryLen,
            l.repository.len() as u64,
            limits::MAX_REPOSITORY_LEN as u64,
        )?;
        // An unknown codec is refused with the locator; here it is bounded as the loosest.
        let codec = match ChunkCodec::try_from(l.codec) {
            Ok(ChunkCodec::Zstd) => Codec::Zstd,
            _ => Codec::GzipPrefix,
        };
        limits::check(
            Bound::CompressedBytes,
            l.compressed_length,
            limits::max_compressed(codec, l.uncompressed_length),
        )?;
        total = total.saturating_add(l.uncompressed_length);
    }
    limits::check(Bound::RequestBytes, total, request_bytes)
}

fn source<T>(request: &Request<T>) -> Option<IpAddr> {
    request.remote_addr().map(|a| a.ip())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<FetchReply, Status>> + Send>>;

fn reply(event: Event) -> Result<FetchReply, Status> {
    Ok(FetchReply { event: Some(event) })
}

fn with_proof<T>(message: T, proof: &str) -> Response<T> {
    let mut response = Response::new(message);
    response
        .metadata_mut()
        .insert(PROOF_HEADER, proof.parse().expect("a proof is hex"));
    response
}

#[tonic::async_trait]
impl Peer for PeerService {
    type FetchStream = ReplyStream;

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let proof = self.authorize(&request, "Fetch")?;
        let caller = self.caller_slot(&request)?;
        let refs = match self.chunk_refs(request.get_ref()) {
            Ok(refs) => refs,
            Err(status) => {
                let why = format!("Fetch: {}", status.message());
                self.refusals.refuse(source(&request), "bad_request", &why);
                return Err(status);
            }
        };
        let priority = if request.get_ref().prefetch {
            Priority::Prefetch
        } else {
            Priority::OnDemand
        };
        let (tx, rx) = mpsc::channel(self.limits.queue);
        let cache = self.cache.clone();
        let streams = self.streams.clone();
        let piece = self.limits.piece_bytes;
        tokio::spawn(async move {
            let _caller = caller;
            if tx.send(reply(Event::Accepted(Accepted {}))).await.is_err() {
                return;
            }
            let work = async {
                let _slot = streams.acquire().await.expect("semaphore is never closed");
                cache.read_for_peer(&refs, priority).await
            };
            tokio::pin!(work);
            let mut progress = tokio::time::interval(PROGRESS_EVERY);
            progress.tick().await;
            let found = loop {
                tokio::select! {
                    found = &mut work => break found,
                    _ = progress.tick() => {
                        // Only to show the caller this peer is alive: skipped if the queue is full.
                        let _ = tx.try_send(reply(Event::Progress(Progress {})));
                    }
                    _ = tx.closed() => return,
                }
            };
            for (i, chunk) in found.into_iter().enumerate() {
                let sent = match chunk {
                    Some(c) => send_chunk(&tx, i as u32, &c, piece).await,
                    None => tx
                        .send(reply(Event::Missing(Missing {
                            index: i as u32,
                            reason: "not available here".into(),
                        })))
                        .await
                        .is_ok(),
                };
                if !sent {
                    return;
                }
            }
        });
        let stream = tokio_stream_from(rx);
        Ok(with_proof(Box::pin(stream) as ReplyStream, &proof))
    }

    async fn has(&self, request: Request<HasRequest>) -> Result<Response<HasReply>, Status> {
        let proof = self.authorize(&request, "Has")?;
        let digests = request.get_ref().digests.len() as u64;
        limits::check(Bound::HasDigests, digests, limits::MAX_HAS_DIGESTS as u64)
            .map_err(|over| self.over(&request, over))?;
        let mut present = Vec::with_capacity(request.get_ref().digests.len());
        for d in &request.get_ref().digests {
            present.push(match d.parse::<Digest>() {
                Ok(d) => self.cache.contains(&d).await,
                Err(_) => false,
            });
        }
        Ok(with_proof(HasReply { present }, &proof))
    }

    async fn get_trace(
        &self,
        request: Request<PeerTraceRequest>,
    ) -> Result<Response<PeerTraceReply>, Status> {
        let proof = self.authorize(&request, "GetTrace")?;
        let image: Digest = request
            .get_ref()
            .image
            .parse()
            .map_err(|_| Status::invalid_argument("image must be a manifest digest"))?;
        let trace = self.traces.as_ref().and_then(|t| t.trace(&image));
        // A trace too large to send is one this host does not offer; the caller gets it
        // from the registry.
        let trace = trace.filter(|t| {
            let fits = limits::check(
                Bound::TraceBytes,
                t.len() as u64,
                limits::MAX_TRACE_BYTES as u64,
            );
            if let Err(over) = &fits {
                tracing::warn!(%image, %over, "trace not offered to the zone");
            }
            fits.is_ok()
        });
        Ok(with_proof(
            PeerTraceReply {
                found: trace.is_some(),
                trace: trace.unwrap_or_default(),
            },
            &proof,
        ))
    }
}

/// Sends one chunk in pieces; false once the caller has gone.
async fn send_chunk(
    tx: &mpsc::Sender<Result<FetchReply, Status>>,
    index: u32,
    chunk: &VerifiedChunk,
    piece: usize,
) -> bool {
    let data = chunk.data();
    let mut offset = 0;
    loop {
        let end = (offset + piece).min(data.len());
        let message = reply(Event::Piece(Piece {
            index,
            offset: offset as u64,
            data: data.slice(offset..end),
            last: end == data.len(),
        }));
        if tx.send(message).await.is_err() {
            return false;
        }
        if end == data.len() {
            metrics::counter!("brisk_peer_served_bytes_total").increment(data.len() as u64);
            return true;
        }
        offset = end;
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
