//! Read-through composition of cache levels, fastest first: the one read path for on-demand
//! reads, prefetch and (later) chunks served to zone peers.
//!
//! All read policy is here: verify before serving or keeping, fill faster levels on the way
//! back, treat a failing or slow level as a miss, make one fetch for concurrent misses of the
//! same chunk (single flight), and let on-demand reads go ahead of prefetch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::{Answer, ChunkSource, Found};
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
    /// An on-demand reader asked for this chunk before it arrived: it counts as fetched on
    /// demand even when prefetch started the fetch.
    wanted: Arc<AtomicBool>,
    /// This host fetches the chunk through a zone peer. A peer's request for such a chunk
    /// is declined rather than joined: two hosts with different views of the zone could
    /// otherwise each wait for the other.
    forwarded: bool,
}

/// Chunks fetched together by one spawned task, and what their readers are waiting on.
#[derive(Clone, Copy)]
struct Group<'a> {
    chunks: &'a [ChunkRef],
    priority: Priority,
    urgency: &'a Urgency,
    /// Per chunk: an on-demand reader joined before it arrived.
    wanted: &'a [Arc<AtomicBool>],
    reader: Reader,
    handoff: &'a Handoff,
}

/// Hands each chunk of a group to its waiting readers once, and takes it out of the
/// in-flight table so later readers find it in the cache. A group that ends without
/// handing a chunk over (a panic) fails its readers instead of leaving them waiting.
struct Handoff {
    layered: Arc<Layered>,
    chunks: Vec<ChunkRef>,
    senders: Mutex<Vec<Option<oneshot::Sender<Outcome>>>>,
}

impl Handoff {
    fn deliver(&self, i: usize, outcome: Outcome) {
        let sender = self.senders.lock().expect("not poisoned")[i].take();
        if let Some(sender) = sender {
            tracing::debug!(digest = %self.chunks[i].digest, ok = outcome.is_ok(), "chunk fetch done");
            self.layered
                .inflight
                .lock()
                .expect("not poisoned")
                .remove(&self.chunks[i]);
            let _ = sender.send(outcome);
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        for i in 0..self.chunks.len() {
            self.deliver(i, Err(Arc::from("the fetch ended without an answer")));
        }
    }
}

/// Who a read is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Local,
    /// A zone peer: the peer level is skipped (the asking host already chose this one).
    Peer,
}

/// Compressed bytes prefetch keeps on the way before it starts another batch: several round
/// trips' worth on a WAN link, little enough that chunks arrive about in trace order.
const PREFETCH_WINDOW: u64 = 1 << 20;

/// Prefetch keeps chunks this close in one range request (the gap is read and dropped): the
/// registry level's own limit.
const PREFETCH_MAX_GAP: u64 = 64 * 1024;

/// The name zone peer levels go by; see `ChunkSource::name`.
const PEER_LEVEL: &str = "peer";

pub struct Layered {
    levels: Vec<Level>,
    /// Fetches in progress by the whole chunk reference, not the digest alone: a reference
    /// that names a digest with a wrong range or length (a hostile TOC or peer) must never
    /// fail, or delay, a correct one that would otherwise join it. The price: the same content
    /// asked for through two blobs at once is fetched twice (the caches then hold it once).
    /// A std mutex: held only to look up or insert.
    inflight: Mutex<HashMap<ChunkRef, InFlight>>,
    /// On-demand fetches that reached the last level; prefetch waits while any are running.
    ondemand: AtomicUsize,
    ondemand_idle: Notify,
    prefetch_slots: Semaphore,
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

    /// Prefetch batches fetched from the slowest level at once (default 4), across every
    /// prefetch running.
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
            origin_on_demand: AtomicU64::new(0),
            origin_prefetch: AtomicU64::new(0),
            passes: self.passes,
        })
    }
}

/// What a level's answer is worth for one chunk reference.
enum Accepted {
    Verified(VerifiedChunk),
    /// The level holds the digest's true bytes, but the reference claims another length: the
    /// reference is wrong, not the level, so nothing is discarded and no level can do better.
    WrongLength(u64),
    /// The level's bytes are not the chunk's.
    Corrupt,
}

