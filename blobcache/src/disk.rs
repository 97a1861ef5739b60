//! L2: chunks on the host's disk, content-addressed by digest (a chunk shared by layers and
//! images is stored once), bounded by bytes with least-recently-used eviction, surviving
//! restarts.
//!
//! Crash safety comes from the order of writes: a chunk is written to `tmp/`, synced, renamed
//! into `chunks/`, and only then entered in the sled index. A chunk is served only if the index
//! has it, so a torn write is never visible; leftovers are removed on open. Bytes that rot
//! behind Brisk's back fail verification in the read path, which then discards them here.
//! A full disk evicts, and if that does not help the level degrades to pass-through.
//!
//! Writes happen on a writer thread of their own: a chunk a reader waits for is handed over
//! without waiting for its file to be synced, and the sync never holds an async worker. Until
//! its file is in place, a chunk being written is served from the bytes queued for writing.
//!
//! A batch of chunks (read-ahead of a streaming reader, prefetch) is read and checked on the
//! blocking pool, a few at a time, each handed over as soon as it is ready: a stream from L2
//! then overlaps disk reads and hashing with the reader, instead of doing one after the
//! other on an async worker.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use futures::StreamExt;

use crate::chunk::{ChunkRef, VerifiedChunk};
use crate::source::{Answer, ChunkSource, Found, Priority, SourceError};
use crate::{Digest, Error, Result};

/// sled keeps its own page cache; this caps it so the index never competes with L1.
const INDEX_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Bytes queued for the writer at most; past it a write happens in the caller, which slows a
/// burst of fetches down to what the disk takes instead of growing memory without bound.
const QUEUED_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Chunks of one batch read and checked at once on the blocking pool.
const BATCH_READS: usize = 2;

pub struct DiskCache {
    store: Arc<Store>,
    queue: Arc<Queue>,
    writer: Option<(mpsc::Sender<VerifiedChunk>, std::thread::JoinHandle<()>)>,
}

/// Chunks handed to the writer and not yet in place, readable meanwhile.
#[derive(Default)]
struct Queue {
    chunks: Mutex<HashMap<Digest, VerifiedChunk>>,
    bytes: AtomicU64,
    /// Signalled each time the writer empties the queue.
    drained: Condvar,
}

struct Store {
    root: PathBuf,
    /// digest -> size (u64 BE) ++ access stamp (u64 BE).
    index: sled::Tree,
    /// access stamp (u64 BE) ++ digest -> (), oldest first: the eviction order.
    by_age: sled::Tree,
    db: sled::Db,
    capacity: u64,
    bytes: AtomicU64,
    clock: AtomicU64,
    /// Serializes eviction so two writers do not both evict for the same overflow.
    evicting: Mutex<()>,
}

impl DiskCache {
    /// Opens (or creates) the cache at `root`, dropping anything a crash left half done.
    pub fn open(root: impl Into<PathBuf>, capacity_bytes: u64) -> Result<Self> {
        let store = Arc::new(Store::open(root.into(), capacity_bytes)?);
        let queue = Arc::new(Queue::default());
        let (tx, rx) = mpsc::channel::<VerifiedChunk>();
        let writer = {
            let root = store.root.clone();
            let (store, queue) = (store.clone(), queue.clone());
            std::thread::Builder::new()
                .name("brisk-l2-writer".into())
                .spawn(move || {
                    for chunk in rx {
                        store.put(&chunk);
                        queue.done(chunk.digest());
                    }
                })
                .map_err(|e| Error::io(root, e))?
        };
        Ok(Self {
            store,
            queue,
            writer: Some((tx, writer)),
        })
    }

    /// Bytes currently stored.
    pub fn len_bytes(&self) -> u64 {
        self.store.len_bytes()
    }

    /// Waits for the chunks queued so far to be written, then writes the index to disk; the
    /// snapshotter calls it on shutdown.
    pub fn flush(&self) -> Result<()> {
        self.queue.wait_drained();
        self.store.flush()
    }

