//! Real OCI images for the tests: a sample built with umoci, pushed and pulled with skopeo,
//! and unpacked back to a directory tree with umoci.
//!
//! umoci 0.4.7 cannot read zstd layers, so unpacking goes through skopeo first: it
//! decompresses the layers into a `dir:` copy and then writes an OCI layout with plain tar
//! layers, which umoci can unpack. The same path serves the original and the converted
//! image, so any difference between two unpacked trees comes from the images themselves.

use std::fmt;
use std::fs;
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::run;

/// Size of the large file in the sample: several 512 KiB chunks plus a ragged tail.
const BIG_FILE_SIZE: usize = 3 * 1024 * 1024 + 1234;

/// An image tagged `tag` in the OCI layout at `dir`. Displays as `DIR:TAG`.
#[derive(Clone, Debug)]
pub struct OciImage {
    pub dir: PathBuf,
    pub tag: String,
}

impl OciImage {
    /// The skopeo and Brisk spelling: `oci:DIR:TAG`.
    pub fn transport(&self) -> String {
        format!("oci:{self}")
    }
}

impl fmt::Display for OciImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dir.display(), self.tag)
    }
}

/// Builds the sample image in `dir`: a two-layer image made by umoci, with gzip layers.
///
/// Layer 1 is a small busybox system that exercises what a converter can get wrong: modes
/// with setuid and sticky bits, owners, a hard link, relative and absolute symlinks, a
/// non-ASCII name, an empty file, a file spanning several chunks, and a user xattr (umoci
/// keeps `user.*` xattrs as `SCHILY.xattr` PAX records). Layer 2 modifies a file, deletes a
/// file and a directory from layer 1 (whiteouts), and adds a directory tree.
pub fn build_sample_image(dir: &Path) -> Result<OciImage> {
    fs::create_dir_all(dir)?;
    let image = OciImage {
        dir: dir.join("layout"),
        tag: "sample".into(),
    };
    let bundle = dir.join("bundle");
    let rootfs = sample_rootfs(dir);
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&image.dir))?;
    run(Command::new("umoci").args(["new", "--image", &image.to_string()]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image.to_string()])
        .arg(&bundle))?;

    write_layer_one(&rootfs).context("Writing layer 1 of the sample")?;
    repack(&image, &bundle)?;
    write_layer_two(&rootfs).context("Writing layer 2 of the sample")?;
    repack(&image, &bundle)?;
    Ok(image)
}

/// The tree `build_sample_image(dir)` packed last: the sample's final content, with layer 2
/// applied, to compare files read from the image against.
pub fn sample_rootfs(dir: &Path) -> PathBuf {
    dir.join("bundle/rootfs")
}

/// Builds a pause image in `dir`: one layer holding only busybox, whose entrypoint sleeps
/// until the pod is stopped (CRI kills the sandbox with SIGKILL). Its layer shares no chain
/// ID with the sample's, so pulling it never satisfies a sample layer.
pub fn build_pause_image(dir: &Path) -> Result<OciImage> {
    fs::create_dir_all(dir)?;
    let image = OciImage {
        dir: dir.join("layout"),
        tag: "pause".into(),
    };
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&image.dir))?;
    run(Command::new("umoci").args(["new", "--image", &image.to_string()]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image.to_string()])
        .arg(&bundle))?;
    let root = bundle.join("rootfs");
    fs::create_dir_all(root.join("bin"))?;
    fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    set_mode(&root.join("bin/busybox"), 0o755)?;
    repack(&image, &bundle)?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image.to_string(),
        "--config.entrypoint",
        "/bin/busybox",
        "--config.cmd",
        "sleep",
        "--config.cmd",
        "100000",
    ]))?;
    Ok(image)
}

/// `--refresh-bundle` records the packed state in the bundle, so that the next repack
/// diffs against it and makes a new layer with only the changes.
fn repack(image: &OciImage, bundle: &Path) -> Result<()> {
    run(Command::new("umoci")
        .args(["repack", "--refresh-bundle", "--image", &image.to_string()])
        .arg(bundle))?;
    Ok(())
}

