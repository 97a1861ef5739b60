//! Read-path benchmark, one run, ratios against baselines measured in the same run:
//! L1 and L2 hit latency (p50/p99) and throughput for 4 KiB and 1 MiB chunks, L4 sequential
//! fetch throughput against `curl` downloading the same blob from the same registry, and the
//! request count of a sequential prefetch with and without coalescing.
//!
//! Run with `cargo bench -p brisk-blobcache --bench cache`. The L4 part starts Debian's
//! `docker-registry` on a loopback port and needs `curl`; it is skipped if either is missing.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brisk_blobcache::chunk::{ChunkRef, VerifiedChunk};
use brisk_blobcache::disk::DiskCache;
use brisk_blobcache::layered::{Layered, Priority};
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_blobcache::source::ChunkSource;
use brisk_blobcache::toc::{convert_layer, ConvertOptions};
use brisk_blobcache::Digest;
use bytes::Bytes;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("hit latency (in process, through Layered::read):");
        for size in [4096usize, 1 << 20] {
            hits(size).await;
        }
        l4().await;
    });
}

fn data(seed: u64, len: usize) -> Bytes {
    let mut x = seed | 1;
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<_>>(),
    )
}

fn chunk(seed: u64, len: usize) -> (ChunkRef, VerifiedChunk) {
    let d = data(seed, len);
    let r = ChunkRef {
        codec: Default::default(),
        digest: Digest::sha256(&d),
        blob: Digest::sha256(b"b"),
        compressed: 0..1,
        uncompressed_len: len as u64,
    };
    let v = VerifiedChunk::check(&r, d).unwrap();
    (r, v)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

async fn measure(
    layered: &Arc<Layered>,
    refs: &[ChunkRef],
    rounds: usize,
) -> (Duration, Duration, f64) {
    let mut samples = Vec::with_capacity(rounds);
    let started = Instant::now();
    let mut bytes = 0u64;
    for i in 0..rounds {
        let r = &refs[i % refs.len()];
        let t = Instant::now();
        let c = layered.read(r, Priority::OnDemand).await.unwrap();
        samples.push(t.elapsed());
        bytes += c.data().len() as u64;
    }
    let (p50, p99) = percentiles(samples);
    (
        p50,
        p99,
        bytes as f64 / started.elapsed().as_secs_f64() / 1e6,
    )
}

async fn hits(size: usize) {
    let count = if size < 65536 { 256 } else { 32 };
    let chunks: Vec<_> = (0..count).map(|i| chunk(i as u64 + 1, size)).collect();
    let refs: Vec<ChunkRef> = chunks.iter().map(|c| c.0.clone()).collect();
    let rounds = if size < 65536 { 20_000 } else { 500 };

    let memory = Arc::new(MemoryCache::new(1 << 30));
    for (_, v) in &chunks {
        memory.put(v).await;
    }
    let l1 = Layered::builder()
        .memory(memory, Duration::from_secs(1))
        .build();
    let (p50, p99, tput) = measure(&l1, &refs, rounds).await;
    println!(
        "  L1 {:>7} B: p50 {:>9.1?}  p99 {:>9.1?}  {:>8.0} MB/s",
        size, p50, p99, tput
    );

    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
    for (_, v) in &chunks {
        disk.put(v).await;
    }
    disk.flush().unwrap();
    // An L1 of zero bytes keeps nothing, so every read is an L2 hit (warm page cache).
    let l2 = Layered::builder()
        .memory(Arc::new(MemoryCache::new(0)), Duration::from_secs(1))
        .disk(disk, Duration::from_secs(5))
        .build();
    measure(&l2, &refs, rounds / 10).await;
    let (p50, p99, tput) = measure(&l2, &refs, rounds).await;
    println!(
        "  L2 {:>7} B: p50 {:>9.1?}  p99 {:>9.1?}  {:>8.0} MB/s",
        size, p50, p99, tput
    );
}

/// The registry process and the directory holding its storage, removed on drop.
struct Registry(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry() -> Option<(Registry, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir = tempfile::tempdir().ok()?;
    let config = dir.path().join("config.yml");
    let yaml = format!(
        "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
        dir.path().join("data").display()
    );
    std::fs::write(&config, yaml).ok()?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let reg = Registry(child, dir);
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Some((reg, addr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

async fn l4() {
    println!(
        "\nL4 sequential fetch (loopback registry, 100 MB layer of 1 MiB chunks, no cache levels):"
    );
    if Command::new("curl").arg("--version").output().is_err() {
        println!("  skipped: curl not found");
        return;
    }
    let Some((_registry, addr)) = start_registry() else {
        println!("  skipped: docker-registry could not be started");
        return;
    };
    // One 100 MB file of barely compressible bytes, as a lazy layer.
    let mut tar = tar::Builder::new(Vec::new());
    let payload = data(99, 100 << 20);
    let mut h = tar::Header::new_gnu();
    h.set_size(payload.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_data(&mut h, "big.bin", &payload[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let (layer, blob) = convert_layer(&tar[..], Vec::new(), &ConvertOptions::default()).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().write_all(&blob).unwrap();
    let toc = {
        let r = layer.toc.range();
        brisk_blobcache::toc::Toc::decode(
            &blob[r.start as usize..r.end as usize],
            layer.toc.uncompressed_size,
            None,
        )
        .unwrap()
    };
    let reference: Reference = format!("{addr}/bench:v1").parse().unwrap();
    let client = Arc::new(RegistryClient::new(RegistryConfig::default()).unwrap());
    client
        .push_blob_file(&reference, &layer.digest, file.path())
        .await
        .unwrap();
    let url = format!("http://{addr}/v2/bench/blobs/{}", layer.digest);
    let refs = ChunkRef::all(layer.digest, &toc);

    let mut curl_best = Duration::MAX;
    let mut brisk_best = Duration::MAX;
    let mut requests = (0, 0);
    for _ in 0..3 {
        let t = Instant::now();
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &url])
            .status()
            .unwrap()
            .success();
        assert!(ok, "curl failed");
        curl_best = curl_best.min(t.elapsed());
        for coalesce in [true, false] {
            let config = if coalesce {
                RemoteConfig::default()
            } else {
                RemoteConfig {
                    coalesce_bytes: 0,
                    ..RemoteConfig::default()
                }
            };
            let source = Arc::new(RegistrySource::new(client.clone(), config));
            source.register_blob(layer.digest, &reference);
            let layered = Layered::builder()
                .origin(source.clone(), Duration::from_secs(120))
                .prefetch_concurrency(4)
                .build();
            let t = Instant::now();
            let fetched = layered
                .prefetch(refs.clone(), 16 << 20, Default::default())
                .await
                .unwrap();
            assert_eq!(fetched, refs.len());
            let n = source
                .stats()
                .requests
                .load(std::sync::atomic::Ordering::Relaxed);
            if coalesce {
                brisk_best = brisk_best.min(t.elapsed());
                requests.0 = n;
            } else {
                requests.1 = n;
            }
        }
    }
    let mb = blob.len() as f64 / 1e6;
    println!(
        "  curl (whole blob)          {:>8.0} MB/s",
        mb / curl_best.as_secs_f64()
    );
    println!(
        "  brisk prefetch (coalesced) {:>8.0} MB/s  ratio {:.2}x of curl (fetch + decompress + verify)",
        mb / brisk_best.as_secs_f64(),
        curl_best.as_secs_f64() / brisk_best.as_secs_f64()
    );
    println!(
        "  range requests for {} chunks: {} coalesced, {} without coalescing",
        refs.len(),
        requests.0,
        requests.1
    );
}
