//! The inode table of one layer, built once from its TOC when the layer is mounted.
//!
//! It turns the TOC's flat, tar-ordered entry list into what the kernel asks about: numbered
//! inodes, sorted directory listings, attributes and decoded xattrs, with the conventions
//! overlayfs expects of a lower layer (a whiteout is a character device 0/0, an opaque
//! directory carries `trusted.overlay.opaque=y`). It never reads file content; `super::read`
//! does that through the chunk cache. The table never changes after it is built (layers are
//! immutable), so lookups need no lock.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use brisk_blobcache::toc::{Entry, EntryKind, Toc};
use fuser::{FileAttr, FileType, INodeNo};

use crate::{Error, Result};

/// The xattr overlayfs reads to decide that a directory hides the lower layers' contents.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Reported for a uid or gid that does not fit in 32 bits, as the kernel does (`overflowuid`).
const OVERFLOW_ID: u32 = 65534;

/// Directories report the size ext4 gives an empty one; tools print it, nothing relies on it.
const DIR_SIZE: u64 = 4096;

pub(crate) struct Inode {
    pub kind: FileType,
    /// Permission bits, including setuid, setgid and sticky.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub nlink: u32,
    /// Device number in the kernel's `new_encode_dev` form (character and block devices).
    pub rdev: u32,
    /// Where a regular file's content lies in the layer's tar stream; `None` when it is empty.
    pub content: Option<Range<u64>>,
    /// A symlink's target, verbatim.
    pub target: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// A directory's entries sorted by name: binary search for lookup, and a stable index
    /// that readdir uses as its offset.
    pub children: Vec<(String, u64)>,
    /// The directory holding this inode's first name (a directory's `..`).
    pub parent: u64,
    /// The first path this inode was given in the layer, for read traces and logs. An `Arc`
    /// because every read of the file may hand it on.
    pub path: Arc<str>,
}

impl Inode {
    fn new(kind: FileType, path: &str, parent: u64) -> Self {
        Self {
            kind,
            perm: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: if kind == FileType::Directory {
                DIR_SIZE
            } else {
                0
            },
            nlink: 1,
            rdev: 0,
            content: None,
            target: None,
            xattrs: BTreeMap::new(),
            children: Vec::new(),
            parent,
            path: path.into(),
        }
    }

    /// A directory the tar omits but a deeper entry needs. Same defaults as containerd's
    /// unpacker: 0755, owned by root, mtime 0. It keeps no path: paths are for the read
    /// traces of files, and a chain of omitted parents would otherwise hold every prefix.
    fn synthetic_dir(parent: u64) -> Self {
        let mut dir = Self::new(FileType::Directory, "", parent);
        dir.perm = 0o755;
        dir
    }

