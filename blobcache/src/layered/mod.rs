//! Read-through composition of cache levels, fastest first: the one read path for on-demand
//! reads, prefetch and chunks served to zone peers.
//!
//! Each policy has a file of its own: `flight` (concurrent reads of one chunk make one
//! fetch), `levels` (the walk down the levels, deadlines), `fill` (verification before
//! anything is served or kept, and fill-back into faster levels), `schedule` (on-demand reads
//! ahead of prefetch at the origin), `prefetch` (batching in trace order), `stats` (counters),
//! `failure` (why a read failed, as data). Levels are given roles by the builder: what a
//! level is for is never guessed from its name or its place.

mod failure;
mod fill;
mod flight;
mod levels;
mod prefetch;
mod schedule;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use failure::{CacheError, ReadFailure};
pub use stats::{BlobFetched, LevelReport};

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::ChunkSource;
pub use crate::source::Priority;
use crate::{Digest, Error, Result};

/// What a level is for. Levels are asked in this order (the builder sorts them, keeping the
/// order given within a role).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Host memory (L1).
    Memory,
    /// Host disk (L2).
    Disk,
    /// Zone peers (L3): skipped for reads a peer asked for, and never joined by them.
    Peer,
    /// Where chunks come from (L4, the registry): on-demand fetches here hold prefetch back,
    /// and what it serves is counted as fetched.
    Origin,
}

struct Level {
    role: Role,
    source: Arc<dyn ChunkSource>,
    /// Slower than this counts as a miss for this read, not an error: the next level may
    /// still answer in time.
    deadline: Duration,
    stats: stats::LevelStats,
}

/// Who a read is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Local,
    /// A zone peer: the peer level is skipped (the asking host already chose this one).
    Peer,
}

pub struct Layered {
    levels: Vec<Level>,
    /// Fetches in progress by the whole chunk reference, not the digest alone: a reference
    /// that names a digest with a wrong range or length (a hostile TOC or peer) must never
    /// fail, or delay, a correct one that would otherwise join it. The price: the same content
    /// asked for through two blobs at once is fetched twice (the caches then hold it once).
    /// A std mutex: held only to look up or insert.
    inflight: Mutex<HashMap<ChunkRef, flight::InFlight>>,
    gate: schedule::Gate,
    counters: stats::Counters,
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
    /// Adds a level with `role`, answering within `deadline`.
    pub fn level(mut self, role: Role, source: Arc<dyn ChunkSource>, deadline: Duration) -> Self {
        self.levels.push(Level {
            role,
            source,
            deadline,
            stats: stats::LevelStats::default(),
        });
        self
    }

    pub fn memory(self, source: Arc<dyn ChunkSource>, deadline: Duration) -> Self {
        self.level(Role::Memory, source, deadline)
    }

    pub fn disk(self, source: Arc<dyn ChunkSource>, deadline: Duration) -> Self {
        self.level(Role::Disk, source, deadline)
    }

    pub fn peer(self, source: Arc<dyn ChunkSource>, deadline: Duration) -> Self {
        self.level(Role::Peer, source, deadline)
    }

    pub fn origin(self, source: Arc<dyn ChunkSource>, deadline: Duration) -> Self {
        self.level(Role::Origin, source, deadline)
    }

    /// Prefetch batches fetched from the origin at once (default 4), across every prefetch
    /// running.
    pub fn prefetch_concurrency(mut self, n: usize) -> Self {
        self.prefetch_concurrency = n.max(1);
        self
    }

    pub fn passes(mut self, n: u32) -> Self {
        self.passes = n.max(1);
        self
    }

    pub fn build(mut self) -> Arc<Layered> {
        self.levels.sort_by_key(|l| l.role);
        Arc::new(Layered {
            levels: self.levels,
            inflight: Mutex::default(),
            gate: schedule::Gate::new(self.prefetch_concurrency),
            counters: stats::Counters::default(),
            passes: self.passes,
        })
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
        Ok(self.read_many_from(chunks, priority).await?.0)
    }

    /// Reads as `read_many` does, and says the slowest role that served any of the chunks
    /// (`Role::Memory` for none): a read that got a chunk from a peer or the origin waited on
    /// the network, whether its own fetch or one it joined.
    pub async fn read_many_from(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        priority: Priority,
    ) -> Result<(Vec<VerifiedChunk>, Role)> {
        for c in chunks {
            c.check()?;
        }
        let flights = self
            .join_or_start(chunks, priority, Reader::Local)
            .into_iter()
            .map(|f| f.expect("local reads are never declined"));
        let results = futures::future::join_all(flights).await;
        let mut slowest = Role::Memory;
        let got = chunks
            .iter()
            .zip(results)
            .map(|(c, r)| match r {
                Ok(served) => {
                    slowest = slowest.max(served.from);
                    Ok(served.chunk)
                }
                Err(reason) => Err(Error::Cache(CacheError::ChunkUnavailable {
                    digest: c.digest,
                    reason,
                })),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((got, slowest))
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
                Some(f) => f.await.ok().map(|served| served.chunk),
                None => None,
            }
        }))
        .await
    }

    /// Whether a level of this host (memory or disk) holds the chunk; fetches nothing.
    pub async fn contains(&self, digest: &Digest) -> bool {
        for level in self.levels.iter().filter(|l| l.role < Role::Peer) {
            if level.source.contains(digest).await {
                return true;
            }
        }
        false
    }

    /// Chunks fetched from the origin (on demand, by prefetch).
    pub fn origin_fetches(&self) -> (u64, u64) {
        self.counters.origin_fetches()
    }

    /// What layer blob `blob`'s chunks cost off this host so far (zero for a blob past the
    /// bound of blobs counted, or forgotten).
    pub fn fetched(&self, blob: &Digest) -> BlobFetched {
        self.counters.fetched_for(blob)
    }

    /// Stops counting `blob` one by one (its layer is gone), making room for another.
    pub fn forget_fetched(&self, blob: &Digest) {
        self.counters.forget(blob)
    }

    /// Per-level counters, fastest level first.
    pub fn report(&self) -> Vec<LevelReport> {
        self.levels
            .iter()
            .map(|l| l.stats.report(l.source.name()))
            .collect()
    }
}
