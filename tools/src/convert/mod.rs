//! `brisk convert`: rewrites an image (or every platform of an index) so each layer is in the
//! lazy format, and stores the result at the destination.
//!
//! Order of writes is the safety property: layer blobs, then the config, then each image
//! manifest, then the index, and the tag last. A run that fails at any step leaves the
//! destination without a manifest that points to a missing blob.

mod layer;
mod reorder;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use brisk_blobcache::registry::FetchedManifest;
use brisk_blobcache::{media, toc, Digest};
use futures::StreamExt;
use indicatif::MultiProgress;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Serialize;
use serde_json::{json, Value};

use crate::store::Store;
use crate::{Error, Result};

pub use layer::LayerSummary;

#[derive(Clone, Debug)]
pub struct ConvertConfig {
    pub chunk_size: u32,
    pub level: i32,
    /// zstd level for the chunks listed for prefetch (with `trace_files`).
    pub prefetch_level: i32,
    /// Chunk size inside the listed parts of large files.
    pub prefetch_chunk_size: u32,
    /// Smaller chunks for large files read in pieces (ELF files, data that does not compress).
    pub scattered: toc::Scattered,
    /// `os/arch[/variant]`; `None` converts every platform of an index.
    pub platform: Option<String>,
    /// Layers converted at once; each takes one core while it compresses.
    pub jobs: usize,
    /// Show a progress bar per layer on stderr.
    pub progress: bool,
    /// Where layers are staged; the system temp dir by default.
    pub tmp_dir: Option<PathBuf>,
    /// Files of a start-up trace (layer paths, first-read order) to bake in: they move to the
    /// front of their layer and the TOC lists their chunks for prefetch.
    pub trace_files: Vec<String>,
    /// The parts of those files the start read (file byte ranges), by layer path; a traced
    /// file without an entry is prefetched whole.
    pub trace_ranges: std::collections::HashMap<String, Vec<std::ops::Range<u64>>>,
}

impl Default for ConvertConfig {
    fn default() -> Self {
        Self {
            chunk_size: toc::DEFAULT_CHUNK_SIZE,
            level: 3,
            prefetch_level: toc::DEFAULT_PREFETCH_LEVEL,
            prefetch_chunk_size: toc::DEFAULT_PREFETCH_CHUNK_SIZE,
            scattered: toc::DEFAULT_SCATTERED,
            platform: None,
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            progress: false,
            trace_files: Vec::new(),
            trace_ranges: Default::default(),
            tmp_dir: None,
        }
    }
}

/// What a conversion did, for `--json` and the human summary.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub source: String,
    pub destination: String,
    /// Digest of what the destination tag now points to (manifest or index).
    pub digest: Digest,
    pub images: Vec<ImageSummary>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    pub platform: Option<String>,
    pub source_manifest: Digest,
    pub manifest: Digest,
    pub layers: Vec<LayerSummary>,
}

impl Summary {
    pub fn totals(&self) -> (u64, u64, u64, usize) {
        let layers = self.images.iter().flat_map(|i| &i.layers);
        layers.fold((0, 0, 0, 0), |(src, dst, tar, chunks), l| {
            (
                src + l.source_size,
                dst + l.size,
                tar + l.tar_size,
                chunks + l.chunks,
            )
        })
    }
}

/// Shared state of one conversion run.
struct Run<'a> {
    src: &'a Store,
    dst: &'a Store,
    config: &'a ConvertConfig,
    bars: MultiProgress,
    /// Layers already converted in this run (an index's platforms often share layers).
    done: Mutex<HashMap<Digest, LayerSummary>>,
}

