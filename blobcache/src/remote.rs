//! L4: chunks from the registry, by HTTP range reads of their compressed spans.
//!
//! Neighbouring chunks asked for together (prefetch, sequential reads) are coalesced into one
//! range request up to a size limit, and requests per registry are bounded. Bytes are only
//! decompressed here; the read path verifies them.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{watch, Notify, Semaphore};

use crate::chunk::ChunkRef;
use crate::layered::Priority;
use crate::reference::Reference;
use crate::registry::RegistryClient;
use crate::source::{Answer, ChunkSource, Found, SourceError};
use crate::Digest;

#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Largest span fetched by one range request.
    pub coalesce_bytes: u64,
    /// Neighbours this far apart are still fetched together (the gap is read and dropped).
    pub max_gap: u64,
    /// Range requests in flight per registry host.
    pub concurrency: usize,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            coalesce_bytes: 16 * 1024 * 1024,
            max_gap: 64 * 1024,
            concurrency: 8,
        }
    }
}

/// Counters the registry level keeps beyond the read path's per-level ones.
#[derive(Debug, Default)]
pub struct RemoteStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct RegistrySource {
    client: Arc<RegistryClient>,
    config: RemoteConfig,
    /// Which repository serves each blob; the snapshotter registers layers as it mounts them.
    /// A std lock: held only to clone a reference out.
    blobs: RwLock<HashMap<Digest, Reference>>,
    /// One semaphore per registry host, created on first use.
    limits: RwLock<HashMap<String, Arc<Semaphore>>>,
    /// Blob ranges fetched ahead of their TOC (see `preload`), by blob. A std lock: held only
    /// to look up, insert or remove.
    preloads: Mutex<HashMap<Digest, Vec<Arc<Preload>>>>,
    /// Chunks handed out from a preload, with their blob: if one fails verification, every
    /// preload of that blob is dropped and its chunks are fetched afresh.
    preload_served: Mutex<HashMap<Digest, Digest>>,
    stats: RemoteStats,
}

/// A blob range fetched before anyone asked for its chunks; chunk fetches inside it wait for
/// its bytes instead of making a request of their own.
struct Preload {
    range: Range<u64>,
    /// The bytes received so far, from `range.start`.
    bytes: Mutex<Vec<u8>>,
    /// How many bytes have arrived; `None` once the fetch has failed.
    arrived: watch::Sender<Option<u64>>,
}

impl Preload {
    /// Bytes still to arrive (none once the fetch failed).
    fn remaining(&self) -> u64 {
        let len = self.range.end - self.range.start;
        self.arrived.borrow().map_or(0, |n| len.saturating_sub(n))
    }

    /// The compressed bytes of `chunk` once they are in, or `None` if the fetch failed.
    async fn take(&self, chunk: &ChunkRef) -> Option<Vec<u8>> {
        let lo = (chunk.compressed.start - self.range.start) as usize;
        let hi = (chunk.compressed.end - self.range.start) as usize;
        let mut arrived = self.arrived.subscribe();
        loop {
            // Copied out, so the watch's lock is not held while `bytes` is locked: `fill`
            // takes them the other way round.
            let now = *arrived.borrow_and_update();
            match now {
                None => return None,
                Some(n) if n as usize >= hi => {
                    return Some(self.bytes.lock().expect("not poisoned")[lo..hi].to_vec())
                }
                Some(_) => {}
            }
            arrived.changed().await.ok()?;
        }
    }
}

/// How long preloaded bytes are kept after their fetch ends, for the chunk fetches to come.
const PRELOAD_KEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes of preloads still on their way before the next span starts (as for prefetch).
const PRELOAD_WINDOW: u64 = 1 << 20;

/// Bytes one blob's preloads may span at most.
const PRELOAD_MAX_BYTES: u64 = 64 << 20;

impl RegistrySource {
    pub fn new(client: Arc<RegistryClient>, config: RemoteConfig) -> Self {
        Self {
            client,
            config,
            blobs: RwLock::default(),
            limits: RwLock::default(),
            preloads: Mutex::default(),
            preload_served: Mutex::default(),
            stats: RemoteStats::default(),
        }
    }

