//! L1: decompressed chunks in host memory, bounded by bytes, least recently used out first.

use std::sync::Mutex;

use lru::LruCache;

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::{Answer, ChunkSource, Found, Priority};
use crate::Digest;

pub struct MemoryCache {
    /// A std mutex: held for a hash lookup or insert, never across an await.
    inner: Mutex<Inner>,
    capacity: u64,
}

struct Inner {
    lru: LruCache<Digest, VerifiedChunk>,
    bytes: u64,
}

impl MemoryCache {
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity: capacity_bytes,
        }
    }

    pub fn len_bytes(&self) -> u64 {
        self.inner.lock().expect("not poisoned").bytes
    }

    fn lookup(&self, digest: &Digest) -> Option<VerifiedChunk> {
        self.inner
            .lock()
            .expect("not poisoned")
            .lru
            .get(digest)
            .cloned()
    }
}

#[async_trait::async_trait]
impl ChunkSource for MemoryCache {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        for (i, chunk) in chunks.iter().enumerate() {
            if let Some(v) = self.lookup(&chunk.digest) {
                each(i, Ok(Some(Found::Verified(v))));
            }
        }
    }

    async fn contains(&self, digest: &Digest) -> bool {
        self.inner
            .lock()
            .expect("not poisoned")
            .lru
            .contains(digest)
    }

    async fn put(&self, chunk: &VerifiedChunk) {
        let size = chunk.data().len() as u64;
        if size > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().expect("not poisoned");
        if let Some(old) = inner.lru.put(*chunk.digest(), chunk.clone()) {
            inner.bytes -= old.data().len() as u64;
        }
        inner.bytes += size;
        while inner.bytes > self.capacity {
            let Some((_, evicted)) = inner.lru.pop_lru() else {
                break;
            };
            inner.bytes -= evicted.data().len() as u64;
        }
    }

    async fn discard(&self, digest: &Digest) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if let Some(old) = inner.lru.pop(digest) {
            inner.bytes -= old.data().len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn chunk(data: &'static [u8]) -> (ChunkRef, VerifiedChunk) {
        let r = ChunkRef {
            codec: Default::default(),
            digest: Digest::sha256(data),
            blob: Digest::sha256(b"blob"),
            compressed: 0..1,
            uncompressed_len: data.len() as u64,
        };
        let v = VerifiedChunk::check(&r, Bytes::from_static(data)).unwrap();
        (r, v)
    }

    #[tokio::test]
    async fn keeps_within_its_byte_bound_evicting_the_least_recently_used() {
        let cache = MemoryCache::new(10);
        let (a, va) = chunk(b"aaaa");
        let (b, vb) = chunk(b"bbbb");
        let (c, vc) = chunk(b"cccc");
        cache.put(&va).await;
        cache.put(&vb).await;
        assert!(cache.get(&a).await.unwrap().is_some()); // a is now the most recent
        cache.put(&vc).await;
        assert_eq!(cache.len_bytes(), 8);
        assert!(cache.get(&a).await.unwrap().is_some());
        assert!(
            cache.get(&b).await.unwrap().is_none(),
            "b was least recently used"
        );
        assert_eq!(cache.get(&c).await.unwrap().unwrap().bytes(), &b"cccc"[..]);
        cache.discard(&c.digest).await;
        assert!(cache.get(&c).await.unwrap().is_none());
        assert_eq!(cache.len_bytes(), 4);
    }
}
