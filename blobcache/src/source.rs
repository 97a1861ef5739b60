//! The interface shared by every cache level: memory, disk, zone peers, registry.
//!
//! A level answers "do you have these chunks?" and may keep chunks it is given. It never
//! decides what a miss, a failure or bad bytes mean; that policy lives in `crate::layered`.

use bytes::Bytes;

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::layered::Priority;
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

#[async_trait::async_trait]
pub trait ChunkSource: Send + Sync {
    /// Short, stable name for logs and metrics: "memory", "disk", "peer", "registry".
    fn name(&self) -> &'static str;

    /// The uncompressed bytes of `chunk` if this level has them.
    async fn get(&self, chunk: &ChunkRef) -> Answer;

    /// Several chunks at once, answers in request order. Levels that can serve neighbours in
    /// one request (the registry) override this; the default asks for each concurrently.
    async fn get_many(&self, chunks: &[ChunkRef]) -> Vec<Answer> {
        futures::future::join_all(chunks.iter().map(|c| self.get(c))).await
    }

    /// `get_many` for a read of the given priority; levels that pass work on to others
    /// (zone peers) forward it.
    async fn get_many_for(&self, chunks: &[ChunkRef], _priority: Priority) -> Vec<Answer> {
        self.get_many(chunks).await
    }

    /// `get_many_for` that hands each answer to `each` (with the chunk's index) as soon as it
    /// is known, so a reader waiting on one chunk of a large batch need not wait for the rest.
    /// Levels that receive a batch piece by piece (the registry) override it.
    async fn get_many_each(
        &self,
        chunks: &[ChunkRef],
        priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        for (i, answer) in self
            .get_many_for(chunks, priority)
            .await
            .into_iter()
            .enumerate()
        {
            each(i, answer);
        }
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

/// `get` for levels whose natural unit is a batch: asks `get_many` for one chunk.
pub async fn get_one<S: ChunkSource + ?Sized>(source: &S, chunk: &ChunkRef) -> Answer {
    source
        .get_many(std::slice::from_ref(chunk))
        .await
        .pop()
        .unwrap_or(Ok(None))
}
