//! `brisk cat` and the chunk cache read path behind it, against the real registry with a
//! fault-injecting proxy in between: a file costs only the chunks it needs, a repeat with
//! a cache directory costs no blob bytes (and works offline), retryable faults are
//! retried, and no fault ever gets a wrong byte printed or kept.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use brisk_blobcache::chunk::ChunkRef;
use brisk_blobcache::layered::{Layered, Priority};
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_blobcache::toc::{Toc, TocPosition};
use brisk_blobcache::Digest;
use brisk_e2e::cmd::stderr_of;
use brisk_e2e::proxy::Counts;
use brisk_e2e::{
    brisk_output, gate, raw_manifest, sample_in_registry, Fault, Injection, Proxy,
    RegisteredSample, Registry, CONVERT_FILES, CONVERT_TOOLS,
};
use serde_json::Value;
use tempfile::TempDir;

/// The multi-chunk file of layer 1.
const BIG: &str = "app/big.bin";

fn enabled() -> bool {
    gate(CONVERT_TOOLS, CONVERT_FILES)
}

/// The sample, converted into its own registry, reached through a proxy.
struct LazySample {
    proxy: Proxy,
    registry: Registry,
    /// `sample:lazy` through the proxy.
    image: String,
    rootfs: PathBuf,
    cache_dir: PathBuf,
    _tmp: TempDir,
}

impl LazySample {
    fn start() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let RegisteredSample {
            registry, rootfs, ..
        } = sample_in_registry(tmp.path(), false, &[])?;
        let proxy = Proxy::start(&registry.addr())?;
        Ok(Self {
            image: proxy.image("sample:lazy"),
            proxy,
            registry,
            rootfs,
            cache_dir: tmp.path().join("cache"),
            _tmp: tmp,
        })
    }

    /// The sample with its manifest and both TOCs already in `cache_dir` (by reading a
    /// layer 2 file), and the counts reset: reading `BIG` (layer 1) with the cache then
    /// makes blob requests for chunks only, so a blob fault hits the chunk read path.
    fn with_metadata_cached() -> Result<Self> {
        let sample = Self::start()?;
        let out = sample.cat_cached("etc/hostname", &[])?;
        assert_printed(&out, b"sample-v2\n", "warming cat");
        sample.proxy.reset_counts();
        Ok(sample)
    }

    /// The true content of `path`, from the tree the image was built from.
    fn truth(&self, path: &str) -> Result<Vec<u8>> {
        let file = self.rootfs.join(path.trim_start_matches('/'));
        std::fs::read(&file).with_context(|| format!("Reading {}", file.display()))
    }

    /// `brisk cat` through the proxy, without a cache directory.
    fn cat(&self, path: &str, flags: &[&str]) -> Result<Output> {
        let mut args = vec!["cat", &self.image, path];
        args.extend_from_slice(flags);
        brisk_output(&args)
    }

    /// `brisk cat` through the proxy with `cache_dir`.
    fn cat_cached(&self, path: &str, flags: &[&str]) -> Result<Output> {
        let dir = self.cache_dir.to_str().context("Non-UTF-8 temp path")?;
        let mut with_cache = vec!["--cache-dir", dir];
        with_cache.extend_from_slice(flags);
        self.cat(path, &with_cache)
    }

    /// Sum of the layer sizes in the converted manifest.
    fn image_bytes(&self) -> Result<u64> {
        let manifest: Value =
            serde_json::from_str(&raw_manifest(&self.registry.image("sample:lazy"))?)?;
        manifest["layers"]
            .as_array()
            .context("Manifest has no layers")?
            .iter()
            .map(|l| l["size"].as_u64().context("Layer without a size"))
            .sum()
    }
}

/// A successful cat printed exactly `expected`.
fn assert_printed(out: &Output, expected: &[u8], what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        stderr_of(out)
    );
    assert!(
        out.stdout == expected,
        "{what} printed {} bytes that differ from the {} expected",
        out.stdout.len(),
        expected.len()
    );
}

