//! L2 on a real directory: restarts, crash leftovers, damage behind Brisk's back, the byte
//! bound, and a full disk.

use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::chunk::{ChunkRef, VerifiedChunk};
use brisk_blobcache::disk::DiskCache;
use brisk_blobcache::layered::{Layered, Priority};
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::source::ChunkSource;
use brisk_blobcache::Digest;
use bytes::Bytes;

fn chunk(seed: u32, len: usize) -> (ChunkRef, VerifiedChunk) {
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
        .collect();
    let r = ChunkRef {
        codec: Default::default(),
        digest: Digest::sha256(&data),
        blob: Digest::sha256(b"layer"),
        compressed: 0..1,
        uncompressed_len: len as u64,
    };
    let v = VerifiedChunk::check(&r, Bytes::from(data)).unwrap();
    (r, v)
}

/// Flips bits of one byte of a chunk's file behind the cache's back.
fn rot(disk: &DiskCache, digest: &Digest, at: usize, bits: u8) {
    let mut bytes = std::fs::read(disk.path_of(digest)).unwrap();
    bytes[at] ^= bits;
    std::fs::write(disk.path_of(digest), &bytes).unwrap();
}

#[tokio::test]
async fn chunks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (r, v) = chunk(1, 10_000);
    {
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        cache.put(&v).await;
        cache.flush().unwrap();
    }
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(cache.get(&r).await.unwrap().unwrap().bytes(), v.data());
    assert_eq!(cache.len_bytes(), 10_000);
}

#[tokio::test]
async fn crash_leftovers_are_cleaned_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, kept_v) = chunk(1, 5_000);
    let (lost, lost_v) = chunk(2, 5_000);
    let (orphan, _) = chunk(3, 5_000);
    {
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        cache.put(&kept_v).await;
        cache.put(&lost_v).await;
        cache.flush().unwrap();
        // A write torn by a crash: the temp file is there, the index never heard of it.
        std::fs::write(dir.path().join("tmp").join("torn.1"), b"half a chunk").unwrap();
        // A chunk renamed into place but not yet indexed when the process died.
        let orphan_path = cache.path_of(&orphan.digest);
        std::fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
        std::fs::write(&orphan_path, b"not indexed").unwrap();
        // An indexed chunk whose file was truncated.
        std::fs::write(cache.path_of(&lost.digest), b"short").unwrap();
    }
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert!(std::fs::read_dir(dir.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    assert!(!cache.path_of(&orphan.digest).exists());
    assert!(cache.get(&orphan).await.unwrap().is_none());
    assert!(cache.get(&lost).await.unwrap().is_none());
    assert_eq!(
        cache.get(&kept).await.unwrap().unwrap().bytes(),
        kept_v.data()
    );
    assert_eq!(cache.len_bytes(), 5_000);
}

#[tokio::test]
async fn a_chunk_damaged_on_disk_is_detected_discarded_and_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
    // The slower level stands in for the origin: a real level holding the good bytes.
    let origin = Arc::new(MemoryCache::new(1 << 20));
    let (r, v) = chunk(7, 20_000);
    origin.put(&v).await;
    disk.put(&v).await;
    disk.flush().unwrap();
    rot(&disk, &r.digest, 1234, 0x01);

    let layered = Layered::builder()
        .disk(disk.clone(), Duration::from_secs(5))
        .origin(origin, Duration::from_secs(5))
        .build();
    let got = layered.read(&r, Priority::OnDemand).await.unwrap();
    assert_eq!(got.data(), v.data());
    let report = layered.report();
    assert_eq!((report[0].level, report[0].corrupt), ("disk", 1));
    assert_eq!(report[1].hits, 1);
    // The damaged copy was replaced by the verified one.
    disk.flush().unwrap();
    assert_eq!(
        std::fs::read(disk.path_of(&r.digest)).unwrap(),
        v.data().as_ref()
    );
}

