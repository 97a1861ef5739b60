//! The benchmark's images, built locally from the Debian archive and busybox, kept in one OCI
//! layout under the output directory so that a rerun skips the slow build:
//!
//! - `py`: Debian bookworm minbase with python3 (mmdebstrap), one layer; its command imports a
//!   few standard modules and prints `ready`.
//! - `big`: `py` plus a layer holding one 200 MiB file of incompressible bytes.
//! - `small-0` … `small-9`: one busybox layer each, made distinct by a file of their own, so
//!   that ten pulls mount ten different lazy layers.
//! - the comparison's workload images (`workload`): minbase with their Debian packages and
//!   files, one layer, each in a layout of its own so that adding one rebuilds no other. Some
//!   have content generated at build time (`Generated`): `modules` a Python application of 3000
//!   modules of 2-4 KiB each, compiled to bytecode in the image; `mmap` a 1 GiB file of
//!   incompressible bytes, written 8 MiB at a time so that the build never holds it whole.
//!
//! Each run pushes them to its fresh registry (`NAME:v1`) and converts them there
//! (`NAME:lazy`), talking to the registry directly: setup is not measured.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::workload::{Generated, Workload};
use crate::cmd::run;
use crate::image::{push_image, raw_manifest, OciImage};
use crate::registry::Registry;

/// Changes whenever the recipe below does, so an old cache is rebuilt rather than reused.
const RECIPE: &str = "brisk-bench images v1\n";

/// The command of `py`: what a cold start waits for.
pub const PY_CMD: &[&str] = &[
    "python3",
    "-c",
    "import json, http.server, email, sqlite3; print('ready')",
];

/// Where the big file sits inside `big`, and its size.
pub const BIG_FILE: &str = "/data/big.bin";
pub const BIG_FILE_BYTES: u64 = 200 << 20;

/// How many small images the memory measurement mounts.
pub const SMALL_IMAGES: usize = 10;

/// Names and sizes of the images of one run.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSizes {
    pub name: String,
    pub layers: usize,
    /// Sum of the compressed layer sizes of `NAME:v1` (gzip, as umoci writes them).
    pub v1_bytes: u64,
    /// The same for `NAME:lazy` (Brisk's format, zstd with a TOC).
    pub lazy_bytes: u64,
}

/// Builds the layout under `cache` unless a complete one is there; returns it.
pub fn build_or_reuse(cache: &Path) -> Result<PathBuf> {
    cached_layout(cache, RECIPE, |layout| {
        build_python(cache, layout).context("Building the python image")?;
        for i in 0..SMALL_IMAGES {
            build_small(cache, layout, i).with_context(|| format!("Building small-{i}"))?;
        }
        Ok(())
    })
}

/// The layout `cache/layout`, made by `build` (given the new, empty layout) unless the marker
/// file says a build of the same `recipe` completed there.
fn cached_layout(
    cache: &Path,
    recipe: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let layout = cache.join("layout");
    let marker = cache.join("complete");
    if fs::read_to_string(&marker).is_ok_and(|m| m == recipe) {
        eprintln!(
            "images: reusing the layout built earlier in {}",
            cache.display()
        );
        return Ok(layout);
    }
    if cache.exists() {
        fs::remove_dir_all(cache).context("Removing an incomplete image cache")?;
    }
    fs::create_dir_all(cache)?;
    let layout_arg = layout.display().to_string();
    run(Command::new("umoci").args(["init", "--layout", &layout_arg]))?;
    build(&layout)?;
    fs::write(&marker, recipe)?;
    Ok(layout)
}

/// The layout holding `workload`'s image (tag `NAME`) under `cache/NAME`, built unless it is
/// there. `py` is the cold-start benchmark's own image, from `build_or_reuse`.
pub fn workload_layout(cache: &Path, workload: &Workload) -> Result<PathBuf> {
    if workload.packages.is_empty() {
        return build_or_reuse(cache);
    }
    let dir = cache.join(workload.name);
    // Any change to what goes into the image makes a different recipe, hence a rebuild.
    let mut recipe = format!(
        "brisk-bench workload image v1\n{:?}\n{:?}\n{:?}\n",
        workload.packages, workload.files, workload.cmd
    );
    // Only when there is some, so that the images built before generated content existed
    // keep their recipe and are reused. The version is that of the generators' output, which
    // can change while their parameters stay the same.
    if !workload.generated.is_empty() {
        let _ = writeln!(recipe, "generated v1 {:?}", workload.generated);
    }
    cached_layout(&dir, &recipe, |layout| {
        let bundle = build_debian(
            &dir,
            layout,
            workload.name,
            workload.packages,
            workload.files,
            workload.generated,
            workload.cmd,
        )?;
        fs::remove_dir_all(bundle)?;
        Ok(())
    })
    .with_context(|| format!("Building the {} image", workload.name))
}

