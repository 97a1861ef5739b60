//! Start-up traces end to end: the first start of a lazy image is recorded and lists the
//! files the program opened; the trace travels through the registry to a host with empty
//! caches, which prefetches it so the same start needs no on-demand registry fetch; bad
//! trace files are refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brisk_e2e::daemons::{Containerd, Snapshotter};
use brisk_e2e::proxy::{Fault, Injection, Proxy, Scope};
use brisk_e2e::{
    assert_same_tree, brisk, brisk_output, sample_in_registry, snapshotter_gate,
    unpack_image_from_layout, unpack_image_from_registry, OciImage, RegisteredSample, Registry,
};
use serde_json::Value;

/// What the traced program reads.
const PROGRAM: &str = "cat /etc/hostname /app/link /app/added/new.txt > /dev/null; echo done";

fn enabled() -> bool {
    snapshotter_gate()
}

/// One "host": a snapshotter (recording ends 1 s after the last read) and a containerd.
struct Host {
    containerd: Containerd,
    snapshotter: Snapshotter,
}

impl Host {
    fn start(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("brisk.toml");
        std::fs::write(&config, "[trace]\nquiet_secs = 1\n")?;
        let snapshotter = Snapshotter::start(
            &dir.join("brisk"),
            &["--config", config.to_str().context("path")?],
        )?;
        let namespace = format!("{name}-{}", std::process::id());
        let containerd =
            Containerd::start(&dir.join("containerd"), &snapshotter.socket, &namespace)?;
        Ok(Self {
            containerd,
            snapshotter,
        })
    }

    fn socket(&self) -> &str {
        self.snapshotter.socket.to_str().expect("UTF-8 temp path")
    }

    fn pull(&self, image: &str) -> Result<()> {
        self.containerd.brisk_pull(image, &[])?;
        Ok(())
    }

    /// Runs `PROGRAM` in a new container of `image`; its stdout.
    fn run(&self, image: &str, id: &str) -> Result<String> {
        let id = format!("{id}-{}", std::process::id());
        self.containerd
            .run_busybox(image, &id, &["sh", "-c", PROGRAM])
            .with_context(|| self.snapshotter.log())
    }

    fn pull_and_run(&self, image: &str, id: &str) -> Result<String> {
        self.pull(image)?;
        self.run(image, id)
    }

    fn export_trace(&self, image: &str, file: &Path) -> Result<()> {
        let file = file.to_str().context("path")?;
        brisk(&[
            "trace",
            "export",
            image,
            file,
            "--snapshotter",
            self.socket(),
        ])?;
        Ok(())
    }

    fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&brisk(&[
            "status",
            "--snapshotter",
            self.socket(),
            "--json",
        ])?)?)
    }

    fn traces(&self) -> Result<Value> {
        Ok(serde_json::from_str(&brisk(&[
            "trace",
            "ls",
            "--json",
            "--snapshotter",
            self.socket(),
        ])?)?)
    }

    /// Waits until the daemon holds a trace (a recording ends a second after the last read).
    fn wait_for_trace(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.traces()?["traces"]
                .as_array()
                .is_some_and(|t| !t.is_empty())
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("no trace was recorded; log:\n{}", self.snapshotter.log())
    }

    /// Waits until prefetch stops fetching.
    fn wait_for_prefetch(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = u64::MAX;
        while Instant::now() < deadline {
            let now = self.status()?["prefetch_fetches"].as_u64().unwrap_or(0);
            if now > 0 && now == last {
                return Ok(now);
            }
            last = now;
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("prefetch did not settle; log:\n{}", self.snapshotter.log())
    }
}

/// The sample converted into its own registry, and the host whose first start of it was
/// recorded and exported.
struct Recorded {
    sample: OciImage,
    registry: Registry,
    image: String,
    host: Host,
    trace: PathBuf,
}

fn record_first_start(dir: &Path, name: &str) -> Result<Recorded> {
    let RegisteredSample {
        sample, registry, ..
    } = sample_in_registry(dir, false, &[])?;
    let image = registry.image("sample:lazy");
    let host = Host::start(&dir.join(name), name)?;
    assert_eq!(host.pull_and_run(&image, "first")?, "done\n");
    host.wait_for_trace()?;
    let trace = dir.join("trace.json");
    host.export_trace(&image, &trace)?;
    Ok(Recorded {
        sample,
        registry,
        image,
        host,
        trace,
    })
}

