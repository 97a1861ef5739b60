//! The fuzzing entry point of the filesystem: the inode table built from a TOC, and every
//! metadata call and read plan the FUSE callbacks make, without a mount, a cache or a runtime.
//!
//! The calls mirror the callbacks in `super` (lookup, getattr, readlink, open, opendir,
//! readdir, readdirplus, getxattr, listxattr, read with its read-ahead, statfs) and check what
//! the kernel relies on: a tree of directories under a directory root, listings whose names
//! are real names and whose lookups agree, attributes that match the inode, and read plans
//! that stay inside the file and the chunk table. Chunks are never fetched; when the caller
//! hands in the tar stream, reads are cut from it through `read::cut` and compared with it.
//! The fuzz crate in `snapshotter/fuzz/` drives this; nothing in the daemon calls it.
#![doc(hidden)]

use std::collections::HashSet;
use std::ops::Range;

use brisk_blobcache::chunk::{ChunkRef, VerifiedChunk};
use brisk_blobcache::toc::Toc;
use brisk_blobcache::Digest;
use bytes::Bytes;
use fuser::FileType;

use super::inode::{Inode, InodeTable};
use super::read::{self, Plan};
use super::readahead::{Streams, START_AFTER};
use crate::{Error, Result};

/// Reads of this size stream through a file to start read-ahead, as the kernel's do.
const KERNEL_READ: u32 = 128 << 10;

/// Builds the inode table of `toc` as `LayerFs::new` does, if `toc` passes `Toc::validate`
/// (a mounted layer's TOC always has), and makes every call the FUSE callbacks make on it,
/// panicking where an answer breaks what the kernel relies on. `tar`, if given, is the
/// layer's uncompressed tar stream: the reads of chunks whose digests match it are cut as
/// `read::fetch` cuts them and compared with the file's bytes in it.
#[doc(hidden)]
pub fn fuzz_layer(toc: &Toc, tar: Option<&[u8]>) {
    if toc.validate().is_err() {
        return;
    }
    // A table that does not build is a layer the daemon refuses to mount.
    let Ok(table) = InodeTable::build(toc) else {
        return;
    };
    let layer = Layer {
        toc,
        table: &table,
        tar,
        chunks: tar.map_or_else(Vec::new, |tar| verified_chunks(toc, tar)),
    };
    // The kernel only learns the inodes it can reach from the root; the others only get
    // `get`, which must still answer.
    let reachable = layer.tree();
    let mut streams = Streams::default();
    for ino in 1..=table.len() {
        let node = table.get(ino).expect("inodes run from 1 to len");
        let _ = node.attr(ino);
        if reachable.contains(&ino) {
            layer.node(ino, node, &mut streams);
        }
    }
    for ino in [0, table.len() + 1, u64::MAX] {
        assert!(matches!(table.get(ino), Err(Error::NoEntry)), "inode {ino}");
        assert!(table.lookup(ino, "x").is_err());
    }
    // statfs
    let _ = (table.content_bytes().div_ceil(4096), table.len());
}

struct Layer<'a> {
    toc: &'a Toc,
    table: &'a InodeTable,
    tar: Option<&'a [u8]>,
    /// The TOC's chunks that match `tar`, by index; empty without one.
    chunks: Vec<Option<VerifiedChunk>>,
}

