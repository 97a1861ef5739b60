//! Per-image usage: what containers read through an image's lazy layers and how long they
//! waited on the network, beside what those layers' chunks cost off the host. Which images
//! start slowly, and why, for `brisk status` and the Prometheus metrics.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use brisk_blobcache::layered::BlobFetched;
use brisk_blobcache::Digest;
use brisk_proto::brisk::v1 as api;

use crate::fs::ReadReport;
use crate::meta::Snapshot;
use crate::remote::RemoteLayers;

/// How often the per-image gauges are brought up to date when metrics are served.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(10);

/// One lazy layer's reads and fetches in this run (zero when it is not mounted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub read: ReadReport,
    pub fetched: BlobFetched,
}

impl Usage {
    fn add(&mut self, other: &Usage) {
        self.read.add(&other.read);
        let (f, o) = (&mut self.fetched, &other.fetched);
        f.origin_bytes += o.origin_bytes;
        f.origin_chunks += o.origin_chunks;
        f.peer_bytes += o.peer_bytes;
        f.peer_chunks += o.peer_chunks;
    }

    /// Compressed bytes fetched off the host for each compressed byte read; `None` before
    /// anything was read.
    pub fn fetched_per_read(&self) -> Option<f64> {
        let fetched = self.fetched.origin_bytes + self.fetched.peer_bytes;
        (self.read.compressed > 0).then(|| fetched as f64 / self.read.compressed as f64)
    }
}

/// An image's committed lazy layers, summed.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageUsage {
    pub image: String,
    pub manifest: Digest,
    pub layers: u32,
    pub mounted: u32,
    pub usage: Usage,
}

/// Each lazy snapshot's usage, by snapshot id; `None` for one not mounted in this run.
pub fn of_layers(snapshots: &[Snapshot], remote: &RemoteLayers) -> BTreeMap<u64, Option<Usage>> {
    snapshots
        .iter()
        .filter(|s| s.remote.is_some())
        .map(|s| {
            let usage = remote
                .read_report(s.id)
                .map(|(read, fetched)| Usage { read, fetched });
            (s.id, usage)
        })
        .collect()
}

/// The images the lazy snapshots came with, each with its layers' usage summed. A layer blob
/// two snapshots of one image share is counted once; a layer shared with another image counts
/// in the image whose snapshot it is.
pub fn by_image(snapshots: &[Snapshot], layers: &BTreeMap<u64, Option<Usage>>) -> Vec<ImageUsage> {
    let mut images: BTreeMap<(String, Digest), (ImageUsage, HashSet<Digest>)> = BTreeMap::new();
    for s in snapshots {
        let Some(r) = &s.remote else { continue };
        let usage = layers.get(&s.id).copied().flatten();
        let key = (r.image.to_string(), r.manifest);
        let (image, blobs) = images.entry(key.clone()).or_insert_with(|| {
            let image = ImageUsage {
                image: key.0,
                manifest: key.1,
                layers: 0,
                mounted: 0,
                usage: Usage::default(),
            };
            (image, HashSet::new())
        });
        image.layers += 1;
        let Some(usage) = usage else { continue };
        image.mounted += 1;
        if blobs.insert(r.blob) {
            image.usage.add(&usage);
        }
    }
    images.into_values().map(|(image, _)| image).collect()
}

pub fn to_api(u: &Usage) -> api::ReadStatus {
    api::ReadStatus {
        reads: u.read.reads,
        bytes: u.read.bytes,
        compressed_bytes: u.read.compressed,
        stalled_reads: u.read.stalled_reads,
        stall_us: u64::try_from(u.read.stall.as_micros()).unwrap_or(u64::MAX),
        registry_bytes: u.fetched.origin_bytes,
        registry_chunks: u.fetched.origin_chunks,
        peer_bytes: u.fetched.peer_bytes,
        peer_chunks: u.fetched.peer_chunks,
    }
}

/// Sets the per-image gauges: what was read, fetched and waited for.
pub fn publish(images: &[ImageUsage]) {
    for i in images {
        let u = &i.usage;
        let labels = [
            ("image", i.image.clone()),
            ("manifest", i.manifest.to_string()),
        ];
        metrics::gauge!("brisk_image_read_bytes", &labels).set(u.read.bytes as f64);
        metrics::gauge!("brisk_image_read_compressed_bytes", &labels).set(u.read.compressed as f64);
        metrics::gauge!("brisk_image_fetched_bytes", &labels)
            .set((u.fetched.origin_bytes + u.fetched.peer_bytes) as f64);
        metrics::gauge!("brisk_image_stall_seconds", &labels).set(u.read.stall.as_secs_f64());
        if let Some(ratio) = u.fetched_per_read() {
            metrics::gauge!("brisk_image_fetched_per_read", &labels).set(ratio);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::RemoteLayer;
    use crate::snapshots::tests::{lazy_snapshot, remote_layer};

    fn snapshot(id: u64, image: &str, manifest: &[u8], blob: &[u8]) -> Snapshot {
        let remote = RemoteLayer {
            image: image.parse().unwrap(),
            manifest: Digest::sha256(manifest),
            ..remote_layer(Digest::sha256(blob))
        };
        lazy_snapshot(id, format!("k{id}"), remote)
    }

    fn usage(bytes: u64, compressed: u64, fetched: u64) -> Usage {
        Usage {
            read: ReadReport {
                reads: 1,
                bytes,
                compressed,
                stalled_reads: 1,
                stall: Duration::from_millis(bytes),
            },
            fetched: BlobFetched {
                origin_bytes: fetched,
                origin_chunks: 1,
                ..BlobFetched::default()
            },
        }
    }

    #[test]
    fn layers_are_summed_per_image_and_a_shared_blob_once() {
        let snapshots = [
            snapshot(1, "reg.test/app", b"m1", b"base"),
            snapshot(2, "reg.test/app", b"m1", b"top"),
            snapshot(3, "reg.test/app", b"m1", b"base"),
            snapshot(4, "reg.test/other", b"m2", b"base"),
            snapshot(5, "reg.test/idle", b"m3", b"x"),
        ];
        let layers = BTreeMap::from([
            (1, Some(usage(100, 40, 80))),
            (2, Some(usage(10, 5, 5))),
            (3, Some(usage(100, 40, 80))),
            (4, Some(usage(7, 7, 0))),
            (5, None),
        ]);
        let images = by_image(&snapshots, &layers);
        assert_eq!(images.len(), 3);
        let app = &images[0];
        assert_eq!(
            (app.image.as_str(), app.layers, app.mounted),
            ("reg.test/app", 3, 3)
        );
        assert_eq!(app.usage.read.bytes, 110, "the shared base counted once");
        assert_eq!(app.usage.fetched.origin_bytes, 85);
        assert_eq!(app.usage.read.stall, Duration::from_millis(110));
        assert_eq!(app.usage.fetched_per_read(), Some(85.0 / 45.0));
        let idle = &images[1];
        assert_eq!(
            (idle.image.as_str(), idle.layers, idle.mounted),
            ("reg.test/idle", 1, 0)
        );
        assert_eq!(idle.usage.fetched_per_read(), None, "nothing read yet");
        assert_eq!(images[2].usage.read.bytes, 7);
    }
}
