//! Read-through composition of cache levels, fastest first: the one read path for on-demand
//! reads, prefetch and (later) chunks served to zone peers.
//!
//! All read policy is here: verify before serving or keeping, fill faster levels on the way
//! back, treat a failing or slow level as a miss, make one fetch for concurrent misses of the
//! same chunk (single flight), and let on-demand reads go ahead of prefetch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::{ChunkSource, Found};
use crate::{Digest, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A reader is waiting for these bytes.
    OnDemand,
    /// Fetched ahead of need; waits while on-demand fetches are in flight.
    Prefetch,
}

struct Level {
    source: Arc<dyn ChunkSource>,
    /// Slower than this counts as a miss for this read, not an error: the next level may
    /// still answer in time.
    deadline: Duration,
    stats: LevelStats,
}

#[derive(Default)]
struct LevelStats {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    corrupt: AtomicU64,
    timeouts: AtomicU64,
    bytes: AtomicU64,
}

/// A level's counters at one moment, for `--stats` and tests.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LevelReport {
    pub level: &'static str,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub corrupt: u64,
    pub timeouts: u64,
    /// Uncompressed bytes this level served.
    pub bytes: u64,
}

/// A chunk's fate in one read: verified bytes, or why no level could provide them.
type Outcome = Result<VerifiedChunk, Arc<str>>;

type Flight = Shared<BoxFuture<'static, Outcome>>;

/// Raised when an on-demand reader joins a prefetch fetch, so that fetch stops waiting behind
/// other prefetch work and on-demand reads: it has become one.
#[derive(Default)]
struct Urgency {
    raised: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Urgency {
    fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    async fn raised(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

struct InFlight {
    flight: Flight,
    urgency: Arc<Urgency>,
    /// This host fetches the chunk through a zone peer. A peer's request for such a chunk
    /// is declined rather than joined: two hosts with different views of the zone could
    /// otherwise each wait for the other.
    forwarded: bool,
}

/// Who a read is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Local,
    /// A zone peer: the peer level is skipped (the asking host already chose this one).
    Peer,
}

/// The name zone peer levels go by; see `ChunkSource::name`.
const PEER_LEVEL: &str = "peer";

pub struct Layered {
    levels: Vec<Level>,
    /// Fetches in progress by chunk digest. A std mutex: held only to look up or insert.
    inflight: Mutex<HashMap<Digest, InFlight>>,
    /// On-demand fetches that reached the last level; prefetch waits while any are running.
    ondemand: AtomicUsize,
    ondemand_idle: Notify,
    prefetch_slots: Semaphore,
    prefetch_concurrency: usize,
    /// Chunks the slowest level served while a reader waited, and ahead of any reader: how
    /// much of a start prefetch covered.
    origin_on_demand: AtomicU64,
    origin_prefetch: AtomicU64,
    /// How many times the whole level list is tried before a chunk is declared unavailable;
    /// a second pass catches a registry that served one bad response.
    passes: u32,
}

pub struct LayeredBuilder {
    levels: Vec<Level>,
    prefetch_concurrency: usize,
    passes: u32,
}

impl LayeredBuilder {
    pub fn level(mut self, source: Arc<dyn ChunkSource>, deadline: Duration) -> Self {
        self.levels.push(Level {
            source,
            deadline,
            stats: LevelStats::default(),
        });
        self
    }

    /// Prefetch batches fetched at once (default 2).
    pub fn prefetch_concurrency(mut self, n: usize) -> Self {
        self.prefetch_concurrency = n.max(1);
        self
    }

    pub fn passes(mut self, n: u32) -> Self {
        self.passes = n.max(1);
        self
    }

    pub fn build(self) -> Arc<Layered> {
        Arc::new(Layered {
            levels: self.levels,
            inflight: Mutex::default(),
            ondemand: AtomicUsize::new(0),
            ondemand_idle: Notify::new(),
            prefetch_slots: Semaphore::new(self.prefetch_concurrency),
            prefetch_concurrency: self.prefetch_concurrency,
            origin_on_demand: AtomicU64::new(0),
            origin_prefetch: AtomicU64::new(0),
            passes: self.passes,
        })
    }
}

/// The verified chunk for `found`: bytes are checked here; a chunk a level already holds
/// verified only has to be the one asked for.
fn accept(chunk: &ChunkRef, found: Found) -> Option<VerifiedChunk> {
    match found {
        Found::Bytes(bytes) => VerifiedChunk::check(chunk, bytes),
        Found::Verified(v) => (v.digest() == &chunk.digest).then_some(v),
    }
}

/// Decrements the on-demand count when an origin fetch ends, however it ends.
struct OnDemandGuard<'a>(&'a Layered);

impl Drop for OnDemandGuard<'_> {
    fn drop(&mut self) {
        if self.0.ondemand.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ondemand_idle.notify_waiters();
        }
    }
}

