//! Start-up traces in the daemon: kept per image in sled, recorded the first time an image
//! starts with no trace anywhere, and replayed as prefetch when its layers are prepared again
//! (here or on any host that fetched the trace from the registry).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use brisk_blobcache::reference::Reference;
use brisk_blobcache::registry::RegistryClient;
use brisk_blobcache::Digest;
use brisk_trace_recorder::recorder::Limits;
use brisk_trace_recorder::{Recorder, Trace};

use crate::{Error, Result};

pub struct Traces {
    tree: sled::Tree,
    recorder: Arc<Recorder>,
    /// Images whose prefetch or recording already started in this run.
    started: Mutex<HashSet<Digest>>,
    prefetches: AtomicU64,
    recordings: AtomicU64,
    /// The reference each recorded image was pulled from, for pushing its trace.
    sources: Arc<Mutex<HashMap<Digest, Reference>>>,
}

/// Where recorded traces are pushed when the operator enabled it.
pub struct Push {
    pub client: Arc<RegistryClient>,
    pub rt: tokio::runtime::Handle,
}

impl Traces {
    /// Opens the trace store. With `push`, every newly recorded trace is also pushed to the
    /// registry of the image it was recorded for (an operator's choice: it needs write access).
    pub fn open(db: &sled::Db, limits: Limits, push: Option<Push>) -> Result<Arc<Self>> {
        let tree = db.open_tree("traces").map_err(Error::Meta)?;
        let store = tree.clone();
        let sources: Arc<Mutex<HashMap<Digest, Reference>>> = Arc::default();
        let from = sources.clone();
        let recorder = Recorder::start(4096, limits, move |trace| {
            let merged = match merge_into(&store, &trace) {
                Ok(m) => m,
                Err(err) => {
                    tracing::error!(image = %trace.image, %err, "storing a recorded trace failed");
                    return;
                }
            };
            let (Some(push), Some(reference)) = (
                &push,
                from.lock()
                    .expect("not poisoned")
                    .get(&trace.image)
                    .cloned(),
            ) else {
                return;
            };
            let client = push.client.clone();
            push.rt.spawn(async move {
                match brisk_trace_recorder::share::push(&client, &reference, &merged).await {
                    Ok(d) => tracing::info!(image = %reference, artifact = %d, "trace pushed to the registry"),
                    Err(err) => tracing::warn!(image = %reference, %err, "pushing the trace failed"),
                }
            });
        });
        Ok(Arc::new(Self {
            tree,
            recorder,
            sources,
            started: Mutex::default(),
            prefetches: AtomicU64::new(0),
            recordings: AtomicU64::new(0),
        }))
    }

    /// Starts recording `image`, remembering where it came from for a later push.
    pub fn record(&self, image: Digest, reference: &Reference, layers: Vec<Digest>) {
        self.sources
            .lock()
            .expect("not poisoned")
            .insert(image, reference.clone());
        self.recordings.fetch_add(1, Ordering::Relaxed);
        self.recorder.begin(image, layers);
    }

    /// Drops a recording begun before the lookups found a trace for `image`.
    pub fn abandon(&self, image: &Digest) {
        if self.recorder.is_recording(image) {
            self.recordings.fetch_sub(1, Ordering::Relaxed);
        }
        self.sources.lock().expect("not poisoned").remove(image);
        self.recorder.abandon(image);
    }

    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// Whether a trace of `image` is held, without decoding it.
    pub fn has(&self, image: &Digest) -> Result<bool> {
        self.tree
            .contains_key(image.as_bytes())
            .map_err(Error::Meta)
    }

    pub fn get(&self, image: &Digest) -> Result<Option<Trace>> {
        match self.tree.get(image.as_bytes()).map_err(Error::Meta)? {
            Some(v) => Ok(Some(Trace::decode(&v, Some(image)).map_err(Error::Trace)?)),
            None => Ok(None),
        }
    }

    /// Adds `trace`, merged with the one already held for its image; returns the result.
    pub fn import(&self, trace: &Trace) -> Result<Trace> {
        merge_into(&self.tree, trace)
    }

    pub fn list(&self) -> Result<Vec<Trace>> {
        self.tree
            .iter()
            .map(|r| {
                let (_, v) = r.map_err(Error::Meta)?;
                Trace::decode(&v, None).map_err(Error::Trace)
            })
            .collect()
    }

    pub fn note_prefetch(&self) {
        self.prefetches.fetch_add(1, Ordering::Relaxed);
    }

    pub fn prefetches_started(&self) -> u64 {
        self.prefetches.load(Ordering::Relaxed)
    }

    pub fn recordings_started(&self) -> u64 {
        self.recordings.load(Ordering::Relaxed)
    }

    /// True the first time an image is seen in this run.
    pub fn first_sight(&self, image: &Digest) -> bool {
        self.started.lock().expect("not poisoned").insert(*image)
    }
}

fn merge_into(tree: &sled::Tree, trace: &Trace) -> Result<Trace> {
    let merged = match tree.get(trace.image.as_bytes()).map_err(Error::Meta)? {
        Some(v) => {
            let mut old = Trace::decode(&v, Some(&trace.image)).map_err(Error::Trace)?;
            old.merge(trace);
            old
        }
        None => trace.clone(),
    };
    tree.insert(trace.image.as_bytes(), merged.encode())
        .map_err(Error::Meta)?;
    tree.flush().map_err(Error::Meta)?;
    Ok(merged)
}
