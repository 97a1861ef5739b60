//! L4: chunks from the registry, by HTTP range reads of their compressed spans.
//!
//! Neighbouring chunks asked for together (prefetch, sequential reads) are coalesced into one
//! range request up to a size limit, and requests per registry are bounded. Each chunk is
//! decompressed and checked here as it arrives, so that a mirror that sends wrong bytes is
//! passed over like one that fails: the rest of the read goes to the next source, finally the
//! image's own registry, whose answer goes to the read path as it is (which counts and
//! retries it).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::chunk::{BadFrame, ChunkRef, VerifiedChunk};
use crate::reference::Reference;
use crate::registry::{RegistryClient, MAX_RANGE_BYTES};
use crate::source::{Answer, ChunkSource, Found, Priority, SourceError};
use crate::Digest;

#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Largest span fetched by one range request (at most `registry::MAX_RANGE_BYTES`).
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
    /// The repositories that named each blob, the one that last served it right first; the
    /// snapshotter registers layers as it mounts them. A list, not one entry: an image that
    /// merely names another image's blob must not redirect that image's reads to its own
    /// registry, so every repository is tried in turn (wrong bytes and failures fall through,
    /// `fetch_span`). A std lock: held only to clone references out.
    blobs: RwLock<HashMap<Digest, Vec<Reference>>>,
    /// One semaphore per registry host, created on first use.
    limits: RwLock<HashMap<String, Arc<Semaphore>>>,
    /// Blob ranges fetched ahead of their TOC (see `preload`). A std lock: held only to look
    /// up, insert or remove.
    preloads: Mutex<Preloads>,
    /// Mirror hosts that served bytes failing verification, until when they are passed over.
    /// A std lock: held only to look up or insert.
    shunned: Mutex<HashMap<String, Instant>>,
    stats: RemoteStats,
}

#[derive(Default)]
struct Preloads {
    by_blob: HashMap<Digest, Vec<Arc<Preload>>>,
    /// Bytes the live preloads may grow to, all blobs together; at most
    /// `PRELOADS_MAX_BYTES`. Held from `preload` until its task ends.
    bytes: u64,
}