fn write_layer_one(root: &Path) -> Result<()> {
    for d in [
        "bin",
        "etc",
        "usr/bin",
        "tmp",
        "home/user",
        "app/nested",
        "app/data",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    set_mode(&root.join("bin/busybox"), 0o755)?;
    for applet in ["sh", "ls", "cat"] {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    fs::write(root.join("etc/hostname"), "sample\n")?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
    write_with_mode(
        &root.join("etc/shadow"),
        b"root:*:19000:0:99999:7:::\n",
        0o600,
    )?;
    write_with_mode(&root.join("usr/bin/suid-tool"), b"#!/bin/sh\nid\n", 0o4755)?;
    set_mode(&root.join("tmp"), 0o1777)?;
    write_with_mode(&root.join("home/user/notes.txt"), b"owned by user\n", 0o640)?;
    chown(root.join("home/user"), Some(1000), Some(1000))?;
    chown(root.join("home/user/notes.txt"), Some(1000), Some(1000))?;

    let target = root.join("app/nested/target.txt");
    fs::write(&target, "the target\n")?;
    run(Command::new("setfattr")
        .args(["-n", "user.brisk", "-v", "hello"])
        .arg(&target))?;
    symlink("/app/nested/target.txt", root.join("app/link"))?;
    fs::write(root.join("app/data/original"), "linked twice\n")?;
    fs::hard_link(
        root.join("app/data/original"),
        root.join("app/data/hardlink"),
    )?;
    fs::write(root.join("app/ünïcødé-名前.txt"), "non-ASCII name\n")?;
    fs::write(root.join("app/empty"), "")?;
    fs::write(root.join("app/big.bin"), deterministic_bytes(BIG_FILE_SIZE))?;
    fs::write(root.join("app/remove-me.txt"), "deleted by layer 2\n")?;
    fs::create_dir_all(root.join("app/old-dir"))?;
    fs::write(
        root.join("app/old-dir/file.txt"),
        "deleted with its directory\n",
    )?;
    Ok(())
}

fn write_layer_two(root: &Path) -> Result<()> {
    fs::write(root.join("etc/hostname"), "sample-v2\n")?;
    fs::remove_file(root.join("app/remove-me.txt"))?;
    fs::remove_dir_all(root.join("app/old-dir"))?;
    fs::create_dir_all(root.join("app/added/deeper"))?;
    fs::write(root.join("app/added/new.txt"), "added by layer 2\n")?;
    fs::write(root.join("app/added/deeper/more.txt"), "further down\n")?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    // An explicit chmod: the process umask would clear bits from a mode given at creation.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    fs::write(path, data)?;
    set_mode(path, mode)
}

/// `len` bytes from xorshift64: the same on every run, and incompressible, so the
/// compressed layer has chunks of about the same size as the tar ranges they cover.
pub fn deterministic_bytes(len: usize) -> Vec<u8> {
    seeded_bytes(len, 1)
}

/// `len` bytes of xorshift64 from `seed`: incompressible, and different for every seed.
pub fn seeded_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The sample and a registry of its own that holds it.
pub struct RegisteredSample {
    pub sample: OciImage,
    pub registry: crate::Registry,
    /// The sample's final tree (`sample_rootfs`), to compare what is read against.
    pub rootfs: PathBuf,
}

/// Builds the sample under `dir/sample`, starts a registry, and converts the sample into it as
/// `sample:lazy` with `brisk convert CONVERT_ARGS`; with `plain`, also pushes it unconverted
/// as `sample:v1`.
pub fn sample_in_registry(
    dir: &Path,
    plain: bool,
    convert_args: &[&str],
) -> Result<RegisteredSample> {
    let sample_dir = dir.join("sample");
    let sample = build_sample_image(&sample_dir)?;
    let registry = crate::Registry::start()?;
    if plain {
        push_image(&sample, &registry.image("sample:v1"))?;
    }
    let (src, dst) = (sample.transport(), registry.image("sample:lazy"));
    let mut args = vec!["convert"];
    args.extend_from_slice(convert_args);
    args.extend([src.as_str(), dst.as_str()]);
    crate::brisk(&args)?;
    Ok(RegisteredSample {
        sample,
        registry,
        rootfs: sample_rootfs(&sample_dir),
    })
}

/// Copies `image` to `docker://DST` on a plain-HTTP registry.
pub fn push_image(image: &OciImage, dst: &str) -> Result<()> {
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &image.transport(),
        &format!("docker://{dst}"),
    ]))?;
    Ok(())
}

/// The manifest bytes of `reference` on a plain-HTTP registry, exactly as stored.
pub fn raw_manifest(reference: &str) -> Result<String> {
    run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]))
}

/// Pulls `reference` from a plain-HTTP registry and unpacks it under `dir`; returns the
/// root of the unpacked tree.
pub fn unpack_image_from_registry(reference: &str, dir: &Path) -> Result<PathBuf> {
    unpack(
        &format!("docker://{reference}"),
        &["--src-tls-verify=false"],
        dir,
    )
}

/// Unpacks `image` from an OCI layout under `dir`; returns the root of the unpacked tree.
pub fn unpack_image_from_layout(image: &OciImage, dir: &Path) -> Result<PathBuf> {
    unpack(&image.transport(), &[], dir)
}

fn unpack(src: &str, src_flags: &[&str], dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let plain = dir.join("plain");
    let layout = OciImage {
        dir: dir.join("layout"),
        tag: "unpack".into(),
    };
    let bundle = dir.join("bundle");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-decompress"])
        .args(src_flags)
        .arg(src)
        .arg(format!("dir:{}", plain.display())))?;
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-oci-accept-uncompressed-layers",
        &format!("dir:{}", plain.display()),
        &layout.transport(),
    ]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &layout.to_string()])
        .arg(&bundle))?;
    Ok(bundle.join("rootfs"))
}