#[tokio::test]
async fn a_batch_read_from_disk_is_checked_chunk_by_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskCache::open(dir.path(), 4 << 20).unwrap());
    let origin = Arc::new(MemoryCache::new(4 << 20));
    let chunks: Vec<_> = (0..5).map(|i| chunk(40 + i, 100_000)).collect();
    for (_, v) in &chunks {
        origin.put(v).await;
        disk.put(v).await;
    }
    disk.flush().unwrap();
    // One chunk of the batch rots on disk.
    let damaged = &chunks[2].0;
    rot(&disk, &damaged.digest, 99_999, 0x80);

    let layered = Layered::builder()
        .disk(disk.clone(), Duration::from_secs(5))
        .origin(origin, Duration::from_secs(5))
        .build();
    let refs: Vec<ChunkRef> = chunks.iter().map(|(r, _)| r.clone()).collect();
    let got = layered.read_many(&refs, Priority::OnDemand).await.unwrap();
    for ((_, want), got) in chunks.iter().zip(&got) {
        assert_eq!(got.data(), want.data());
    }
    let report = layered.report();
    assert_eq!(
        (report[0].hits, report[0].corrupt, report[1].hits),
        (4, 1, 1),
        "{report:?}"
    );
    disk.flush().unwrap();
    assert_eq!(
        std::fs::read(disk.path_of(&damaged.digest)).unwrap(),
        chunks[2].1.data().as_ref()
    );
}

#[tokio::test]
async fn the_byte_bound_holds_and_recent_chunks_stay() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let chunks: Vec<_> = (0..100).map(|i| chunk(i, 64 * 1024)).collect();
    for (i, (_, v)) in chunks.iter().enumerate() {
        cache.put(v).await;
        // Each write in place before the next read, as in a start that reads as it fetches.
        cache.flush().unwrap();
        if i >= 2 {
            // Keep chunk 0 hot: it must survive eviction.
            assert!(
                cache.get(&chunks[0].0).await.unwrap().is_some(),
                "hot chunk evicted at {i}"
            );
        }
    }
    assert!(
        cache.len_bytes() <= 1 << 20,
        "{} bytes kept",
        cache.len_bytes()
    );
    let on_disk: u64 = walk(&dir.path().join("chunks"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(on_disk, cache.len_bytes());
    assert!(cache.get(&chunks[99].0).await.unwrap().is_some());
    assert!(cache.get(&chunks[1].0).await.unwrap().is_none());
    drop(cache);
    // The bound and the accounting survive a restart.
    let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(cache.len_bytes(), on_disk);
}

#[tokio::test]
async fn queued_writes_are_served_at_once_and_in_place_when_the_cache_goes() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..64).map(|i| chunk(200 + i, 64 * 1024)).collect();
    {
        let cache = DiskCache::open(dir.path(), 64 << 20).unwrap();
        for (_, v) in &chunks {
            cache.put(v).await;
        }
        // Whether its file is written yet or not, every chunk put is served.
        for (r, v) in &chunks {
            assert_eq!(cache.get(r).await.unwrap().unwrap().bytes(), v.data());
            assert!(cache.contains(&r.digest).await);
        }
    }
    // Dropped without a flush: the writer finished the queue first.
    let cache = DiskCache::open(dir.path(), 64 << 20).unwrap();
    for (r, v) in &chunks {
        assert_eq!(
            std::fs::read(cache.path_of(&r.digest)).unwrap(),
            v.data().as_ref()
        );
    }
    assert_eq!(cache.len_bytes(), 64 * 64 * 1024);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A disk that fills up: writes fail, the cache keeps serving (pass-through) and never
/// crashes. Needs root to mount a small tmpfs; skipped visibly otherwise.
#[tokio::test]
async fn a_full_disk_degrades_to_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        if std::env::var("BRISK_E2E").as_deref() == Ok("1") {
            panic!("BRISK_E2E=1 but a tmpfs could not be mounted (needs root)");
        }
        println!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let result = std::panic::AssertUnwindSafe(async {
        let disk = Arc::new(DiskCache::open(dir.path().join("cache"), 64 << 20).unwrap());
        let origin = Arc::new(MemoryCache::new(64 << 20));
        let chunks: Vec<_> = (0..8).map(|i| chunk(100 + i, 256 * 1024)).collect();
        for (_, v) in &chunks {
            origin.put(v).await;
        }
        let layered = Layered::builder()
            .disk(disk.clone(), Duration::from_secs(5))
            .origin(origin, Duration::from_secs(5))
            .build();
        // 2 MiB of chunks into a 1 MiB filesystem: every read still succeeds.
        for (r, v) in &chunks {
            assert_eq!(
                layered.read(r, Priority::OnDemand).await.unwrap().data(),
                v.data()
            );
        }
        disk.flush().unwrap();
        assert!(disk.len_bytes() <= 1 << 20);
    });
    let outcome = futures::FutureExt::catch_unwind(result).await;
    let _ = std::process::Command::new("umount")
        .arg(dir.path())
        .status();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