/// A blob range fetched before anyone asked for its chunks; chunk fetches inside it wait for
/// its bytes instead of making a request of their own.
struct Preload {
    range: Range<u64>,
    /// The bytes received so far, from `range.start`.
    bytes: Mutex<Vec<u8>>,
    /// How many bytes have arrived; `None` once the fetch has failed or was dropped.
    arrived: watch::Sender<Option<u64>>,
    /// The host the bytes came from, to pass over if they prove wrong.
    served_by: Mutex<Option<Reference>>,
    /// Cancelled when the blob's preloads are dropped: the fetch stops and the bytes go.
    dropped: CancellationToken,
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

/// Repositories remembered per blob: images that name one blob are few, and an image that
/// names many blobs it does not hold only costs each its own failed request.
const MAX_REPOSITORIES_PER_BLOB: usize = 8;

/// How long preloaded bytes are kept after their fetch ends, for the chunk fetches to come.
const PRELOAD_KEEP: Duration = Duration::from_secs(60);

/// Bytes of preloads still on their way before the next span starts (as for prefetch).
const PRELOAD_WINDOW: u64 = 1 << 20;

/// Bytes one blob's preloads may span at most.
const PRELOAD_MAX_BYTES: u64 = 64 << 20;

/// Bytes all preloads together may span at most, as much as the daemon's default memory
/// cache holds (four blobs at their own limit). Preloaded bytes are held for a minute outside
/// every cache's accounting, so without it a burst of image starts (or annotations claiming
/// the most for every layer) would hold 64 MiB a layer. Spans past it are not preloaded:
/// their chunks are fetched once the TOC is in, as without the annotation.
const PRELOADS_MAX_BYTES: u64 = 256 << 20;

const _: () = assert!(PRELOAD_MAX_BYTES <= MAX_RANGE_BYTES);

/// How long a mirror that served wrong bytes is passed over (as a lying zone peer is).
const SHUN: Duration = Duration::from_secs(60);

impl RegistrySource {
    pub fn new(client: Arc<RegistryClient>, mut config: RemoteConfig) -> Self {
        config.coalesce_bytes = config.coalesce_bytes.min(MAX_RANGE_BYTES);
        Self {
            client,
            config,
            blobs: RwLock::default(),
            limits: RwLock::default(),
            preloads: Mutex::default(),
            shunned: Mutex::default(),
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
        let mut blobs = self.blobs.write().expect("not poisoned");
        let repos = blobs.entry(blob).or_default();
        if repos.contains(&r) {
            return;
        }
        // The first (the one that served it last) is kept; a newcomer takes the last place.
        if repos.len() >= MAX_REPOSITORIES_PER_BLOB {
            repos.pop();
        }
        repos.push(r);
    }

    /// The repository that serves `blob` first, if any.
    pub fn repository_of(&self, blob: &Digest) -> Option<Reference> {
        self.blobs
            .read()
            .expect("not poisoned")
            .get(blob)
            .and_then(|r| r.first().cloned())
    }

    /// Every repository registered for `blob`, in the order they are tried.
    pub fn repositories_of(&self, blob: &Digest) -> Vec<Reference> {
        self.blobs
            .read()
            .expect("not poisoned")
            .get(blob)
            .cloned()
            .unwrap_or_default()
    }

    /// `repo` served `blob` right: it is tried first from now on.
    fn promote(&self, blob: &Digest, repo: &Reference) {
        let mut blobs = self.blobs.write().expect("not poisoned");
        if let Some(repos) = blobs.get_mut(blob) {
            if let Some(i) = repos.iter().position(|r| r == repo) {
                let r = repos.remove(i);
                repos.insert(0, r);
            }
        }
    }

    pub fn stats(&self) -> &RemoteStats {
        &self.stats
    }

    /// Bytes the live preloads of all blobs may grow to (what `PRELOADS_MAX_BYTES` bounds).
    pub fn preload_bytes(&self) -> u64 {
        self.preloads.lock().expect("not poisoned").bytes
    }

    /// Starts fetching `spans` of `blob` now, in order, two at a time, before any chunk in them
    /// is asked for: a layer's start-up chunks can be on the way while its TOC is still being
    /// fetched. Chunk fetches that fall inside a span take their bytes from it and check them
    /// like any other. Kept for a minute after arriving. Spans past `PRELOAD_MAX_BYTES` for
    /// the blob, or `PRELOADS_MAX_BYTES` for all blobs, are left out.
    pub fn preload(self: &Arc<Self>, blob: Digest, reference: &Reference, spans: Vec<Range<u64>>) {
        let dropped = CancellationToken::new();
        let (spans, reserved) = {
            let mut preloads = self.preloads.lock().expect("not poisoned");
            let held: u64 = preloads
                .by_blob
                .get(&blob)
                .into_iter()
                .flatten()
                .map(|p| p.range.end - p.range.start)
                .sum();
            let room = PRELOAD_MAX_BYTES
                .saturating_sub(held)
                .min(PRELOADS_MAX_BYTES.saturating_sub(preloads.bytes));
            let mut total = 0;
            let spans: Vec<Arc<Preload>> = spans
                .into_iter()
                .filter(|r| r.end > r.start)
                .take(crate::toc::MAX_PREFETCH_SPANS)
                .take_while(|r| {
                    total += r.end - r.start;
                    total <= room
                })
                .map(|range| {
                    Arc::new(Preload {
                        range,
                        bytes: Mutex::default(),
                        arrived: watch::channel(Some(0)).0,
                        served_by: Mutex::default(),
                        dropped: dropped.clone(),
                    })
                })
                .collect();
            if spans.is_empty() {
                if total > 0 {
                    tracing::debug!(%blob, held, all = preloads.bytes, "preload limit reached; start-up chunks wait for the TOC");
                }
                return;
            }
            let reserved: u64 = spans.iter().map(|p| p.range.end - p.range.start).sum();
            preloads.bytes += reserved;
            preloads
                .by_blob
                .entry(blob)
                .or_default()
                .extend(spans.iter().cloned());
            (spans, reserved)
        };
        let this = self.clone();
        let reference = reference.clone();
        tokio::spawn(async move {
            // Removes the spans and gives their bytes back however the task ends.
            let _held = HeldPreloads {
                source: &this,
                blob,
                spans: &spans,
                bytes: reserved,
            };
            tokio::select! {
                _ = this.fill_all(&reference, &blob, &spans) => {}
                _ = dropped.cancelled() => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(PRELOAD_KEEP) => {}
                _ = dropped.cancelled() => {}
            }
        });
    }

    /// Fetches the spans of one `preload` call, keeping a window of bytes on the way.
    async fn fill_all(&self, reference: &Reference, blob: &Digest, spans: &[Arc<Preload>]) {
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
                    pending.push(self.fill(reference, blob, p, &progressed));
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
    }

    /// Fetches one preload span from the first source that answers (nothing can be checked
    /// yet: the TOC that has the digests is still on its way).
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
        let started = Instant::now();
        let mut failure = None;
        for source in self.sources(reference) {
            *p.served_by.lock().expect("not poisoned") = Some(source.clone());
            match self.range(&source, blob, p.range.clone(), &progress).await {
                Ok(span) => {
                    progress(&span);
                    tracing::debug!(%blob, start = p.range.start, bytes = span.len(), ms = started.elapsed().as_millis() as u64, "preload span arrived");
                    return;
                }
                Err(err) => failure = Some(err),
            }
        }
        if let Some(err) = failure {
            tracing::debug!(%blob, err = %crate::error::chain(&err), "preload failed; chunks will be fetched on their own");
        }
        p.arrived.send_replace(None);
        progressed.notify_one();
    }

