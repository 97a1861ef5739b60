//! The layer filesystem against the real kernel: a converted layer mounted through FUSE reads
//! back as its tar describes it; two mounted layers stack under overlayfs with whiteouts and
//! opaque directories honoured; and a cache that cannot serve a chunk gives EIO, never wrong
//! bytes, while metadata keeps working.
//!
//! Needs root and `/dev/fuse` (the overlay test also `mount` and `umount`). Without
//! `BRISK_E2E=1` a missing prerequisite skips the test visibly; with it, the test fails.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brisk_blobcache::chunk::{ChunkRef, VerifiedChunk};
use brisk_blobcache::layered::Layered;
use brisk_blobcache::memory::MemoryCache;
use brisk_blobcache::source::{Answer, ChunkSource, Priority};
use brisk_blobcache::toc::{self, ConvertOptions, Footer, Toc, FOOTER_SIZE};
use brisk_blobcache::Digest;
use brisk_snapshotter::fs::{self as layerfs, LayerFs, ReadEvent, Recorder};
use tokio::runtime::Runtime;

fn prerequisites(tools: &[&str]) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root to mount FUSE".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("needs /dev/fuse".into());
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("needs the `{tool}` command"));
        }
    }
    Ok(())
}

fn gate(tools: &[&str]) -> bool {
    match prerequisites(tools) {
        Ok(()) => true,
        Err(why) if std::env::var("BRISK_E2E").as_deref() == Ok("1") => {
            panic!("BRISK_E2E=1 but {why}")
        }
        Err(why) => {
            println!("skipped: {why} (set BRISK_E2E=1 to require it)");
            false
        }
    }
}

const MTIME: u64 = 1_700_000_000;

/// A tar built in memory; every entry is owned by 1000:1001.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(MTIME);
        h
    }

    fn dir(mut self, name: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0, mode);
        self.0.append_data(&mut h, name, io::empty()).unwrap();
        self
    }

    fn file(mut self, name: &str, data: &[u8], mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, data.len() as u64, mode);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0, 0o777);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    fn special(mut self, kind: tar::EntryType, name: &str, dev: (u32, u32), mode: u32) -> Self {
        let mut h = Self::header(kind, 0, mode);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.0.append_data(&mut h, name, io::empty()).unwrap();
        self
    }

    /// The next entry carries this xattr (a PAX `SCHILY.xattr.` record).
    fn xattr(mut self, key: &str, value: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{key}");
        self.0
            .append_pax_extensions([(key.as_str(), value)])
            .unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A converted layer as the daemon holds it: the verified TOC, the blob digest and, for
/// filling a cache, every chunk decoded from the blob.
struct Layer {
    toc: Arc<Toc>,
    blob: Digest,
    chunks: Vec<VerifiedChunk>,
}

fn convert(tar: &[u8]) -> Layer {
    let options = ConvertOptions {
        chunk_size: 256 * 1024,
        ..ConvertOptions::default()
    };
    let (layer, blob) = toc::convert_layer(tar, Vec::new(), &options).unwrap();
    let footer = Footer::decode(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    let r = footer.toc.range();
    let payload = &blob[r.start as usize..r.end as usize];
    let toc = Toc::decode(
        payload,
        footer.toc.uncompressed_size,
        Some(&layer.toc_digest),
    )
    .unwrap();
    let chunks = toc
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let r = c.compressed_range();
            toc::decode_chunk(layer.digest, i, c, &blob[r.start as usize..r.end as usize]).unwrap()
        })
        .collect();
    Layer {
        toc: Arc::new(toc),
        blob: layer.digest,
        chunks,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A one-level cache (memory) holding `chunks` and nothing else.
fn cache(rt: &Runtime, chunks: &[VerifiedChunk]) -> Arc<Layered> {
    let memory = Arc::new(MemoryCache::new(256 << 20));
    for c in chunks {
        rt.block_on(memory.put(c));
    }
    Layered::builder()
        .memory(memory, Duration::from_secs(5))
        .build()
}

/// A memory level that answers only after `delay`, like a registry across a slow link.
struct Slow {
    inner: MemoryCache,
    delay: Duration,
}

#[async_trait::async_trait]
impl ChunkSource for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        tokio::time::sleep(self.delay).await;
        self.inner.fetch(chunks, priority, each).await
    }
}

