//! Earning a chain ID: hashing a lazy layer's tar stream from verified chunks and checking it
//! against the chain ID containerd committed the layer under.
//!
//! containerd names a committed layer by the chain ID computed from the diff_ids an image's
//! config claims, and within a namespace it reuses that name for every later image without
//! asking the snapshotter. The overlayfs unpacker proves each diff_id while unpacking; a lazy
//! layer is committed before a byte is read, so its claim is proved here, afterwards: the TOC's
//! chunks tile the tar stream in order, so reading them in order through the read path (which
//! verifies each against its digest) and hashing gives the layer's real diff_id. This module
//! decides when that happens; `snapshots` decides what an unproven or refuted layer may be
//! used for, and `remote` cuts a refuted layer's content off.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_blobcache::chunk::ChunkRef;
use brisk_blobcache::digest::Hasher;
use brisk_blobcache::layered::{Layered, Priority};
use brisk_blobcache::toc::Toc;
use brisk_blobcache::Digest;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::meta::{Proof, SnapshotStore};
use crate::remote::RemoteLayers;
use crate::Result;

/// When lazy layers are hashed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyMode {
    /// Each lazy layer is read whole, in tar order, at prefetch priority (behind every
    /// on-demand read) some seconds after it is mounted. Costs the whole layer's bytes once
    /// (from the zone when peers hold them); closes the window in which a lying layer is
    /// served to the images that share its chain ID.
    #[default]
    Background,
    /// A layer is hashed only once all its chunks are in this host's cache anyway (images
    /// read whole, or prefetched whole); nothing is fetched for it. Cheap, but a layer that
    /// is never read whole stays unproven.
    Cached,
    /// Never hashed: every lazy layer stays unproven (and is never reused for another blob).
    Off,
}

impl VerifyMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            VerifyMode::Background => "background",
            VerifyMode::Cached => "cached",
            VerifyMode::Off => "off",
        }
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "background" => Ok(VerifyMode::Background),
            "cached" => Ok(VerifyMode::Cached),
            "off" => Ok(VerifyMode::Off),
            _ => Err(crate::Error::InvalidArgument(format!(
                "verify mode {s:?} is not background, cached or off"
            ))),
        }
    }
}

/// Chunks hashed per read: bounds the memory one proof holds (chunks are at most 16 MiB).
const WINDOW: usize = 8;

/// How often a `cached`-mode layer is looked at again.
const CACHED_POLL: Duration = Duration::from_secs(30);

/// The chain ID of a layer with diff_id `diff_id` on top of the chain `parent`, as the OCI
/// image spec defines it.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => *diff_id,
        Some(p) => Digest::sha256(format!("{p} {diff_id}").as_bytes()),
    }
}

/// What a layer committed under chain ID `key`, on top of `parent`, is, given the diff_id
/// its tar stream hashed to.
pub fn judge(key: &str, parent: Option<&Digest>, diff_id: Digest) -> Proof {
    if chain_id(parent, &diff_id).to_string() == key {
        Proof::Proven
    } else {
        Proof::Refuted { diff_id }
    }
}

/// The diff_id of a layer: the sha256 of its tar stream, from its chunks in order, each one
/// verified by the read path before it is hashed.
pub async fn diff_id(cache: &Arc<Layered>, blob: Digest, toc: &Toc) -> Result<Digest> {
    let mut hasher = Hasher::new();
    for window in toc.chunks.chunks(WINDOW) {
        let refs: Vec<ChunkRef> = window.iter().map(|c| ChunkRef::new(blob, c)).collect();
        let chunks = cache.read_many(&refs, Priority::Prefetch).await?;
        // Hashing a window (up to 8 MiB) is milliseconds of CPU: off the async workers.
        hasher = tokio::task::spawn_blocking(move || {
            for c in &chunks {
                hasher.update(c.data());
            }
            hasher
        })
        .await
        .map_err(|e| crate::Error::io("layer hash", std::io::Error::other(e)))?;
    }
    Ok(hasher.finish())
}