/// Checks `found` against `chunk`: bytes are checked here; a chunk a level already holds
/// verified only has to be the one asked for, length included.
fn accept(chunk: &ChunkRef, found: Found) -> Accepted {
    let verified = match found {
        Found::Bytes(bytes) => match VerifiedChunk::check(chunk, bytes.clone()) {
            Some(verified) => verified,
            None if bytes.len() as u64 != chunk.uncompressed_len
                && Digest::sha256(&bytes) == chunk.digest =>
            {
                return Accepted::WrongLength(bytes.len() as u64)
            }
            None => return Accepted::Corrupt,
        },
        Found::Verified(v) => v,
    };
    if verified.digest() != &chunk.digest {
        Accepted::Corrupt
    } else if verified.data().len() as u64 != chunk.uncompressed_len {
        Accepted::WrongLength(verified.data().len() as u64)
    } else {
        Accepted::Verified(verified)
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
            prefetch_concurrency: 4,
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
    /// waited for, not fetched again. Fails if any chunk is unavailable from every level, or
    /// if a reference is outside the limits (`ChunkRef::check`), before anything is fetched.
    pub async fn read_many(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        priority: Priority,
    ) -> Result<Vec<VerifiedChunk>> {
        for c in chunks {
            c.check()?;
        }
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
        let mut mine_index: HashMap<&ChunkRef, usize> = HashMap::new();
        enum Slot {
            Joined(Flight),
            Mine(usize),
            Declined,
            Refused(Flight),
        }
        let slots: Vec<Slot> = chunks
            .iter()
            .map(|c| {
                // Refused here too, so that no reference outside the limits reaches a level
                // whichever way it came in (prefetch, a zone peer).
                if let Err(err) = c.check() {
                    let outcome: Outcome = Err(Arc::from(err.to_string()));
                    return Slot::Refused(futures::future::ready(outcome).boxed().shared());
                }
                match inflight.get(c) {
                    Some(f) if reader == Reader::Peer && f.forwarded => Slot::Declined,
                    Some(f) => {
                        if priority == Priority::OnDemand {
                            tracing::debug!(digest = %c.digest, "on-demand read joins a fetch in flight");
                            f.wanted.store(true, Ordering::SeqCst);
                            f.urgency.raise();
                        }
                        Slot::Joined(f.flight.clone())
                    }
                    None => Slot::Mine(*mine_index.entry(c).or_insert_with(|| {
                        mine.push(c.clone());
                        mine.len() - 1
                    })),
                }
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
            let batch: Vec<ChunkRef> = members.iter().map(|&j| mine[j].clone()).collect();
            let urgency = Arc::new(Urgency::default());
            let wanted: Vec<Arc<AtomicBool>> = batch
                .iter()
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect();
            let mut senders = Vec::with_capacity(batch.len());
            for (k, &j) in members.iter().enumerate() {
                let (tx, rx) = oneshot::channel::<Outcome>();
                senders.push(Some(tx));
                let flight: Flight = rx
                    .map(|r| r.unwrap_or_else(|_| Err(Arc::from("the fetch was abandoned"))))
                    .boxed()
                    .shared();
                inflight.insert(
                    mine[j].clone(),
                    InFlight {
                        flight: flight.clone(),
                        urgency: urgency.clone(),
                        wanted: wanted[k].clone(),
                        forwarded: group_forwarded,
                    },
                );
                started[j] = Some(flight);
            }
            let handoff = Handoff {
                layered: self.clone(),
                chunks: batch.clone(),
                senders: Mutex::new(senders),
            };
            tracing::debug!(
                chunks = batch.len(),
                ?priority,
                first = %batch[0].digest,
                "fetch started"
            );
            let this = self.clone();
            // Spawned, not polled by its readers: the group hands each chunk over as soon as
            // it is verified, and runs to the end (filling the cache) even if they go away.
            tokio::spawn(async move {
                let group = Group {
                    chunks: &batch,
                    priority,
                    urgency: &urgency,
                    wanted: &wanted,
                    reader,
                    handoff: &handoff,
                };
                this.read_through(&group).await;
            });
        }
        slots
            .into_iter()
            .map(|s| match s {
                Slot::Joined(f) => Some(f),
                Slot::Mine(j) => started[j].clone(),
                Slot::Declined => None,
                Slot::Refused(f) => Some(f),
            })
            .collect()
    }

    /// Tries the levels, fastest first, for a group's chunks; hands each chunk to its readers
    /// as soon as one level's verified answer arrives, and the failures once every pass is done.
    async fn read_through(&self, group: &Group<'_>) {
        let Group {
            chunks,
            priority,
            urgency,
            reader,
            handoff,
            ..
        } = *group;
        let mut failures: Vec<Arc<str>> = vec![Arc::from("no cache level has it"); chunks.len()];
        let mut remaining: Vec<usize> = (0..chunks.len()).collect();
        let last = self.levels.len().saturating_sub(1);
        'passes: for _ in 0..self.passes {
            for (li, level) in self.levels.iter().enumerate() {
                if remaining.is_empty() {
                    break 'passes;
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
                let effective = if urgency.is_raised() {
                    Priority::OnDemand
                } else {
                    priority
                };
                remaining = self
                    .ask(
                        li,
                        li == last,
                        level,
                        group,
                        remaining,
                        &mut failures,
                        effective,
                    )
                    .await;
            }
        }
        for i in remaining {
            handoff.deliver(i, Err(failures[i].clone()));
        }
    }

    /// Asks one level for the `remaining` chunks of `group`, handing over each verified answer
    /// as it arrives; returns the chunks it did not serve, with why in `failures`.
    #[allow(clippy::too_many_arguments)]
    async fn ask(
        &self,
        li: usize,
        origin: bool,
        level: &Level,
        group: &Group<'_>,
        remaining: Vec<usize>,
        failures: &mut [Arc<str>],
        priority: Priority,
    ) -> Vec<usize> {
        let name = level.source.name();
        let refs: Vec<ChunkRef> = remaining.iter().map(|&i| group.chunks[i].clone()).collect();
        let started = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Answer)>();
        let fetch = tokio::time::timeout(level.deadline, async {
            // Owned by this future, so the channel closes when the level is done.
            let tx = tx;
            let each = move |k: usize, answer: Answer| {
                let _ = tx.send((k, answer));
            };
            level.source.get_many_each(&refs, priority, &each).await;
        });
        tokio::pin!(fetch);
        let mut answered = vec![false; refs.len()];
        let mut missed = Vec::new();
        let timed_out = loop {
            tokio::select! {
                Some((k, answer)) = rx.recv() => {
                    if let Some(done) = answered.get_mut(k).filter(|done| !**done) {
                        *done = true;
                        let i = remaining[k];
                        if let Err(why) = self.take(li, origin, level, group, i, answer).await {
                            if let Some(why) = why { failures[i] = why; }
                            missed.push(i);
                        }
                    }
                }
                result = &mut fetch => {
                    while let Ok((k, answer)) = rx.try_recv() {
                        if let Some(done) = answered.get_mut(k).filter(|done| !**done) {
                            *done = true;
                            let i = remaining[k];
                            if let Err(why) = self.take(li, origin, level, group, i, answer).await {
                                if let Some(why) = why { failures[i] = why; }
                                missed.push(i);
                            }
                        }
                    }
                    break result.is_err();
                }
            }
        };
        metrics::histogram!("brisk_cache_latency_seconds", "level" => name)
            .record(started.elapsed().as_secs_f64());
        let unanswered: Vec<usize> = (0..refs.len()).filter(|&k| !answered[k]).collect();
        if timed_out && !unanswered.is_empty() {
            level.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("brisk_cache_timeouts_total", "level" => name).increment(1);
            tracing::warn!(level = name, "level too slow, skipping");
            let reason: Arc<str> = Arc::from(format!(
                "the {name} level did not answer in {:?}",
                level.deadline
            ));
            for &k in &unanswered {
                failures[remaining[k]] = reason.clone();
            }
        } else if !unanswered.is_empty() {
            // A level that says nothing about a chunk does not have it.
            level
                .stats
                .misses
                .fetch_add(unanswered.len() as u64, Ordering::Relaxed);
            metrics::counter!("brisk_cache_misses_total", "level" => name)
                .increment(unanswered.len() as u64);
        }
        missed.extend(unanswered.into_iter().map(|k| remaining[k]));
        missed
    }

    /// One level's answer for chunk `i` of `group`: a verified chunk is kept by the faster
    /// levels and handed over at once (as is the failure of a reference with the wrong
    /// length); otherwise why it was not, if there is more to say than a clean miss.
    async fn take(
        &self,
        li: usize,
        origin: bool,
        level: &Level,
        group: &Group<'_>,
        i: usize,
        answer: Answer,
    ) -> std::result::Result<(), Option<Arc<str>>> {
        let name = level.source.name();
        let chunk = &group.chunks[i];
        match answer {
            Ok(Some(found)) => match accept(chunk, found) {
                Accepted::Verified(verified) => {
                    let len = verified.data().len() as u64;
                    level.stats.hits.fetch_add(1, Ordering::Relaxed);
                    level.stats.bytes.fetch_add(len, Ordering::Relaxed);
                    metrics::counter!("brisk_cache_hits_total", "level" => name).increment(1);
                    metrics::counter!("brisk_cache_bytes_total", "level" => name).increment(len);
                    // Only the faster levels need it; this one already has it.
                    for faster in &self.levels[..li] {
                        faster.source.put(&verified).await;
                    }
                    if origin {
                        let on_demand = group.priority == Priority::OnDemand
                            || group.wanted[i].load(Ordering::SeqCst);
                        let counter = if on_demand {
                            &self.origin_on_demand
                        } else {
                            &self.origin_prefetch
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    group.handoff.deliver(i, Ok(verified));
                    Ok(())
                }
                Accepted::WrongLength(actual) => {
                    // Handed over (as a failure) at once: every level would say the same.
                    tracing::warn!(level = name, digest = %chunk.digest, claimed = chunk.uncompressed_len, actual, "chunk reference has the wrong length");
                    group.handoff.deliver(
                        i,
                        Err(Arc::from(format!(
                            "the reference claims {} bytes, the chunk has {actual}",
                            chunk.uncompressed_len
                        ))),
                    );
                    Ok(())
                }
                Accepted::Corrupt => {
                    level.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("brisk_cache_corrupt_total", "level" => name).increment(1);
                    tracing::warn!(level = name, digest = %chunk.digest, "chunk failed verification, skipping level");
                    level.source.discard(&chunk.digest).await;
                    Err(Some(Arc::from(format!(
                        "bytes from the {name} level failed verification"
                    ))))
                }
            },
            Ok(None) => {
                level.stats.misses.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("brisk_cache_misses_total", "level" => name).increment(1);
                Err(None)
            }
            Err(err) => {
                level.stats.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("brisk_cache_errors_total", "level" => name).increment(1);
                let err = crate::error::chain(&err);
                tracing::warn!(level = name, digest = %chunk.digest, %err, "level failed, skipping");
                Err(Some(Arc::from(format!("the {name} level failed: {err}"))))
            }
        }
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

    /// Fetches `chunks` in the background, in the order given, always behind on-demand reads.
    /// A batch is a run of consecutive chunks that lie next to each other in one blob (one
    /// range request, up to about `batch_bytes` compressed); a few batches run at once, so
    /// the chunks needed first arrive first instead of sharing the link with later ones.
    /// Stops early when `cancel` fires. Returns how many chunks it made local.
    pub fn prefetch(
        self: &Arc<Self>,
        chunks: Vec<ChunkRef>,
        batch_bytes: u64,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<usize> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut batches: Vec<Vec<ChunkRef>> = Vec::new();
            let mut size = 0;
            // A reference outside the limits is left out (its range could not even be sized).
            for c in chunks.into_iter().filter(|c| c.check().is_ok()) {
                let follows = batches.last().and_then(|b| b.last()).is_some_and(|last| {
                    last.blob == c.blob
                        && c.compressed.start >= last.compressed.end
                        && c.compressed.start - last.compressed.end <= PREFETCH_MAX_GAP
                });
                if !follows || size >= batch_bytes {
                    batches.push(Vec::new());
                    size = 0;
                }
                size += c.compressed.end - c.compressed.start;
                batches.last_mut().expect("a batch was just pushed").push(c);
            }
            // The next batch starts once what is still to arrive fits the window: the link
            // stays busy across round trips, and chunks keep arriving about in the order given.
            let mut pending = futures::stream::FuturesUnordered::new();
            let mut outstanding = 0u64;
            let mut made_local = 0;
            let mut batches = batches.into_iter();
            loop {
                while pending.is_empty() || outstanding < PREFETCH_WINDOW {
                    if cancel.is_cancelled() {
                        break;
                    }
                    let Some(batch) = batches.next() else { break };
                    let flights = this.join_or_start(&batch, Priority::Prefetch, Reader::Local);
                    for (c, flight) in batch.iter().zip(flights) {
                        let size = c.compressed.end - c.compressed.start;
                        outstanding += size;
                        let flight = flight.expect("local reads are never declined");
                        pending.push(async move { (size, flight.await) });
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = pending.next() => match next {
                        Some((size, outcome)) => {
                            outstanding -= size;
                            match outcome {
                                Ok(_) => made_local += 1,
                                Err(err) => tracing::debug!(%err, "prefetch of a chunk failed"),
                            }
                        }
                        None => break,
                    },
                }
            }
            made_local
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

    /// `n` chunks of `len` bytes whose compressed ranges are as long and `stride` apart (no
    /// smaller: `ChunkRef::check` refuses a range longer than its data can compress to).
    fn spread_chunks(n: usize, len: u64, stride: u64) -> Vec<(ChunkRef, Bytes)> {
        (0..n)
            .map(|i| {
                let data = Bytes::from(vec![i as u8 + 1; len as usize]);
                let at = i as u64 * stride;
                let r = ChunkRef {
                    digest: Digest::sha256(&data),
                    blob: Digest::sha256(b"blob"),
                    compressed: at..at + len,
                    uncompressed_len: len,
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

    /// A level that serves bytes by where a reference says they are (as the registry does),
    /// slowly: a reference with the wrong range gets wrong bytes.
    struct ByRange {
        data: HashMap<std::ops::Range<u64>, Bytes>,
        delay: Duration,
        gets: AtomicU32,
    }

    #[async_trait::async_trait]
    impl ChunkSource for ByRange {
        fn name(&self) -> &'static str {
            "by-range"
        }

        async fn get(&self, chunk: &ChunkRef) -> Answer {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let wrong = || Bytes::from(vec![0u8; chunk.uncompressed_len as usize]);
            let data = self.data.get(&chunk.compressed).cloned();
            Ok(Some(Found::Bytes(data.unwrap_or_else(wrong))))
        }
    }

    #[tokio::test]
    async fn a_bad_reference_never_fails_a_good_one_for_the_same_digest() {
        let cs = chunks(1);
        let good = cs[0].0.clone();
        let origin = Arc::new(ByRange {
            data: HashMap::from([(good.compressed.clone(), cs[0].1.clone())]),
            delay: Duration::from_millis(50),
            gets: AtomicU32::new(0),
        });
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .build();
        // The same digest at the wrong place, and with the wrong length: each asked for just
        // before the good reference, which would have joined their fetch by digest alone.
        let wrong_range = ChunkRef {
            compressed: 5000..5100,
            ..good.clone()
        };
        let wrong_length = ChunkRef {
            uncompressed_len: good.uncompressed_len - 1,
            ..good.clone()
        };
        for bad in [wrong_range, wrong_length] {
            let l = layered.clone();
            let bad_read = tokio::spawn(async move { l.read(&bad, Priority::OnDemand).await });
            tokio::time::sleep(Duration::from_millis(10)).await;
            let got = layered.read(&good, Priority::OnDemand).await.unwrap();
            assert_eq!(got.data(), &cs[0].1);
            assert!(bad_read.await.unwrap().is_err());
        }
    }

    #[tokio::test]
    async fn a_reference_with_the_wrong_length_fails_alone_and_evicts_nothing() {
        let cs = chunks(1);
        let memory = Arc::new(MemoryCache::new(1 << 20));
        let origin = Arc::new(Scripted::new(&cs));
        let layered = Layered::builder()
            .level(memory.clone(), Duration::from_secs(1))
            .level(origin.clone(), Duration::from_secs(1))
            .build();
        layered.read(&cs[0].0, Priority::OnDemand).await.unwrap();
        let longer = ChunkRef {
            uncompressed_len: cs[0].0.uncompressed_len + 1,
            ..cs[0].0.clone()
        };
        let err = layered.read(&longer, Priority::OnDemand).await.unwrap_err();
        assert!(err.to_string().contains("the chunk has 1000"), "{err}");
        assert!(
            memory.contains(&cs[0].0.digest).await,
            "the true chunk stays"
        );
        assert_eq!(
            origin.gets.load(Ordering::SeqCst),
            1,
            "no level was asked again"
        );
        assert_eq!(layered.report()[0].corrupt, 0);
    }

    #[tokio::test]
    async fn references_outside_the_limits_are_refused_before_any_level_is_asked() {
        let cs = chunks(1);
        let origin = Arc::new(Scripted::new(&cs));
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(1))
            .build();
        let huge = ChunkRef {
            uncompressed_len: 1 << 40,
            ..cs[0].0.clone()
        };
        let err = layered.read(&huge, Priority::OnDemand).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::OverLimit {
                    limit: crate::Limit::ChunkSize,
                    value: 1099511627776,
                    ..
                }
            ),
            "{err}"
        );
        let wide = ChunkRef {
            compressed: 0..1 << 40,
            ..cs[0].0.clone()
        };
        assert!(layered
            .read_for_peer(std::slice::from_ref(&wide), Priority::OnDemand)
            .await[0]
            .is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = ChunkRef {
            compressed: 200..100,
            ..cs[0].0.clone()
        };
        let done = layered.prefetch(vec![wide, backwards], u64::MAX, CancellationToken::new());
        assert_eq!(done.await.unwrap(), 0);
        assert_eq!(origin.gets.load(Ordering::SeqCst), 0);
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
            layered.inflight.lock().unwrap().contains_key(&cs[9].0),
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

    /// An origin that answers the first `at_once` chunks of every request at once and holds
    /// the rest back until `release` gets a permit, like a large range read still arriving.
    struct Trickle {
        data: HashMap<Digest, Bytes>,
        at_once: usize,
        release: tokio::sync::Semaphore,
        calls: AtomicU32,
    }

    impl Trickle {
        fn new(chunks: &[(ChunkRef, Bytes)], at_once: usize) -> Self {
            Self {
                data: chunks.iter().map(|(r, b)| (r.digest, b.clone())).collect(),
                at_once,
                release: tokio::sync::Semaphore::new(0),
                calls: AtomicU32::new(0),
            }
        }

        fn answer(&self, chunk: &ChunkRef) -> Answer {
            Ok(self.data.get(&chunk.digest).cloned().map(Found::Bytes))
        }
    }

    #[async_trait::async_trait]
    impl ChunkSource for Trickle {
        fn name(&self) -> &'static str {
            "trickle"
        }

        async fn get(&self, chunk: &ChunkRef) -> Answer {
            crate::source::get_one(self, chunk).await
        }

        async fn get_many_each(
            &self,
            chunks: &[ChunkRef],
            _priority: Priority,
            each: &(dyn Fn(usize, Answer) + Send + Sync),
        ) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            for (i, c) in chunks.iter().enumerate().take(self.at_once) {
                each(i, self.answer(c));
            }
            if chunks.len() > self.at_once {
                self.release.acquire().await.unwrap().forget();
            }
            for (i, c) in chunks.iter().enumerate().skip(self.at_once) {
                each(i, self.answer(c));
            }
        }
    }

    /// Prefetches all of `cs` as one batch and returns once `origin` has been asked for it.
    async fn prefetch_in_one_batch(
        layered: &Arc<Layered>,
        cs: &[(ChunkRef, Bytes)],
        origin: &Trickle,
    ) -> tokio::task::JoinHandle<usize> {
        let all: Vec<ChunkRef> = cs.iter().map(|c| c.0.clone()).collect();
        let handle = layered.prefetch(all, u64::MAX, CancellationToken::new());
        while origin.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        handle
    }

    #[tokio::test]
    async fn a_chunk_of_a_batch_is_handed_over_before_the_rest_of_the_batch_arrives() {
        let cs = chunks(3);
        let origin = Arc::new(Trickle::new(&cs, 1));
        let memory = Arc::new(MemoryCache::new(1 << 20));
        let layered = Layered::builder()
            .level(memory, Duration::from_secs(5))
            .level(origin.clone(), Duration::from_secs(5))
            .build();
        let handle = prefetch_in_one_batch(&layered, &cs, &origin).await;
        let first = tokio::time::timeout(
            Duration::from_secs(5),
            layered.read(&cs[0].0, Priority::OnDemand),
        )
        .await
        .expect("the first chunk must not wait for the rest of its batch")
        .unwrap();
        assert_eq!(first.data(), &cs[0].1);
        assert!(!handle.is_finished(), "the rest of the batch is held back");
        assert_eq!(
            origin.calls.load(Ordering::SeqCst),
            1,
            "the reader made no fetch"
        );
        origin.release.add_permits(1);
        assert_eq!(handle.await.unwrap(), 3);
        assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_reader_joining_one_chunk_of_a_prefetch_batch_makes_only_that_chunk_on_demand() {
        let cs = chunks(3);
        let origin = Arc::new(Trickle::new(&cs, 0));
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .build();
        let handle = prefetch_in_one_batch(&layered, &cs, &origin).await;
        let l = layered.clone();
        let wanted = cs[1].0.clone();
        let reader = tokio::spawn(async move { l.read(&wanted, Priority::OnDemand).await });
        while !layered.inflight.lock().unwrap()[&cs[1].0]
            .wanted
            .load(Ordering::SeqCst)
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        origin.release.add_permits(1);
        assert_eq!(reader.await.unwrap().unwrap().data(), &cs[1].1);
        assert_eq!(handle.await.unwrap(), 3);
        assert_eq!(layered.origin_fetches(), (1, 2));
    }

    #[tokio::test]
    async fn prefetch_batches_are_runs_of_neighbours_in_the_order_given() {
        // Chunks of 100 kB that touch: 2 and 7 are 500 kB apart, far more than the gap kept.
        let cs = spread_chunks(9, 100_000, 100_000);
        let origin = Arc::new(Scripted::new(&cs));
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .prefetch_concurrency(1)
            .build();
        let order = [0, 1, 2, 7, 8, 3, 5];
        let refs = order.iter().map(|&i| cs[i].0.clone()).collect();
        assert_eq!(
            layered
                .prefetch(refs, u64::MAX, CancellationToken::new())
                .await
                .unwrap(),
            order.len()
        );
        let digests = |is: &[usize]| is.iter().map(|&i| cs[i].0.digest).collect::<Vec<_>>();
        assert_eq!(
            *origin.calls.lock().unwrap(),
            vec![
                digests(&[0, 1, 2]),
                digests(&[7, 8]),
                digests(&[3]),
                digests(&[5])
            ]
        );
    }

    #[tokio::test]
    async fn prefetch_stops_when_cancelled() {
        // 600 kB apart: each its own batch, and two fill the window.
        let cs = spread_chunks(10, 600_000, 1_200_000);
        let mut origin = Scripted::new(&cs);
        origin.delay = Duration::from_millis(30);
        let origin = Arc::new(origin);
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .build();
        let cancel = CancellationToken::new();
        let handle = layered.prefetch(
            cs.iter().map(|c| c.0.clone()).collect(),
            u64::MAX,
            cancel.clone(),
        );
        tokio::time::sleep(Duration::from_millis(70)).await;
        cancel.cancel();
        let done = handle.await.unwrap();
        assert!(done < 10, "prefetched {done} of 10 after cancel");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fetched = origin.gets.load(Ordering::SeqCst);
        assert!(fetched < 10, "{fetched} of 10 fetched after cancel");
    }

    #[tokio::test]
    async fn prefetch_keeps_about_a_window_of_bytes_on_the_way() {
        // 10 chunks of 400 kB, each its own batch: the window holds three at a time.
        let cs = spread_chunks(10, 400_000, 1_000_000);
        let origin = Arc::new(Trickle::new(&cs, 0));
        let layered = Layered::builder()
            .level(origin.clone(), Duration::from_secs(5))
            .prefetch_concurrency(10)
            .build();
        let handle = layered.prefetch(
            cs.iter().map(|c| c.0.clone()).collect(),
            u64::MAX,
            CancellationToken::new(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(origin.calls.load(Ordering::SeqCst), 3, "three on the way");
        origin.release.add_permits(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            origin.calls.load(Ordering::SeqCst),
            4,
            "one more after one arrived"
        );
        origin.release.add_permits(100);
        assert_eq!(handle.await.unwrap(), 10);
    }
}