/// A memory level that notes every chunk it is asked for, by digest.
struct Noting {
    inner: MemoryCache,
    asked: Mutex<Vec<Digest>>,
}

#[async_trait::async_trait]
impl ChunkSource for Noting {
    fn name(&self) -> &'static str {
        "noting"
    }

    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        priority: Priority,
        each: &(dyn Fn(usize, Answer) + Send + Sync),
    ) {
        self.asked
            .lock()
            .unwrap()
            .extend(chunks.iter().map(|c| c.digest));
        self.inner.fetch(chunks, priority, each).await
    }
}

/// A mounted layer. Dropping it unmounts (also when the test panics); the session goes
/// before the directory that holds the mount point.
struct Mounted {
    session: Option<fuser::BackgroundSession>,
    dir: tempfile::TempDir,
}

impl Mounted {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.session.take());
    }
}

fn mount(rt: &Runtime, layer: &Layer, cache: Arc<Layered>, recorder: Option<Recorder>) -> Mounted {
    let mut fs = LayerFs::new(layer.toc.clone(), layer.blob, cache, rt.handle().clone()).unwrap();
    if let Some(recorder) = recorder {
        fs = fs.with_recorder(recorder);
    }
    mount_fs(fs)
}

fn mount_fs(fs: LayerFs) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let session = layerfs::mount(fs, dir.path()).unwrap().session;
    Mounted {
        session: Some(session),
        dir,
    }
}

/// An overlay mount, unmounted on drop; declare it after the layers it stacks, so it goes first.
struct Overlay {
    dir: tempfile::TempDir,
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn cstr(bytes: &[u8]) -> CString {
    CString::new(bytes).unwrap()
}

/// `getfattr` for one name; `follow` picks getxattr over lgetxattr.
fn getxattr(path: &Path, name: &str, follow: bool) -> io::Result<Vec<u8>> {
    let (p, n) = (cstr(path.as_os_str().as_bytes()), cstr(name.as_bytes()));
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and outlive the call; `buf` is writable for
    // `buf.len()` bytes.
    let len = unsafe {
        let get = if follow {
            libc::getxattr
        } else {
            libc::lgetxattr
        };
        get(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; a null buffer of size 0 asks only for the value's length.
    let probe = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(probe, len, "size probe of {name} on {}", path.display());
    buf.truncate(len as usize);
    Ok(buf)
}

fn listxattr(path: &Path) -> Vec<String> {
    let p = cstr(path.as_os_str().as_bytes());
    let mut buf = vec![0u8; 1024];
    // SAFETY: `p` is NUL-terminated and outlives the call; `buf` is writable for its length.
    let len = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "{}", io::Error::last_os_error());
    buf.truncate(len as usize);
    buf.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8(n.to_vec()).unwrap())
        .collect()
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Incompressible content several chunks long, not a multiple of anything.
fn big_file() -> Vec<u8> {
    noise(3 * 1024 * 1024 + 12_345)
}

/// `len` incompressible bytes, the same every time.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sample_tar(big: &[u8]) -> Vec<u8> {
    use tar::EntryType::{Char, Fifo, Link, Symlink};
    Tar::new()
        .dir("etc/", 0o755)
        .file("etc/hostname", b"brisk\n", 0o644)
        .file("etc/empty", b"", 0o644)
        .link(Link, "etc/hostname.hard", "etc/hostname")
        .link(Symlink, "etc/abs", "/usr/lib/big.bin")
        .dir("opt/app/", 0o750)
        .file("usr/lib/big.bin", big, 0o644)
        .file("usr/bin/tool", b"#!/bin/sh\n", 0o4755)
        .link(Symlink, "usr/bin/rel", "../lib/big.bin")
        .special(Char, "dev/null", (1, 3), 0o666)
        .special(Fifo, "run/fifo", (0, 0), 0o600)
        .xattr("user.brisk", b"v\0\xffx")
        .file("bin/ping", b"ELF", 0o755)
        .file(".wh.gone", b"", 0o644)
        .dir("dir/", 0o755)
        .file("dir/.wh..wh..opq", b"", 0o644)
        .file("dir/inside", b"in\n", 0o644)
        .file("名前/ünïcödé.txt", "héllo".as_bytes(), 0o644)
        .finish()
}

fn errno<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
    result.unwrap_err().raw_os_error().unwrap()
}

