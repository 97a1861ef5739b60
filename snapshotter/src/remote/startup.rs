//! The start-up policy of a lazy image: what to prefetch when its layers are mounted (the
//! start-up chunks baked into a layer's TOC, a recorded trace held here, at a zone peer or in
//! the registry), or, with no trace anywhere, recording one.

use std::collections::HashMap;
use std::sync::Arc;

use brisk_blobcache::reference::Reference;
use brisk_blobcache::toc::Toc;
use brisk_blobcache::Digest;

use super::{RemoteLayers, PREFETCH_BATCH};
use crate::meta::RemoteLayer;
use crate::Result;
use brisk_blobcache::error_chain as chain;

impl RemoteLayers {
    /// A layer just mounted: its baked start-up chunks go to prefetch at once (they need no
    /// manifest). On first sight of the image in this run: prefetch from its trace (local,
    /// else from a zone peer or the registry), or record one if there is none. Runs in the
    /// background; Prepare returns.
    pub fn start_image(self: &Arc<Self>, layer: &RemoteLayer, toc: &Toc) {
        let reference = layer.image.clone();
        let (manifest, blob) = (layer.manifest, layer.blob);
        self.prefetch_baked(&reference, manifest, blob, toc);
        if !self.traces.first_sight(&manifest) {
            // Another layer of an image being recorded: its reads belong to the trace too.
            if self.traces.recorder().is_recording(&manifest) {
                self.traces.recorder().begin(manifest, vec![blob]);
            }
            return;
        }
        // The container can start reading before the manifest and the trace lookups below
        // are done: with no trace held here, recording starts with the mount, and is dropped
        // if a trace turns up.
        let early = self.policy.record && matches!(self.traces.has(&manifest), Ok(false));
        if early {
            self.traces.record(manifest, &reference, vec![blob]);
        }
        let this = self.clone();
        self.rt.spawn(async move {
            if let Err(err) = this.replay_or_record(&reference, manifest, early).await {
                tracing::warn!(image = %reference, err = %chain(&err), "no prefetch for this image");
            }
        });
    }

    /// `recording`: a recording of this image began with its first mount.
    async fn replay_or_record(
        &self,
        reference: &Reference,
        manifest: Digest,
        recording: bool,
    ) -> Result<()> {
        let layers = self.image_layers(reference, manifest).await?;
        let prefetch = self.prefetch_allowed(reference);
        let mut trace = self.traces.get(&manifest)?;
        // Layers of the image not mounted in this run (committed before) may hold baked
        // start-up chunks too; a recorded trace held here takes their place.
        if trace.is_none() {
            for (blob, toc) in &layers {
                self.prefetch_baked(reference, manifest, *blob, toc);
            }
        }
        if let (None, Some(zone)) = (&trace, &self.zone) {
            if let Some(bytes) = zone.trace(&manifest).await {
                match brisk_trace_recorder::Trace::decode(&bytes, Some(&manifest)) {
                    Ok(t) => {
                        tracing::info!(image = %reference, chunks = t.entries.len(), "trace fetched from a zone peer");
                        trace = Some(self.traces.import(&t)?);
                    }
                    Err(err) => {
                        tracing::warn!(image = %reference, err = %chain(&err), "a zone peer's trace was refused")
                    }
                }
            }
        }
        if trace.is_none() && self.policy.fetch_from_registry {
            match brisk_trace_recorder::share::fetch(self.images.client(), reference, &manifest)
                .await
            {
                Ok(Some(t)) => {
                    tracing::info!(image = %reference, chunks = t.entries.len(), "trace fetched from the registry");
                    trace = Some(self.traces.import(&t)?);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(image = %reference, err = %chain(&err), "trace lookup in the registry failed")
                }
            }
        }
        match trace {
            Some(trace) if prefetch => {
                let by_blob: HashMap<Digest, &Toc> =
                    layers.iter().map(|(b, t)| (*b, t.as_ref())).collect();
                let plan = brisk_trace_recorder::plan::plan(&trace, &by_blob);
                tracing::info!(image = %reference, chunks = plan.chunks.len(), stale = plan.stale, "prefetching from the start-up trace");
                self.traces.note_prefetch();
                self.cache.prefetch(
                    plan.chunks,
                    PREFETCH_BATCH,
                    tokio_util::sync::CancellationToken::new(),
                );
            }
            Some(_) => {}
            None if self.policy.record => {
                // Even behind a baked trace the start is recorded, to learn this host's order.
                tracing::info!(image = %reference, "recording a start-up trace");
                let layers = layers.iter().map(|(b, _)| *b).collect();
                if recording {
                    self.traces.recorder().begin(manifest, layers);
                } else {
                    self.traces.record(manifest, reference, layers);
                }
                return Ok(());
            }
            None => {}
        }
        if recording {
            self.traces.abandon(&manifest);
        }
        Ok(())
    }

    pub(super) fn prefetch_allowed(&self, reference: &Reference) -> bool {
        let repo = format!("{}/{}", reference.registry, reference.repository);
        self.policy.prefetch && !self.policy.skip.contains(&repo)
    }