    /// Where the cache keeps its files (for tests that damage them on purpose).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.store.chunk_path(digest)
    }

    pub fn root(&self) -> &Path {
        &self.store.root
    }
}

impl Drop for DiskCache {
    /// Whatever was queued is written before the cache goes.
    fn drop(&mut self) {
        if let Some((tx, writer)) = self.writer.take() {
            drop(tx);
            let _ = writer.join();
        }
    }
}

impl Queue {
    fn get(&self, digest: &Digest) -> Option<VerifiedChunk> {
        self.chunks
            .lock()
            .expect("not poisoned")
            .get(digest)
            .cloned()
    }

    /// Takes `chunk` in unless it is already queued or the queue is full.
    fn admit(&self, chunk: &VerifiedChunk) -> bool {
        let size = chunk.data().len() as u64;
        let mut chunks = self.chunks.lock().expect("not poisoned");
        if chunks.contains_key(chunk.digest())
            || self.bytes.load(Ordering::Relaxed) + size > QUEUED_MAX_BYTES
        {
            return false;
        }
        chunks.insert(*chunk.digest(), chunk.clone());
        self.bytes.fetch_add(size, Ordering::Relaxed);
        true
    }

    fn done(&self, digest: &Digest) {
        let mut chunks = self.chunks.lock().expect("not poisoned");
        if let Some(c) = chunks.remove(digest) {
            self.bytes
                .fetch_sub(c.data().len() as u64, Ordering::Relaxed);
        }
        if chunks.is_empty() {
            self.drained.notify_all();
        }
    }

    fn wait_drained(&self) {
        let chunks = self.chunks.lock().expect("not poisoned");
        let _unused = self
            .drained
            .wait_while(chunks, |c| !c.is_empty())
            .expect("not poisoned");
    }
}