/// A failed cat: exit status 1 and an error on stderr. Returns stderr.
fn assert_cat_failed(out: &Output, what: &str) -> String {
    let stderr = stderr_of(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} should fail with 1; stderr:\n{stderr}"
    );
    assert!(stderr.contains("Error: "), "{what}: no error:\n{stderr}");
    stderr
}

/// A failed cat of a file whose content is `truth`: on stdout nothing or a strict prefix
/// of it, never other bytes. Returns stderr.
fn assert_failed_cleanly(out: &Output, truth: &[u8], what: &str) -> String {
    let stderr = assert_cat_failed(out, what);
    assert!(
        out.stdout.len() < truth.len() && truth.starts_with(&out.stdout),
        "{what} printed {} bytes that are not a strict prefix of the file",
        out.stdout.len()
    );
    stderr
}

/// The `--stats` JSON: the last line of stderr.
fn stats(out: &Output) -> Result<Value> {
    let stderr = stderr_of(out);
    let line = stderr.lines().last().context("Empty stderr, no stats")?;
    serde_json::from_str(line).with_context(|| format!("Stats line is not JSON: {line}"))
}

/// One level's counters from `--stats`, or `Null` if the level is absent.
fn level<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["levels"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["level"] == name))
        .unwrap_or(&Value::Null)
}