    /// Where to read `reference`'s blobs, in order: its registry's mirrors, less those that
    /// lately served wrong bytes, then the registry itself (never passed over).
    fn sources(&self, reference: &Reference) -> Vec<Reference> {
        let mut sources = self.client.read_sources(reference);
        let registry = sources.pop().expect("the registry is always a source");
        let now = Instant::now();
        let mut shunned = self.shunned.lock().expect("not poisoned");
        shunned.retain(|_, until| *until > now);
        sources.retain(|s| !shunned.contains_key(&s.registry));
        sources.push(registry);
        sources
    }

    /// Passes `source` over for a while: it served bytes of `blob` that failed verification.
    /// The image's own registry is never passed over; the read path retries it.
    fn shun(&self, source: &Reference, reference: &Reference, blob: &Digest) {
        if source.registry == reference.registry {
            return;
        }
        tracing::warn!(mirror = %source.registry, %blob, "mirror served wrong bytes; passed over for a minute");
        self.shunned
            .lock()
            .expect("not poisoned")
            .insert(source.registry.clone(), Instant::now() + SHUN);
    }

    /// One range read of `blob` from `source`, within that host's request limit and counted.
    async fn range(
        &self,
        source: &Reference,
        blob: &Digest,
        range: Range<u64>,
        progress: &(dyn Fn(&[u8]) + Send + Sync),
    ) -> crate::Result<Bytes> {
        let limit = self.limit(&source.registry);
        let _permit = limit.acquire().await.expect("semaphore is never closed");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let span = self
            .client
            .get_blob_range_from(source, blob, range, progress)
            .await?;
        self.stats
            .bytes
            .fetch_add(span.len() as u64, Ordering::Relaxed);
        Ok(span)
    }