    /// Hands the start-up chunks baked into `blob`'s TOC to prefetch, once per layer and run.
    /// A baked list needs no lookup, so it starts before the zone and the registry are asked
    /// for a recorded trace (round trips the start cannot spare); a recorded trace held here
    /// takes its place, being this host's own order.
    fn prefetch_baked(&self, reference: &Reference, manifest: Digest, blob: Digest, toc: &Toc) {
        if toc.prefetch.is_empty()
            || !self.prefetch_allowed(reference)
            || !matches!(self.traces.has(&manifest), Ok(false))
        {
            return;
        }
        let first_of_image = {
            let mut baked = self.baked.lock().expect("not poisoned");
            let repo = format!("{}/{}", reference.registry, reference.repository);
            if !baked.blobs.insert((blob, repo)) {
                return;
            }
            baked.images.insert(manifest)
        };
        let chunks: Vec<brisk_blobcache::chunk::ChunkRef> = toc
            .prefetch
            .iter()
            .filter_map(|&i| toc.chunks.get(i as usize))
            .map(|c| brisk_blobcache::chunk::ChunkRef::new(blob, c))
            .collect();
        tracing::info!(image = %reference, %blob, chunks = chunks.len(), "prefetching the trace baked into the layer");
        if first_of_image {
            self.traces.note_prefetch();
        }
        self.cache.prefetch(
            chunks,
            PREFETCH_BATCH,
            tokio_util::sync::CancellationToken::new(),
        );
    }

    /// Every lazy layer of the image, with its verified TOC, opened from the image's
    /// repository so prefetch can fetch layers not prepared yet.
    async fn image_layers(
        &self,
        reference: &Reference,
        manifest: Digest,
    ) -> Result<Vec<(Digest, Arc<Toc>)>> {
        let m = self.images.manifest(reference, manifest).await?;
        Ok(self
            .images
            .open_all(reference, &m)
            .await?
            .into_iter()
            .map(|h| (h.blob(), h.toc))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use brisk_trace_recorder::{Trace, TraceEntry};

    use super::*;
    use crate::remote::testing::{host, policy, Origin};
    use crate::remote::TracePolicy;

    /// What the origin was asked for, once it stops being asked.
    fn asked(rt: &tokio::runtime::Runtime, origin: &Origin) -> Vec<Digest> {
        rt.block_on(async {
            let mut last = usize::MAX;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = origin.asked.lock().unwrap().len();
                if now == last {
                    return origin.asked.lock().unwrap().clone();
                }
                last = now;
            }
        })
    }

    #[test]
    fn a_layers_baked_start_up_set_is_prefetched_once_per_repository() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = rt.enter();
        let h = host(&rt, policy());
        let baked: Vec<Digest> = h
            .toc
            .prefetch
            .iter()
            .map(|&i| h.toc.chunks[i as usize].digest)
            .collect();
        assert!(!baked.is_empty());
        h.remote.start_image(&h.layer, &h.toc);
        h.remote.start_image(&h.layer, &h.toc);
        // Each baked file is a run of neighbours (one batch); the batches run at once.
        let mut got = asked(&rt, &h.origin);
        let mut want = baked.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "the baked set, once");
        // The same blob named by another repository is prefetched for it too: an image that
        // names a blob first cannot mark another's start-up set as started.
        let other = RemoteLayer {
            image: "127.0.0.1:1/tenant/other".parse().unwrap(),
            ..h.layer.clone()
        };
        h.remote.start_image(&other, &h.toc);
        let again = asked(&rt, &h.origin);
        assert!(again.len() >= baked.len(), "{again:?}");
        // With no trace anywhere, the start is recorded.
        assert!(h.remote.traces().recorder().is_recording(&h.layer.manifest));
    }

    #[test]
    fn a_recorded_trace_held_here_takes_the_place_of_the_baked_set() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = rt.enter();
        let h = host(&rt, policy());
        // A trace of the last three chunks, last first.
        let n = h.toc.chunks.len();
        let entries: Vec<TraceEntry> = (n - 3..n)
            .rev()
            .map(|i| TraceEntry {
                layer: h.layer.blob,
                chunk: i as u32,
                digest: h.toc.chunks[i].digest,
                at_ms: 0,
                path: "f9".into(),
            })
            .collect();
        let mut want: Vec<Digest> = entries.iter().map(|e| e.digest).collect();
        let trace = Trace {
            entries,
            ..Trace::new(h.layer.manifest)
        };
        h.remote.traces().import(&trace).unwrap();
        h.remote.start_image(&h.layer, &h.toc);
        // Three batches (no two chunks neighbours in this order) run at once, so the origin
        // may see them in any order.
        let mut got = asked(&rt, &h.origin);
        got.sort();
        want.sort();
        assert_eq!(got, want, "the trace's chunks, and only them");
        assert!(!h.remote.traces().recorder().is_recording(&h.layer.manifest));
    }

    #[test]
    fn a_repository_told_not_to_prefetch_prefetches_nothing() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = rt.enter();
        let h = host(
            &rt,
            TracePolicy {
                skip: vec!["127.0.0.1:1/tenant/app".into()],
                ..policy()
            },
        );
        h.remote.start_image(&h.layer, &h.toc);
        assert!(asked(&rt, &h.origin).is_empty());
    }
}