#[test]
fn a_recorded_trace_travels_through_the_registry_and_is_prefetched() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    // Host A: first start, recorded.
    // The registry is bound so that it lives to the end of the test.
    let Recorded {
        image,
        host: a,
        trace: exported,
        registry: _registry,
        ..
    } = record_first_start(tmp.path(), "trace-a")?;
    let status = a.status()?;
    assert_eq!(status["recordings"], 1);
    // The first start read through the lazy layer, fetched what it read from the registry,
    // and waited for it: the per-image figures say so.
    let images = status["images"].as_array().context("images in status")?;
    assert_eq!(images.len(), 1, "{status}");
    let reads = &images[0]["reads"];
    let figure = |name: &str| reads[name].as_u64().unwrap_or(0);
    assert!(
        figure("bytes") > 0 && figure("compressed_bytes") > 0,
        "{status}"
    );
    assert!(figure("stalled_reads") > 0, "{status}");
    assert!(reads["stall_ms"].as_f64().unwrap_or(0.0) > 0.0, "{status}");
    // Every chunk read came whole from the registry (no cache, no peers yet).
    assert!(
        figure("registry_bytes") >= figure("compressed_bytes"),
        "{status}"
    );
    assert_eq!(figure("peer_bytes"), 0, "{status}");
    assert!(
        reads["fetched_per_read"].as_f64().unwrap_or(0.0) >= 1.0,
        "{status}"
    );
    let summary = brisk(&["status", "--snapshotter", a.socket()])?;
    let repository = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
    assert!(
        summary
            .lines()
            .any(|l| l.trim_start().starts_with(repository)),
        "no row for {repository} in:\n{summary}"
    );
    let shown = brisk(&["trace", "show", &image, "--snapshotter", a.socket()])?;
    for file in [
        "bin/busybox",
        "etc/hostname",
        "app/nested/target.txt",
        "app/added/new.txt",
    ] {
        assert!(
            shown.contains(file),
            "{file} missing from the trace:\n{shown}"
        );
    }
    assert!(
        !shown.contains("app/big.bin"),
        "the program never read big.bin:\n{shown}"
    );
    brisk(&["trace", "push", &image, "--snapshotter", a.socket()])?;

    // Host B: empty caches; the trace comes from the registry on first sight.
    let b = Host::start(&tmp.path().join("b"), "trace-b")?;
    b.pull(&image)?;
    let prefetched = b.wait_for_prefetch()?;
    let before = b.status()?;
    assert_eq!(before["prefetches_started"], 1, "{before}");
    assert_eq!(before["recordings"], 0, "{before}");
    let out = b.run(&image, "second")?;
    assert_eq!(out, "done\n");
    let after = b.status()?;
    assert_eq!(
        after["on_demand_fetches"].as_u64(),
        before["on_demand_fetches"].as_u64(),
        "reads went to the registry despite the prefetch of {prefetched} chunks: {after}"
    );
    // No read waited on the network: prefetch had brought every chunk the start read.
    assert_eq!(after["images"][0]["reads"]["stalled_reads"], 0, "{after}");
    assert!(
        after["images"][0]["reads"]["bytes"].as_u64().unwrap_or(0) > 0,
        "{after}"
    );
    // The imported trace is the exported one.
    let b_trace = brisk(&[
        "trace",
        "show",
        &image,
        "--json",
        "--snapshotter",
        b.socket(),
    ])?;
    let a_trace: Value = serde_json::from_slice(&std::fs::read(&exported)?)?;
    assert_eq!(
        serde_json::from_str::<Value>(&b_trace)?["entries"],
        a_trace["entries"]
    );
    Ok(())
}

