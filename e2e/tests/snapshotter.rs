//! The remote snapshotter under a real containerd: a converted image starts lazily (the
//! registry serves a fraction of it), an unconverted one through the fallback, the container
//! sees exactly the image's files, a restarted snapshotter serves new containers, a corrupt
//! chunk is an I/O error inside the container (never wrong bytes), and removing the image
//! leaves no mount or directory behind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use brisk_blobcache::toc::{Footer, Toc, FOOTER_SIZE};
use brisk_e2e::daemons::{mounts_under, Containerd, Snapshotter};
use brisk_e2e::{
    brisk, build_sample_image, raw_manifest, sample_in_registry, snapshotter_gate, Proxy,
    RegisteredSample, Registry,
};
use serde_json::Value;
use tempfile::TempDir;

fn enabled() -> bool {
    snapshotter_gate()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique name per test process and call: containers and namespaces must not collide with
/// other tests sharing `/run/containerd`.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Registry (with the sample pushed plain and converted), a counting proxy, Brisk and a
/// containerd using it.
struct Stack {
    containerd: Containerd,
    snapshotter: Snapshotter,
    proxy: Proxy,
    registry: Registry,
    rootfs: PathBuf,
    _tmp: TempDir,
}

impl Stack {
    fn start() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let RegisteredSample {
            registry, rootfs, ..
        } = sample_in_registry(tmp.path(), true, &[])?;
        let proxy = Proxy::start(&registry.addr())?;
        let snapshotter = Snapshotter::start(&tmp.path().join("brisk"), &[])?;
        let containerd = Containerd::start(
            &tmp.path().join("containerd"),
            &snapshotter.socket,
            &unique("brisk-e2e"),
        )?;
        Ok(Self {
            containerd,
            snapshotter,
            proxy,
            registry,
            rootfs,
            _tmp: tmp,
        })
    }

    fn lazy(&self) -> String {
        self.proxy.image("sample:lazy")
    }

    fn pull(&self, image: &str) -> Result<String> {
        self.containerd.brisk_pull(image, &[])
    }

    /// Runs `/bin/busybox ARGS` in a new container of `image` on Brisk; its stdout.
    fn run(&self, image: &str, args: &[&str]) -> Result<String> {
        self.containerd
            .run_busybox(image, &unique("c"), args)
            .with_context(|| format!("snapshotter log:\n{}", self.snapshotter.log()))
    }

    fn layer_bytes(&self, tag: &str) -> Result<u64> {
        let manifest: Value = serde_json::from_str(&raw_manifest(&self.registry.image(tag))?)?;
        Ok(manifest["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum())
    }
}

#[test]
fn lazy_pull_runs_and_fetches_a_fraction_of_the_image() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    stack.pull(&stack.lazy())?;
    let out = stack.run(&stack.lazy(), &["cat", "/etc/hostname"])?;
    assert_eq!(out, "sample-v2\n");
    assert!(
        stack.snapshotter.log().contains("lazy layer mounted"),
        "{}",
        stack.snapshotter.log()
    );
    let fetched = stack.proxy.counts().blob_bytes;
    let image = stack.layer_bytes("sample:lazy")?;
    // The 3 MiB file of layer 1 is never read; busybox and a few small files are.
    assert!(
        fetched * 10 < image * 7,
        "fetched {fetched} of {image} bytes"
    );
    Ok(())
}

#[test]
fn a_converted_layer_is_mounted_without_a_second_manifest_fetch() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    stack.pull(&stack.lazy())?;
    assert!(stack.snapshotter.log().contains("lazy layer mounted"));
    let counts = stack.proxy.counts();
    // The pull asks for the manifest by tag; the daemon would ask by digest. Its first TOC
    // read (the first ranged blob read) must come with no such request before it: the
    // layer's labels said where the TOC is.
    let first_toc = counts
        .blobs
        .iter()
        .position(|b| b.range.is_some())
        .context("no ranged blob read")?;
    let first_toc_path = &counts.blobs[first_toc].path;
    let before: Vec<&String> = counts
        .paths
        .iter()
        .take_while(|p| *p != first_toc_path)
        .collect();
    assert!(
        before.iter().any(|p| p.ends_with("/manifests/lazy")),
        "{before:?}"
    );
    assert!(
        !before.iter().any(|p| p.contains("/manifests/sha256:")),
        "{before:?}"
    );
    Ok(())
}

