//! Verification and fill-back: what one level's answer for one chunk is worth, and, when it
//! is the chunk, keeping it in every faster level on the way back to the reader.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::failure::ReadFailure;
use super::flight::{Group, Served};
use super::{Layered, Level, Role};
use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::{Answer, Found, Priority};
use crate::Digest;

/// What a level's answer is worth for one chunk reference.
enum Accepted {
    Verified(VerifiedChunk),
    /// The level holds the digest's true bytes, but the reference claims another length.
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

/// How one answer ended for its chunk.
pub(super) enum Taken {
    /// Handed to the readers (the chunk, or a failure no other level could change).
    Delivered,
    /// A clean miss: the next level is asked.
    Missed,
    /// The level failed or lied: the next level is asked, and this is why it may fail.
    Failed(ReadFailure),
}

impl Layered {
    /// Level `li`'s answer for chunk `i` of `group`: a verified chunk is kept by the faster
    /// levels and handed over at once (as is the failure of a reference with the wrong
    /// length); bytes that fail their check are discarded from the level.
    pub(super) async fn take(
        &self,
        li: usize,
        level: &Level,
        group: &Group<'_>,
        i: usize,
        answer: Answer,
    ) -> Taken {
        let name = level.source.name();
        let chunk = &group.chunks[i];
        match answer {
            Ok(Some(found)) => match accept(chunk, found) {
                Accepted::Verified(verified) => {
                    level.stats.hit(name, verified.data().len() as u64);
                    // Only the faster levels need it; this one already has it.
                    for faster in &self.levels[..li] {
                        faster.source.put(&verified).await;
                    }
                    if level.role == Role::Origin {
                        let on_demand = group.priority == Priority::OnDemand
                            || group.wanted[i].load(Ordering::SeqCst);
                        self.counters.origin_fetch(on_demand);
                    }
                    if level.role >= Role::Peer {
                        self.counters.fetched(chunk, level.role);
                    }
                    group.handoff.deliver(
                        i,
                        Ok(Served {
                            chunk: verified,
                            from: level.role,
                        }),
                    );
                    Taken::Delivered
                }
                Accepted::WrongLength(actual) => {
                    tracing::warn!(level = name, digest = %chunk.digest, claimed = chunk.uncompressed_len, actual, "chunk reference has the wrong length");
                    group.handoff.deliver(
                        i,
                        Err(ReadFailure::WrongLength {
                            claimed: chunk.uncompressed_len,
                            actual,
                        }),
                    );
                    Taken::Delivered
                }
                Accepted::Corrupt => {
                    level.stats.corrupt(name);
                    tracing::warn!(level = name, digest = %chunk.digest, "chunk failed verification, skipping level");
                    level.source.discard(&chunk.digest).await;
                    Taken::Failed(ReadFailure::Corrupt { level: name })
                }
            },
            Ok(None) => {
                level.stats.misses(name, 1);
                Taken::Missed
            }
            Err(err) => {
                level.stats.error(name);
                tracing::warn!(level = name, digest = %chunk.digest, err = %crate::error::chain(&err), "level failed, skipping");
                Taken::Failed(ReadFailure::LevelFailed {
                    level: name,
                    error: Arc::new(err),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn reference(data: &[u8]) -> ChunkRef {
        ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(data),
            blob: Digest::sha256(b"blob"),
            compressed: 0..data.len() as u64,
            uncompressed_len: data.len() as u64,
        }
    }

    #[test]
    fn an_answer_is_the_chunk_a_wrong_reference_or_not_the_chunk() {
        let data = Bytes::from_static(b"the chunk's bytes");
        let chunk = reference(&data);
        assert!(matches!(
            accept(&chunk, Found::Bytes(data.clone())),
            Accepted::Verified(v) if v.data() == &data
        ));
        assert!(matches!(
            accept(&chunk, Found::Bytes(Bytes::from_static(b"other bytes"))),
            Accepted::Corrupt
        ));
        // The digest's true bytes under a reference claiming another length: the reference
        // is wrong, whether the level checked the bytes already or not.
        let longer = ChunkRef {
            uncompressed_len: data.len() as u64 + 1,
            ..chunk.clone()
        };
        assert!(matches!(
            accept(&longer, Found::Bytes(data.clone())),
            Accepted::WrongLength(n) if n == data.len() as u64
        ));
        let verified = VerifiedChunk::check(&chunk, data.clone()).unwrap();
        assert!(matches!(
            accept(&longer, Found::Verified(verified.clone())),
            Accepted::WrongLength(_)
        ));
        // A verified chunk of another digest is not this one.
        let other = reference(b"another chunk");
        assert!(matches!(
            accept(&other, Found::Verified(verified)),
            Accepted::Corrupt
        ));
    }
}