impl Layered {
    pub fn builder() -> LayeredBuilder {
        LayeredBuilder {
            levels: Vec::new(),
            prefetch_concurrency: 2,
            passes: 2,
        }
    }

    /// Reads one chunk.
    pub async fn read(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        priority: Priority,
    ) -> Result<VerifiedChunk> {
        let mut v = self
            .read_many(std::slice::from_ref(chunk), priority)
            .await?;
        Ok(v.pop().expect("one answer per chunk"))
    }

    /// Reads several chunks, in request order. Chunks another reader is already fetching are
    /// waited for, not fetched again. Fails if any chunk is unavailable from every level.
    pub async fn read_many(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        priority: Priority,
    ) -> Result<Vec<VerifiedChunk>> {
        let flights = self
            .join_or_start(chunks, priority, Reader::Local)
            .into_iter()
            .map(|f| f.expect("local reads are never declined"));
        let results = futures::future::join_all(flights).await;
        chunks
            .iter()
            .zip(results)
            .map(|(c, r)| {
                r.map_err(|reason| Error::ChunkUnavailable {
                    digest: c.digest,
                    reason: reason.to_string(),
                })
            })
            .collect()
    }

    /// Reads chunks for a zone peer, from every level but the peers. `None` for a chunk that
    /// no level could provide, or that this host is itself fetching from a peer right now.
    pub async fn read_for_peer(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        priority: Priority,
    ) -> Vec<Option<VerifiedChunk>> {
        let flights = self.join_or_start(chunks, priority, Reader::Peer);
        futures::future::join_all(flights.into_iter().map(|f| async move {
            match f {
                Some(f) => f.await.ok(),
                None => None,
            }
        }))
        .await
    }

    /// Whether a level faster than the peers holds the chunk; fetches nothing.
    pub async fn contains(&self, digest: &Digest) -> bool {
        for level in &self.levels {
            if level.source.name() == PEER_LEVEL {
                break;
            }
            if level.source.contains(digest).await {
                return true;
            }
        }
        false
    }