/// The chunk files of a disk cache, `chunks/chunks/<2 hex>/<hex>` under `cache_dir`.
fn disk_chunks(cache_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(cache_dir.join("chunks/chunks"))? {
        for file in std::fs::read_dir(dir?.path())? {
            files.push(file?.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Every chunk kept on disk is named by the sha256 of its bytes: nothing unverified was kept.
fn assert_disk_holds_only_verified_chunks(cache_dir: &Path) -> Result<()> {
    for file in disk_chunks(cache_dir)? {
        let bytes = std::fs::read(&file)?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert_eq!(
            Digest::sha256(&bytes).hex(),
            name,
            "{} holds other bytes than its name says",
            file.display()
        );
    }
    Ok(())
}

fn ranges(counts: &Counts) -> Vec<Option<String>> {
    counts.blobs.iter().map(|b| b.range.clone()).collect()
}

#[test]
fn cat_reads_files_and_fetches_only_what_they_need() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let sample = LazySample::start()?;
    let image_bytes = sample.image_bytes()?;

    let out = sample.cat("app/nested/target.txt", &["--stats"])?;
    assert_printed(&out, b"the target\n", "cat of a small file");
    let small = sample.proxy.counts();
    // Its chunk and the two TOCs: a small fraction of the image.
    assert!(
        small.blob_bytes * 10 < image_bytes,
        "a small file cost {} blob bytes of a {image_bytes}-byte image",
        small.blob_bytes
    );
    assert_eq!(stats(&out)?["registry_chunk_requests"], 1);

    sample.proxy.reset_counts();
    let out = sample.cat(&format!("/{BIG}"), &[])?;
    assert_printed(&out, &sample.truth(BIG)?, "cat of the big file");
    assert!(sample.proxy.counts().blob_bytes < image_bytes);

    for (path, expected) in [
        ("etc/hostname", &b"sample-v2\n"[..]),
        ("/etc/hostname", b"sample-v2\n"),
        ("app/link", b"the target\n"),
        ("/app/link", b"the target\n"),
        ("app/data/hardlink", b"linked twice\n"),
        ("app/empty", b""),
    ] {
        let out = sample.cat(path, &[])?;
        assert_printed(&out, expected, &format!("cat {path}"));
    }
    for deleted in ["app/remove-me.txt", "/app/old-dir/file.txt", "app/old-dir"] {
        let out = sample.cat(deleted, &[])?;
        let stderr = assert_cat_failed(&out, &format!("cat of deleted {deleted}"));
        assert!(out.stdout.is_empty());
        assert!(stderr.contains("no such file"), "stderr:\n{stderr}");
    }
    Ok(())
}

#[test]
fn cat_repeat_with_cache_dir_costs_zero_blob_bytes() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let mut sample = LazySample::start()?;
    let truth = sample.truth(BIG)?;
    let out = sample.cat_cached(BIG, &["--stats"])?;
    assert_printed(&out, &truth, "first cat");
    let first = stats(&out)?;
    assert!(level(&first, "registry")["hits"].as_u64() > Some(0));
    let chunks = disk_chunks(&sample.cache_dir)?.len() as u64;
    assert!(chunks > 1, "{chunks} chunk files for a multi-chunk file");

    sample.proxy.reset_counts();
    let out = sample.cat_cached(BIG, &["--stats"])?;
    assert_printed(&out, &truth, "repeat cat");
    let counts = sample.proxy.counts();
    assert_eq!(
        (counts.blob_requests, counts.blob_bytes),
        (0, 0),
        "the repeat fetched blobs: {:?}",
        counts.blobs
    );
    let repeat = stats(&out)?;
    assert_eq!(level(&repeat, "disk")["hits"].as_u64(), Some(chunks));
    assert_eq!(level(&repeat, "registry")["hits"], 0);
    assert_eq!(repeat["registry_chunk_bytes"], 0);
    assert_eq!(repeat["registry_toc_bytes"], 0);

    // A registry that answers nothing but errors, then one that is gone altogether.
    sample.proxy.inject(Injection::all(Fault::Status(503)));
    let out = sample.cat_cached(BIG, &["--retries", "0"])?;
    assert_printed(&out, &truth, "cat while the registry answers 503");
    sample.proxy.stop();
    let out = sample.cat_cached(BIG, &["--retries", "0"])?;
    assert_printed(&out, &truth, "cat while the registry is unreachable");
    Ok(())
}

/// Reads `BIG` once with `injection` on its chunk requests; returns the sample (for its
/// counts and cache), the true content and the output.
fn cat_big_with(injection: Injection, flags: &[&str]) -> Result<(LazySample, Vec<u8>, Output)> {
    let sample = LazySample::with_metadata_cached()?;
    let truth = sample.truth(BIG)?;
    sample.proxy.inject(injection);
    let out = sample.cat_cached(BIG, flags)?;
    Ok((sample, truth, out))
}

/// After a failed read, whatever it kept on disk is verified, and the same cache directory
/// with the fault gone gives the true content.
fn assert_recovers(sample: &LazySample, truth: &[u8]) -> Result<()> {
    assert_disk_holds_only_verified_chunks(&sample.cache_dir)?;
    sample.proxy.clear();
    let out = sample.cat_cached(BIG, &[])?;
    assert_printed(&out, truth, "cat after the fault is gone");
    Ok(())
}

/// A fault that fires once and is retried: the read succeeds, and the proxy saw the
/// failed request and its retry for the same range.
fn assert_retried_once(fault: Fault) -> Result<()> {
    let (sample, truth, out) = cat_big_with(Injection::blobs(fault.clone()).times(1), &[])?;
    assert_printed(&out, &truth, &format!("cat with {fault:?} once"));
    let counts = sample.proxy.counts();
    assert_eq!(counts.faults, 1);
    assert_eq!(counts.blob_requests, 2, "requests: {:?}", counts.blobs);
    assert_eq!(counts.blobs[0].range, counts.blobs[1].range);
    assert!(counts.blobs[0].range.is_some());
    Ok(())
}

#[test]
fn cat_retries_a_chunk_request_answered_500_once() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    assert_retried_once(Fault::Status(500))
}

#[test]
fn cat_retries_a_chunk_request_answered_429_once() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    assert_retried_once(Fault::Status(429))
}

#[test]
fn cat_retries_a_connection_cut_mid_body() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    assert_retried_once(Fault::CloseMidBody)
}