#[test]
fn a_mounted_layer_reads_back_as_its_tar() {
    if !gate(&[]) {
        return;
    }
    let rt = runtime();
    let big = big_file();
    let layer = convert(&sample_tar(&big));
    assert!(
        layer.toc.chunks.len() > 10,
        "the big file spans several chunks"
    );
    let events: Arc<Mutex<Vec<ReadEvent>>> = Arc::default();
    let sink = events.clone();
    let recorder: Recorder = Arc::new(move |e| sink.lock().unwrap().push(e));
    let m = mount(&rt, &layer, cache(&rt, &layer.chunks), Some(recorder));

    // First, before anything is in the page cache: 8 threads read the big file at once, each
    // with its own stride and starting point, so chunk boundaries fall mid-request.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (path, big) = (m.path("usr/lib/big.bin"), &big);
            s.spawn(move || {
                let file = fs::File::open(path).unwrap();
                let step = 37 * 1024 * (t as usize + 1) + 1;
                let mut offset = (t * 7919) as usize % big.len();
                for _ in 0..big.len() / step + 1 {
                    let mut buf = vec![0u8; step];
                    let n = file.read_at(&mut buf, offset as u64).unwrap();
                    let end = (offset + step).min(big.len());
                    assert_eq!(n, end - offset, "thread {t} at {offset}");
                    assert!(buf[..n] == big[offset..end], "thread {t} at {offset}");
                    offset = (offset + step) % big.len();
                }
            });
        }
    });

    // Content.
    assert!(fs::read(m.path("usr/lib/big.bin")).unwrap() == big);
    assert!(
        fs::read(m.path("usr/bin/rel")).unwrap() == big,
        "relative symlink resolves"
    );
    assert_eq!(fs::read(m.path("etc/hostname")).unwrap(), b"brisk\n");
    assert_eq!(fs::read(m.path("etc/hostname.hard")).unwrap(), b"brisk\n");
    assert_eq!(fs::read(m.path("etc/empty")).unwrap(), b"");
    assert_eq!(fs::read(m.path("usr/bin/tool")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(fs::read(m.path("bin/ping")).unwrap(), b"ELF");
    assert_eq!(fs::read(m.path("dir/inside")).unwrap(), b"in\n");
    assert_eq!(
        fs::read_to_string(m.path("名前/ünïcödé.txt")).unwrap(),
        "héllo"
    );
    let mut tail = [0u8; 16];
    let file = fs::File::open(m.path("usr/lib/big.bin")).unwrap();
    assert_eq!(file.read_at(&mut tail, big.len() as u64).unwrap(), 0, "EOF");
    assert_eq!(
        file.read_at(&mut tail, big.len() as u64 + 4096).unwrap(),
        0,
        "past EOF"
    );

    // Attributes.
    let meta = |rel: &str| fs::symlink_metadata(m.path(rel)).unwrap();
    let host = meta("etc/hostname");
    assert_eq!(
        (
            host.mode(),
            host.uid(),
            host.gid(),
            host.size(),
            host.mtime()
        ),
        (0o100644, 1000, 1001, 6, MTIME as i64)
    );
    assert_eq!(
        (host.nlink(), host.ino()),
        (2, meta("etc/hostname.hard").ino())
    );
    assert_eq!(
        (
            meta("usr/lib/big.bin").nlink(),
            meta("usr/lib/big.bin").size()
        ),
        (1, big.len() as u64)
    );
    assert_eq!(meta("usr/bin/tool").mode(), 0o104755);
    let opt = meta("opt");
    assert_eq!(
        (opt.mode(), opt.uid(), opt.gid(), opt.mtime()),
        (0o40755, 0, 0, 0),
        "synthesized"
    );
    assert_eq!(
        (meta("opt/app").mode(), meta("opt/app").uid()),
        (0o40750, 1000)
    );
    assert_eq!(
        (
            meta("").nlink(),
            meta("etc").nlink(),
            meta("usr").nlink(),
            meta("opt").nlink()
        ),
        (10, 2, 4, 3)
    );
    let abs = meta("etc/abs");
    assert!(abs.file_type().is_symlink());
    assert_eq!(
        (abs.uid(), abs.size()),
        (1000, "/usr/lib/big.bin".len() as u64)
    );
    assert_eq!(
        fs::read_link(m.path("etc/abs")).unwrap(),
        Path::new("/usr/lib/big.bin")
    );
    assert_eq!(
        fs::read_link(m.path("usr/bin/rel")).unwrap(),
        Path::new("../lib/big.bin")
    );
    let null = meta("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (null.rdev(), null.mode() & 0o7777),
        (libc::makedev(1, 3), 0o666)
    );
    assert!(meta("run/fifo").file_type().is_fifo());
    let gone = meta("gone");
    assert!(
        gone.file_type().is_char_device(),
        "a whiteout is a character device"
    );
    assert_eq!(gone.rdev(), libc::makedev(0, 0));

    // Listings: exactly the tar's names, no whiteout or opaque marker.
    let root = [
        "bin", "dev", "dir", "etc", "gone", "opt", "run", "usr", "名前",
    ];
    assert_eq!(names(m.dir.path()), set(&root));
    assert_eq!(
        names(&m.path("etc")),
        set(&["abs", "empty", "hostname", "hostname.hard"])
    );
    assert_eq!(names(&m.path("dir")), set(&["inside"]));
    assert_eq!(names(&m.path("usr")), set(&["bin", "lib"]));
    assert_eq!(names(&m.path("名前")), set(&["ünïcödé.txt"]));

    // Xattrs.
    assert_eq!(
        getxattr(&m.path("bin/ping"), "user.brisk", true).unwrap(),
        b"v\0\xffx"
    );
    assert_eq!(listxattr(&m.path("bin/ping")), ["user.brisk"]);
    assert_eq!(
        getxattr(&m.path("dir"), "trusted.overlay.opaque", false).unwrap(),
        b"y"
    );
    assert_eq!(listxattr(&m.path("dir")), ["trusted.overlay.opaque"]);
    assert_eq!(
        errno(getxattr(&m.path("etc"), "trusted.overlay.opaque", false)),
        libc::ENODATA
    );
    assert_eq!(
        errno(getxattr(&m.path("etc/hostname"), "user.nope", true)),
        libc::ENODATA
    );
    assert!(listxattr(&m.path("etc/hostname")).is_empty());

    // Writes.
    let refused = [libc::EROFS, libc::EACCES];
    let write = OpenOptions::new().write(true).open(m.path("etc/hostname"));
    assert!(refused.contains(&errno(write)));
    assert!(refused.contains(&errno(fs::File::create(m.path("new")))));
    assert!(refused.contains(&errno(fs::create_dir(m.path("newdir")))));
    assert!(refused.contains(&errno(fs::remove_file(m.path("etc/hostname")))));
    assert_eq!(fs::read(m.path("etc/hostname")).unwrap(), b"brisk\n");

    // The read-trace hook saw the reads, under each file's first name.
    let events = events.lock().unwrap();
    let host = events
        .iter()
        .find(|e| e.path == "etc/hostname")
        .expect("hostname read");
    assert_eq!((host.offset, host.len, host.chunks.len()), (0, 6, 1));
    let entry = layer
        .toc
        .entries
        .iter()
        .find(|e| e.name == "usr/lib/big.bin")
        .unwrap();
    let read: BTreeSet<usize> = events
        .iter()
        .filter(|e| e.path == "usr/lib/big.bin")
        .flat_map(|e| e.chunks.iter().copied())
        .collect();
    assert!(read
        .iter()
        .copied()
        .eq(layer.toc.chunks_for(entry.tar_range().unwrap())));
    assert!(!events.iter().any(|e| e.path.contains(".hard")));
}

#[test]
fn after_the_first_files_and_directories_open_and_close_without_a_request() {
    if !gate(&[]) {
        return;
    }
    let rt = runtime();
    let big = big_file();
    let layer = convert(&sample_tar(&big));
    let cache = cache(&rt, &layer.chunks);
    let fs = LayerFs::new(layer.toc.clone(), layer.blob, cache, rt.handle().clone()).unwrap();
    let stats = fs.stats();
    let m = mount_fs(fs);
    for _ in 0..20 {
        assert_eq!(fs::read(m.path("etc/hostname")).unwrap(), b"brisk\n");
        assert!(fs::read(m.path("usr/lib/big.bin")).unwrap() == big);
        assert!(names(&m.path("etc")).contains("hostname"));
    }
    // The first open, opendir and flush reach the daemon, and nothing after them: 20 rounds
    // of two files opened, read and closed and a directory listed would be 100 requests.
    let requests = stats.open_requests();
    assert!(requests <= 3, "{requests} open, opendir and flush requests");
    let refused = [libc::EROFS, libc::EACCES];
    let write = OpenOptions::new().write(true).open(m.path("etc/hostname"));
    assert!(refused.contains(&errno(write)), "writes are still refused");
}

#[test]
fn a_layer_without_xattrs_is_asked_for_them_once() {
    if !gate(&[]) {
        return;
    }
    let rt = runtime();
    let layer = convert(
        &Tar::new()
            .dir("lib/", 0o755)
            .file("lib/a.py", b"a = 1\n", 0o644)
            .file("lib/b.py", b"b = 2\n", 0o644)
            .finish(),
    );
    let cache = cache(&rt, &layer.chunks);
    let fs = LayerFs::new(layer.toc.clone(), layer.blob, cache, rt.handle().clone()).unwrap();
    let stats = fs.stats();
    let m = mount_fs(fs);
    for _ in 0..20 {
        for file in ["lib/a.py", "lib/b.py", "lib"] {
            let got = getxattr(&m.path(file), "trusted.overlay.metacopy", true);
            assert_eq!(errno(got), libc::EOPNOTSUPP, "{file}");
        }
    }
    let p = cstr(m.path("lib/a.py").as_os_str().as_bytes());
    // SAFETY: `p` is NUL-terminated and outlives the call; a null buffer of size 0 asks only
    // for the length.
    let len = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(
        len, 0,
        "listing answers an empty list, so xattr-copying tools work"
    );
    // 60 getxattr asked, the first reached the daemon; plus the listing.
    let requests = stats.xattr_requests();
    assert!(requests <= 2, "{requests} xattr requests");
    assert_eq!(fs::read(m.path("lib/b.py")).unwrap(), b"b = 2\n");
}

#[test]
fn overlayfs_stacks_mounted_layers_with_whiteouts_and_opaque_dirs() {
    if !gate(&["mount", "umount"]) {
        return;
    }
    let rt = runtime();
    let lower = convert(
        &Tar::new()
            .dir("a/", 0o755)
            .file("a/keep", b"keep", 0o644)
            .file("a/drop", b"drop", 0o644)
            .dir("b/", 0o755)
            .file("b/x", b"x", 0o644)
            .finish(),
    );
    let upper = convert(
        &Tar::new()
            .dir("a/", 0o755)
            .file("a/.wh.drop", b"", 0o644)
            .dir("b/", 0o755)
            .file("b/.wh..wh..opq", b"", 0o644)
            .file("b/y", b"y", 0o644)
            .finish(),
    );
    let lower_mnt = mount(&rt, &lower, cache(&rt, &lower.chunks), None);
    let upper_mnt = mount(&rt, &upper, cache(&rt, &upper.chunks), None);
    let merged = Overlay {
        dir: tempfile::tempdir().unwrap(),
    };
    let lowerdir = format!(
        "lowerdir={}:{}",
        upper_mnt.dir.path().display(),
        lower_mnt.dir.path().display()
    );
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &lowerdir])
        .arg(merged.dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount -t overlay failed: {status}");
    let at = |rel: &str| merged.dir.path().join(rel);

    assert_eq!(fs::read(at("a/keep")).unwrap(), b"keep");
    assert_eq!(errno(fs::symlink_metadata(at("a/drop"))), libc::ENOENT);
    assert_eq!(
        errno(fs::symlink_metadata(at("b/x"))),
        libc::ENOENT,
        "opaque b hides x"
    );
    assert_eq!(fs::read(at("b/y")).unwrap(), b"y");
    assert_eq!(names(&at("a")), set(&["keep"]));
    assert_eq!(names(&at("b")), set(&["y"]));
    assert_eq!(names(merged.dir.path()), set(&["a", "b"]));
}