pub async fn convert(src: &Store, dst: &Store, config: &ConvertConfig) -> Result<Summary> {
    let started = Instant::now();
    let bars = MultiProgress::new();
    if !config.progress {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let run = Run {
        src,
        dst,
        config,
        bars,
        done: Mutex::default(),
    };
    let root = src.root_manifest().await?;
    let tag = dst.tag();
    let (digest, images) = if is_index(&root) {
        run.convert_index(&root, tag.as_deref()).await?
    } else {
        let (image, _size) = run.convert_image(&root, None, tag.as_deref()).await?;
        (image.manifest, vec![image])
    };
    Ok(Summary {
        source: src.location().to_string(),
        destination: dst.location().to_string(),
        digest,
        images,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn is_index(m: &FetchedManifest) -> bool {
    if !m.media_type.is_empty() && m.media_type != "application/json" {
        return media::is_index(&m.media_type);
    }
    serde_json::from_slice::<Value>(&m.bytes).is_ok_and(|v| v.get("manifests").is_some())
}

fn platform_string(p: &oci_spec::image::Platform) -> String {
    match p.variant() {
        Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
        None => format!("{}/{}", p.os(), p.architecture()),
    }
}

impl Run<'_> {
    async fn convert_index(
        &self,
        root: &FetchedManifest,
        tag: Option<&str>,
    ) -> Result<(Digest, Vec<ImageSummary>)> {
        let index: ImageIndex = serde_json::from_slice(&root.bytes)
            .map_err(|e| Error::invalid(format!("image index {}", root.digest), e))?;
        let raw: Value =
            serde_json::from_slice(&root.bytes).map_err(|e| Error::invalid("image index", e))?;
        let mut descriptors = Vec::new();
        let mut images = Vec::new();
        for (i, desc) in index.manifests().iter().enumerate() {
            let platform = desc.platform().as_ref().map(platform_string);
            // Attestations and other non-runnable entries carry an unknown platform.
            if platform
                .as_deref()
                .is_some_and(|p| p.starts_with("unknown/"))
            {
                tracing::info!(digest = %desc.digest(), "skipping index entry with unknown platform");
                continue;
            }
            if let (Some(want), Some(have)) = (&self.config.platform, &platform) {
                if want != have && !have.starts_with(&format!("{want}/")) {
                    continue;
                }
            }
            let digest: Digest = desc.digest().to_string().parse()?;
            let child = self
                .src
                .manifest(&digest, desc.media_type().as_ref())
                .await?;
            let (image, size) = self
                .convert_image(&child, platform.clone(), None)
                .await
                .map_err(|e| Error::Manifest {
                    digest,
                    source: Box::new(e),
                })?;
            let mut out = json!({"mediaType": media::OCI_MANIFEST, "digest": image.manifest.to_string(), "size": size});
            if let Some(p) = raw["manifests"][i].get("platform") {
                out["platform"] = p.clone();
            }
            descriptors.push(out);
            images.push(image);
        }
        if images.is_empty() {
            return Err(Error::NoPlatform(
                self.config.platform.clone().unwrap_or_else(|| "any".into()),
            ));
        }
        let mut out =
            json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": descriptors});
        if let Some(a) = index.annotations() {
            out["annotations"] = json!(a.iter().collect::<BTreeMap<_, _>>());
        }
        let bytes = serde_json::to_vec(&out).map_err(|e| Error::invalid("output index", e))?;
        let digest = self
            .dst
            .put_manifest(bytes.into(), media::OCI_INDEX, tag)
            .await?;
        Ok((digest, images))
    }

    /// Converts one image manifest; returns its summary and the new manifest's size.
    async fn convert_image(
        &self,
        fetched: &FetchedManifest,
        platform: Option<String>,
        tag: Option<&str>,
    ) -> Result<(ImageSummary, u64)> {
        let what = format!("image manifest {}", fetched.digest);
        let manifest: ImageManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| Error::invalid(&what, e))?;
        if !fetched.media_type.is_empty()
            && !media::is_manifest(&fetched.media_type)
            && fetched.media_type != "application/json"
        {
            return Err(
                brisk_blobcache::Error::UnsupportedMediaType(fetched.media_type.clone()).into(),
            );
        }
        let config_digest: Digest = manifest.config().digest().to_string().parse()?;
        let config_bytes = self.src.small_blob(&config_digest).await?;
        let config: Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::invalid(format!("image config {config_digest}"), e))?;
        let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
            .as_array()
            .ok_or_else(|| {
                Error::invalid(
                    format!("image config {config_digest}"),
                    "no rootfs.diff_ids",
                )
            })?
            .iter()
            .map(|d| d.as_str().unwrap_or_default().parse())
            .collect::<Result<_, _>>()?;
        if diff_ids.len() != manifest.layers().len() {
            return Err(Error::invalid(
                &what,
                "the config lists a different number of layers",
            ));
        }

        let jobs = manifest.layers().iter().zip(&diff_ids).enumerate().map(
            |(i, (desc, diff_id))| async move {
                let digest: Digest = desc.digest().to_string().parse()?;
                if let Some(done) = self
                    .done
                    .lock()
                    .expect("not poisoned")
                    .get(&digest)
                    .cloned()
                {
                    return Ok(done);
                }
                let summary = layer::convert_layer(self, i, desc, *diff_id)
                    .await
                    .map_err(|e| Error::layer(i, digest, e))?;
                self.done
                    .lock()
                    .expect("not poisoned")
                    .insert(digest, summary.clone());
                Ok::<_, Error>(summary)
            },
        );
        let layers: Vec<LayerSummary> = futures::stream::iter(jobs)
            .buffered(self.config.jobs.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;

        // The tar streams pass through unchanged, so the diff_ids (checked per layer) and
        // therefore the config bytes and digest stay the same.
        // A layer reordered for a baked trace has a new uncompressed digest; the config must
        // name it (containerd and umoci check diff_ids). Otherwise the config is untouched.
        let new_diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id).collect();
        let (config_digest, config_bytes) = if new_diff_ids == diff_ids {
            (config_digest, config_bytes)
        } else {
            let mut config = config;
            config["rootfs"]["diff_ids"] = json!(new_diff_ids
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>());
            let bytes =
                serde_json::to_vec(&config).map_err(|e| Error::invalid("output config", e))?;
            (Digest::sha256(&bytes), bytes::Bytes::from(bytes))
        };
        self.dst
            .put_blob_bytes(&config_digest, config_bytes.clone())
            .await?;
        let layer_descs: Vec<Value> = layers
            .iter()
            .map(|l| {
                let annotations =
                    toc::layer_annotations(&l.toc_digest, &l.toc_position, &l.prefetch_spans);
                json!({
                    "mediaType": media::OCI_LAYER_ZSTD,
                    "digest": l.digest.to_string(),
                    "size": l.size,
                    "annotations": annotations,
                })
            })
            .collect();
        let mut out = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
            "layers": layer_descs,
        });
        if let Some(a) = manifest.annotations() {
            out["annotations"] = json!(a.iter().collect::<BTreeMap<_, _>>());
        }
        let bytes = serde_json::to_vec(&out).map_err(|e| Error::invalid("output manifest", e))?;
        let size = bytes.len() as u64;
        let digest = self
            .dst
            .put_manifest(bytes.into(), media::OCI_MANIFEST, tag)
            .await?;
        Ok((
            ImageSummary {
                platform,
                source_manifest: fetched.digest,
                manifest: digest,
                layers,
            },
            size,
        ))
    }
}