    /// Records that `blob` can be fetched from the repository of `reference`.
    pub fn register_blob(&self, blob: Digest, reference: &Reference) {
        let r = Reference {
            tag: None,
            digest: None,
            ..reference.clone()
        };
        self.blobs.write().expect("not poisoned").insert(blob, r);
    }

    /// The repository registered for `blob`, if any.
    pub fn repository_of(&self, blob: &Digest) -> Option<Reference> {
        self.blobs.read().expect("not poisoned").get(blob).cloned()
    }

    pub fn stats(&self) -> &RemoteStats {
        &self.stats
    }

    /// Starts fetching `spans` of `blob` now, in order, two at a time, before any chunk in them
    /// is asked for: a layer's start-up chunks can be on the way while its TOC is still being
    /// fetched. Nothing is verified here; chunk fetches that fall inside a span take their bytes
    /// from it, and the read path checks them like any other. Kept for a minute after arriving.
    pub fn preload(self: &Arc<Self>, blob: Digest, reference: &Reference, spans: Vec<Range<u64>>) {
        let mut total = 0;
        let spans: Vec<Arc<Preload>> = spans
            .into_iter()
            .filter(|r| r.end > r.start)
            .take_while(|r| {
                total += r.end - r.start;
                total <= PRELOAD_MAX_BYTES
            })
            .map(|range| {
                Arc::new(Preload {
                    range,
                    bytes: Mutex::default(),
                    arrived: watch::channel(Some(0)).0,
                })
            })
            .collect();
        if spans.is_empty() {
            return;
        }
        self.register_blob(blob, reference);
        self.preloads
            .lock()
            .expect("not poisoned")
            .entry(blob)
            .or_default()
            .extend(spans.iter().cloned());
        let this = self.clone();
        let reference = reference.clone();
        tokio::spawn(async move {
            // Like prefetch: the next span starts once less than a window of the ones on the
            // way is still to arrive, so the link stays busy and the front arrives first.
            let progressed = Notify::new();
            let mut pending = futures::stream::FuturesUnordered::new();
            let mut queue = spans.iter().cloned();
            let mut started: Vec<Arc<Preload>> = Vec::new();
            loop {
                let remaining: u64 = started.iter().map(|p| p.remaining()).sum();
                if pending.is_empty() || remaining < PRELOAD_WINDOW {
                    if let Some(p) = queue.next() {
                        started.push(p.clone());
                        pending.push(this.fill(&reference, &blob, p, &progressed));
                        continue;
                    }
                }
                if pending.is_empty() {
                    break;
                }
                tokio::select! {
                    _ = pending.next() => {}
                    _ = progressed.notified() => {}
                }
            }
            tokio::time::sleep(PRELOAD_KEEP).await;
            let mut preloads = this.preloads.lock().expect("not poisoned");
            if let Some(held) = preloads.get_mut(&blob) {
                held.retain(|p| !spans.iter().any(|s| Arc::ptr_eq(s, p)));
                if held.is_empty() {
                    preloads.remove(&blob);
                    this.preload_served
                        .lock()
                        .expect("not poisoned")
                        .retain(|_, b| *b != blob);
                }
            }
        });
    }

    async fn fill(
        &self,
        reference: &Reference,
        blob: &Digest,
        p: Arc<Preload>,
        progressed: &Notify,
    ) {
        let progress = |prefix: &[u8]| {
            let len = {
                let mut bytes = p.bytes.lock().expect("not poisoned");
                // A retried attempt starts again from its first byte: only what is new counts.
                if prefix.len() <= bytes.len() {
                    return;
                }
                let have = bytes.len();
                bytes.extend_from_slice(&prefix[have..]);
                bytes.len()
            };
            // Announced after `bytes` is unlocked: a reader holds the watch while it locks it.
            p.arrived.send_replace(Some(len as u64));
            progressed.notify_one();
        };
        let started = std::time::Instant::now();
        match self
            .range(reference, blob, p.range.clone(), &progress)
            .await
        {
            Ok(span) => {
                progress(&span);
                tracing::debug!(%blob, start = p.range.start, bytes = span.len(), ms = started.elapsed().as_millis() as u64, "preload span arrived");
            }
            Err(err) => {
                tracing::debug!(%blob, err = %crate::error::chain(&err), "preload failed; chunks will be fetched on their own");
                p.arrived.send_replace(None);
                progressed.notify_one();
            }
        }
    }