impl Layer<'_> {
    /// The directory tree from the root, as lookups and listings see it; returns the inodes
    /// in it.
    fn tree(&self) -> HashSet<u64> {
        let root = self.table.get(1).expect("inode 1 exists");
        assert_eq!(root.kind, FileType::Directory, "the root is a directory");
        let mut seen = HashSet::from([1u64]);
        let mut reachable = HashSet::from([1u64]);
        let mut stack = vec![1u64];
        while let Some(dir) = stack.pop() {
            let node = self.table.dir(dir).expect("a listed directory");
            let mut subdirs = 0;
            for (name, child) in &node.children {
                let kind = self.table.get(*child).expect("a listed inode exists").kind;
                reachable.insert(*child);
                if kind == FileType::Directory {
                    subdirs += 1;
                    assert!(seen.insert(*child), "directory {child} is listed twice");
                    assert_eq!(self.table.get(*child).unwrap().parent, dir, "{name:?}'s ..");
                    stack.push(*child);
                }
            }
            assert_eq!(node.nlink, 2 + subdirs, "links of directory {dir}");
        }
        reachable
    }

    /// Every callback on inode `ino`.
    fn node(&self, ino: u64, node: &Inode, streams: &mut Streams) {
        // getattr
        let attr = node.attr(ino);
        assert_eq!(
            (attr.ino.0, attr.kind, attr.size),
            (ino, node.kind, node.size)
        );
        // readlink
        assert_eq!(node.target.is_some(), node.kind == FileType::Symlink);
        if let Some(target) = &node.target {
            assert_eq!(node.size, target.len() as u64);
        }
        // getxattr and listxattr
        let mut names = Vec::new();
        for (name, value) in &node.xattrs {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            xattr_reply(value);
        }
        xattr_reply(&names);
        assert!(matches!(
            node.xattrs
                .get("user.brisk.fuzz.absent")
                .ok_or(Error::NoAttr),
            Err(Error::NoAttr)
        ));
        // opendir, readdir, readdirplus, lookup
        match self.table.entries(ino) {
            Ok(_) => {
                assert_eq!(node.kind, FileType::Directory);
                self.listing(ino, node);
            }
            Err(err) => {
                assert!(matches!(err, Error::NotDir), "{err}");
                let _ = err.errno();
                assert!(matches!(self.table.lookup(ino, "x"), Err(Error::NotDir)));
            }
        }
        // open and read
        if node.kind == FileType::RegularFile {
            self.reads(ino, node, streams);
        }
    }

    /// readdir and readdirplus from several offsets, and lookup of every name listed and of
    /// names that cannot be there.
    fn listing(&self, ino: u64, node: &Inode) {
        let all: Vec<(&str, u64)> = self.table.entries(ino).unwrap().collect();
        assert_eq!(all[0], (".", ino));
        assert_eq!(all[1].0, "..");
        assert!(
            self.table.dir(all[1].1).is_ok(),
            "`..` of {ino} is a directory"
        );
        let n = all.len();
        for offset in [0, 1, 2, n / 2, n.saturating_sub(1), n, n + 1] {
            let entries = self.table.entries(ino).unwrap();
            for (i, (name, child)) in entries.enumerate().skip(offset) {
                let child_node = self.table.get(child).expect("a listed inode exists");
                let _ = (i as u64 + 1, child_node.kind, name, child_node.attr(child));
            }
        }
        let mut previous: Option<&str> = None;
        for (name, child) in &node.children {
            assert!(
                !name.is_empty() && !name.contains('/') && name != "." && name != "..",
                "directory {ino} lists {name:?}"
            );
            assert!(
                previous < Some(name.as_str()),
                "listing is sorted and unique"
            );
            previous = Some(name);
            assert_eq!(self.table.lookup(ino, name).ok(), Some(*child), "{name:?}");
            let slash = format!("{name}/");
            assert!(matches!(
                self.table.lookup(ino, &slash),
                Err(Error::NoEntry)
            ));
        }
        for absent in ["", ".", ".."] {
            assert!(self.table.lookup(ino, absent).is_err(), "{absent:?}");
        }
    }

    /// read (with the read-ahead it starts) at offsets around the file's ends, its middle and
    /// its chunk boundaries, then a stream of kernel-sized reads from the start.
    fn reads(&self, ino: u64, node: &Inode, streams: &mut Streams) {
        let Some(content) = &node.content else {
            assert_eq!(node.size, 0, "a file without content is empty");
            return;
        };
        assert_eq!(content.end - content.start, node.size);
        assert!(content.end <= self.toc.tar_size);
        let len = node.size;
        let mut offsets = vec![0, 1, len / 2, len.saturating_sub(1), len, len + 1, u64::MAX];
        let chunks = self.toc.chunks_for(content.clone());
        for c in self.toc.chunks[chunks].iter().take(8) {
            let at = c.tar_offset.saturating_sub(content.start);
            offsets.extend([at.saturating_sub(1), at, at + 1]);
        }
        for offset in offsets {
            for size in [1, 4096, KERNEL_READ, u32::MAX] {
                self.read(ino, content, offset, size, streams);
            }
        }
        if len > START_AFTER {
            for i in 0..(START_AFTER / u64::from(KERNEL_READ) + 64) {
                self.read(
                    ino,
                    content,
                    i * u64::from(KERNEL_READ),
                    KERNEL_READ,
                    streams,
                );
            }
        }
    }

    /// One read as `LayerFs::read` serves it: the plan, the read-ahead note, the cut.
    fn read(&self, ino: u64, content: &Range<u64>, offset: u64, size: u32, streams: &mut Streams) {
        let len = content.end - content.start;
        let Some(plan) = Plan::new(self.toc, content, offset, size) else {
            assert!(
                offset >= len || size == 0,
                "read of {size} at {offset} of {len}"
            );
            return;
        };
        let want = u64::from(size).min(len - offset);
        assert_eq!(
            plan.range,
            content.start + offset..content.start + offset + want
        );
        assert_eq!(u64::from(plan.len()), want);
        self.covers(&plan.chunks, &plan.range);
        if let Some(ahead) = streams.note(ino, offset, u64::from(plan.len()), len) {
            assert!(
                ahead.start < ahead.end && ahead.end <= len,
                "{ahead:?} of {len}"
            );
            let range = content.start + ahead.start..content.start + ahead.end;
            self.covers(&self.toc.chunks_for(range.clone()), &range);
        }
        let (Some(tar), Some(got)) = (self.tar, self.fetched(&plan.chunks)) else {
            return;
        };
        let bytes = read::cut(&self.toc.chunks[plan.chunks.clone()], &got, &plan.range)
            .expect("verified chunks cut");
        let want = &tar[plan.range.start as usize..plan.range.end as usize];
        assert!(
            bytes[..] == *want,
            "read of {size} at {offset} of inode {ino}"
        );
    }

    /// `chunks` (a range of the chunk table) holds all of `range` of the tar stream.
    fn covers(&self, chunks: &Range<usize>, range: &Range<u64>) {
        let table = &self.toc.chunks[chunks.clone()];
        let (first, last) = (table.first().expect("a chunk"), table.last().unwrap());
        assert!(first.tar_offset <= range.start, "{range:?}");
        assert!(last.tar_offset + last.tar_size >= range.end, "{range:?}");
    }

    /// The verified chunks of `chunks`, if every one of them matched the tar stream.
    fn fetched(&self, chunks: &Range<usize>) -> Option<Vec<VerifiedChunk>> {
        self.chunks.get(chunks.clone())?.iter().cloned().collect()
    }
}