#[test]
fn reads_made_before_the_trace_lookups_end_are_recorded() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let registry = sample_in_registry(tmp.path(), false, &[])?.registry;
    // The daemon reads the manifest (by digest) before it looks for a trace; held up here,
    // the lookups end long after the container has run.
    let proxy = Proxy::start(&registry.addr())?;
    proxy.inject(Injection {
        fault: Fault::Delay(Duration::from_secs(3)),
        scope: Scope::ManifestsByDigest,
        times: None,
    });
    let image = proxy.image("sample:lazy");
    let host = Host::start(&tmp.path().join("host"), "early")?;
    assert_eq!(host.pull_and_run(&image, "first")?, "done\n");
    host.wait_for_trace()?;
    assert!(proxy.counts().faults > 0, "the manifest was never delayed");
    let shown = brisk(&["trace", "show", &image, "--snapshotter", host.socket()])?;
    for file in ["bin/busybox", "etc/hostname", "app/nested/target.txt"] {
        assert!(
            shown.contains(file),
            "{file} missing from the trace:\n{shown}"
        );
    }
    assert_eq!(host.status()?["recordings"], 1);
    Ok(())
}

#[test]
fn bad_trace_files_are_refused() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let Recorded {
        sample,
        registry,
        image,
        host,
        trace: good,
    } = record_first_start(tmp.path(), "trace-bad")?;
    let bytes = std::fs::read(&good)?;

    let garbage = tmp.path().join("garbage.json");
    std::fs::write(&garbage, b"\x00\x01 not a trace")?;
    let truncated = tmp.path().join("truncated.json");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    for file in [&garbage, &truncated] {
        let out = brisk_output(&[
            "trace",
            "import",
            file.to_str().context("path")?,
            "--snapshotter",
            host.socket(),
        ])?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Not a Brisk trace"), "{err}");
    }
    // A trace for another image: refused when the caller names the image it expects.
    let other = registry.image("other:lazy");
    brisk(&["convert", &sample.transport(), &other])?;
    let mut foreign: Value = serde_json::from_slice(&bytes)?;
    foreign["image"] = Value::String(format!("sha256:{}", "ab".repeat(32)));
    let foreign_file = tmp.path().join("foreign.json");
    std::fs::write(&foreign_file, serde_json::to_vec(&foreign)?)?;
    let out = brisk_output(&[
        "trace",
        "import",
        foreign_file.to_str().context("path")?,
        "--image",
        &image,
        "--snapshotter",
        host.socket(),
    ])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the trace of image"));
    // And the good one still imports (merged with what the host recorded).
    let ok = brisk(&[
        "trace",
        "import",
        good.to_str().context("path")?,
        "--image",
        &image,
        "--snapshotter",
        host.socket(),
    ])?;
    assert!(ok.contains("2 start(s)"), "{ok}");
    Ok(())
}

#[test]
fn a_baked_trace_prefetches_on_a_host_that_never_saw_one() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let Recorded {
        sample,
        registry,
        trace,
        host: _a,
        ..
    } = record_first_start(tmp.path(), "bake-a")?;

    // Bake it in: the traced files move to the front of their layers.
    let baked = registry.image("sample:baked");
    brisk(&[
        "convert",
        "--trace",
        trace.to_str().context("path")?,
        &sample.transport(),
        &baked,
    ])?;
    let inspect: Value = serde_json::from_str(&brisk(&["inspect", "--json", &baked])?)?;
    assert!(inspect[0]["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .all(|l| l["toc"].is_object()));
    // Standard tools still unpack exactly the original tree.
    let original = unpack_image_from_layout(&sample, &tmp.path().join("unpack-original"))?;
    let reordered = unpack_image_from_registry(&baked, &tmp.path().join("unpack-baked"))?;
    assert_same_tree(&original, &reordered)?;

    // A host with no trace at all prefetches each layer from its TOC as it is mounted:
    // the image's manifest is not needed, so a registry that refuses it (by digest, as the
    // daemon asks for it) changes nothing.
    let proxy = Proxy::start(&registry.addr())?;
    proxy.inject(Injection {
        fault: Fault::Status(404),
        scope: Scope::ManifestsByDigest,
        times: None,
    });
    let baked = proxy.image("sample:baked");
    let b = Host::start(&tmp.path().join("b"), "bake-b")?;
    b.pull(&baked)?;
    b.wait_for_prefetch()?;
    let before = b.status()?;
    assert_eq!(before["prefetches_started"], 1, "{before}");
    let out = b.run(&baked, "baked")?;
    assert_eq!(out, "done\n");
    let after = b.status()?;
    assert_eq!(
        after["on_demand_fetches"], before["on_demand_fetches"],
        "{after}"
    );
    assert!(
        proxy.counts().faults > 0,
        "the manifest was never asked for"
    );
    Ok(())
}
