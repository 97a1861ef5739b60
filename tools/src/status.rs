//! `brisk status`: the daemon's answer as JSON for scripts, or as a summary for a person
//! reading a terminal (which images were read, what they cost, how long reads waited).

use std::fmt::Write as _;

use brisk_proto::brisk::v1 as api;
use indicatif::HumanBytes;
use serde_json::{json, Value};

fn reads_json(r: Option<&api::ReadStatus>) -> Value {
    let r = r.copied().unwrap_or_default();
    json!({
        "reads": r.reads,
        "bytes": r.bytes,
        "compressed_bytes": r.compressed_bytes,
        "stalled_reads": r.stalled_reads,
        "stall_ms": r.stall_us as f64 / 1000.0,
        "registry_bytes": r.registry_bytes,
        "registry_chunks": r.registry_chunks,
        "peer_bytes": r.peer_bytes,
        "peer_chunks": r.peer_chunks,
        "fetched_per_read": fetched_per_read(&r),
    })
}

/// Compressed bytes fetched off the host per compressed byte read; `None` before any read.
fn fetched_per_read(r: &api::ReadStatus) -> Option<f64> {
    (r.compressed_bytes > 0)
        .then(|| (r.registry_bytes + r.peer_bytes) as f64 / r.compressed_bytes as f64)
}

/// The whole answer as one JSON object (`brisk status --json`).
pub fn to_json(s: &api::StatusResponse) -> Value {
    let levels: Vec<Value> = s
        .cache
        .iter()
        .map(|l| json!({"level": l.level, "hits": l.hits, "misses": l.misses, "errors": l.errors, "corrupt": l.corrupt, "timeouts": l.timeouts, "bytes": l.bytes}))
        .collect();
    let zone = s.zone.as_ref().map(|z| json!({"address": z.address, "members": z.members, "requests": z.requests, "chunks": z.chunks, "bytes": z.bytes, "corrupt": z.corrupt, "failures": z.failures}));
    let layers: Vec<Value> = s
        .layers
        .iter()
        .map(|l| json!({"chain_id": l.chain_id, "blob": l.blob, "image": l.image, "manifest": l.manifest, "proof": l.proof, "mounted": l.mounted, "reads": reads_json(l.reads.as_ref())}))
        .collect();
    let images: Vec<Value> = s
        .images
        .iter()
        .map(|i| json!({"image": i.image, "manifest": i.manifest, "layers": i.layers, "mounted": i.mounted, "reads": reads_json(i.reads.as_ref())}))
        .collect();
    let count = |p: &str| proven(s, p);
    let proofs = json!({"mode": s.verify, "proven": count("proven"), "unproven": count("unproven"), "refuted": count("refuted")});
    json!({"version": s.version, "snapshots": s.snapshots, "remote_layers": s.remote_layers, "verify": proofs, "images": images, "layers": layers, "cache": levels, "registry_requests": s.registry_requests, "registry_bytes": s.registry_bytes, "on_demand_fetches": s.on_demand_fetches, "prefetch_fetches": s.prefetch_fetches, "prefetches_started": s.prefetches_started, "recordings": s.recordings, "zone": zone})
}

