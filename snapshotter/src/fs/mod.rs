//! The FUSE filesystem that serves one converted layer, read-only, from its TOC.
//!
//! Metadata (lookup, attributes, listings, symlinks, xattrs) comes from the inode table built
//! from the TOC at mount (`inode`), so it never waits on anything. File content comes through
//! the layered chunk cache (`read`); a read that misses may wait on the network, so its reply
//! moves into a task on the daemon's runtime and the FUSE thread goes back to other requests
//! at once. Layers are immutable, so attributes, entries and pages are cached by the kernel
//! for long. This module does not stack layers (overlayfs does) and does not fetch or verify
//! the TOC (the caller hands in a verified one). It is the only place errors become errnos.

pub mod fuzz;
mod inode;
mod read;
mod readahead;
mod session;
mod stats;

use brisk_blobcache::error_chain as chain;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_blobcache::layered::{Layered, Role};
use brisk_blobcache::toc::Toc;
use brisk_blobcache::Digest;
use fuser::{
    AccessFlags, FileHandle, FileType, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use self::inode::{Inode, InodeTable};
use self::read::Plan;
pub use self::read::{ReadEvent, Recorder};
pub(crate) use self::session::leave;
pub use self::session::{adopt, mount, Connection, MountedLayer};
pub use self::stats::{ReadReport, ReadStats};
use crate::{Error, Result};

/// How long the kernel may cache attributes and entries. A layer never changes while it is
/// mounted, so the only limit is memory the kernel can reclaim anyway.
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Block size reported by statfs.
const BLOCK: u32 = 4096;

/// One converted layer, served read-only.
pub struct LayerFs {
    table: InodeTable,
    toc: Arc<Toc>,
    /// The layer blob's digest: with a TOC chunk it names the chunk for the cache levels.
    blob: Digest,
    cache: Arc<Layered>,
    /// The daemon's runtime: reads run there, never on the FUSE thread.
    rt: Handle,
    recorder: Option<Recorder>,
    /// What the kernel offered at INIT, kept so a successor can replay it (`session`).
    init_seen: Arc<Mutex<Option<Connection>>>,
    /// Set when the layer's tar stream proved not to be the layer its chain ID names: from
    /// then on every lookup, read and listing fails (see `crate::proof`; opens are the kernel's).
    refuted: Arc<AtomicBool>,
    /// Runs of reads per file, for read-ahead. A std lock: taken only on the FUSE thread and
    /// only for arithmetic.
    streams: Mutex<readahead::Streams>,
    /// What containers read here and how long they waited, for `brisk status`.
    stats: Arc<ReadStats>,
}

impl LayerFs {
    /// `toc` is already verified; `blob` is the layer blob digest (for `ChunkRef::new`);
    /// `cache` is the shared read path; `rt` the daemon's tokio runtime handle.
    pub fn new(toc: Arc<Toc>, blob: Digest, cache: Arc<Layered>, rt: Handle) -> Result<Self> {
        let table = InodeTable::build(&toc)?;
        Ok(Self {
            table,
            toc,
            blob,
            cache,
            rt,
            recorder: None,
            init_seen: Arc::default(),
            refuted: Arc::default(),
            streams: Mutex::default(),
            stats: Arc::default(),
        })
    }

    /// The flag that refuses the layer's content once set.
    pub fn refuted_flag(&self) -> Arc<AtomicBool> {
        self.refuted.clone()
    }

    /// The layer's read counters, shared: they go on counting while the layer is mounted.
    pub fn stats(&self) -> Arc<ReadStats> {
        self.stats.clone()
    }

    /// Inode numbers run from 1 to this.
    pub fn inodes(&self) -> u64 {
        self.table.len()
    }

    /// The inode table, unless the layer was refuted.
    fn table(&self) -> Result<&InodeTable> {
        if self.refuted.load(Ordering::Relaxed) {
            return Err(Error::Refuted);
        }
        Ok(&self.table)
    }

    /// Asks for the chunks ahead of a reader streaming through a large file (see
    /// `readahead`), in the background and as a reader would: they jump the prefetch queue,
    /// and the reads that follow join them instead of fetching again.
    fn read_ahead(&self, ino: u64, content: &std::ops::Range<u64>, offset: u64, len: u32) {
        let size = content.end - content.start;
        let ahead =
            self.streams
                .lock()
                .expect("not poisoned")
                .note(ino, offset, u64::from(len), size);
        let Some(ahead) = ahead else { return };
        let range = content.start + ahead.start..content.start + ahead.end;
        let (cache, toc, blob) = (self.cache.clone(), self.toc.clone(), self.blob);
        self.rt.spawn(async move {
            if let Err(err) = read::fetch_ahead(&cache, &toc, blob, range).await {
                // The reads that need these chunks will try again and report it.
                tracing::debug!(error = %chain(&err), "read-ahead failed");
            }
        });
    }

    /// Calls `f` on every read that reaches file content (reads at or past the end of a file
    /// read nothing and are not reported). `f` runs on the FUSE thread: it must not block.
    pub fn with_recorder(mut self, f: Recorder) -> Self {
        self.recorder = Some(f);
        self
    }

    fn node(&self, ino: INodeNo) -> Result<&Inode> {
        self.table()?.get(ino.0)
    }
}

/// getxattr and listxattr share one protocol: size 0 asks for the length.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Error::Range.errno());
    } else {
        reply.data(value);
    }
}