#[test]
fn cat_fails_cleanly_when_chunk_requests_get_503_forever() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let (sample, truth, out) =
        cat_big_with(Injection::blobs(Fault::Status(503)), &["--retries", "2"])?;
    let stderr = assert_failed_cleanly(&out, &truth, "cat with 503 forever");
    assert!(stderr.contains("503"), "stderr does not say 503:\n{stderr}");
    // Three attempts (one and two retries) in each of the read path's two passes.
    assert_eq!(sample.proxy.counts().blob_requests, 6);
    assert_recovers(&sample, &truth)
}

/// A registry that stops sending: the read gives up within a bounded time.
fn assert_gives_up_on(fault: Fault) -> Result<()> {
    let started = Instant::now();
    let (sample, truth, out) = cat_big_with(
        Injection::blobs(fault.clone()),
        &["--registry-timeout", "1", "--retries", "1"],
    )?;
    let stderr = assert_failed_cleanly(&out, &truth, &format!("cat with {fault:?}"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "gave up only after {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("any cache level") && stderr.contains("timed out"),
        "stderr does not name the chunk and the timeout:\n{stderr}"
    );
    // Two attempts in each of two passes.
    assert_eq!(sample.proxy.counts().blob_requests, 4);
    assert_recovers(&sample, &truth)
}

#[test]
fn cat_gives_up_on_a_registry_that_never_answers() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    assert_gives_up_on(Fault::Stall)
}

#[test]
fn cat_gives_up_on_a_body_that_never_arrives() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    assert_gives_up_on(Fault::StallBody)
}

#[test]
fn cat_never_prints_chunks_with_a_flipped_bit() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let (sample, truth, out) = cat_big_with(Injection::blobs(Fault::FlipBit), &[])?;
    let stderr = assert_failed_cleanly(&out, &truth, "cat with a bit flipped");
    assert!(
        stderr.contains("any cache level"),
        "stderr does not name the chunk:\n{stderr}"
    );
    // One request per pass: the second asks again only for the chunk that failed.
    let counts = sample.proxy.counts();
    assert_eq!(counts.blob_requests, 2, "requests: {:?}", ranges(&counts));
    assert_recovers(&sample, &truth)
}

#[test]
fn cat_refetches_a_chunk_with_a_bit_flipped_once() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let (sample, truth, out) =
        cat_big_with(Injection::blobs(Fault::FlipBit).times(1), &["--stats"])?;
    assert_printed(&out, &truth, "cat with a bit flipped once");
    let registry = level(&stats(&out)?, "registry").clone();
    assert_eq!(registry["corrupt"], 1, "registry level: {registry}");
    let counts = sample.proxy.counts();
    assert_eq!(counts.blob_requests, 2, "requests: {:?}", ranges(&counts));
    assert_ne!(
        counts.blobs[0].range, counts.blobs[1].range,
        "the second pass should ask for the bad chunk alone"
    );
    Ok(())
}

#[test]
fn cat_never_prints_another_chunks_bytes() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let (sample, truth, out) = cat_big_with(Injection::blobs(Fault::WrongChunk), &[])?;
    let stderr = assert_failed_cleanly(&out, &truth, "cat served the wrong chunk");
    assert!(
        stderr.contains("any cache level"),
        "stderr does not name the chunk:\n{stderr}"
    );
    assert_recovers(&sample, &truth)
}

#[test]
fn cat_handles_a_registry_that_ignores_range() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let (sample, truth, out) = cat_big_with(Injection::blobs(Fault::IgnoreRange), &[])?;
    assert_printed(&out, &truth, "cat from a registry ignoring Range");
    // The whole blob came back once and was cut to the range: no retry, no second pass.
    let counts = sample.proxy.counts();
    assert_eq!((counts.faults, counts.blob_requests), (1, 1));
    Ok(())
}