impl Store {
    fn open(root: PathBuf, capacity_bytes: u64) -> Result<Self> {
        for dir in ["chunks", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|e| Error::io(root.join(dir), e))?;
        }
        let db = open_index(&root.join("index"))?;
        let sled_err = |e: sled::Error| Error::io(root.join("index"), std::io::Error::other(e));
        let index = db.open_tree("chunks").map_err(sled_err)?;
        let by_age = db.open_tree("by_age").map_err(sled_err)?;
        let cache = Self {
            root,
            index,
            by_age,
            db,
            capacity: capacity_bytes,
            bytes: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            evicting: Mutex::new(()),
        };
        cache.recover()?;
        Ok(cache)
    }

    fn chunk_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Makes the index and the files agree: temp files go, files the index does not know go,
    /// index entries whose file is missing or has the wrong size go.
    fn recover(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp)
            .map_err(|e| Error::io(&tmp, e))?
            .flatten()
        {
            let _ = std::fs::remove_file(entry.path());
        }
        let mut total = 0u64;
        let mut max_stamp = 0u64;
        for item in self.index.iter() {
            let (key, value) = item.map_err(|e| Error::io(&self.root, std::io::Error::other(e)))?;
            let Some((digest, size, stamp)) = decode_entry(&key, &value) else {
                let _ = self.index.remove(&key);
                continue;
            };
            match std::fs::metadata(self.chunk_path(&digest)) {
                Ok(meta) if meta.len() == size => {
                    total += size;
                    max_stamp = max_stamp.max(stamp);
                }
                _ => {
                    let _ = self.index.remove(&key);
                    let _ = self.by_age.remove(age_key(stamp, &digest));
                    let _ = std::fs::remove_file(self.chunk_path(&digest));
                }
            }
        }
        let chunks = self.root.join("chunks");
        for dir in std::fs::read_dir(&chunks)
            .map_err(|e| Error::io(&chunks, e))?
            .flatten()
        {
            for file in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let known = file
                    .file_name()
                    .to_str()
                    .and_then(|name| format!("sha256:{name}").parse::<Digest>().ok())
                    .is_some_and(|d| self.index.contains_key(d.as_bytes()).unwrap_or(false));
                if !known {
                    let _ = std::fs::remove_file(file.path());
                }
            }
        }
        self.bytes.store(total, Ordering::Relaxed);
        self.clock.store(max_stamp + 1, Ordering::Relaxed);
        Ok(())
    }

    fn len_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| Error::io(&self.root, std::io::Error::other(e)))
    }

    fn touch(&self, digest: &Digest, size: u64, old_stamp: Option<u64>) -> sled::Result<()> {
        let stamp = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = old_stamp {
            self.by_age.remove(age_key(old, digest))?;
        }
        self.by_age.insert(age_key(stamp, digest), &[])?;
        self.index
            .insert(digest.as_bytes(), encode_value(size, stamp))?;
        Ok(())
    }

    fn read(&self, digest: &Digest) -> std::io::Result<Option<Found>> {
        let Some(value) = self
            .index
            .get(digest.as_bytes())
            .map_err(std::io::Error::other)?
        else {
            return Ok(None);
        };
        let Some((_, size, stamp)) = decode_entry(digest.as_bytes(), &value) else {
            return Ok(None);
        };
        let data = match std::fs::read(self.chunk_path(digest)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.remove(digest);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if data.len() as u64 != size {
            self.remove(digest);
            return Ok(None);
        }
        self.touch(digest, size, Some(stamp))
            .map_err(std::io::Error::other)?;
        Ok(Some(Found::Bytes(data.into())))
    }

    fn write(&self, chunk: &VerifiedChunk) -> std::io::Result<()> {
        let digest = chunk.digest();
        if self
            .index
            .contains_key(digest.as_bytes())
            .map_err(std::io::Error::other)?
        {
            return Ok(());
        }
        let size = chunk.data().len() as u64;
        if size > self.capacity {
            return Ok(());
        }
        self.make_room(size);
        let result = self.write_file(digest, chunk.data());
        let result = match result {
            // A full disk: free a tenth of the cache and try once more.
            Err(e) if e.raw_os_error() == Some(28) => {
                self.evict_until(self.len_bytes().saturating_sub(self.capacity / 10));
                self.write_file(digest, chunk.data())
            }
            other => other,
        };
        result?;
        self.touch(digest, size, None)
            .map_err(std::io::Error::other)?;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    fn write_file(&self, digest: &Digest, data: &[u8]) -> std::io::Result<()> {
        let dest = self.chunk_path(digest);
        std::fs::create_dir_all(dest.parent().expect("chunk paths have a parent"))?;
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}",
            digest.hex(),
            self.clock.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &dest)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    fn make_room(&self, incoming: u64) {
        if self.len_bytes() + incoming > self.capacity {
            self.evict_until(self.capacity.saturating_sub(incoming));
        }
    }

    fn evict_until(&self, target: u64) {
        let _guard = self.evicting.lock().expect("not poisoned");
        while self.len_bytes() > target {
            let Ok(Some((key, _))) = self.by_age.pop_min() else {
                break;
            };
            let Ok(digest_bytes) = <[u8; 32]>::try_from(&key[8..]) else {
                continue;
            };
            self.remove(&Digest::from_bytes(digest_bytes));
        }
    }

    fn remove(&self, digest: &Digest) {
        if let Ok(Some(value)) = self.index.remove(digest.as_bytes()) {
            if let Some((_, size, stamp)) = decode_entry(digest.as_bytes(), &value) {
                let _ = self.by_age.remove(age_key(stamp, digest));
                self.bytes
                    .fetch_sub(size.min(self.len_bytes()), Ordering::Relaxed);
            }
        }
        let _ = std::fs::remove_file(self.chunk_path(digest));
    }

    fn put(&self, chunk: &VerifiedChunk) {
        if let Err(err) = self.write(chunk) {
            tracing::warn!(digest = %chunk.digest(), %err, "disk cache write failed; serving without keeping");
        }
    }
}