/// getxattr's and listxattr's reply for a buffer of 0 (the length), exactly the value's size,
/// and one byte less (ERANGE), as `super::reply_xattr` answers them.
fn xattr_reply(value: &[u8]) {
    let reply = |size: u32| -> Result<usize> {
        if size == 0 {
            Ok(u32::try_from(value.len()).expect("xattrs fit a u32") as usize)
        } else if value.len() > size as usize {
            Err(Error::Range)
        } else {
            Ok(value.len())
        }
    };
    let len = value.len() as u32;
    assert_eq!(reply(0).unwrap(), value.len());
    assert_eq!(reply(len.max(1)).unwrap(), value.len());
    if len > 1 {
        assert!(matches!(reply(len - 1), Err(Error::Range)));
    }
}

/// The TOC's chunks as the cache would hand them over, where `tar` holds their bytes.
fn verified_chunks(toc: &Toc, tar: &[u8]) -> Vec<Option<VerifiedChunk>> {
    let blob = Digest::sha256(b"fuzz");
    toc.chunks
        .iter()
        .map(|c| {
            let bytes = tar.get(c.tar_offset as usize..(c.tar_offset + c.tar_size) as usize)?;
            VerifiedChunk::check(&ChunkRef::new(blob, c), Bytes::copy_from_slice(bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use brisk_blobcache::toc::{self, ConvertOptions, Footer, FOOTER_SIZE};

    use super::*;

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_mtime(1_700_000_000);
        h
    }

    /// A layer of every kind of entry, with a file long enough to start read-ahead, through
    /// the converter: every check holds, and every read cut from its chunks is the file's.
    #[test]
    fn a_converted_layer_passes_every_check() {
        let mut b = tar::Builder::new(Vec::new());
        let small: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let large = vec![7u8; START_AFTER as usize + (1 << 20)];
        for (kind, name, data) in [
            (tar::EntryType::Directory, "d", &b""[..]),
            (tar::EntryType::Regular, "d/small", &small),
            (tar::EntryType::Regular, "d/large", &large),
            (tar::EntryType::Regular, "d/.wh.gone", b""),
            (tar::EntryType::Regular, "o/.wh..wh..opq", b""),
            (tar::EntryType::Char, "null", b""),
        ] {
            b.append_data(&mut header(kind, data.len() as u64), name, data)
                .unwrap();
        }
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
            .unwrap();
        b.append_data(&mut header(tar::EntryType::Regular, 1), "x", &b"x"[..])
            .unwrap();
        let mut link = header(tar::EntryType::Symlink, 0);
        b.append_link(&mut link, "d/sym", "small").unwrap();
        let mut link = header(tar::EntryType::Link, 0);
        b.append_link(&mut link, "hard", "d/small").unwrap();
        let tar = b.into_inner().unwrap();
        let opts = ConvertOptions {
            chunk_size: 4096,
            ..ConvertOptions::default()
        };
        let (_, blob) = toc::convert_layer(&tar[..], Vec::new(), &opts).unwrap();
        let footer = Footer::decode(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
        let r = footer.toc.range();
        let toc = Toc::decode(
            &blob[r.start as usize..r.end as usize],
            footer.toc.uncompressed_size,
            None,
        )
        .unwrap();
        assert!(toc.entries.len() >= 9, "{:?}", toc.entries);
        fuzz_layer(&toc, Some(&tar));
    }

    fn json_toc(json: &str) -> Toc {
        let toc: Toc = serde_json::from_str(json).unwrap();
        toc.validate().expect("the TOC validates");
        toc
    }

    /// Found by the `inode` fuzz target: a non-directory entry named `""` replaced the root.
    #[test]
    fn an_entry_named_like_the_root_is_refused() {
        let toc = json_toc(
            r#"{"version":1,"tar_size":0,"chunks":[],
                "entries":[{"type":"symlink","name":"","link":"/etc"}]}"#,
        );
        assert!(InodeTable::build(&toc).is_err());
    }

    /// Found by the `inode` fuzz target: a hardlink named `""` listed an empty name in the root.
    #[test]
    fn a_hardlink_named_like_the_root_is_refused() {
        let toc = json_toc(
            r#"{"version":1,"tar_size":0,"chunks":[],
                "entries":[{"type":"reg","name":"f"},{"type":"hardlink","name":"","link":"f"}]}"#,
        );
        assert!(InodeTable::build(&toc).is_err());
    }
}