#[test]
fn a_chunk_no_level_has_is_eio_while_metadata_still_works() {
    if !gate(&[]) {
        return;
    }
    let rt = runtime();
    let big = big_file();
    let layer = convert(&sample_tar(&big));
    let m = mount(&rt, &layer, cache(&rt, &[]), None);

    assert_eq!(errno(fs::read(m.path("etc/hostname"))), libc::EIO);
    assert_eq!(errno(fs::read(m.path("usr/lib/big.bin"))), libc::EIO);
    let mut buf = [0u8; 10];
    let file = fs::File::open(m.path("usr/lib/big.bin")).unwrap();
    assert_eq!(errno(file.read_at(&mut buf, 300_000)), libc::EIO);
    assert_eq!(
        fs::read(m.path("etc/empty")).unwrap(),
        b"",
        "an empty file needs no chunk"
    );

    assert_eq!(
        fs::metadata(m.path("usr/lib/big.bin")).unwrap().len(),
        big.len() as u64
    );
    assert_eq!(
        fs::symlink_metadata(m.path("etc/hostname"))
            .unwrap()
            .nlink(),
        2
    );
    assert_eq!(
        fs::read_link(m.path("etc/abs")).unwrap(),
        Path::new("/usr/lib/big.bin")
    );
    assert!(names(m.dir.path()).contains("etc"));
    assert_eq!(names(&m.path("dir")), set(&["inside"]));
    assert_eq!(
        getxattr(&m.path("bin/ping"), "user.brisk", true).unwrap(),
        b"v\0\xffx"
    );
}