fn image(layout: &Path, tag: &str) -> OciImage {
    OciImage {
        dir: layout.to_owned(),
        tag: tag.to_owned(),
    }
}

fn umoci(args: &[&str], bundle: &Path) -> Result<()> {
    run(Command::new("umoci").args(args).arg(bundle))?;
    Ok(())
}

fn build_python(cache: &Path, layout: &Path) -> Result<()> {
    let bundle = build_debian(cache, layout, "py", &["python3"], &[], &[], PY_CMD)?;
    let py = image(layout, "py").to_string();

    // `big` is `py` plus one layer: tag the same manifest, then pack only the new file on top.
    let big = image(layout, "big").to_string();
    run(Command::new("umoci").args(["tag", "--image", &py, "big"]))?;
    let data = bundle.join("rootfs/data");
    fs::create_dir_all(&data)?;
    eprintln!("images: packing big ({} MiB)", BIG_FILE_BYTES >> 20);
    fs::write(
        bundle.join("rootfs").join(BIG_FILE.trim_start_matches('/')),
        crate::image::seeded_bytes(BIG_FILE_BYTES as usize, 0xb16),
    )?;
    umoci(&["repack", "--refresh-bundle", "--image", &big], &bundle)?;
    fs::remove_dir_all(&bundle)?;
    Ok(())
}

/// `tag` in `layout`: Debian bookworm minbase with `packages` (mmdebstrap), `files` (path
/// inside the image, content) and `generated` in one layer, with `cmd` as its command.
/// Returns the unpacked bundle, for layers on top.
fn build_debian(
    cache: &Path,
    layout: &Path,
    tag: &str,
    packages: &[&str],
    files: &[(&str, &str)],
    generated: &[Generated],
    cmd: &[&str],
) -> Result<PathBuf> {
    let tar = cache.join("rootfs.tar");
    eprintln!(
        "images: mmdebstrap bookworm minbase + {} (a minute or more)",
        packages.join(" ")
    );
    run(Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase"])
        .arg(format!("--include={}", packages.join(",")))
        .arg("bookworm")
        .arg(&tar))?;
    let bundle = cache.join(format!("{tag}-bundle"));
    let reference = image(layout, tag).to_string();
    run(Command::new("umoci").args(["new", "--image", &reference]))?;
    umoci(&["unpack", "--image", &reference], &bundle)?;
    let root = bundle.join("rootfs");
    // Device nodes stay out, as in images from registries: the runtime provides /dev.
    run(Command::new("tar")
        .args(["-xpf"])
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "--exclude=./dev/*"]))?;
    fs::remove_file(&tar)?;
    for (path, content) in files {
        let path = root.join(path);
        fs::create_dir_all(path.parent().context("A file path has no parent")?)?;
        fs::write(path, content)?;
    }
    for g in generated {
        write_generated(&root, g).with_context(|| format!("Generating {g:?}"))?;
    }
    eprintln!("images: packing {tag}");
    umoci(
        &["repack", "--refresh-bundle", "--image", &reference],
        &bundle,
    )?;
    let mut config = Command::new("umoci");
    config.args(["config", "--image", &reference]);
    for arg in cmd {
        config.arg("--config.cmd").arg(arg);
    }
    run(&mut config)?;
    Ok(bundle)
}

fn write_generated(root: &Path, generated: &Generated) -> Result<()> {
    match *generated {
        Generated::PythonApp {
            packages,
            modules,
            seed,
        } => super::pyapp::write(root, packages, modules, seed),
        Generated::SeededFile { path, bytes, seed } => {
            write_seeded_file(&root.join(path), bytes, seed)
        }
    }
}