/// Whether every chunk of the layer is held by a level faster than the peers.
async fn all_cached(cache: &Layered, toc: &Toc) -> bool {
    for c in &toc.chunks {
        if !cache.contains(&c.digest).await {
            return false;
        }
    }
    true
}

/// What proving one layer needs.
pub struct Claim {
    /// The snapshot's key: the chain ID it was committed under.
    pub key: String,
    pub id: u64,
    pub blob: Digest,
    pub parent_chain: Option<Digest>,
    pub toc: Arc<Toc>,
}

/// Schedules and runs proofs, one layer at a time, and records their outcome.
pub struct Prover {
    mode: VerifyMode,
    /// Time between a mount and its background read: the container's start and its start-up
    /// prefetch go first.
    delay: Duration,
    store: SnapshotStore,
    remote: Arc<RemoteLayers>,
    /// One layer hashed at a time: a proof is a background job, never a burst.
    running: Semaphore,
    /// Snapshot ids with a proof scheduled, so a layer is never queued twice.
    queued: Mutex<HashSet<u64>>,
}

impl Prover {
    pub fn new(
        mode: VerifyMode,
        delay: Duration,
        store: SnapshotStore,
        remote: Arc<RemoteLayers>,
    ) -> Self {
        Self {
            mode,
            delay,
            store,
            remote,
            running: Semaphore::new(1),
            queued: Mutex::default(),
        }
    }

    pub fn mode(&self) -> VerifyMode {
        self.mode
    }

    /// Proves `claim` in the background, as the mode says; no-op when off or already queued.
    pub fn schedule(self: &Arc<Self>, claim: Claim) {
        if self.mode == VerifyMode::Off
            || !self.queued.lock().expect("not poisoned").insert(claim.id)
        {
            return;
        }
        let this = self.clone();
        self.remote.runtime().spawn(async move {
            let id = claim.id;
            this.run(claim).await;
            this.queued.lock().expect("not poisoned").remove(&id);
        });
    }

    async fn run(&self, claim: Claim) {
        tokio::time::sleep(self.delay).await;
        if self.mode == VerifyMode::Cached {
            while !all_cached(self.remote.cache(), &claim.toc).await {
                if !self.still_unproven(&claim) {
                    return;
                }
                tokio::time::sleep(CACHED_POLL).await;
            }
        }
        let _turn = self
            .running
            .acquire()
            .await
            .expect("semaphore is never closed");
        if !self.still_unproven(&claim) {
            return;
        }
        match self.prove(&claim).await {
            Ok(proof) => self.record(&claim, proof),
            Err(err) => {
                // A layer that cannot be read now stays unproven (and unshared); a later
                // mount of it tries again.
                tracing::warn!(snapshot = %claim.key, blob = %claim.blob, err = %brisk_blobcache::error_chain(&err), "lazy layer could not be hashed; it stays unproven");
            }
        }
    }

    fn still_unproven(&self, claim: &Claim) -> bool {
        matches!(
            self.store.get(&claim.key),
            Ok(Some(s)) if s.remote.as_ref().is_some_and(|r| r.blob == claim.blob && r.proof == Proof::Unproven)
        )
    }

    /// Hashes the layer and compares: the chain ID it really has against its name.
    pub async fn prove(&self, claim: &Claim) -> Result<Proof> {
        let started = std::time::Instant::now();
        let diff = diff_id(self.remote.cache(), claim.blob, &claim.toc).await?;
        let proof = judge(&claim.key, claim.parent_chain.as_ref(), diff);
        tracing::debug!(snapshot = %claim.key, ms = started.elapsed().as_millis() as u64, proof = proof.as_str(), "lazy layer hashed");
        Ok(proof)
    }