    /// One range read of `blob`, within the registry's request limit and counted.
    async fn range(
        &self,
        reference: &Reference,
        blob: &Digest,
        range: Range<u64>,
        progress: &(dyn Fn(&[u8]) + Send + Sync),
    ) -> crate::Result<Bytes> {
        let limit = self.limit(&reference.registry);
        let _permit = limit.acquire().await.expect("semaphore is never closed");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let span = self
            .client
            .get_blob_range_streamed(reference, blob, range, progress)
            .await?;
        self.stats
            .bytes
            .fetch_add(span.len() as u64, Ordering::Relaxed);
        Ok(span)
    }

    /// Drops every preload of `blob` (its bytes proved wrong once).
    fn drop_preloads(&self, blob: &Digest) {
        if self
            .preloads
            .lock()
            .expect("not poisoned")
            .remove(blob)
            .is_some()
        {
            tracing::warn!(%blob, "bytes fetched ahead of the TOC were wrong; dropped");
        }
    }

    /// The preload that holds all of `chunk`, if any.
    fn preload_for(&self, chunk: &ChunkRef) -> Option<Arc<Preload>> {
        let preloads = self.preloads.lock().expect("not poisoned");
        preloads
            .get(&chunk.blob)?
            .iter()
            .find(|p| {
                p.range.start <= chunk.compressed.start && chunk.compressed.end <= p.range.end
            })
            .cloned()
    }

    /// Fetches the chunks at `indexes` of `chunks` with coalesced range requests.
    async fn fetch_indexes(
        &self,
        chunks: &[ChunkRef],
        indexes: &[usize],
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        let picked: Vec<ChunkRef> = indexes.iter().map(|&i| chunks[i].clone()).collect();
        let spans = plan_spans(&picked, &self.config);
        let fetches = spans.iter().filter_map(|span| {
            let blob = picked[span[0]].blob;
            let reference = self.repository_of(&blob)?;
            let refs: Vec<&ChunkRef> = span.iter().map(|&k| &picked[k]).collect();
            Some(async move {
                self.fetch_span(&reference, &blob, &refs, &|k, answer| {
                    each(indexes[span[k]], answer)
                })
                .await
            })
        });
        futures::future::join_all(fetches).await;
        // A chunk of a blob no repository was registered for is a clean miss.
        for span in &spans {
            if self.repository_of(&picked[span[0]].blob).is_none() {
                for &k in span {
                    each(indexes[k], Ok(None));
                }
            }
        }
    }

    fn limit(&self, registry: &str) -> Arc<Semaphore> {
        if let Some(s) = self.limits.read().expect("not poisoned").get(registry) {
            return s.clone();
        }
        let mut limits = self.limits.write().expect("not poisoned");
        limits
            .entry(registry.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.concurrency)))
            .clone()
    }

    /// Fetches one coalesced span and cuts it into the chunks it holds, handing each chunk
    /// (by its index in `chunks`) to `each` as soon as its last byte has arrived.
    async fn fetch_span(
        &self,
        reference: &Reference,
        blob: &Digest,
        chunks: &[&ChunkRef],
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        let start = chunks.first().map_or(0, |c| c.compressed.start);
        let end = chunks.last().map_or(0, |c| c.compressed.end);
        // Chunks handed over so far; a retry restarts the prefix but not the count.
        let next = AtomicUsize::new(0);
        let cut = |prefix: &[u8]| loop {
            let k = next.load(Ordering::SeqCst);
            let Some(c) = chunks.get(k) else { break };
            let hi = (c.compressed.end - start) as usize;
            if hi > prefix.len() {
                break;
            }
            let lo = (c.compressed.start - start) as usize;
            let answer = zstd::bulk::decompress(&prefix[lo..hi], c.uncompressed_len as usize)
                .map(|d| Some(Found::Bytes(Bytes::from(d))))
                .map_err(SourceError::unavailable);
            next.store(k + 1, Ordering::SeqCst);
            each(k, answer);
        };
        match self.range(reference, blob, start..end, &cut).await {
            Ok(span) => cut(&span),
            Err(err) => {
                let err = Arc::new(err);
                for k in next.load(Ordering::SeqCst)..chunks.len() {
                    each(k, Err(SourceError::unavailable(SharedError(err.clone()))));
                }
            }
        }
    }
}