#[test]
fn cat_follows_a_redirect_keeping_the_range() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let (sample, truth, out) = cat_big_with(Injection::blobs(Fault::Redirect), &[])?;
    assert_printed(&out, &truth, "cat through a redirect");
    let counts = sample.proxy.counts();
    let [original, redirected] = &counts.blobs[..] else {
        panic!("expected a request and its redirect: {:?}", counts.blobs);
    };
    assert_eq!(original.fault, Some(Fault::Redirect));
    assert_eq!(redirected.path, format!("/redirected{}", original.path));
    assert!(original.range.is_some());
    assert_eq!(
        redirected.range, original.range,
        "Range lost in the redirect"
    );
    Ok(())
}

#[test]
fn l2_detects_a_chunk_corrupted_on_disk_and_refetches() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let sample = LazySample::start()?;
    let truth = sample.truth(BIG)?;
    assert_printed(&sample.cat_cached(BIG, &[])?, &truth, "first cat");
    let chunk = disk_chunks(&sample.cache_dir)?
        .into_iter()
        .next()
        .context("No chunk on disk")?;
    let mut bytes = std::fs::read(&chunk)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&chunk, bytes)?;

    sample.proxy.reset_counts();
    let out = sample.cat_cached(BIG, &["--stats"])?;
    assert_printed(&out, &truth, "cat with a chunk rotted on disk");
    let stats = stats(&out)?;
    assert!(
        level(&stats, "disk")["corrupt"].as_u64() >= Some(1),
        "stats: {stats}"
    );
    assert_eq!(level(&stats, "registry")["hits"], 1);
    assert_eq!(sample.proxy.counts().blob_requests, 1);
    // The refetched chunk replaced the bad one: a third read is all from disk.
    assert_disk_holds_only_verified_chunks(&sample.cache_dir)?;
    sample.proxy.reset_counts();
    assert_printed(&sample.cat_cached(BIG, &[])?, &truth, "third cat");
    assert_eq!(sample.proxy.counts().blob_requests, 0);
    Ok(())
}

/// Layer 1 of a lazy image as the library sees it.
pub(crate) struct Layer {
    pub(crate) blob: Digest,
    pub(crate) toc: Toc,
    source: Arc<RegistrySource>,
}

impl Layer {
    /// Fetches the manifest and the layer's TOC with the public API, and registers the
    /// blob with a registry level.
    pub(crate) async fn open(image: &str) -> Result<Self> {
        let reference: Reference = image.parse()?;
        let client = Arc::new(RegistryClient::new(RegistryConfig::default())?);
        let manifest = client.get_manifest(&reference).await?;
        let manifest: Value = serde_json::from_slice(&manifest.bytes)?;
        let layer = &manifest["layers"][0];
        let text = |v: &Value| v.as_str().map(str::to_owned).context("Missing string");
        let blob: Digest = text(&layer["digest"])?.parse()?;
        let annotations = &layer["annotations"];
        let toc_digest: Digest = text(&annotations["dev.brisk.toc.digest"])?.parse()?;
        let position: TocPosition = text(&annotations["dev.brisk.toc.position"])?.parse()?;
        let payload = client
            .get_blob_range(&reference, &blob, position.range())
            .await?;
        let toc = Toc::decode(&payload, position.uncompressed_size, Some(&toc_digest))?;
        let source = Arc::new(RegistrySource::new(client, RemoteConfig::default()));
        source.register_blob(blob, &reference);
        Ok(Self { blob, toc, source })
    }

    /// A fresh read path: an empty memory level over the registry level.
    fn layered(&self) -> Arc<Layered> {
        Layered::builder()
            .memory(Arc::new(MemoryCache::new(64 << 20)), Duration::from_secs(1))
            .origin(self.source.clone(), Duration::from_secs(60))
            .build()
    }

    pub(crate) fn chunk(&self, k: usize) -> ChunkRef {
        ChunkRef::new(self.blob, &self.toc.chunks[k])
    }
}

