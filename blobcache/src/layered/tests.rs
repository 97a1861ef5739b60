//! The read path's behaviour, level by level, with scripted levels that are slow, lie, fail or
//! trickle their answers.

use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;

use super::*;
use crate::layered::CacheError;
use crate::memory::MemoryCache;
use tokio_util::sync::CancellationToken;

use crate::source::{Answer, Found, SourceError};

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

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        self.calls
            .lock()
            .unwrap()
            .push(chunks.iter().map(|c| c.digest).collect());
        self.gets.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        for (i, c) in chunks.iter().enumerate() {
            if self.fail {
                each(i, Err(SourceError::unavailable(Failure)));
                continue;
            }
            let found = self.data.get(&c.digest).map(|b| {
                Found::Bytes(if self.lie {
                    Bytes::from(vec![0u8; b.len()])
                } else {
                    b.clone()
                })
            });
            each(i, Ok(found));
        }
    }
}

fn chunks(n: usize) -> Vec<(ChunkRef, Bytes)> {
    (0..n)
        .map(|i| {
            let data = Bytes::from(vec![i as u8 + 1; 1000 + i]);
            let r = ChunkRef {
                codec: Default::default(),
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
                codec: Default::default(),
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
        "peer"
    }

    fn forwards(&self, chunk: &ChunkRef) -> bool {
        chunk.digest == self.forwarded
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        _each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        if chunks.iter().any(|c| self.forwards(c)) {
            futures::future::pending::<()>().await;
        }
    }
}

#[tokio::test]
async fn a_peer_request_never_waits_on_this_hosts_own_peer_fetches() {
    let cs = chunks(2);
    let origin = Arc::new(Scripted::new(&cs));
    let layered = Layered::builder()
        .peer(
            Arc::new(StuckPeer {
                forwarded: cs[1].0.digest,
            }),
            Duration::from_secs(3600),
        )
        .origin(origin, Duration::from_secs(5))
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
        .origin(origin.clone(), Duration::from_secs(5))
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
        .memory(memory.clone(), Duration::from_secs(1))
        .origin(origin.clone(), Duration::from_secs(1))
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
        .memory(memory.clone(), Duration::from_secs(1))
        .disk(Arc::new(liar), Duration::from_secs(1))
        .disk(Arc::new(broken), Duration::from_secs(1))
        .disk(Arc::new(slow), Duration::from_millis(50))
        .origin(good, Duration::from_secs(1))
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
        .memory(memory.clone(), Duration::from_secs(1))
        .origin(Arc::new(liar), Duration::from_secs(1))
        .build();
    let err = layered
        .read(&cs[0].0, Priority::OnDemand)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Cache(CacheError::ChunkUnavailable { digest, .. }) if digest == cs[0].0.digest)
    );
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

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        self.gets.fetch_add(chunks.len() as u32, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        for (i, chunk) in chunks.iter().enumerate() {
            let wrong = || Bytes::from(vec![0u8; chunk.uncompressed_len as usize]);
            let data = self.data.get(&chunk.compressed).cloned();
            each(i, Ok(Some(Found::Bytes(data.unwrap_or_else(wrong)))));
        }
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
        .origin(origin.clone(), Duration::from_secs(5))
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
        .memory(memory.clone(), Duration::from_secs(1))
        .origin(origin.clone(), Duration::from_secs(1))
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
        .origin(origin.clone(), Duration::from_secs(1))
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
        .origin(origin.clone(), Duration::from_secs(5))
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

    async fn fetch(
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
        .memory(memory, Duration::from_secs(5))
        .origin(origin.clone(), Duration::from_secs(5))
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
        .origin(origin.clone(), Duration::from_secs(5))
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
        .origin(origin.clone(), Duration::from_secs(5))
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
        .origin(origin.clone(), Duration::from_secs(5))
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
        .origin(origin.clone(), Duration::from_secs(5))
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