/// Groups request indexes into spans: same blob, ascending, gaps and total size bounded.
fn plan_spans(chunks: &[ChunkRef], config: &RemoteConfig) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by_key(|&i| (chunks[i].blob, chunks[i].compressed.start));
    let mut spans: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let c = &chunks[i];
        if let Some(span) = spans.last_mut() {
            let first = &chunks[span[0]];
            let last = &chunks[*span.last().expect("spans are never empty")];
            let joins = last.blob == c.blob
                && c.compressed.start >= last.compressed.end
                && c.compressed.start - last.compressed.end <= config.max_gap
                && c.compressed.end - first.compressed.start <= config.coalesce_bytes;
            if joins {
                span.push(i);
                continue;
            }
        }
        spans.push(vec![i]);
    }
    spans
}

#[derive(Debug)]
struct SharedError(Arc<crate::Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

#[async_trait::async_trait]
impl ChunkSource for RegistrySource {
    fn name(&self) -> &'static str {
        "registry"
    }

    async fn get(&self, chunk: &ChunkRef) -> Answer {
        crate::source::get_one(self, chunk).await
    }

    async fn discard(&self, digest: &Digest) {
        let blob = self
            .preload_served
            .lock()
            .expect("not poisoned")
            .remove(digest);
        if let Some(blob) = blob {
            self.drop_preloads(&blob);
        }
    }

    async fn get_many(&self, chunks: &[ChunkRef]) -> Vec<Answer> {
        let answers: Mutex<Vec<Answer>> = Mutex::new(chunks.iter().map(|_| Ok(None)).collect());
        self.get_many_each(chunks, Priority::OnDemand, &|i, answer| {
            answers.lock().expect("not poisoned")[i] = answer;
        })
        .await;
        answers.into_inner().expect("not poisoned")
    }

    async fn get_many_each(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        let (preloaded, rest): (Vec<_>, Vec<_>) = (0..chunks.len())
            .map(|i| (i, self.preload_for(&chunks[i])))
            .partition(|(_, p)| p.is_some());
        let rest: Vec<usize> = rest.into_iter().map(|(i, _)| i).collect();
        let from_preloads = async {
            let taken = preloaded.into_iter().map(|(i, p)| async move {
                let p = p.expect("partitioned on it");
                let c = &chunks[i];
                let decoded = p.take(c).await.and_then(|bytes| {
                    zstd::bulk::decompress(&bytes, c.uncompressed_len as usize).ok()
                });
                match decoded {
                    Some(data) => {
                        self.preload_served
                            .lock()
                            .expect("not poisoned")
                            .insert(c.digest, c.blob);
                        each(i, Ok(Some(Found::Bytes(Bytes::from(data)))));
                        None
                    }
                    None => {
                        self.drop_preloads(&c.blob);
                        Some(i)
                    }
                }
            });
            let failed: Vec<usize> = futures::future::join_all(taken)
                .await
                .into_iter()
                .flatten()
                .collect();
            // A preload that failed leaves its chunks to ordinary requests.
            self.fetch_indexes(chunks, &failed, each).await;
        };
        futures::join!(from_preloads, self.fetch_indexes(chunks, &rest, each));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(blob: &[u8], range: std::ops::Range<u64>) -> ChunkRef {
        ChunkRef {
            digest: Digest::sha256(&range.start.to_le_bytes()),
            blob: Digest::sha256(blob),
            compressed: range,
            uncompressed_len: 1,
        }
    }

    #[test]
    fn adjacent_chunks_of_one_blob_coalesce_up_to_the_limit() {
        let config = RemoteConfig {
            coalesce_bytes: 300,
            max_gap: 10,
            concurrency: 1,
        };
        let chunks = vec![
            chunk(b"a", 100..200),
            chunk(b"a", 0..100),
            chunk(b"b", 0..50),
            chunk(b"a", 205..290),
            chunk(b"a", 290..400), // would make the span 400 bytes: starts a new one
            chunk(b"a", 1000..1100), // too far from its neighbour
        ];
        let mut spans = plan_spans(&chunks, &config);
        spans.sort();
        let mut expected = vec![vec![1, 0, 3], vec![2], vec![4], vec![5]];
        expected.sort();
        assert_eq!(spans, expected);
    }
}