/// The answer as a few lines and two tables, for a person.
pub fn summary(s: &api::StatusResponse) -> String {
    let mut out = String::new();
    let count = |p: &str| proven(s, p);
    let _ = writeln!(
        out,
        "brisk-snapshotter {}: {} snapshots, {} lazy layers ({} mounted; {} proven, {} unproven, {} refuted; verify: {})",
        s.version,
        s.snapshots,
        s.layers.len(),
        s.remote_layers,
        count("proven"),
        count("unproven"),
        count("refuted"),
        s.verify
    );
    let _ = writeln!(
        out,
        "registry: {} requests, {}; chunks fetched {} on demand, {} by prefetch; {} prefetches started, {} recordings",
        s.registry_requests,
        HumanBytes(s.registry_bytes),
        s.on_demand_fetches,
        s.prefetch_fetches,
        s.prefetches_started,
        s.recordings
    );
    if let Some(z) = &s.zone {
        let _ = writeln!(
            out,
            "zone: {} with {} members alive; from peers {} chunks, {} ({} corrupt answers, {} failed requests)",
            z.address,
            z.members.len(),
            z.chunks,
            HumanBytes(z.bytes),
            z.corrupt,
            z.failures
        );
    }
    if !s.images.is_empty() {
        out.push_str("\nimages (reads in this run of the daemon; sizes as compressed):\n");
        let rows: Vec<Vec<String>> = s
            .images
            .iter()
            .map(|i| {
                let r = i.reads.unwrap_or_default();
                vec![
                    format!("{}@{}", i.image, short(&i.manifest)),
                    format!("{}/{}", i.mounted, i.layers),
                    HumanBytes(r.compressed_bytes).to_string(),
                    HumanBytes(r.registry_bytes + r.peer_bytes).to_string(),
                    fetched_per_read(&r).map_or("-".into(), |x| format!("{x:.2}")),
                    r.stalled_reads.to_string(),
                    format!("{:.2} s", r.stall_us as f64 / 1e6),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "image",
                "mounted",
                "read",
                "fetched",
                "fetched/read",
                "waiting reads",
                "waited",
            ],
            &rows,
        );
    }
    if !s.cache.is_empty() {
        out.push_str("\ncache levels:\n");
        let rows: Vec<Vec<String>> = s
            .cache
            .iter()
            .map(|l| {
                vec![
                    l.level.clone(),
                    l.hits.to_string(),
                    l.misses.to_string(),
                    l.errors.to_string(),
                    l.corrupt.to_string(),
                    l.timeouts.to_string(),
                    HumanBytes(l.bytes).to_string(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "level", "hits", "misses", "errors", "corrupt", "timeouts", "served",
            ],
            &rows,
        );
    }
    out
}

/// Lazy layers whose proof state is `state`.
fn proven(s: &api::StatusResponse, state: &str) -> usize {
    s.layers.iter().filter(|l| l.proof == state).count()
}

/// `sha256:` and the first 12 hex digits: enough to tell an image's manifests apart.
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(0, |i| i + 1) + 12;
    digest.get(..end).unwrap_or(digest)
}

/// Left-aligned columns two spaces apart.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", text.join("  ").trim_end());
    };
    line(out, &mut head.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> api::StatusResponse {
        api::StatusResponse {
            version: "0.1.0".into(),
            snapshots: 3,
            remote_layers: 1,
            verify: "background".into(),
            images: vec![api::ImageStatus {
                image: "reg.test/py".into(),
                manifest: format!("sha256:{}", "ab".repeat(32)),
                layers: 2,
                mounted: 1,
                reads: Some(api::ReadStatus {
                    reads: 10,
                    bytes: 4 << 20,
                    compressed_bytes: 1 << 20,
                    stalled_reads: 4,
                    stall_us: 1_500_000,
                    registry_bytes: 3 << 19,
                    ..Default::default()
                }),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_summary_names_each_image_with_what_it_read_fetched_and_waited() {
        let text = summary(&status());
        let row = text
            .lines()
            .find(|l| l.contains("reg.test/py@sha256:abababababab"))
            .unwrap_or_else(|| panic!("no image row in:\n{text}"));
        let cells: Vec<&str> = row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cells,
            [
                "reg.test/py@sha256:abababababab",
                "1/2",
                "1.00 MiB",
                "1.50 MiB",
                "1.50",
                "4",
                "1.50 s"
            ],
            "{text}"
        );
        assert!(
            text.starts_with("brisk-snapshotter 0.1.0: 3 snapshots"),
            "{text}"
        );
    }

    #[test]
    fn the_json_carries_the_ratio_and_none_before_any_read() {
        let mut s = status();
        let v = to_json(&s);
        assert_eq!(v["images"][0]["reads"]["fetched_per_read"], 1.5);
        assert_eq!(v["images"][0]["reads"]["stall_ms"], 1500.0);
        s.images[0].reads = None;
        assert_eq!(
            to_json(&s)["images"][0]["reads"]["fetched_per_read"],
            Value::Null
        );
    }
}