#[test]
fn a_read_waiting_on_the_cache_blocks_neither_metadata_nor_other_reads() {
    if !gate(&[]) {
        return;
    }
    let rt = runtime();
    let big = big_file();
    let layer = convert(&sample_tar(&big));
    let delay = Duration::from_millis(600);
    let slow = Slow {
        inner: MemoryCache::new(256 << 20),
        delay,
    };
    for c in &layer.chunks {
        rt.block_on(slow.inner.put(c));
    }
    let cache = Layered::builder()
        .origin(Arc::new(slow), Duration::from_secs(10))
        .build();
    let m = mount(&rt, &layer, cache, None);

    let started = Instant::now();
    std::thread::scope(|s| {
        // One request each (a whole multi-MiB file would be many requests in a row).
        let reads: Vec<_> = [("usr/lib/big.bin", 1 << 20), ("etc/hostname", 0)]
            .into_iter()
            .map(|(rel, offset)| {
                let path = m.path(rel);
                s.spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    let n = fs::File::open(path)
                        .unwrap()
                        .read_at(&mut buf, offset)
                        .unwrap();
                    (buf[..n].to_vec(), started.elapsed())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150));
        // Metadata the kernel has not seen yet, asked while both reads wait on the cache.
        let asked = Instant::now();
        assert_eq!(fs::symlink_metadata(m.path("dir/inside")).unwrap().len(), 3);
        assert_eq!(names(&m.path("名前")), set(&["ünïcödé.txt"]));
        assert_eq!(
            getxattr(&m.path("bin/ping"), "user.brisk", true).unwrap(),
            b"v\0\xffx"
        );
        let took = asked.elapsed();
        assert!(
            took < delay / 3,
            "metadata waited {took:?} behind pending reads"
        );
        let done: Vec<_> = reads.into_iter().map(|r| r.join().unwrap()).collect();
        assert!(done[0].0 == big[1 << 20..(1 << 20) + 4096]);
        assert_eq!(done[1].0, b"brisk\n");
        // Served one after the other they would take two delays at least.
        let slowest = done.iter().map(|d| d.1).max().unwrap();
        assert!(
            slowest < delay * 2,
            "two reads took {slowest:?}: they were serialized"
        );
    });
}