/// Writes `bytes` of `seeded_bytes` to `path`, a piece at a time: each piece is a stream of
/// its own (seed `seed + i`), so memory stays at one piece whatever the size.
fn write_seeded_file(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    const PIECE: u64 = 8 << 20;
    eprintln!("images: writing {} ({} MiB)", path.display(), bytes >> 20);
    fs::create_dir_all(path.parent().context("A file path has no parent")?)?;
    let mut file = fs::File::create(path)?;
    for (i, start) in (0..bytes).step_by(PIECE as usize).enumerate() {
        let len = PIECE.min(bytes - start) as usize;
        file.write_all(&crate::image::seeded_bytes(
            len,
            seed.wrapping_add(i as u64),
        ))?;
    }
    file.sync_all()?;
    Ok(())
}

fn build_small(cache: &Path, layout: &Path, i: usize) -> Result<()> {
    let bundle = cache.join(format!("small-{i}-bundle"));
    let tag = image(layout, &format!("small-{i}")).to_string();
    run(Command::new("umoci").args(["new", "--image", &tag]))?;
    umoci(&["unpack", "--image", &tag], &bundle)?;
    let root = bundle.join("rootfs");
    for d in ["bin", "etc", "app", "tmp"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for applet in ["sh", "cat"] {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    fs::write(root.join("etc/hostname"), format!("small-{i}\n"))?;
    fs::write(
        root.join("app/data.bin"),
        crate::image::seeded_bytes(1 << 20, 0x5eed + i as u64),
    )?;
    umoci(&["repack", "--image", &tag], &bundle)?;
    fs::remove_dir_all(&bundle)?;
    Ok(())
}

/// Pushes `NAME:v1` for every image of the layout to `registry` and converts each to
/// `NAME:lazy` with `brisk convert`; returns their sizes.
pub fn publish(layout: &Path, registry: &Registry) -> Result<Vec<ImageSizes>> {
    let mut names = vec!["py".to_owned(), "big".to_owned()];
    names.extend((0..SMALL_IMAGES).map(|i| format!("small-{i}")));
    let mut sizes = Vec::new();
    for name in names {
        sizes.push(publish_one(layout, registry, &name)?);
    }
    Ok(sizes)
}

/// Pushes `NAME:v1` and converts it to `NAME:lazy`; its sizes.
pub fn publish_one(layout: &Path, registry: &Registry, name: &str) -> Result<ImageSizes> {
    let v1 = registry.image(&format!("{name}:v1"));
    let lazy = registry.image(&format!("{name}:lazy"));
    push_image(&image(layout, name), &v1).with_context(|| format!("Pushing {name}"))?;
    crate::brisk(&["convert", &v1, &lazy]).with_context(|| format!("Converting {name}"))?;
    let (layers, v1_bytes) = layer_bytes(&v1)?;
    let (_, lazy_bytes) = layer_bytes(&lazy)?;
    Ok(ImageSizes {
        name: name.to_owned(),
        layers,
        v1_bytes,
        lazy_bytes,
    })
}

/// Layer count and the sum of the compressed layer sizes of `reference`.
pub(super) fn layer_bytes(reference: &str) -> Result<(usize, u64)> {
    let manifest: Value = serde_json::from_str(&raw_manifest(reference)?)?;
    let layers = manifest["layers"].as_array().context("No layers")?;
    Ok((
        layers.len(),
        layers.iter().filter_map(|l| l["size"].as_u64()).sum(),
    ))
}

/// The uncompressed size of `reference`'s layers (their tar streams), read from the gzip
/// blobs of the same image in `layout`.
pub fn uncompressed_bytes(layout: &Path, reference: &str) -> Result<u64> {
    let manifest: Value = serde_json::from_str(&raw_manifest(reference)?)?;
    let mut total = 0;
    for layer in manifest["layers"].as_array().context("No layers")? {
        let digest = layer["digest"].as_str().context("A layer has no digest")?;
        let hex = digest.trim_start_matches("sha256:");
        let blob = layout.join("blobs/sha256").join(hex);
        let out = run(Command::new("sh")
            .arg("-c")
            .arg("gzip -dc < \"$1\" | wc -c")
            .arg("sh")
            .arg(&blob))?;
        total += out
            .trim()
            .parse::<u64>()
            .with_context(|| format!("Sizing {digest}"))?;
    }
    Ok(total)
}
