//! Seed inputs: small hand-made layers, converted by `toc::convert_layer`, in the forms the
//! targets read (the whole blob, the TOC's JSON, the descriptor's annotations).
//!
//! The committed files under `seeds/` are these, written by the `seeds_are_current` test
//! (`BRISK_UPDATE_SEEDS=1 cargo test --no-default-features` rewrites them). Fuzzer queues and
//! crashes are never committed; they go to a temp directory or `target/`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use brisk_blobcache::toc::{self, ConvertOptions, Footer, FOOTER_SIZE};
use tar::EntryType;

/// One converted sample layer.
pub struct Seed {
    pub name: &'static str,
    /// The converted blob: chunks, TOC frame, footer.
    pub blob: Vec<u8>,
    /// The TOC's JSON as the converter wrote it (decompressed).
    pub json: Vec<u8>,
    /// The descriptor's annotations as `key=value` lines, with `size=` first (the
    /// `annotations` target's input form).
    pub annotations: String,
}

/// The sample layers, converted with 4 KiB chunks so that even these small files span
/// several chunks.
pub fn layers() -> Vec<Seed> {
    let mut out = Vec::new();
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let basic = Tar::new()
        .dir("etc")
        .file("etc/hostname", b"brisk\n")
        .file("etc/empty", b"")
        .dir("usr/bin")
        .file("usr/bin/big", &big)
        .link(EntryType::Symlink, "usr/bin/rel", "big")
        .link(EntryType::Symlink, "abs", "/usr/bin/big")
        .link(EntryType::Symlink, "dangling", "../nowhere")
        .link(EntryType::Link, "usr/bin/hard", "usr/bin/big")
        .device(EntryType::Char, "dev/null", 1, 3)
        .device(EntryType::Block, "dev/sda", 8, 0)
        .device(EntryType::Fifo, "run/fifo", 0, 0);
    out.push(convert("basic", basic, &[]));
    let whiteouts = Tar::new()
        .dir("a")
        .file("a/x", b"x")
        .file("a", b"a file where a directory was")
        .file(".wh.gone", b"")
        .dir("opaque")
        .file("opaque/.wh..wh..opq", b"")
        .file("opaque/kept", b"kept")
        .file(".wh..wh.plnk", b"")
        .file("deep/er/.wh.name", b"")
        .file("dup", b"first")
        .file("dup", b"second wins")
        .link(EntryType::Link, "dup-link", "dup");
    out.push(convert("whiteouts", whiteouts, &[]));
    let xattrs = Tar::new()
        .pax(&[("SCHILY.xattr.user.comment", b"hello")])
        .file("plain", b"with a user xattr")
        .pax(&[
            (
                "SCHILY.xattr.security.capability",
                &[1, 0, 0, 2, 0, 32, 0, 0],
            ),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ])
        .dir("capdir")
        .pax(&[("uid", b"4294967296"), ("gid", b"70000"), ("mtime", b"-1")])
        .file("ids", b"PAX ids beyond 32 bits");
    out.push(convert("xattrs", xattrs, &[]));
    let prefetch = Tar::new()
        .file("app/main", &big)
        .file("app/lib", b"library")
        .file("app/data", &big[..9_000]);
    out.push(convert("prefetch", prefetch, &["app/lib", "app/main"]));
    out
}

fn convert(name: &'static str, tar: Tar, prefetch: &[&str]) -> Seed {
    let tar = tar.0.into_inner().expect("finishing the tar");
    let opts = ConvertOptions {
        chunk_size: 4096,
        prefetch_files: prefetch.iter().map(|s| s.to_string()).collect(),
        prefetch_ranges: HashMap::new(),
        ..ConvertOptions::default()
    };
    let (layer, blob) = toc::convert_layer(&tar[..], Vec::new(), &opts).expect("converting");
    let footer = Footer::decode(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64)
        .expect("the converter's footer");
    let r = footer.toc.range();
    let mut json = Vec::new();
    zstd::stream::read::Decoder::new(&blob[r.start as usize..r.end as usize])
        .expect("TOC frame")
        .read_to_end(&mut json)
        .expect("decompressing the TOC");
    let mut annotations = format!("size={}\n", layer.size);
    for (k, v) in toc::layer_annotations(
        &layer.toc_digest,
        &layer.toc.to_string(),
        &layer.prefetch_spans,
    ) {
        annotations.push_str(&format!("{k}={v}\n"));
    }
    Seed {
        name,
        blob,
        json,
        annotations,
    }
}

/// Compares (or, with `BRISK_UPDATE_SEEDS=1`, writes) the files of `dir`, one per
/// `(file name, contents)` pair, and fails naming the first that differs.
pub fn check_dir(dir: &Path, files: &[(String, Vec<u8>)]) {
    let update = std::env::var_os("BRISK_UPDATE_SEEDS").is_some();
    if update {
        std::fs::create_dir_all(dir).expect("creating the seed directory");
    }
    for (name, contents) in files {
        let path = dir.join(name);
        if update {
            std::fs::write(&path, contents).expect("writing a seed");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == *contents,
            "{} is not current; rerun with BRISK_UPDATE_SEEDS=1",
            path.display()
        );
    }
}

/// A tar built in memory with fixed metadata, so the seeds are the same on every machine.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h
    }

    fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(EntryType::Directory, 0, 0o755);
        self.0.append_data(&mut h, name, std::io::empty()).unwrap();
        self
    }

    fn file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, data.len() as u64, 0o644);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn link(mut self, kind: EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0, 0o777);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    fn device(mut self, kind: EntryType, name: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0, 0o600);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, name, std::io::empty()).unwrap();
        self
    }

    /// PAX records for the next entry.
    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.0
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }
}
