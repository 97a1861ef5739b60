//! L4: chunks from the registry, by HTTP range reads of their compressed spans.
//!
//! Neighbouring chunks asked for together (prefetch, sequential reads) are coalesced into one
//! range request up to a size limit, and requests per registry are bounded. Bytes are only
//! decompressed here; the read path verifies them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::Semaphore;

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
    stats: RemoteStats,
}

impl RegistrySource {
    pub fn new(client: Arc<RegistryClient>, config: RemoteConfig) -> Self {
        Self {
            client,
            config,
            blobs: RwLock::default(),
            limits: RwLock::default(),
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
        let limit = self.limit(&reference.registry);
        let _permit = limit.acquire().await.expect("semaphore is never closed");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
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
        match self
            .client
            .get_blob_range_streamed(reference, blob, start..end, &cut)
            .await
        {
            Ok(span) => {
                self.stats
                    .bytes
                    .fetch_add(span.len() as u64, Ordering::Relaxed);
                cut(&span);
            }
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
        let spans = plan_spans(chunks, &self.config);
        let fetches = spans.iter().filter_map(|span| {
            let blob = chunks[span[0]].blob;
            let reference = self
                .blobs
                .read()
                .expect("not poisoned")
                .get(&blob)
                .cloned()?;
            let refs: Vec<&ChunkRef> = span.iter().map(|&i| &chunks[i]).collect();
            Some(async move {
                self.fetch_span(&reference, &blob, &refs, &|k, answer| each(span[k], answer))
                    .await
            })
        });
        futures::future::join_all(fetches).await;
        // A chunk of a blob no repository was registered for is a clean miss.
        for span in &spans {
            if self.repository_of(&chunks[span[0]].blob).is_none() {
                for &i in span {
                    each(i, Ok(None));
                }
            }
        }
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