    fn record(&self, claim: &Claim, proof: Proof) {
        match self.store.set_proof(&claim.key, &claim.blob, proof) {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                tracing::error!(snapshot = %claim.key, %err, "the proof of a lazy layer was not recorded");
            }
        }
        match proof {
            Proof::Proven => {
                tracing::info!(snapshot = %claim.key, blob = %claim.blob, "lazy layer proven: its tar stream matches its chain ID")
            }
            Proof::Refuted { diff_id } => {
                tracing::error!(snapshot = %claim.key, blob = %claim.blob, %diff_id, "lazy layer REFUTED: its tar stream does not match the diff_id its image claims; its content is refused from now on");
                self.remote.refute(claim.id);
            }
            Proof::Unproven => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // From the OCI image spec's example: ChainID(A|B) = sha256(ChainID(A) + " " + DiffID(B)).
        let a = Digest::sha256(b"layer a");
        let b = Digest::sha256(b"layer b");
        assert_eq!(chain_id(None, &a), a);
        let ab = chain_id(Some(&a), &b);
        assert_eq!(ab, Digest::sha256(format!("{a} {b}").as_bytes()));
        assert_ne!(ab, chain_id(Some(&b), &a), "order matters");
    }

    /// A converted layer whose chunks are all in a memory level.
    async fn layer(tar: &[u8]) -> (Arc<Layered>, Digest, Toc) {
        let options = brisk_blobcache::toc::ConvertOptions {
            chunk_size: 64 * 1024,
            ..Default::default()
        };
        let (converted, blob) =
            brisk_blobcache::toc::convert_layer(tar, Vec::new(), &options).unwrap();
        let footer = brisk_blobcache::toc::Footer::decode(
            &blob[blob.len() - brisk_blobcache::toc::FOOTER_SIZE..],
            blob.len() as u64,
        )
        .unwrap();
        let r = footer.toc.range();
        let toc = Toc::decode(
            &blob[r.start as usize..r.end as usize],
            footer.toc.uncompressed_size,
            Some(&converted.toc_digest),
        )
        .unwrap();
        let memory = Arc::new(brisk_blobcache::memory::MemoryCache::new(64 << 20));
        for (i, c) in toc.chunks.iter().enumerate() {
            let r = c.compressed_range();
            let verified = brisk_blobcache::toc::decode_chunk(
                converted.digest,
                i,
                c,
                &blob[r.start as usize..r.end as usize],
            )
            .unwrap();
            brisk_blobcache::source::ChunkSource::put(memory.as_ref(), &verified).await;
        }
        let cache = Layered::builder()
            .memory(memory, Duration::from_secs(5))
            .build();
        (cache, converted.digest, toc)
    }

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[tokio::test]
    async fn the_hash_of_the_chunks_in_order_is_the_diff_id() {
        // Big enough for many chunks and several hashing windows.
        let big: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let tar = tar_of(&[("a", big), ("b/c", b"small".to_vec())]);
        let (cache, blob, toc) = layer(&tar).await;
        assert!(toc.chunks.len() > WINDOW, "{} chunks", toc.chunks.len());
        let diff = diff_id(&cache, blob, &toc).await.unwrap();
        assert_eq!(diff, Digest::sha256(&tar));

        let parent = Digest::sha256(b"parent chain");
        let honest = chain_id(Some(&parent), &diff).to_string();
        assert_eq!(judge(&honest, Some(&parent), diff), Proof::Proven);
        // The chain ID another layer has: what a config lying about its diff_ids names.
        let other = chain_id(Some(&parent), &Digest::sha256(b"another layer")).to_string();
        assert_eq!(
            judge(&other, Some(&parent), diff),
            Proof::Refuted { diff_id: diff }
        );
        assert_eq!(
            judge(&honest, None, diff),
            Proof::Refuted { diff_id: diff },
            "the same layer on another parent is another chain"
        );
        assert!(all_cached(&cache, &toc).await);
    }
}