    fn join_or_start(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        priority: Priority,
        reader: Reader,
    ) -> Vec<Option<Flight>> {
        let mut inflight = self.inflight.lock().expect("not poisoned");
        let mut mine: Vec<ChunkRef> = Vec::new();
        let mut mine_index: HashMap<Digest, usize> = HashMap::new();
        enum Slot {
            Joined(Flight),
            Mine(usize),
            Declined,
        }
        let slots: Vec<Slot> = chunks
            .iter()
            .map(|c| match inflight.get(&c.digest) {
                Some(f) if reader == Reader::Peer && f.forwarded => Slot::Declined,
                Some(f) => {
                    if priority == Priority::OnDemand {
                        f.urgency.raise();
                    }
                    Slot::Joined(f.flight.clone())
                }
                None => Slot::Mine(*mine_index.entry(c.digest).or_insert_with(|| {
                    mine.push(c.clone());
                    mine.len() - 1
                })),
            })
            .collect();
        // Chunks fetched through a peer and chunks fetched here go in separate groups, so a
        // chunk this host is home for never waits on another host's answer: two homes
        // serving each other would otherwise wait on each other.
        let forwarded: Vec<bool> = mine
            .iter()
            .map(|c| {
                reader == Reader::Local
                    && self
                        .levels
                        .iter()
                        .any(|l| l.source.name() == PEER_LEVEL && l.source.forwards(c))
            })
            .collect();
        let mut started: Vec<Option<Flight>> = vec![None; mine.len()];
        for group_forwarded in [false, true] {
            let members: Vec<usize> = (0..mine.len())
                .filter(|&j| forwarded[j] == group_forwarded)
                .collect();
            if members.is_empty() {
                continue;
            }
            let this = self.clone();
            let batch: Vec<ChunkRef> = members.iter().map(|&j| mine[j].clone()).collect();
            let urgency = Arc::new(Urgency::default());
            let urgent = urgency.clone();
            let group = async move {
                let out = this.read_through(&batch, priority, &urgent, reader).await;
                let mut inflight = this.inflight.lock().expect("not poisoned");
                for c in &batch {
                    inflight.remove(&c.digest);
                }
                Arc::new(out)
            }
            .boxed()
            .shared();
            for (k, &j) in members.iter().enumerate() {
                let g = group.clone();
                let flight: Flight = async move { g.await[k].clone() }.boxed().shared();
                inflight.insert(
                    mine[j].digest,
                    InFlight {
                        flight: flight.clone(),
                        urgency: urgency.clone(),
                        forwarded: group_forwarded,
                    },
                );
                started[j] = Some(flight);
            }
        }
        slots
            .into_iter()
            .map(|s| match s {
                Slot::Joined(f) => Some(f),
                Slot::Mine(j) => started[j].clone(),
                Slot::Declined => None,
            })
            .collect()
    }

    async fn read_through(
        &self,
        chunks: &[ChunkRef],
        priority: Priority,
        urgency: &Urgency,
        reader: Reader,
    ) -> Vec<Outcome> {
        let mut out: Vec<Outcome> = vec![Err(Arc::from("no cache level has it")); chunks.len()];
        let mut remaining: Vec<usize> = (0..chunks.len()).collect();
        let last = self.levels.len().saturating_sub(1);
        for _ in 0..self.passes {
            for (li, level) in self.levels.iter().enumerate() {
                if remaining.is_empty() {
                    return out;
                }
                let peer_level = level.source.name() == PEER_LEVEL;
                if peer_level && reader == Reader::Peer {
                    continue;
                }
                let mut _slot = None;
                let _guard;
                if li == last && priority == Priority::Prefetch && !urgency.is_raised() {
                    tokio::select! {
                        slot = async {
                            let slot = self.prefetch_slots.acquire().await.expect("semaphore is never closed");
                            self.wait_for_ondemand().await;
                            slot
                        } => _slot = Some(slot),
                        _ = urgency.raised() => {}
                    }
                }
                if li == last && (priority == Priority::OnDemand || urgency.is_raised()) {
                    self.ondemand.fetch_add(1, Ordering::SeqCst);
                    _guard = OnDemandGuard(self);
                }
                let asked = remaining.len();
                let effective = if urgency.is_raised() {
                    Priority::OnDemand
                } else {
                    priority
                };
                remaining = self
                    .ask(li, level, chunks, remaining, &mut out, effective)
                    .await;
                if li == last {
                    let served = (asked - remaining.len()) as u64;
                    let counter = if priority == Priority::OnDemand || urgency.is_raised() {
                        &self.origin_on_demand
                    } else {
                        &self.origin_prefetch
                    };
                    counter.fetch_add(served, Ordering::Relaxed);
                }
            }
        }
        out
    }