    /// Copies an entry's metadata. A whiteout keeps only its owner and time: it is a
    /// character device 0/0 with mode 0, as containerd's unpacker makes it.
    fn set_meta(&mut self, e: &Entry) -> Result<()> {
        let id = |v: u64| u32::try_from(v).unwrap_or(OVERFLOW_ID);
        self.uid = id(e.uid);
        self.gid = id(e.gid);
        self.mtime = e.mtime;
        if e.kind == EntryKind::Whiteout {
            return Ok(());
        }
        self.perm = (e.mode & 0o7777) as u16;
        self.xattrs = e
            .xattrs
            .iter()
            .map(|(name, value)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .map_err(|_| {
                        Error::InvalidArgument(format!(
                            "xattr {name:?} of {:?} is not base64",
                            e.name
                        ))
                    })?;
                Ok((name.clone(), bytes))
            })
            .collect::<Result<_>>()?;
        match e.kind {
            EntryKind::Reg => {
                self.size = e.size;
                self.content = e.tar_range();
            }
            EntryKind::Symlink => {
                let target = e.link.clone().unwrap_or_default();
                self.size = target.len() as u64;
                self.target = Some(target);
            }
            EntryKind::Char | EntryKind::Block => {
                self.rdev = encode_dev(e.dev_major.unwrap_or(0), e.dev_minor.unwrap_or(0));
            }
            _ => {}
        }
        Ok(())
    }

    pub fn attr(&self, ino: u64) -> FileAttr {
        let mtime = if self.mtime >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_secs(self.mtime as u64))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(self.mtime.unsigned_abs()))
        }
        .unwrap_or(UNIX_EPOCH);
        FileAttr {
            ino: INodeNo(ino),
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: self.kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The file type an entry makes on disk.
fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir | EntryKind::Opaque => FileType::Directory,
        EntryKind::Reg | EntryKind::Hardlink => FileType::RegularFile,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Char | EntryKind::Whiteout => FileType::CharDevice,
        EntryKind::Block => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's `new_encode_dev`: the 32-bit device number FUSE attributes carry.
pub(crate) fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn parent_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

fn base_of(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// Inode numbers are indexes into `nodes` plus one; the root is 1, as FUSE requires.
pub(crate) struct InodeTable {
    nodes: Vec<Inode>,
    /// Sum of regular file sizes, for statfs.
    content_bytes: u64,
    /// Whether any node carries an xattr (an opaque mark included).
    has_xattrs: bool,
}

impl InodeTable {
    pub fn build(toc: &Toc) -> Result<Self> {
        let mut b = Builder {
            nodes: vec![Inode::synthetic_dir(1)],
            children: vec![BTreeMap::new()],
            whiteouts: HashSet::new(),
            opaque: Vec::new(),
        };
        let mut hardlinks = Vec::new();
        for e in &toc.entries {
            // The root is the mount's root: it can only be a directory (containerd's unpacker
            // refuses anything else there too).
            if e.name.is_empty() && !matches!(e.kind, EntryKind::Dir | EntryKind::Opaque) {
                return Err(Error::InvalidArgument(format!(
                    "the layer's root is a {:?} entry, not a directory",
                    e.kind
                )));
            }
            match e.kind {
                EntryKind::Hardlink => hardlinks.push(e),
                EntryKind::Dir => {
                    let ino = b.dir(&e.name)?;
                    b.nodes[ino as usize - 1].set_meta(e)?;
                }
                EntryKind::Opaque => {
                    let ino = b.dir(&e.name)?;
                    b.opaque.push(ino);
                }
                _ => b.insert(e)?,
            }
        }
        // Last, so every target is in place: "last one wins" may have moved a target's entry
        // after the hardlink in the TOC, and a hardlink may name an earlier hardlink.
        for e in hardlinks {
            b.hardlink(e)?;
        }
        Ok(b.finish())
    }

    pub fn get(&self, ino: u64) -> Result<&Inode> {
        let i = usize::try_from(ino).map_err(|_| Error::NoEntry)?;
        i.checked_sub(1)
            .and_then(|i| self.nodes.get(i))
            .ok_or(Error::NoEntry)
    }

    pub fn dir(&self, ino: u64) -> Result<&Inode> {
        let node = self.get(ino)?;
        if node.kind != FileType::Directory {
            return Err(Error::NotDir);
        }
        Ok(node)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<u64> {
        let dir = self.dir(parent)?;
        dir.children
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .map(|i| dir.children[i].1)
            .map_err(|_| Error::NoEntry)
    }

    /// A directory's listing as readdir gives it: `.`, `..`, then the entries by name.
    pub fn entries(&self, ino: u64) -> Result<impl Iterator<Item = (&str, u64)>> {
        let dir = self.dir(ino)?;
        let dots = [(".", ino), ("..", dir.parent)];
        Ok(dots
            .into_iter()
            .chain(dir.children.iter().map(|(n, c)| (n.as_str(), *c))))
    }

    pub fn len(&self) -> u64 {
        self.nodes.len() as u64
    }

    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    pub fn has_xattrs(&self) -> bool {
        self.has_xattrs
    }
}

struct Builder {
    nodes: Vec<Inode>,
    /// Directory entries while building, by inode index; sorted into `Inode::children` at the end.
    children: Vec<BTreeMap<String, u64>>,
    whiteouts: HashSet<u64>,
    opaque: Vec<u64>,
}

impl Builder {
    fn push(&mut self, node: Inode) -> u64 {
        self.nodes.push(node);
        self.children.push(BTreeMap::new());
        self.nodes.len() as u64
    }

    /// The inode at `path`, walking the tree built so far from the root, one component at a
    /// time. Paths are looked up through the directories, never kept whole: a table of every
    /// prefix of every path would grow with the square of path depth.
    fn find(&self, path: &str) -> Option<u64> {
        if path.is_empty() {
            return Some(1);
        }
        path.split('/').try_fold(1u64, |ino, name| {
            self.children[ino as usize - 1].get(name).copied()
        })
    }

    /// The directory at `path`, made (with its parents) if the tar omitted it. A loop, not
    /// recursion: the TOC bounds path depth, but the stack must not depend on that bound.
    fn dir(&mut self, path: &str) -> Result<u64> {
        let mut ino = 1u64;
        if path.is_empty() {
            return Ok(ino);
        }
        let mut end = 0;
        for name in path.split('/') {
            end += name.len();
            let at = &path[..end];
            end += 1;
            ino = match self.children[ino as usize - 1].get(name).copied() {
                Some(child) => self.existing_dir(at, child)?,
                None => {
                    let child = self.push(Inode::synthetic_dir(ino));
                    self.children[ino as usize - 1].insert(name.to_owned(), child);
                    child
                }
            };
        }
        Ok(ino)
    }

    /// `ino`, known at `path`, as a directory that may hold entries.
    fn existing_dir(&mut self, path: &str, ino: u64) -> Result<u64> {
        let i = ino as usize - 1;
        if self.nodes[i].kind == FileType::Directory {
            return Ok(ino);
        }
        // A whiteout and a directory of one name both hide the lower layers' entry;
        // the directory also has content, so it wins.
        if self.whiteouts.remove(&ino) {
            let parent = self.nodes[i].parent;
            self.nodes[i] = Inode::synthetic_dir(parent);
            return Ok(ino);
        }
        // containerd's unpacker refuses this too (a file cannot hold entries).
        Err(Error::InvalidArgument(format!(
            "{path:?} holds entries but is not a directory"
        )))
    }

    fn link(&mut self, parent: u64, path: &str, ino: u64) {
        self.children[parent as usize - 1].insert(base_of(path).to_owned(), ino);
    }

    /// Any entry but a directory, opaque marker or hardlink.
    fn insert(&mut self, e: &Entry) -> Result<()> {
        let parent = self.dir(parent_of(&e.name))?;
        let mut node = Inode::new(file_type(e.kind), &e.name, parent);
        node.set_meta(e)?;
        let whiteout = e.kind == EntryKind::Whiteout;
        let existing = self.children[parent as usize - 1]
            .get(base_of(&e.name))
            .copied();
        match existing {
            // A real entry and a whiteout of one name: the real entry wins, in either order.
            Some(ino) if whiteout && !self.whiteouts.contains(&ino) => {}
            Some(ino) => {
                // A later entry replaces an earlier one, as `tar -x` does; a replaced
                // directory's entries become unreachable.
                let i = ino as usize - 1;
                self.nodes[i] = node;
                self.children[i].clear();
                if !whiteout {
                    self.whiteouts.remove(&ino);
                }
            }
            None => {
                let ino = self.push(node);
                self.link(parent, &e.name, ino);
                if whiteout {
                    self.whiteouts.insert(ino);
                }
            }
        }
        Ok(())
    }

    fn hardlink(&mut self, e: &Entry) -> Result<()> {
        let target = e.link.as_deref().unwrap_or_default();
        let ino = match self.find(target) {
            Some(ino)
                if self.nodes[ino as usize - 1].kind != FileType::Directory
                    && !self.whiteouts.contains(&ino) =>
            {
                ino
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "hardlink {:?} names {target:?}, which is not a file of the layer",
                    e.name
                )))
            }
        };
        let parent = self.dir(parent_of(&e.name))?;
        self.link(parent, &e.name, ino);
        Ok(())
    }

    /// Marks opaque directories and counts links over the tree reachable from the root
    /// (entries of a replaced directory are not reachable and do not count).
    fn finish(mut self) -> InodeTable {
        for ino in self.opaque {
            let dir = &mut self.nodes[ino as usize - 1];
            if dir.kind == FileType::Directory {
                dir.xattrs.insert(OPAQUE_XATTR.to_owned(), b"y".to_vec());
            }
        }
        let mut links = vec![0u32; self.nodes.len()];
        let mut stack = vec![1u64];
        while let Some(dir) = stack.pop() {
            let i = dir as usize - 1;
            let children = std::mem::take(&mut self.children[i]);
            let mut subdirs = 0u32;
            for &child in children.values() {
                if self.nodes[child as usize - 1].kind == FileType::Directory {
                    subdirs += 1;
                    stack.push(child);
                } else {
                    links[child as usize - 1] += 1;
                }
            }
            self.nodes[i].nlink = 2 + subdirs;
            self.nodes[i].children = children.into_iter().collect();
        }
        let mut content_bytes = 0;
        for (node, links) in self.nodes.iter_mut().zip(links) {
            if node.kind != FileType::Directory {
                node.nlink = links.max(1);
                content_bytes += node.size;
            }
        }
        let has_xattrs = self.nodes.iter().any(|n| !n.xattrs.is_empty());
        InodeTable {
            nodes: self.nodes,
            content_bytes,
            has_xattrs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, name: &str) -> Entry {
        Entry {
            kind,
            name: name.to_owned(),
            mode: 0o644,
            uid: 1000,
            gid: 1001,
            size: 0,
            mtime: 1_700_000_000,
            link: None,
            offset: None,
            dev_major: None,
            dev_minor: None,
            xattrs: BTreeMap::new(),
        }
    }

    fn link(kind: EntryKind, name: &str, target: &str) -> Entry {
        Entry {
            link: Some(target.to_owned()),
            ..entry(kind, name)
        }
    }

    fn table(entries: Vec<Entry>) -> Result<InodeTable> {
        InodeTable::build(&Toc {
            format: Default::default(),
            version: 1,
            tar_size: 0,
            chunks: Vec::new(),
            entries,
            prefetch: Vec::new(),
        })
    }

    fn resolve<'a>(t: &'a InodeTable, path: &str) -> &'a Inode {
        let ino = path
            .split('/')
            .filter(|name| !name.is_empty())
            .try_fold(1, |dir, name| t.lookup(dir, name))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        t.get(ino).unwrap()
    }

    fn names(t: &InodeTable, ino: u64) -> Vec<&str> {
        t.entries(ino).unwrap().map(|(n, _)| n).collect()
    }

    #[test]
    fn parents_the_tar_omits_are_synthesized() {
        let mut file = entry(EntryKind::Reg, "a/b/file");
        (file.size, file.offset) = (5, Some(512));
        let t = table(vec![file, entry(EntryKind::Dir, "a/c")]).unwrap();
        let b = resolve(&t, "a/b");
        assert_eq!(
            (b.kind, b.perm, b.uid, b.gid, b.mtime),
            (FileType::Directory, 0o755, 0, 0, 0)
        );
        let f = resolve(&t, "a/b/file");
        assert_eq!(
            (f.size, f.content.clone(), f.uid),
            (5, Some(512..517), 1000)
        );
        assert_eq!(resolve(&t, "a").nlink, 4, "a holds b and c");
        assert_eq!((resolve(&t, "").nlink, resolve(&t, "a/c").perm), (3, 0o644));
        assert_eq!(names(&t, 1), [".", "..", "a"]);
        let a = t.lookup(1, "a").unwrap();
        assert_eq!(
            t.entries(a).unwrap().collect::<Vec<_>>()[..2],
            [(".", a), ("..", 1)]
        );
        assert_eq!(&*f.path, "a/b/file");
    }

    #[test]
    fn a_deep_path_builds_on_a_small_stack() {
        // 2,000 omitted parents (a 4 KiB path, the longest the TOC admits) on a 128 KiB
        // stack: one frame per component would overflow it.
        let deep = vec!["d"; 2_000].join("/");
        let name = format!("{deep}/f");
        let t = std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || table(vec![entry(EntryKind::Reg, &name)]).map(|t| t.len()))
            .unwrap()
            .join()
            .expect("no stack overflow")
            .unwrap();
        assert_eq!(t, 2_002, "root, 2,000 directories and the file");
    }

    #[test]
    fn paths_kept_grow_with_the_toc_not_with_the_square_of_depth() {
        // 200 files, each 250 omitted directories deep under a top directory of its own.
        let entries: Vec<Entry> = (0..200)
            .map(|i| {
                let name = format!("{i}/{}/f", vec!["d"; 250].join("/"));
                entry(EntryKind::Reg, &name)
            })
            .collect();
        let names: usize = entries.iter().map(|e| e.name.len()).sum();
        let t = table(entries).unwrap();
        assert_eq!(t.len(), 1 + 200 * 252);
        let kept: usize = t.nodes.iter().map(|n| n.path.len()).sum();
        assert!(
            kept <= names,
            "{kept} path bytes kept for {names} in the TOC"
        );
        let deep = resolve(&t, &format!("7/{}/f", vec!["d"; 250].join("/")));
        assert_eq!(deep.kind, FileType::RegularFile);
    }

    #[test]
    fn a_root_that_is_not_a_directory_is_refused() {
        for kind in [
            EntryKind::Reg,
            EntryKind::Symlink,
            EntryKind::Whiteout,
            EntryKind::Fifo,
        ] {
            let mut e = entry(kind, "");
            e.link = Some("x".into());
            let err = table(vec![e]).err().expect("refused");
            assert!(err.to_string().contains("root"), "{kind:?}: {err}");
        }
        let t = table(vec![entry(EntryKind::Dir, ""), entry(EntryKind::Reg, "f")]).unwrap();
        assert_eq!(t.get(1).unwrap().kind, FileType::Directory);
    }

    #[test]
    fn a_directory_listed_after_its_entries_keeps_them() {
        let mut dir = entry(EntryKind::Dir, "d");
        dir.mode = 0o1777;
        let t = table(vec![entry(EntryKind::Reg, "d/x"), dir]).unwrap();
        assert_eq!(resolve(&t, "d").perm, 0o1777);
        assert_eq!(names(&t, t.lookup(1, "d").unwrap()), [".", "..", "x"]);
    }

    #[test]
    fn hardlinks_share_their_target_inode_and_count_as_links() {
        let t = table(vec![
            entry(EntryKind::Reg, "f"),
            link(EntryKind::Hardlink, "dir/g", "f"),
            link(EntryKind::Hardlink, "h", "dir/g"),
            entry(EntryKind::Reg, "lonely"),
        ])
        .unwrap();
        let f = t.lookup(1, "f").unwrap();
        assert_eq!(t.lookup(t.lookup(1, "dir").unwrap(), "g").unwrap(), f);
        assert_eq!(t.lookup(1, "h").unwrap(), f);
        assert_eq!(t.get(f).unwrap().nlink, 3);
        assert_eq!(resolve(&t, "lonely").nlink, 1);
        assert_eq!(t.len(), 4, "root, f, dir, lonely: links add no inode");
    }

    #[test]
    fn a_hardlink_to_nothing_or_to_a_directory_is_refused() {
        assert!(table(vec![link(EntryKind::Hardlink, "g", "missing")]).is_err());
        let to_dir = vec![
            entry(EntryKind::Dir, "d"),
            link(EntryKind::Hardlink, "g", "d"),
        ];
        assert!(table(to_dir).is_err());
        let under_file = vec![entry(EntryKind::Reg, "f"), entry(EntryKind::Reg, "f/x")];
        assert!(table(under_file).is_err());
    }

    #[test]
    fn a_whiteout_is_a_character_device_0_0_and_a_real_entry_beats_it() {
        let mut dev = entry(EntryKind::Char, "null");
        (dev.dev_major, dev.dev_minor) = (Some(1), Some(3));
        let t = table(vec![
            entry(EntryKind::Whiteout, "gone"),
            entry(EntryKind::Whiteout, "both"),
            entry(EntryKind::Reg, "both"),
            entry(EntryKind::Dir, "d"),
            entry(EntryKind::Whiteout, "d"),
            entry(EntryKind::Whiteout, "sub/gone"),
            dev,
        ])
        .unwrap();
        let gone = resolve(&t, "gone");
        assert_eq!(
            (gone.kind, gone.rdev, gone.perm, gone.uid),
            (FileType::CharDevice, 0, 0, 1000)
        );
        assert_eq!(resolve(&t, "both").kind, FileType::RegularFile);
        assert_eq!(resolve(&t, "d").kind, FileType::Directory);
        assert_eq!(resolve(&t, "sub/gone").kind, FileType::CharDevice);
        assert_eq!(resolve(&t, "null").rdev, 0x103);
    }

    #[test]
    fn opaque_directories_carry_the_overlay_xattr_beside_their_own() {
        let mut dir = entry(EntryKind::Dir, "o");
        dir.xattrs.insert("user.k".into(), "dg==".into());
        let t = table(vec![
            entry(EntryKind::Opaque, "o"),
            dir,
            entry(EntryKind::Opaque, "p/q"),
        ])
        .unwrap();
        let o = resolve(&t, "o");
        assert_eq!(
            o.xattrs.get(OPAQUE_XATTR).map(Vec::as_slice),
            Some(&b"y"[..])
        );
        assert_eq!(o.xattrs.get("user.k").map(Vec::as_slice), Some(&b"v"[..]));
        assert!(resolve(&t, "p/q").xattrs.contains_key(OPAQUE_XATTR));
        assert!(!resolve(&t, "p").xattrs.contains_key(OPAQUE_XATTR));
    }

    #[test]
    fn a_later_file_replaces_a_directory_and_its_entries() {
        let t = table(vec![
            entry(EntryKind::Reg, "a/x"),
            entry(EntryKind::Reg, "a"),
        ])
        .unwrap();
        assert_eq!(resolve(&t, "a").kind, FileType::RegularFile);
        assert_eq!(resolve(&t, "").nlink, 2);
        assert!(t.entries(t.lookup(1, "a").unwrap()).is_err());
    }

    #[test]
    fn attributes_follow_the_entry() {
        let mut exe = entry(EntryKind::Reg, "exe");
        (exe.mode, exe.uid, exe.mtime) = (0o4755, u64::MAX, -1);
        let sym = link(EntryKind::Symlink, "s", "../target");
        let t = table(vec![exe, sym]).unwrap();
        let attr = resolve(&t, "exe").attr(2);
        assert_eq!((attr.perm, attr.uid, attr.gid), (0o4755, OVERFLOW_ID, 1001));
        assert_eq!(attr.mtime, UNIX_EPOCH - Duration::from_secs(1));
        let s = resolve(&t, "s");
        assert_eq!((s.size, s.target.as_deref()), (9, Some("../target")));
        assert_eq!(encode_dev(8, 300) as u64, libc::makedev(8, 300));
        assert!(matches!(t.get(0), Err(Error::NoEntry)));
        assert!(matches!(t.lookup(2, "x"), Err(Error::NotDir)));
    }
}