/// Opens the sled index. A previous owner in this process (a cache just dropped) releases
/// the file lock from sled's background thread, a moment later: wait for it briefly.
fn open_index(path: &Path) -> Result<sled::Db> {
    let mut attempts = 0;
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(INDEX_CACHE_BYTES)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::Other && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(Error::io(path, std::io::Error::other(e))),
        }
    }
}

fn age_key(stamp: u64, digest: &Digest) -> Vec<u8> {
    let mut k = stamp.to_be_bytes().to_vec();
    k.extend_from_slice(digest.as_bytes());
    k
}

fn encode_value(size: u64, stamp: u64) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&stamp.to_be_bytes());
    v
}

fn decode_entry(key: &[u8], value: &[u8]) -> Option<(Digest, u64, u64)> {
    let digest = Digest::from_bytes(key.try_into().ok()?);
    let size = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let stamp = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((digest, size, stamp))
}

impl DiskCache {
    /// One chunk read on the calling thread: a small synchronous file read is cheaper inline
    /// than a hop to the blocking pool, and the chunk files are in the page cache when it
    /// matters.
    fn read_inline(&self, chunk: &ChunkRef) -> Answer {
        if let Some(queued) = self.queue.get(&chunk.digest) {
            return Ok(Some(Found::Bytes(queued.data().clone())));
        }
        self.store
            .read(&chunk.digest)
            .map_err(SourceError::unavailable)
    }
}

#[async_trait::async_trait]
impl ChunkSource for DiskCache {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        if chunks.len() < 2 {
            for (i, c) in chunks.iter().enumerate() {
                each(i, self.read_inline(c));
            }
            return;
        }
        let reads = chunks.iter().cloned().map(|chunk| {
            let store = self.store.clone();
            let queued = self.queue.get(&chunk.digest);
            async move {
                if let Some(queued) = queued {
                    return Ok(Some(Found::Bytes(queued.data().clone())));
                }
                tokio::task::spawn_blocking(move || {
                    let found = store.read(&chunk.digest)?;
                    // Checked here, off the async workers; bytes that fail are handed on as
                    // they are, for the read path to refuse and discard like any other.
                    Ok(found.map(|found| match found {
                        Found::Bytes(bytes) => match VerifiedChunk::check(&chunk, bytes.clone()) {
                            Some(verified) => Found::Verified(verified),
                            None => Found::Bytes(bytes),
                        },
                        verified => verified,
                    }))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(SourceError::unavailable)
            }
        });
        let mut answers = futures::stream::iter(reads).buffered(BATCH_READS);
        let mut i = 0;
        while let Some(answer) = answers.next().await {
            each(i, answer);
            i += 1;
        }
    }

    async fn contains(&self, digest: &Digest) -> bool {
        self.queue.get(digest).is_some()
            || self
                .store
                .index
                .contains_key(digest.as_bytes())
                .unwrap_or(false)
    }

    async fn put(&self, chunk: &VerifiedChunk) {
        if self
            .store
            .index
            .contains_key(chunk.digest().as_bytes())
            .unwrap_or(false)
        {
            return;
        }
        let Some((tx, _)) = &self.writer else { return };
        if self.queue.admit(chunk) {
            if tx.send(chunk.clone()).is_err() {
                self.queue.done(chunk.digest());
            }
        } else if self.queue.get(chunk.digest()).is_none() {
            // The writer is behind: this caller writes the chunk itself, which holds the
            // read path back (the cache keeps up rather than silently dropping chunks).
            crate::blocking::in_place(|| self.store.put(chunk));
        }
    }

    async fn discard(&self, digest: &Digest) {
        self.store.remove(digest);
    }
}