/// The `Range` header a request for exactly `chunks` carries.
fn range_of(chunks: &[ChunkRef]) -> Option<String> {
    let (first, last) = (chunks.first()?, chunks.last()?);
    Some(format!(
        "bytes={}-{}",
        first.compressed.start,
        last.compressed.end - 1
    ))
}

#[test]
fn concurrent_readers_of_one_chunk_cause_one_fetch() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let sample = LazySample::start()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let layer = Layer::open(&sample.image).await?;
        ensure!(
            layer.toc.chunks.len() >= 4,
            "{} chunks",
            layer.toc.chunks.len()
        );

        // The pause keeps the first fetch in flight while every reader arrives.
        sample.proxy.reset_counts();
        sample
            .proxy
            .inject(Injection::blobs(Fault::Delay(Duration::from_millis(300))));
        let layered = layer.layered();
        let chunk = layer.chunk(1);
        let start = Arc::new(tokio::sync::Barrier::new(16));
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let (layered, chunk, start) = (layered.clone(), chunk.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    layered.read(&chunk, Priority::OnDemand).await
                })
            })
            .collect();
        let mut read = Vec::new();
        for reader in readers {
            read.push(reader.await??);
        }
        assert!(read
            .iter()
            .all(|r| r.digest() == &chunk.digest && r.data() == read[0].data()));
        let counts = sample.proxy.counts();
        assert_eq!(ranges(&counts), vec![range_of(&[chunk])]);

        // Neighbours asked for together are fetched with one range request.
        sample.proxy.clear();
        sample.proxy.reset_counts();
        let four: Vec<ChunkRef> = (0..4).map(|k| layer.chunk(k)).collect();
        let read = layer.layered().read_many(&four, Priority::OnDemand).await?;
        assert!(read.iter().zip(&four).all(|(r, c)| r.digest() == &c.digest));
        assert_eq!(ranges(&sample.proxy.counts()), vec![range_of(&four)]);
        Ok(())
    })
}

#[test]
fn a_neighbouring_chunks_valid_frame_fails_verification() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let sample = LazySample::start()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let layer = Layer::open(&sample.image).await?;
        // Two full chunks of the big file: same compressed and decoded sizes, so the
        // proxy's wrong bytes are a whole, valid frame that decodes to the wrong content.
        let chunks = &layer.toc.chunks;
        let k = (0..chunks.len() - 1)
            .find(|&k| {
                chunks[k].size == chunks[k + 1].size
                    && chunks[k].tar_size == chunks[k + 1].tar_size
                    && chunks[k].digest != chunks[k + 1].digest
            })
            .context("No two neighbouring chunks of the same size")?;
        let chunk = layer.chunk(k);

        sample.proxy.reset_counts();
        sample.proxy.inject(Injection::blobs(Fault::WrongChunk));
        let layered = layer.layered();
        let err = layered
            .read(&chunk, Priority::OnDemand)
            .await
            .expect_err("a neighbour's bytes were accepted");
        assert!(
            matches!(err, brisk_blobcache::Error::Cache(brisk_blobcache::layered::CacheError::ChunkUnavailable { digest, .. }) if digest == chunk.digest),
            "unexpected error: {err}"
        );
        let registry = layered.report().pop().context("No levels")?;
        assert_eq!(
            (registry.corrupt, registry.errors, registry.hits),
            (2, 0, 0),
            "one verification failure per pass, and no decode error: {registry:?}"
        );
        let counts = sample.proxy.counts();
        assert_eq!(
            ranges(&counts),
            vec![range_of(std::slice::from_ref(&chunk)); 2]
        );

        // Nothing was kept: with the fault gone the same read path fetches and verifies.
        sample.proxy.clear();
        let read = layered.read(&chunk, Priority::OnDemand).await?;
        assert_eq!(read.digest(), &chunk.digest);
        Ok(())
    })
}
