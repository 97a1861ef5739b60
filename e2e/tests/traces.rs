//! Start-up traces end to end: the first start of a lazy image is recorded and lists the
//! files the program opened; the trace travels through the registry to a host with empty
//! caches, which prefetches it so the same start needs no on-demand registry fetch; bad
//! trace files are refused.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brisk_e2e::daemons::{Containerd, Snapshotter};
use brisk_e2e::{
    assert_same_tree, brisk, brisk_output, build_sample_image, gate, unpack_image_from_layout,
    unpack_image_from_registry, Registry, CONVERT_FILES,
};
use serde_json::Value;

const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "umoci",
    "containerd",
    "ctr",
    "runc",
    "setfattr",
    "sha256sum",
];

/// What the traced program reads.
const PROGRAM: &str = "cat /etc/hostname /app/link /app/added/new.txt > /dev/null; echo done";

fn enabled() -> bool {
    gate(TOOLS, &[CONVERT_FILES, &["/dev/fuse"]].concat())
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

    fn pull_and_run(&self, image: &str, id: &str) -> Result<String> {
        let socket = self.containerd.socket.to_str().context("path")?;
        brisk(&[
            "pull",
            image,
            "--containerd",
            socket,
            "--namespace",
            &self.containerd.namespace,
        ])?;
        let id = format!("{id}-{}", std::process::id());
        self.containerd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "brisk",
                image,
                &id,
                "/bin/busybox",
                "sh",
                "-c",
                PROGRAM,
            ])
            .with_context(|| self.snapshotter.log())
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

#[test]
fn a_recorded_trace_travels_through_the_registry_and_is_prefetched() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let sample = build_sample_image(&tmp.path().join("sample"))?;
    let registry = Registry::start()?;
    let image = registry.image("sample:lazy");
    brisk(&["convert", &sample.transport(), &image])?;

    // Host A: first start, recorded.
    let a = Host::start(&tmp.path().join("a"), "trace-a")?;
    assert_eq!(a.pull_and_run(&image, "first")?, "done\n");
    assert_eq!(a.status()?["recordings"], 1);
    a.wait_for_trace()?;
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
    let exported = tmp.path().join("trace.json");
    brisk(&[
        "trace",
        "export",
        &image,
        exported.to_str().context("path")?,
        "--snapshotter",
        a.socket(),
    ])?;
    brisk(&["trace", "push", &image, "--snapshotter", a.socket()])?;

    // Host B: empty caches; the trace comes from the registry on first sight.
    let b = Host::start(&tmp.path().join("b"), "trace-b")?;
    let socket = b.containerd.socket.to_str().context("path")?;
    brisk(&[
        "pull",
        &image,
        "--containerd",
        socket,
        "--namespace",
        &b.containerd.namespace,
    ])?;
    let prefetched = b.wait_for_prefetch()?;
    let before = b.status()?;
    assert_eq!(before["prefetches_started"], 1, "{before}");
    assert_eq!(before["recordings"], 0, "{before}");
    let id = format!("second-{}", std::process::id());
    let out = b.containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "brisk",
        &image,
        &id,
        "/bin/busybox",
        "sh",
        "-c",
        PROGRAM,
    ])?;
    assert_eq!(out, "done\n");
    let after = b.status()?;
    assert_eq!(
        after["on_demand_fetches"].as_u64(),
        before["on_demand_fetches"].as_u64(),
        "reads went to the registry despite the prefetch of {prefetched} chunks: {after}"
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
fn bad_trace_files_are_refused() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let sample = build_sample_image(&tmp.path().join("sample"))?;
    let registry = Registry::start()?;
    let image = registry.image("sample:lazy");
    brisk(&["convert", &sample.transport(), &image])?;
    let host = Host::start(&tmp.path().join("h"), "trace-bad")?;
    assert_eq!(host.pull_and_run(&image, "rec")?, "done\n");
    host.wait_for_trace()?;
    let good = tmp.path().join("good.json");
    brisk(&[
        "trace",
        "export",
        &image,
        good.to_str().context("path")?,
        "--snapshotter",
        host.socket(),
    ])?;
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
    let sample = build_sample_image(&tmp.path().join("sample"))?;
    let registry = Registry::start()?;
    let lazy = registry.image("sample:lazy");
    brisk(&["convert", &sample.transport(), &lazy])?;
    let a = Host::start(&tmp.path().join("a"), "bake-a")?;
    assert_eq!(a.pull_and_run(&lazy, "record")?, "done\n");
    a.wait_for_trace()?;
    let trace = tmp.path().join("trace.json");
    brisk(&[
        "trace",
        "export",
        &lazy,
        trace.to_str().context("path")?,
        "--snapshotter",
        a.socket(),
    ])?;

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

    // A host with no trace at all prefetches from the TOC.
    let b = Host::start(&tmp.path().join("b"), "bake-b")?;
    let socket = b.containerd.socket.to_str().context("path")?;
    brisk(&[
        "pull",
        &baked,
        "--containerd",
        socket,
        "--namespace",
        &b.containerd.namespace,
    ])?;
    b.wait_for_prefetch()?;
    let before = b.status()?;
    assert_eq!(before["prefetches_started"], 1, "{before}");
    let id = format!("baked-{}", std::process::id());
    let out = b.containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "brisk",
        &baked,
        &id,
        "/bin/busybox",
        "sh",
        "-c",
        PROGRAM,
    ])?;
    assert_eq!(out, "done\n");
    let after = b.status()?;
    assert_eq!(
        after["on_demand_fetches"], before["on_demand_fetches"],
        "{after}"
    );
    Ok(())
}