    /// Asks one level for the `remaining` chunks; returns those it did not serve.
    async fn ask(
        &self,
        li: usize,
        level: &Level,
        chunks: &[ChunkRef],
        remaining: Vec<usize>,
        out: &mut [Outcome],
        priority: Priority,
    ) -> Vec<usize> {
        let name = level.source.name();
        let refs: Vec<ChunkRef> = remaining.iter().map(|&i| chunks[i].clone()).collect();
        let started = Instant::now();
        let answers =
            match tokio::time::timeout(level.deadline, level.source.get_many_for(&refs, priority))
                .await
            {
                Ok(answers) => answers,
                Err(_) => {
                    level.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("brisk_cache_timeouts_total", "level" => name).increment(1);
                    tracing::warn!(level = name, "level too slow, skipping");
                    let reason: Arc<str> = Arc::from(format!(
                        "the {name} level did not answer in {:?}",
                        level.deadline
                    ));
                    for &i in &remaining {
                        out[i] = Err(reason.clone());
                    }
                    return remaining;
                }
            };
        metrics::histogram!("brisk_cache_latency_seconds", "level" => name)
            .record(started.elapsed().as_secs_f64());
        let mut missed = Vec::new();
        for (i, answer) in remaining.into_iter().zip(answers) {
            let chunk = &chunks[i];
            match answer {
                Ok(Some(found)) => match accept(chunk, found) {
                    Some(verified) => {
                        let len = verified.data().len() as u64;
                        level.stats.hits.fetch_add(1, Ordering::Relaxed);
                        level.stats.bytes.fetch_add(len, Ordering::Relaxed);
                        metrics::counter!("brisk_cache_hits_total", "level" => name).increment(1);
                        metrics::counter!("brisk_cache_bytes_total", "level" => name)
                            .increment(len);
                        // Only the faster levels need it; this one already has it.
                        for faster in &self.levels[..li] {
                            faster.source.put(&verified).await;
                        }
                        out[i] = Ok(verified);
                    }
                    None => {
                        level.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("brisk_cache_corrupt_total", "level" => name)
                            .increment(1);
                        tracing::warn!(level = name, digest = %chunk.digest, "chunk failed verification, skipping level");
                        level.source.discard(&chunk.digest).await;
                        out[i] = Err(Arc::from(format!(
                            "bytes from the {name} level failed verification"
                        )));
                        missed.push(i);
                    }
                },
                Ok(None) => {
                    level.stats.misses.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("brisk_cache_misses_total", "level" => name).increment(1);
                    missed.push(i);
                }
                Err(err) => {
                    level.stats.errors.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("brisk_cache_errors_total", "level" => name).increment(1);
                    let err = crate::error::chain(&err);
                    tracing::warn!(level = name, digest = %chunk.digest, %err, "level failed, skipping");
                    out[i] = Err(Arc::from(format!("the {name} level failed: {err}")));
                    missed.push(i);
                }
            }
        }
        missed
    }

    async fn wait_for_ondemand(&self) {
        loop {
            let idle = self.ondemand_idle.notified();
            if self.ondemand.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Fetches `chunks` in the background, in order, in batches of about `batch_bytes` of
    /// compressed neighbours, a few batches at once and always behind on-demand reads. Stops
    /// early when `cancel` fires. Returns how many chunks it made local.
    pub fn prefetch(
        self: &Arc<Self>,
        chunks: Vec<ChunkRef>,
        batch_bytes: u64,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<usize> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut batches: Vec<Vec<ChunkRef>> = Vec::new();
            let mut size = u64::MAX;
            for c in chunks {
                if size >= batch_bytes {
                    batches.push(Vec::new());
                    size = 0;
                }
                size += c.compressed.end - c.compressed.start;
                batches.last_mut().expect("a batch was just pushed").push(c);
            }
            let concurrency = this.prefetch_concurrency;
            futures::stream::iter(batches)
                .map(|batch| {
                    let this = this.clone();
                    async move {
                        match this.read_many(&batch, Priority::Prefetch).await {
                            Ok(_) => batch.len(),
                            Err(err) => {
                                tracing::debug!(%err, "prefetch batch failed");
                                0
                            }
                        }
                    }
                })
                .buffered(concurrency)
                .take_until(cancel.cancelled())
                .fold(0, |total, n| async move { total + n })
                .await
        })
    }

