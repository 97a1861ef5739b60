//! A host for the lazy-layer unit tests: an image whose manifest and TOC are kept on it, and
//! a scripted origin level in place of the registry, so no registry and no root are needed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_blobcache::chunk::ChunkRef;
use brisk_blobcache::layered::Layered;
use brisk_blobcache::lazy::LazyImages;
use brisk_blobcache::meta::MetaStore;
use brisk_blobcache::registry::{RegistryClient, RegistryConfig};
use brisk_blobcache::remote::{RegistrySource, RemoteConfig};
use brisk_blobcache::source::{Answer, ChunkSource, Found, Priority};
use brisk_blobcache::toc::Toc;
use brisk_blobcache::toc::{self, ConvertOptions};
use brisk_blobcache::Digest;
use bytes::Bytes;

use crate::meta::RemoteLayer;
use crate::remote::{RemoteLayers, TracePolicy};

/// An origin that serves chunks by digest and notes what it was asked for, in order.
pub struct Origin {
    chunks: HashMap<Digest, Bytes>,
    pub asked: Mutex<Vec<Digest>>,
}

#[async_trait::async_trait]
impl ChunkSource for Origin {
    fn name(&self) -> &'static str {
        "registry"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        _priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        let mut asked = self.asked.lock().unwrap();
        for (i, c) in chunks.iter().enumerate() {
            asked.push(c.digest);
            each(i, Ok(self.chunks.get(&c.digest).cloned().map(Found::Bytes)));
        }
    }
}

pub struct Host {
    pub remote: Arc<RemoteLayers>,
    pub origin: Arc<Origin>,
    pub layer: RemoteLayer,
    pub toc: Arc<Toc>,
    /// The TOC position and digest labels containerd would pass to `Prepare`.
    pub labels: std::collections::BTreeMap<String, String>,
    _dir: tempfile::TempDir,
}

/// A host that holds the manifest and TOC of a one-layer image of ten files, two of them
/// baked in as its start-up set.
pub fn host(rt: &tokio::runtime::Runtime, policy: TracePolicy) -> Host {
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..10u32 {
        let data: Vec<u8> = (0..40_000u32).map(|j| (i * 31 + j * 7) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let opts = ConvertOptions {
        chunk_size: 16 * 1024,
        prefetch_files: vec!["f7".into(), "f2".into()],
        ..ConvertOptions::default()
    };
    let (converted, blob) = toc::convert_layer(&tar[..], Vec::new(), &opts).unwrap();
    let r = converted.toc.range();
    let payload = &blob[r.start as usize..r.end as usize];
    let toc = Arc::new(
        Toc::decode(
            payload,
            converted.toc.uncompressed_size,
            Some(&converted.toc_digest),
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let kept = MetaStore::open(dir.path().join("meta")).unwrap();
    kept.put(payload).unwrap();
    let annotations = toc::layer_annotations(
        &converted.toc_digest,
        &converted.toc.to_string(),
        &converted.prefetch_spans,
    );
    let labels = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(toc::SNAPSHOT_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": Digest::sha256(b"config").to_string(),
            "size": 6,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": converted.digest.to_string(),
            "size": converted.size,
            "annotations": annotations.into_iter().collect::<BTreeMap<_, _>>(),
        }],
    }))
    .unwrap();
    let manifest = kept.put(&manifest).unwrap();
    let chunks = toc
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let r = c.compressed_range();
            let v = toc::decode_chunk(
                converted.digest,
                i,
                c,
                &blob[r.start as usize..r.end as usize],
            )
            .unwrap();
            (c.digest, v.data().clone())
        })
        .collect();
    let origin = Arc::new(Origin {
        chunks,
        asked: Mutex::default(),
    });
    let _guard = rt.enter();
    // The image's registry is 127.0.0.1:1, where nothing listens: any request fails.
    let client = Arc::new(RegistryClient::new(RegistryConfig::default()).unwrap());
    let source = Arc::new(RegistrySource::new(client.clone(), RemoteConfig::default()));
    let images = Arc::new(LazyImages::new(client, Some(kept)).serving(source.clone()));
    let cache = Layered::builder()
        .origin(origin.clone(), Duration::from_secs(5))
        .build();
    let db = sled::open(dir.path().join("db")).unwrap();
    let traces = crate::traces::Traces::open(&db, Default::default(), None).unwrap();
    let remote = Arc::new(RemoteLayers::new(
        images,
        source,
        cache,
        rt.handle().clone(),
        traces,
        policy,
    ));
    let layer = RemoteLayer {
        image: "127.0.0.1:1/tenant/app".parse().unwrap(),
        manifest,
        blob: converted.digest,
        blob_size: converted.size,
        toc_digest: converted.toc_digest,
        toc_position: converted.toc,
        parent_chain: None,
        proof: crate::meta::Proof::Unproven,
        format: Default::default(),
    };
    Host {
        remote,
        origin,
        layer,
        toc,
        labels,
        _dir: dir,
    }
}

pub fn policy() -> TracePolicy {
    TracePolicy {
        record: true,
        prefetch: true,
        fetch_from_registry: false,
        skip: Vec::new(),
    }
}