#[test]
fn a_reader_streaming_a_large_file_gets_the_chunks_ahead_of_it() {
    if !gate(&[]) {
        return;
    }
    let rt = runtime();
    const CHUNK: usize = 256 * 1024;
    let big = noise(12 << 20);
    let layer = convert(&Tar::new().file("data/big.bin", &big, 0o644).finish());
    let noting = Arc::new(Noting {
        inner: MemoryCache::new(256 << 20),
        asked: Mutex::default(),
    });
    for c in &layer.chunks {
        rt.block_on(noting.inner.put(c));
    }
    let cache = Layered::builder()
        .origin(noting.clone(), Duration::from_secs(10))
        .build();
    let m = mount(&rt, &layer, cache, None);
    // Each chunk of the file is 256 KiB of it, from its first byte (a large file's chunks
    // start where its content does), and the content is random: digests name chunks.
    let content_start = layer.toc.chunks[layer.toc.chunks_for(0..1).start].tar_offset;
    let index_of = |d: &Digest| {
        let c = layer.toc.chunks.iter().find(|c| c.digest == *d).unwrap();
        ((c.tar_offset.max(content_start) - content_start) / CHUNK as u64) as usize
    };
    let furthest = || {
        let asked = noting.asked.lock().unwrap();
        asked.iter().map(index_of).max().unwrap_or(0)
    };

    let file = fs::File::open(m.path("data/big.bin")).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    let mut read_to = |from: usize, to: usize| {
        for at in (from..to).step_by(buf.len()) {
            let n = file.read_at(&mut buf, at as u64).unwrap();
            assert!(buf[..n] == big[at..at + n], "bytes at {at}");
        }
    };
    // 3 MiB one read after another: still below the threshold, nothing beyond what the
    // kernel's own read-ahead (128 KiB) asks for.
    read_to(0, 3 << 20);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        furthest() < (4 << 20) / CHUNK,
        "chunk {} was asked for",
        furthest()
    );
    // Past the threshold, the chunks well ahead of the reader are asked for before it
    // reaches them.
    read_to(3 << 20, 5 << 20);
    let deadline = Instant::now() + Duration::from_secs(5);
    while furthest() < (6 << 20) / CHUNK && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        furthest() >= (6 << 20) / CHUNK,
        "read-ahead reached chunk {} only",
        furthest()
    );
    // The rest of the file still reads back right.
    read_to(5 << 20, big.len());
}