    /// Chunks fetched from the slowest level (on demand, by prefetch).
    pub fn origin_fetches(&self) -> (u64, u64) {
        (
            self.origin_on_demand.load(Ordering::Relaxed),
            self.origin_prefetch.load(Ordering::Relaxed),
        )
    }

    /// Per-level counters, fastest level first.
    pub fn report(&self) -> Vec<LevelReport> {
        self.levels
            .iter()
            .map(|l| LevelReport {
                level: l.source.name(),
                hits: l.stats.hits.load(Ordering::Relaxed),
                misses: l.stats.misses.load(Ordering::Relaxed),
                errors: l.stats.errors.load(Ordering::Relaxed),
                corrupt: l.stats.corrupt.load(Ordering::Relaxed),
                timeouts: l.stats.timeouts.load(Ordering::Relaxed),
                bytes: l.stats.bytes.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use bytes::Bytes;

    use super::*;
    use crate::memory::MemoryCache;
    use crate::source::{Answer, SourceError};

    /// A level over fixed contents that logs every call, can be slow, and can lie.
    struct Scripted {
        data: HashMap<Digest, Bytes>,
        delay: Duration,
        calls: Mutex<Vec<Vec<Digest>>>,
        lie: bool,
        fail: bool,
        gets: AtomicU32,
    }

    impl Scripted {
        fn new(chunks: &[(ChunkRef, Bytes)]) -> Self {
            Self {
                data: chunks.iter().map(|(r, b)| (r.digest, b.clone())).collect(),
                delay: Duration::ZERO,
                calls: Mutex::default(),
                lie: false,
                fail: false,
                gets: AtomicU32::new(0),
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("scripted failure")]
    struct Failure;

    #[async_trait::async_trait]
    impl ChunkSource for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }

        async fn get(&self, chunk: &ChunkRef) -> Answer {
            self.get_many(std::slice::from_ref(chunk))
                .await
                .pop()
                .unwrap()
        }

        async fn get_many(&self, chunks: &[ChunkRef]) -> Vec<Answer> {
            self.calls
                .lock()
                .unwrap()
                .push(chunks.iter().map(|c| c.digest).collect());
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            chunks
                .iter()
                .map(|c| {
                    if self.fail {
                        return Err(SourceError::unavailable(Failure));
                    }
                    Ok(self.data.get(&c.digest).map(|b| {
                        Found::Bytes(if self.lie {
                            Bytes::from(vec![0u8; b.len()])
                        } else {
                            b.clone()
                        })
                    }))
                })
                .collect()
        }
    }

    fn chunks(n: usize) -> Vec<(ChunkRef, Bytes)> {
        (0..n)
            .map(|i| {
                let data = Bytes::from(vec![i as u8 + 1; 1000 + i]);
                let r = ChunkRef {
                    digest: Digest::sha256(&data),
                    blob: Digest::sha256(b"blob"),
                    compressed: (i as u64 * 100)..(i as u64 * 100 + 100),
                    uncompressed_len: data.len() as u64,
                };
                (r, data)
            })
            .collect()
    }

    /// A zone peer level that forwards one chunk and never answers for it.
    struct StuckPeer {
        forwarded: Digest,
    }

    #[async_trait::async_trait]
    impl ChunkSource for StuckPeer {
        fn name(&self) -> &'static str {
            PEER_LEVEL
        }

        fn forwards(&self, chunk: &ChunkRef) -> bool {
            chunk.digest == self.forwarded
        }

        async fn get(&self, chunk: &ChunkRef) -> Answer {
            if self.forwards(chunk) {
                futures::future::pending::<()>().await;
            }
            Ok(None)
        }
    }

    #[tokio::test]
    async fn a_peer_request_never_waits_on_this_hosts_own_peer_fetches() {
        let cs = chunks(2);
        let origin = Arc::new(Scripted::new(&cs));
        let layered = Layered::builder()
            .level(
                Arc::new(StuckPeer {
                    forwarded: cs[1].0.digest,
                }),
                Duration::from_secs(3600),
            )
            .level(origin, Duration::from_secs(5))
            .build();
        let refs: Vec<ChunkRef> = cs.iter().map(|c| c.0.clone()).collect();
        // A local read of both: chunk 1 waits on the (stuck) peer, chunk 0 is fetched here.
        let l = layered.clone();
        let both = refs.clone();
        let local = tokio::spawn(async move { l.read_many(&both, Priority::OnDemand).await });
        tokio::task::yield_now().await;
        let served = tokio::time::timeout(
            Duration::from_secs(5),
            layered.read_for_peer(&refs, Priority::OnDemand),
        )
        .await
        .expect("a peer request must not wait on this host's peer fetch");
        assert_eq!(served[0].as_ref().map(|c| c.data()), Some(&cs[0].1));
        assert!(
            served[1].is_none(),
            "a chunk fetched through a peer is declined"
        );
        assert!(!local.is_finished());
        local.abort();
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_chunk_make_one_fetch() {
        let cs = chunks(1);
        let mut origin = Scripted::new(&cs);
        origin.delay = Duration::from_millis(50);
        let origin = Arc::new(origin);
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .build();
        let reads = (0..16).map(|_| {
            let l = layered.clone();
            let r = cs[0].0.clone();
            tokio::spawn(async move { l.read(&r, Priority::OnDemand).await.unwrap() })
        });
        for r in futures::future::join_all(reads).await {
            assert_eq!(r.unwrap().data(), &cs[0].1);
        }
        assert_eq!(origin.gets.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn faster_levels_are_filled_on_the_way_back() {
        let cs = chunks(2);
        let memory = Arc::new(MemoryCache::new(1 << 20));
        let origin = Arc::new(Scripted::new(&cs));
        let layered = Layered::builder()
            .level(memory.clone(), Duration::from_secs(1))
            .level(origin.clone(), Duration::from_secs(1))
            .build();
        let refs: Vec<ChunkRef> = cs.iter().map(|c| c.0.clone()).collect();
        layered.read_many(&refs, Priority::OnDemand).await.unwrap();
        layered.read_many(&refs, Priority::OnDemand).await.unwrap();
        assert_eq!(
            origin.gets.load(Ordering::SeqCst),
            1,
            "second read came from memory"
        );
        let report = layered.report();
        assert_eq!(
            (report[0].hits, report[0].misses, report[1].hits),
            (2, 2, 2)
        );
    }

    #[tokio::test]
    async fn lying_failing_and_slow_levels_are_skipped_and_never_kept() {
        let cs = chunks(1);
        let memory = Arc::new(MemoryCache::new(1 << 20));
        let mut liar = Scripted::new(&cs);
        liar.lie = true;
        let mut broken = Scripted::new(&cs);
        broken.fail = true;
        let mut slow = Scripted::new(&cs);
        slow.delay = Duration::from_secs(5);
        let good = Arc::new(Scripted::new(&cs));
        let layered = Layered::builder()
            .level(memory.clone(), Duration::from_secs(1))
            .level(Arc::new(liar), Duration::from_secs(1))
            .level(Arc::new(broken), Duration::from_secs(1))
            .level(Arc::new(slow), Duration::from_millis(50))
            .level(good, Duration::from_secs(1))
            .build();
        let got = layered.read(&cs[0].0, Priority::OnDemand).await.unwrap();
        assert_eq!(got.data(), &cs[0].1);
        let report = layered.report();
        assert_eq!(report[1].corrupt, 1);
        assert_eq!(report[2].errors, 1);
        assert_eq!(report[3].timeouts, 1);
        assert_eq!(report[4].hits, 1);
        assert_eq!(
            memory.get(&cs[0].0).await.unwrap().unwrap().bytes(),
            &cs[0].1
        );
    }

    #[tokio::test]
    async fn a_chunk_no_level_can_verify_is_an_error() {
        let cs = chunks(1);
        let memory = Arc::new(MemoryCache::new(1 << 20));
        let mut liar = Scripted::new(&cs);
        liar.lie = true;
        let layered = Layered::builder()
            .level(memory.clone(), Duration::from_secs(1))
            .level(Arc::new(liar), Duration::from_secs(1))
            .build();
        let err = layered
            .read(&cs[0].0, Priority::OnDemand)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ChunkUnavailable { digest, .. } if digest == cs[0].0.digest));
        assert!(err.to_string().contains("failed verification"), "{err}");
        assert!(
            memory.get(&cs[0].0).await.unwrap().is_none(),
            "unverified bytes were kept"
        );
        assert_eq!(layered.report()[1].corrupt, 2, "one try per pass");
    }

    /// Twelve chunks behind an origin that takes 40 ms a call, with one prefetch slot.
    fn slow_origin_one_prefetch_slot() -> (Vec<(ChunkRef, Bytes)>, Arc<Scripted>, Arc<Layered>) {
        let cs = chunks(12);
        let mut origin = Scripted::new(&cs);
        origin.delay = Duration::from_millis(40);
        let origin = Arc::new(origin);
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .prefetch_concurrency(1)
            .build();
        (cs, origin, layered)
    }

    /// Which origin call fetched `chunk`.
    fn call_of(origin: &Scripted, chunk: &ChunkRef) -> usize {
        origin
            .calls
            .lock()
            .unwrap()
            .iter()
            .position(|c| c.contains(&chunk.digest))
            .unwrap()
    }

    #[tokio::test]
    async fn on_demand_reads_jump_the_prefetch_queue() {
        let (cs, origin, layered) = slow_origin_one_prefetch_slot();
        // Prefetch chunks 0..10 one batch at a time (batch bytes smaller than a chunk).
        let prefetch: Vec<ChunkRef> = cs[..10].iter().map(|c| c.0.clone()).collect();
        let handle = layered.prefetch(prefetch, 1, CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(60)).await;
        let wanted = cs[11].0.clone();
        layered.read(&wanted, Priority::OnDemand).await.unwrap();
        assert_eq!(handle.await.unwrap(), 10);
        assert_eq!(layered.origin_fetches(), (1, 10));
        let calls = origin.calls.lock().unwrap().clone();
        let position = call_of(&origin, &wanted);
        // At most the one prefetch batch already in flight went first.
        assert!(
            position <= 2,
            "on-demand read was call {position} of {}",
            calls.len()
        );
    }

    #[tokio::test]
    async fn an_on_demand_reader_joining_a_queued_prefetch_fetch_promotes_it() {
        let (cs, origin, layered) = slow_origin_one_prefetch_slot();
        // Four images prefetching at once share one prefetch slot: the last one's first fetch
        // (chunk 9) is started but queued behind the first fetches of the other three.
        let mut handles = Vec::new();
        for start in [0, 3, 6, 9] {
            let refs = cs[start..start + 3].iter().map(|c| c.0.clone()).collect();
            handles.push(layered.prefetch(refs, 1, CancellationToken::new()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            layered
                .inflight
                .lock()
                .unwrap()
                .contains_key(&cs[9].0.digest),
            "chunk 9 should be queued"
        );
        let wanted = cs[9].0.clone();
        layered.read(&wanted, Priority::OnDemand).await.unwrap();
        let position = call_of(&origin, &wanted);
        assert!(position <= 1, "joined prefetch fetch was call {position}");
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        assert_eq!(total, 12);
    }

    #[tokio::test]
    async fn prefetch_stops_when_cancelled() {
        let cs = chunks(10);
        let mut origin = Scripted::new(&cs);
        origin.delay = Duration::from_millis(30);
        let layered = Layered::builder()
            .level(Arc::new(origin), Duration::from_secs(5))
            .build();
        let cancel = CancellationToken::new();
        let handle = layered.prefetch(cs.iter().map(|c| c.0.clone()).collect(), 1, cancel.clone());
        tokio::time::sleep(Duration::from_millis(70)).await;
        cancel.cancel();
        let done = handle.await.unwrap();
        assert!(done < 10, "prefetched {done} of 10 after cancel");
    }
}
