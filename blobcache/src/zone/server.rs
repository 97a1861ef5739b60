//! The peer service: serves this host's chunks (and what it fetches for the zone as a home)
//! and its start-up traces to authenticated zone members.
//!
//! Memory is bounded per caller: a request may ask for a bounded number of bytes, a caller
//! may hold a bounded number of requests, all callers together a bounded number more, and
//! replies go out through a small queue that waits for the caller to read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_proto::brisk::v1::fetch_reply::Event;
use brisk_proto::brisk::v1::peer_server::Peer;
use brisk_proto::brisk::v1::{
    Accepted, FetchReply, FetchRequest, HasReply, HasRequest, Missing, PeerTraceReply,
    PeerTraceRequest, Piece, Progress,
};
use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use super::auth::{Verifier, ZoneKey, PROOF_HEADER};
use crate::chunk::{ChunkRef, VerifiedChunk};
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

pub struct PeerService {
    cache: Arc<Layered>,
    registry: Arc<RegistrySource>,
    verifier: Arc<Verifier>,
    traces: Option<Arc<dyn TraceLookup>>,
    limits: ServeLimits,
    streams: Arc<Semaphore>,
    /// Open requests by caller. A std mutex: held only to look up or insert.
    callers: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl PeerService {
    pub fn new(
        cache: Arc<Layered>,
        registry: Arc<RegistrySource>,
        key: ZoneKey,
        traces: Option<Arc<dyn TraceLookup>>,
        limits: ServeLimits,
    ) -> Self {
        Self {
            cache,
            registry,
            verifier: Arc::new(Verifier::new(key)),
            traces,
            streams: Arc::new(Semaphore::new(limits.streams)),
            limits,
            callers: Mutex::default(),
        }
    }

    /// Checks the caller's stamp; the proof for the reply on success.
    fn authorize<T>(&self, request: &Request<T>, method: &str) -> Result<String, Status> {
        match self.verifier.authorize(request, method) {
            Ok(proof) => Ok(proof),
            Err(why) => {
                metrics::counter!("brisk_zone_unauthenticated_total", "kind" => "request")
                    .increment(1);
                tracing::warn!(caller = ?request.remote_addr(), ?why, method, "zone request refused");
                Err(Status::unauthenticated("zone authentication required"))
            }
        }
    }

    fn caller_slot<T>(&self, request: &Request<T>) -> Result<OwnedSemaphorePermit, Status> {
        let ip = request
            .remote_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let slots = self
            .callers
            .lock()
            .expect("not poisoned")
            .entry(ip)
            .or_insert_with(|| Arc::new(Semaphore::new(self.limits.streams_per_caller)))
            .clone();
        slots
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many requests from this peer"))
    }

    fn chunk_refs(&self, request: &FetchRequest) -> Result<Vec<ChunkRef>, Status> {
        let mut total = 0u64;
        let mut refs = Vec::with_capacity(request.chunks.len());
        for l in &request.chunks {
            let bad = |what: &str| Status::invalid_argument(format!("chunk locator: {what}"));
            let digest: Digest = l.digest.parse().map_err(|_| bad("digest"))?;
            let blob: Digest = l.blob.parse().map_err(|_| bad("blob"))?;
            let end = l
                .compressed_offset
                .checked_add(l.compressed_length)
                .ok_or_else(|| bad("range"))?;
            total = total.saturating_add(l.uncompressed_length);
            if total > self.limits.request_bytes {
                return Err(Status::invalid_argument(format!(
                    "a request may ask for at most {} bytes",
                    self.limits.request_bytes
                )));
            }
            if !l.repository.is_empty() && self.registry.repository_of(&blob).is_none() {
                if let Ok(r) = l.repository.parse::<Reference>() {
                    self.registry.register_blob(blob, &r);
                }
            }
            refs.push(ChunkRef {
                digest,
                blob,
                compressed: l.compressed_offset..end,
                uncompressed_len: l.uncompressed_length,
            });
        }
        Ok(refs)
    }
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
        let refs = self.chunk_refs(request.get_ref())?;
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