impl fuser::Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        *self.init_seen.lock().expect("not poisoned") = Some(Connection {
            abi: (abi.0, abi.1),
            capabilities: config.capabilities().bits(),
        });
        // Reads are answered from tasks, so many can be in flight at once: let the kernel
        // queue more readahead before it throttles than its default of 16.
        let _ = config.set_max_background(64);
        // `ls -l`, image scanners and overlayfs list and stat whole directories: one round
        // trip per listing page instead of one per entry. Optional; older kernels lack it.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // TOC names are UTF-8, so no other name can exist here.
        let ino = name
            .to_str()
            .ok_or(Error::NoEntry)
            .and_then(|name| self.table()?.lookup(parent.0, name));
        match ino.and_then(|ino| Ok(self.table()?.get(ino)?.attr(ino))) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(err) => reply.error(err.errno()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &node.attr(ino.0)),
            Err(err) => reply.error(err.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| n.target.as_deref()) {
            Ok(Some(target)) => reply.data(target.as_bytes()),
            Ok(None) => reply.error(Error::InvalidArgument("not a symlink".into()).errno()),
            Err(err) => reply.error(err.errno()),
        }
    }

    /// Opens keep no state, so the first one that would succeed is answered ENOSYS: from then
    /// on the kernel opens files itself, with no request at all, keeping cached pages as
    /// `FOPEN_KEEP_CACHE` would, and sends no release either. Starts that open thousands of
    /// small files save two round trips through this thread per file.
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.stats.opened();
        match self.node(ino) {
            Err(err) => reply.error(err.errno()),
            Ok(node) if node.kind == FileType::Directory => reply.error(Error::IsDir.errno()),
            // The kernel refuses writes on an `ro` mount before they get here.
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 => {
                reply.error(Error::ReadOnly.errno())
            }
            Ok(_) => reply.error(Error::Stateless.errno()),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let node = match self.node(ino) {
            Ok(node) if node.kind == FileType::Directory => {
                return reply.error(Error::IsDir.errno())
            }
            Ok(node) => node,
            Err(err) => return reply.error(err.errno()),
        };
        let Some(plan) = node
            .content
            .as_ref()
            .and_then(|content| Plan::new(&self.toc, content, offset, size))
        else {
            return reply.data(&[]);
        };
        if let Some(record) = &self.recorder {
            record(ReadEvent {
                pid: req.pid(),
                ino: ino.0,
                path: node.path.to_string(),
                offset,
                len: plan.len(),
                chunks: plan.chunks.clone().collect(),
            });
        }
        if let Some(content) = &node.content {
            self.read_ahead(ino.0, content, offset, plan.len());
        }
        self.stats
            .read(&self.toc.chunks[plan.chunks.clone()], &plan.range);
        let (cache, toc, blob, path, stats) = (
            self.cache.clone(),
            self.toc.clone(),
            self.blob,
            node.path.clone(),
            self.stats.clone(),
        );
        // Never wait here: a miss may go to the registry, and this thread serves every other
        // request of the layer. The reply moves into the task and is answered from there.
        self.rt.spawn(async move {
            let asked = std::time::Instant::now();
            match read::fetch(&cache, &toc, blob, &plan).await {
                Ok((bytes, from)) => {
                    if from >= Role::Peer {
                        stats.stalled(asked.elapsed());
                    }
                    reply.data(&bytes)
                }
                Err(err) => {
                    tracing::warn!(%blob, %path, offset, size, error = %chain(&err), "read failed");
                    reply.error(err.errno());
                }
            }
        });
    }

    /// Nothing is ever written, so a close has nothing to flush: ENOSYS tells the kernel to
    /// stop sending flushes, which every close of a file would otherwise wait for.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.stats.opened();
        reply.error(Error::Stateless.errno());
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Opens keep no state.
        reply.ok();
    }

    /// As `open`: after the first, the kernel opens directories itself, and caches their
    /// listings across opens as `FOPEN_CACHE_DIR` would (a listing never changes).
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.stats.opened();
        match self.table().and_then(|t| t.dir(ino.0)) {
            Ok(_) => reply.error(Error::Stateless.errno()),
            Err(err) => reply.error(err.errno()),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.table().and_then(|t| t.entries(ino.0)) {
            Ok(entries) => entries,
            Err(err) => return reply.error(err.errno()),
        };
        // The offset handed back is the index of the next entry, stable because the listing
        // never changes.
        for (i, (name, child)) in entries.enumerate().skip(offset as usize) {
            let Ok(node) = self.table.get(child) else {
                continue;
            };
            if reply.add(INodeNo(child), i as u64 + 1, node.kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.table().and_then(|t| t.entries(ino.0)) {
            Ok(entries) => entries,
            Err(err) => return reply.error(err.errno()),
        };
        for (i, (name, child)) in entries.enumerate().skip(offset as usize) {
            let Ok(node) = self.table.get(child) else {
                continue;
            };
            let attr = node.attr(child);
            if reply.add(
                INodeNo(child),
                i as u64 + 1,
                name,
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.table.content_bytes().div_ceil(u64::from(BLOCK));
        // Nothing is free: the layer cannot grow.
        reply.statfs(blocks, 0, 0, self.table.len(), 0, BLOCK, 255, BLOCK);
    }

    /// overlayfs asks every lower file for its metacopy and origin marks on each lookup, and
    /// FUSE caches no xattr answer: 2 round trips per file opened, hot or not. A layer with
    /// no xattrs at all (no opaque directory either) says so once with ENOSYS and is asked no
    /// more; a layer with any keeps answering, ENODATA for the names it lacks.
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.stats.asked_xattr();
        if !self.table.has_xattrs() {
            return reply.error(Error::NoXattrs.errno());
        }
        let value = self.node(ino).and_then(|node| {
            name.to_str()
                .and_then(|name| node.xattrs.get(name))
                .ok_or(Error::NoAttr)
        });
        match value {
            Ok(value) => reply_xattr(reply, size, value),
            Err(err) => reply.error(err.errno()),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        // Listing is not on overlayfs's per-lookup path, and an error here would make tools
        // that copy xattrs (getfattr -d, cp -a) fail: a layer without xattrs lists none.
        self.stats.asked_xattr();
        match self.node(ino) {
            Ok(node) => {
                let mut names = Vec::new();
                for name in node.xattrs.keys() {
                    names.extend_from_slice(name.as_bytes());
                    names.push(0);
                }
                reply_xattr(reply, size, &names);
            }
            Err(err) => reply.error(err.errno()),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Mode checks are the kernel's (default_permissions); only existence and the
        // read-only rule are left.
        match self.node(ino) {
            Err(err) => reply.error(err.errno()),
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Error::ReadOnly.errno()),
            Ok(_) => reply.ok(),
        }
    }
}