#[test]
fn files_inside_the_container_match_the_image() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    stack.pull(&stack.lazy())?;
    let script = "cat /app/link; readlink /app/link; stat -c '%a %u:%g' /usr/bin/suid-tool /home/user/notes.txt /tmp; \
                  stat -c %h /app/data/original; for f in /app/*; do echo \"${f#/app/}\"; done; \
                  test -e /app/remove-me.txt && echo present || echo gone; \
                  test -e /app/old-dir && echo present || echo gone; \
                  sha256sum /app/big.bin | cut -d' ' -f1";
    let out = stack.run(&stack.lazy(), &["sh", "-c", script])?;
    let big = brisk_e2e::cmd::sha256_file(&stack.rootfs.join("app/big.bin"))?;
    let ls = {
        let mut names: Vec<String> = std::fs::read_dir(stack.rootfs.join("app"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        names.join("\n")
    };
    let expected = format!(
        "the target\n/app/nested/target.txt\n4755 0:0\n640 1000:1000\n1777 0:0\n2\n{ls}\ngone\ngone\n{big}\n"
    );
    assert_eq!(out, expected);
    Ok(())
}

#[test]
fn an_unconverted_image_runs_through_the_fallback() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    let plain = stack.proxy.image("sample:v1");
    stack.pull(&plain)?;
    let out = stack.run(&plain, &["cat", "/etc/hostname", "/app/added/new.txt"])?;
    assert_eq!(out, "sample-v2\nadded by layer 2\n");
    assert!(!stack.snapshotter.log().contains("lazy layer mounted"));
    assert!(
        mounts_under(&stack.snapshotter.root).is_empty(),
        "a non-lazy image needs no FUSE mount"
    );
    Ok(())
}

#[test]
fn a_restarted_snapshotter_serves_new_containers() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let mut stack = Stack::start()?;
    stack.pull(&stack.lazy())?;
    assert_eq!(
        stack.run(&stack.lazy(), &["cat", "/etc/hostname"])?,
        "sample-v2\n"
    );
    stack.snapshotter.restart()?;
    stack.containerd.wait_for_snapshotter()?;
    assert_eq!(
        stack.run(&stack.lazy(), &["cat", "/app/added/new.txt"])?,
        "added by layer 2\n"
    );
    // A clean stop is quick and unmounts everything.
    let took = stack.snapshotter.stop_clean()?;
    assert!(took.as_secs() < 10, "SIGTERM took {took:?}");
    assert!(
        mounts_under(&stack.snapshotter.root).is_empty(),
        "{:?}",
        mounts_under(&stack.snapshotter.root)
    );
    Ok(())
}

#[test]
fn a_corrupt_chunk_is_an_io_error_inside_the_container() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    // Flip a byte inside a chunk of the multi-MiB file of layer 1, found through its TOC.
    let manifest: Value =
        serde_json::from_str(&raw_manifest(&stack.registry.image("sample:lazy"))?)?;
    let layer = &manifest["layers"][0];
    let path = stack
        .registry
        .blob_path(layer["digest"].as_str().context("digest")?)?;
    let mut bytes = std::fs::read(&path)?;
    let footer = Footer::decode(&bytes[bytes.len() - FOOTER_SIZE..], bytes.len() as u64)?;
    let r = footer.toc.range();
    let toc = Toc::decode(
        &bytes[r.start as usize..r.end as usize],
        footer.toc.uncompressed_size,
        None,
    )?;
    let big = toc
        .entries
        .iter()
        .find(|e| e.name == "app/big.bin")
        .context("big.bin in the TOC")?;
    let chunk = &toc.chunks[toc.chunks_for(big.tar_range().context("content")?).start + 1];
    let at = (chunk.offset + chunk.size / 2) as usize;
    bytes[at] ^= 0x55;
    std::fs::write(&path, &bytes)?;
    stack.pull(&stack.lazy())?;
    let out = stack.run(
        &stack.lazy(),
        &[
            "sh",
            "-c",
            "cat /etc/hostname; cat /app/big.bin > /dev/null 2>/tmp/err; echo rc=$?; cat /tmp/err",
        ],
    )?;
    assert!(out.starts_with("sample-v2\nrc=1\n"), "{out}");
    assert!(out.to_lowercase().contains("input/output error"), "{out}");
    Ok(())
}

