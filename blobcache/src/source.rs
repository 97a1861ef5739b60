//! The interface shared by every cache level: memory, disk, zone peers, registry.
//!
//! A level answers "do you have these chunks?" and may keep chunks it is given. It never
//! decides what a miss, a failure or bad bytes mean; that policy lives in `crate::layered`.

use bytes::Bytes;

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Level unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SourceError {
    pub fn unavailable(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(err))
    }
}

/// What a level found for a chunk.
#[derive(Clone, Debug)]
pub enum Found {
    /// Bytes the read path still has to verify (they came from disk, a peer or the network).
    Bytes(Bytes),
    /// A chunk verified when it entered this level and held in process memory since (so
    /// hashing it again on every hit would only cost time), or checked by the level itself
    /// as it read it (L2 checks batches on the blocking pool).
    Verified(VerifiedChunk),
}

impl Found {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Found::Bytes(b) => b,
            Found::Verified(v) => v.data(),
        }
    }
}

/// One answer per requested chunk; `Ok(None)` is a clean miss.
pub type Answer = Result<Option<Found>, SourceError>;

/// Why a read wants the bytes: a waiting reader, or ahead of need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A reader is waiting for these bytes.
    OnDemand,
    /// Fetched ahead of need; waits while on-demand fetches are in flight.
    Prefetch,
}

/// A cache level. Two methods make one: its name and `fetch`; everything else has a default
/// that fits a level which keeps nothing and knows nothing ahead of a fetch.
#[async_trait::async_trait]
pub trait ChunkSource: Send + Sync {
    /// Short, stable name for logs and metrics: "memory", "disk", "peer", "registry".
    fn name(&self) -> &'static str;

    /// Looks for `chunks`, handing each answer to `each` (with the chunk's index) as soon as
    /// it is known, so a reader waiting on one chunk of a large batch need not wait for the
    /// rest. A chunk never handed over is a clean miss. `priority` is for levels that pass
    /// work on to others (zone peers).
    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    );

    /// One chunk, on demand.
    async fn get(&self, chunk: &ChunkRef) -> Answer {
        self.get_many(std::slice::from_ref(chunk))
            .await
            .pop()
            .unwrap_or(Ok(None))
    }

    /// Several chunks on demand, answers in request order.
    async fn get_many(&self, chunks: &[ChunkRef]) -> Vec<Answer> {
        let answers: std::sync::Mutex<Vec<Answer>> =
            std::sync::Mutex::new(chunks.iter().map(|_| Ok(None)).collect());
        self.fetch(chunks, Priority::OnDemand, &|i, answer| {
            if let Some(slot) = answers.lock().expect("not poisoned").get_mut(i) {
                *slot = answer;
            }
        })
        .await;
        answers.into_inner().expect("not poisoned")
    }

    /// Whether asking this level for `chunk` means asking another host (zone peers).
    fn forwards(&self, _chunk: &ChunkRef) -> bool {
        false
    }

    /// Whether this level holds the chunk, without fetching it. Only local levels know.
    async fn contains(&self, _digest: &Digest) -> bool {
        false
    }

    /// Keep a chunk fetched from a slower level. The registry keeps nothing.
    async fn put(&self, _chunk: &VerifiedChunk) {}

    /// Forget a chunk whose bytes failed verification, so it is fetched again.
    async fn discard(&self, _digest: &Digest) {}
}