    /// Drops every preload of `blob` (its bytes proved wrong once): their fetches stop and
    /// their bytes go.
    fn drop_preloads(&self, blob: &Digest) {
        let dropped = self
            .preloads
            .lock()
            .expect("not poisoned")
            .by_blob
            .remove(blob);
        if let Some(dropped) = dropped {
            for p in &dropped {
                p.dropped.cancel();
                p.arrived.send_replace(None);
            }
            tracing::warn!(%blob, "bytes fetched ahead of the TOC were wrong; dropped");
        }
    }

    /// The preload that holds all of `chunk`, if any.
    fn preload_for(&self, chunk: &ChunkRef) -> Option<Arc<Preload>> {
        let preloads = self.preloads.lock().expect("not poisoned");
        preloads
            .by_blob
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
            let repos = self.repositories_of(&blob);
            if repos.is_empty() {
                return None;
            }
            let refs: Vec<&ChunkRef> = span.iter().map(|&k| &picked[k]).collect();
            Some(async move {
                self.fetch_span(&repos, &blob, &refs, &|k, answer| {
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
    /// (by its index in `chunks`) to `each` as soon as its last byte has arrived and checked.
    /// A source whose bytes fail the check is cut off and passed over, and the rest of the
    /// span is read from the next one; the last source's answers go to the read path as they
    /// are.
    async fn fetch_span(
        &self,
        repos: &[Reference],
        blob: &Digest,
        chunks: &[&ChunkRef],
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        let end = chunks.last().map_or(0, |c| c.compressed.end);
        // Chunks handed over so far; a retry or the next source starts after them.
        let next = AtomicUsize::new(0);
        // Every registered repository's sources (its mirrors, then its registry), in turn.
        let sources: Vec<(&Reference, Reference)> = repos
            .iter()
            .flat_map(|r| self.sources(r).into_iter().map(move |s| (r, s)))
            .collect();
        let mut failure = None;
        for (n, (reference, source)) in sources.iter().enumerate() {
            let reference = *reference;
            let Some(start) = chunks.get(next.load(Ordering::SeqCst)) else {
                return;
            };
            let start = start.compressed.start;
            let last = n + 1 == sources.len();
            let wrong = AtomicBool::new(false);
            let cut_off = Notify::new();
            let cut = |prefix: &[u8]| loop {
                if wrong.load(Ordering::SeqCst) {
                    break;
                }
                let k = next.load(Ordering::SeqCst);
                let Some(c) = chunks.get(k) else { break };
                let hi = (c.compressed.end - start) as usize;
                if hi > prefix.len() {
                    break;
                }
                let lo = (c.compressed.start - start) as usize;
                let answer = match check(c, &prefix[lo..hi]) {
                    Ok(verified) => Ok(Some(Found::Verified(verified))),
                    Err(answer) if last => answer,
                    Err(_) => {
                        wrong.store(true, Ordering::SeqCst);
                        cut_off.notify_one();
                        break;
                    }
                };
                next.store(k + 1, Ordering::SeqCst);
                each(k, answer);
            };
            let fetched = tokio::select! {
                fetched = self.range(source, blob, start..end, &cut) => Some(fetched),
                // The rest of a wrong answer is not worth waiting for.
                _ = cut_off.notified() => None,
            };
            match fetched {
                Some(Ok(span)) => cut(&span),
                Some(Err(err)) => {
                    if !last {
                        tracing::warn!(mirror = %source.registry, err = %crate::error::chain(&err), "mirror failed, trying the next source");
                    }
                    failure = Some(err);
                }
                None => {}
            }
            if wrong.load(Ordering::SeqCst) {
                self.shun(source, reference, blob);
                failure = None;
            } else if next.load(Ordering::SeqCst) == chunks.len() {
                if repos.len() > 1 {
                    self.promote(blob, reference);
                }
                return;
            }
        }
        let err = Arc::new(failure.unwrap_or(crate::Error::Cache(
            crate::layered::CacheError::NoRightBytes {
                digest: chunks[next.load(Ordering::SeqCst)].digest,
            },
        )));
        for k in next.load(Ordering::SeqCst)..chunks.len() {
            each(k, Err(SourceError::unavailable(err.clone())));
        }
    }
}

/// Gives one `preload` call's bytes back, and takes its spans out of the table if they are
/// still there, when its task ends (however it ends).
struct HeldPreloads<'a> {
    source: &'a RegistrySource,
    blob: Digest,
    spans: &'a [Arc<Preload>],
    bytes: u64,
}

impl Drop for HeldPreloads<'_> {
    fn drop(&mut self) {
        for p in self.spans {
            // Readers still waiting (a cancelled fetch) go to ordinary requests.
            p.arrived.send_if_modified(|arrived| {
                let done = p.range.end - p.range.start;
                match arrived {
                    Some(n) if *n < done => {
                        *arrived = None;
                        true
                    }
                    _ => false,
                }
            });
        }
        let mut preloads = self.source.preloads.lock().expect("not poisoned");
        preloads.bytes -= self.bytes;
        if let Some(held) = preloads.by_blob.get_mut(&self.blob) {
            held.retain(|p| !self.spans.iter().any(|s| Arc::ptr_eq(s, p)));
            if held.is_empty() {
                preloads.by_blob.remove(&self.blob);
            }
        }
    }
}

/// Decompresses one chunk and checks it against its reference. `Err` holds what the read
/// path gets if these are the last bytes to be had: the wrong bytes (for it to count and
/// discard) or why they do not decompress.
fn check(chunk: &ChunkRef, compressed: &[u8]) -> Result<VerifiedChunk, Answer> {
    // The reference was checked on the way in (`fetch`), so the buffer is bounded.
    VerifiedChunk::decode(chunk, compressed).map_err(|bad| match bad {
        BadFrame::Undecodable(e) => Err(SourceError::unavailable(e)),
        BadFrame::Mismatch(data) => Ok(Some(Found::Bytes(data))),
    })
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

#[async_trait::async_trait]
impl ChunkSource for RegistrySource {
    fn name(&self) -> &'static str {
        "registry"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        // A reference outside the limits never sizes a request or a buffer.
        let mut valid = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            match c.check() {
                Ok(()) => valid.push(i),
                Err(err) => each(i, Err(SourceError::unavailable(err))),
            }
        }
        let (preloaded, rest): (Vec<_>, Vec<_>) = valid
            .into_iter()
            .map(|i| (i, self.preload_for(&chunks[i])))
            .partition(|(_, p)| p.is_some());
        let rest: Vec<usize> = rest.into_iter().map(|(i, _)| i).collect();
        let from_preloads = async {
            let taken = preloaded.into_iter().map(|(i, p)| async move {
                let p = p.expect("partitioned on it");
                let c = &chunks[i];
                match p.take(c).await.map(|bytes| check(c, &bytes)) {
                    Some(Ok(verified)) => {
                        each(i, Ok(Some(Found::Verified(verified))));
                        None
                    }
                    Some(Err(_)) => {
                        let served_by = p.served_by.lock().expect("not poisoned").clone();
                        if let (Some(source), Some(reference)) =
                            (served_by, self.repository_of(&c.blob))
                        {
                            self.shun(&source, &reference, &c.blob);
                        }
                        self.drop_preloads(&c.blob);
                        Some(i)
                    }
                    None => Some(i),
                }
            });
            let failed: Vec<usize> = futures::future::join_all(taken)
                .await
                .into_iter()
                .flatten()
                .collect();
            // A preload that failed, or held wrong bytes, leaves its chunks to ordinary
            // requests.
            self.fetch_indexes(chunks, &failed, each).await;
        };
        futures::join!(from_preloads, self.fetch_indexes(chunks, &rest, each));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, respond, Reply};

    fn chunk(blob: &[u8], range: std::ops::Range<u64>) -> ChunkRef {
        ChunkRef {
            codec: Default::default(),
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

    /// A blob of two zstd chunks, their references, and their decoded bytes.
    fn two_chunk_blob() -> (Vec<u8>, Vec<ChunkRef>, Vec<Vec<u8>>) {
        let plain: Vec<Vec<u8>> = (0..2u32)
            .map(|k| {
                (0..20_000u32)
                    .map(|i| ((i * 7 + k * 13) % 251) as u8)
                    .collect()
            })
            .collect();
        let frames: Vec<Vec<u8>> = plain
            .iter()
            .map(|p| zstd::bulk::compress(p, 3).unwrap())
            .collect();
        let body = frames.concat();
        let blob = Digest::sha256(&body);
        let l0 = frames[0].len() as u64;
        let refs = vec![
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
                compressed: l0..body.len() as u64,
                uncompressed_len: plain[1].len() as u64,
            },
        ];
        (body, refs, plain)
    }

    fn served(answer: &Answer) -> Option<&[u8]> {
        match answer {
            Ok(Some(Found::Verified(v))) => Some(v.data()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_mirror_sending_wrong_bytes_is_passed_over_for_the_next_source() {
        let (body, refs, plain) = two_chunk_blob();
        // The mirror's first chunk is right and its second is not.
        let mut lie = body.clone();
        let last = lie.len() - 10;
        lie[last] ^= 0xff;
        let mirror = respond(move |req| Reply::range_of(&lie, req.range)).await;
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = asked.clone();
        let registry = respond(move |req| {
            seen.lock().unwrap().push(req.range);
            Reply::range_of(&body, req.range)
        })
        .await;
        let source = Arc::new(RegistrySource::new(
            client(&registry.host, &[&mirror.host]),
            RemoteConfig::default(),
        ));
        let reference: Reference = format!("{}/test/app", registry.host).parse().unwrap();
        source.register_blob(refs[0].blob, &reference);
        let answers = source.get_many(&refs).await;
        assert_eq!(served(&answers[0]), Some(&plain[0][..]));
        assert_eq!(served(&answers[1]), Some(&plain[1][..]));
        // Only what the mirror got wrong was asked of the registry.
        let l0 = refs[0].compressed.end;
        assert_eq!(
            *asked.lock().unwrap(),
            [Some((l0, refs[1].compressed.end - 1))]
        );
        assert_eq!(mirror.count(), 1);
        // And the mirror is passed over for the next read; the read path saw nothing wrong.
        let layered = crate::layered::Layered::builder()
            .origin(source.clone(), Duration::from_secs(5))
            .build();
        let again = layered.read(&refs[1], Priority::OnDemand).await.unwrap();
        assert_eq!(again.data(), &plain[1][..]);
        assert_eq!((mirror.count(), registry.count()), (1, 2));
        assert_eq!(layered.report()[0].corrupt, 0);
    }

    #[tokio::test]
    async fn an_image_naming_another_images_blob_cannot_redirect_its_reads() {
        let (body, refs, plain) = two_chunk_blob();
        let mut lie = body.clone();
        lie[5] ^= 0xff;
        let evil = respond(move |req| Reply::range_of(&lie, req.range)).await;
        let good = respond(move |req| Reply::range_of(&body, req.range)).await;
        let source = RegistrySource::new(client(&good.host, &[]), RemoteConfig::default());
        let evil_repo: Reference = format!("{}/evil/app", evil.host).parse().unwrap();
        let good_repo: Reference = format!("{}/good/app", good.host).parse().unwrap();
        // The liar names the blob first.
        source.register_blob(refs[0].blob, &evil_repo);
        source.register_blob(refs[0].blob, &good_repo);
        let answers = source.get_many(&refs).await;
        assert_eq!(served(&answers[0]), Some(&plain[0][..]));
        assert_eq!(served(&answers[1]), Some(&plain[1][..]));
        assert_eq!(evil.count(), 1, "the liar was tried once");
        // The repository that served it right is tried first from now on.
        assert_eq!(source.repository_of(&refs[0].blob), Some(good_repo));
        let again = source.get_many(&refs[1..]).await;
        assert_eq!(served(&again[0]), Some(&plain[1][..]));
        assert_eq!(evil.count(), 1, "the liar is not asked again");
    }

    #[tokio::test]
    async fn wrong_bytes_from_the_registry_itself_go_to_the_read_path_to_count() {
        let (body, refs, _) = two_chunk_blob();
        let mut lie = body.clone();
        lie[5] ^= 0xff;
        let registry = respond(move |req| Reply::range_of(&lie, req.range)).await;
        let source = RegistrySource::new(client(&registry.host, &[]), RemoteConfig::default());
        let reference: Reference = format!("{}/test/app", registry.host).parse().unwrap();
        source.register_blob(refs[0].blob, &reference);
        let answers = source.get_many(&refs).await;
        assert!(
            !matches!(answers[0], Ok(Some(Found::Verified(_)))),
            "the wrong chunk is not passed off as checked"
        );
        assert!(served(&answers[1]).is_some());
        assert!(source.shunned.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reference_outside_the_limits_makes_no_request() {
        let registry = respond(|_| Reply::Hang).await;
        let source = RegistrySource::new(client(&registry.host, &[]), RemoteConfig::default());
        let wild = chunk(b"a", 0..1 << 40);
        let reference: Reference = format!("{}/test/app", registry.host).parse().unwrap();
        source.register_blob(wild.blob, &reference);
        let answers = source.get_many(std::slice::from_ref(&wild)).await;
        let err = answers[0].as_ref().err().map(|e| crate::error::chain(e));
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("compressed chunk size")),
            "{err:?}"
        );
        assert_eq!(registry.count(), 0);
    }

    #[tokio::test]
    async fn preloads_of_all_blobs_together_stop_at_the_global_limit() {
        // A registry that never answers: every preload stays live, holding its reservation.
        let registry = respond(|_| Reply::Hang).await;
        let source = Arc::new(RegistrySource::new(
            client(&registry.host, &[]),
            RemoteConfig::default(),
        ));
        let reference: Reference = format!("{}/test/app", registry.host).parse().unwrap();
        let blobs: Vec<Digest> = (0..6u8).map(|i| Digest::sha256(&[i])).collect();
        let span = |r: Range<u64>| std::iter::once(r).collect::<Vec<_>>();
        let whole = || span(0..PRELOAD_MAX_BYTES);
        source.preload(blobs[0], &reference, whole());
        // One blob stops at its own limit, with room left for others.
        let more = PRELOAD_MAX_BYTES..PRELOAD_MAX_BYTES + 1;
        source.preload(blobs[0], &reference, span(more));
        assert_eq!(source.preload_bytes(), PRELOAD_MAX_BYTES);
        for blob in &blobs[1..4] {
            source.preload(*blob, &reference, whole());
        }
        assert_eq!(source.preload_bytes(), PRELOADS_MAX_BYTES);
        // All blobs together stop at theirs: a fifth blob gets nothing.
        source.preload(blobs[4], &reference, whole());
        assert_eq!(source.preload_bytes(), PRELOADS_MAX_BYTES);
        let held = source.preloads.lock().unwrap().by_blob.len();
        assert_eq!(held, 4);
        // Dropping one blob's preloads gives its bytes back (once its task has ended).
        source.drop_preloads(&blobs[0]);
        tokio::time::timeout(Duration::from_secs(5), async {
            while source.preload_bytes() > PRELOADS_MAX_BYTES - PRELOAD_MAX_BYTES {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the dropped preload's bytes come back");
        source.preload(blobs[5], &reference, whole());
        assert_eq!(source.preload_bytes(), PRELOADS_MAX_BYTES);
    }
}