#[test]
fn removing_the_image_leaves_no_mount_or_directory() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let stack = Stack::start()?;
    stack.pull(&stack.lazy())?;
    stack.run(&stack.lazy(), &["true"])?;
    assert!(
        !mounts_under(&stack.snapshotter.root).is_empty(),
        "lazy layers should be mounted"
    );
    stack
        .containerd
        .ctr(&["images", "rm", "--sync", &stack.lazy()])?;
    let left = stack
        .containerd
        .ctr(&["snapshots", "--snapshotter", "brisk", "ls"])?;
    assert_eq!(left.lines().count(), 1, "snapshots left:\n{left}");
    assert!(
        mounts_under(&stack.snapshotter.root).is_empty(),
        "{:?}",
        mounts_under(&stack.snapshotter.root)
    );
    let dirs: Vec<_> = std::fs::read_dir(stack.snapshotter.root.join("snapshots"))?.collect();
    assert!(dirs.is_empty(), "{dirs:?}");
    Ok(())
}

/// A snapshotter and containerd under `dir` that read registry `host` through `mirror`
/// (containerd's `certs.d/<host>/hosts.toml`), with `image` pulled by `brisk pull` the same way.
fn pull_through_mirror(
    dir: &std::path::Path,
    host: &str,
    mirror: &str,
    image: &str,
) -> Result<(Snapshotter, Containerd)> {
    let certs = dir.join("certs.d");
    std::fs::create_dir_all(certs.join(host))?;
    std::fs::write(
        certs.join(host).join("hosts.toml"),
        format!("server = \"http://{host}\"\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )?;
    let config = dir.join("brisk.toml");
    std::fs::write(
        &config,
        format!("[registry]\nconfig_path = \"{}\"\n", certs.display()),
    )?;
    let snapshotter = Snapshotter::start(
        &dir.join("brisk"),
        &["--config", config.to_str().context("path")?],
    )?;
    let containerd = Containerd::start(
        &dir.join("containerd"),
        &snapshotter.socket,
        &unique("brisk-mirror"),
    )?;
    containerd.brisk_pull(image, &["--hosts-dir", certs.to_str().context("path")?])?;
    Ok((snapshotter, containerd))
}

#[test]
fn a_mirror_that_corrupts_every_blob_is_passed_over_and_the_layer_stays_lazy() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let RegisteredSample { registry, .. } = sample_in_registry(tmp.path(), false, &[])?;
    // The mirror answers every blob read (TOC and chunks) with one bit flipped.
    let mirror = Proxy::start(&registry.addr())?;
    mirror.inject(brisk_e2e::Injection::blobs(brisk_e2e::Fault::FlipBit));
    let image = registry.image("sample:lazy");
    let (snapshotter, containerd) =
        pull_through_mirror(tmp.path(), &registry.addr(), &mirror.addr(), &image)?;
    let out = containerd
        .run_busybox(&image, &unique("c"), &["cat", "/etc/hostname"])
        .with_context(|| snapshotter.log())?;
    assert_eq!(out, "sample-v2\n");
    let log = snapshotter.log();
    assert!(log.contains("lazy layer mounted"), "{log}");
    assert!(
        log.contains("mirror failed, trying the next source"),
        "{log}"
    );
    assert!(mirror.counts().faults > 0, "the mirror was asked");
    Ok(())
}

#[test]
fn layers_are_read_through_a_mirror_from_containerd_hosts_config() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let sample = build_sample_image(&tmp.path().join("sample"))?;
    let mirror = Registry::start()?;
    brisk(&["convert", &sample.transport(), &mirror.image("sample:lazy")])?;
    // The image's own registry does not exist: every byte must come through the mirror.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let image = format!("{dead}/sample:lazy");
    let (snapshotter, containerd) = pull_through_mirror(tmp.path(), &dead, &mirror.addr(), &image)?;
    let out = containerd
        .run_busybox(&image, &unique("c"), &["cat", "/etc/hostname"])
        .with_context(|| snapshotter.log())?;
    assert_eq!(out, "sample-v2\n");
    assert!(
        snapshotter.log().contains("lazy layer mounted"),
        "{}",
        snapshotter.log()
    );
    Ok(())
}
