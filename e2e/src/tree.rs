//! A text listing of a directory tree that two trees can be compared by.
//!
//! One line per entry, sorted by path, with what an image is meant to preserve: type,
//! permission bits (setuid, setgid and sticky included), owner, size, content digest,
//! symlink target, xattrs and hard links. Timestamps are left out on purpose: unpacking
//! does not preserve directory mtimes, so they would differ between two unpacks of the same
//! image.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{run, sha256_file};

/// The listing of the tree at `root`. Paths are relative to it, and the root itself is `.`.
/// A file that shares its inode with an earlier path (in sorted order) is listed as
/// `hardlink-of <earlier path>` in place of its digest, so hard-link groups compare too.
pub fn tree_manifest(root: &Path) -> Result<String> {
    let mut paths = vec![PathBuf::new()];
    collect(root, Path::new(""), &mut paths)?;
    paths.sort();
    let mut first_of_inode: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut out = String::new();
    for rel in &paths {
        let path = root.join(rel);
        let meta = fs::symlink_metadata(&path)?;
        let shown = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel.as_path()
        };
        let kind = meta.file_type();
        let type_name = if kind.is_dir() {
            "dir"
        } else if kind.is_file() {
            "file"
        } else if kind.is_symlink() {
            "symlink"
        } else if kind.is_fifo() {
            "fifo"
        } else if kind.is_char_device() {
            "char"
        } else if kind.is_block_device() {
            "block"
        } else {
            "socket"
        };
        write!(
            out,
            "{shown:?} {type_name} mode={:04o} uid={} gid={}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        )?;
        if kind.is_file() {
            let first = if meta.nlink() > 1 {
                let first = first_of_inode
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| rel.clone());
                (first != rel).then(|| first.clone())
            } else {
                None
            };
            match first {
                Some(first) => write!(out, " hardlink-of {first:?}")?,
                None => write!(out, " size={} sha256={}", meta.len(), sha256_file(&path)?)?,
            }
        } else if kind.is_symlink() {
            write!(out, " -> {:?}", fs::read_link(&path)?)?;
        } else if kind.is_char_device() || kind.is_block_device() {
            write!(out, " rdev={:x}", meta.rdev())?;
        }
        for xattr in xattrs(&path)? {
            write!(out, " xattr:{xattr}")?;
        }
        out.push('\n');
    }
    Ok(out)
}

/// Fails with the lines that differ when the trees at `expected` and `actual` do not list
/// the same.
pub fn assert_same_tree(expected: &Path, actual: &Path) -> Result<()> {
    let (want, got) = (tree_manifest(expected)?, tree_manifest(actual)?);
    if want == got {
        return Ok(());
    }
    let only = |a: &str, b: &str| {
        a.lines()
            .filter(|l| !b.lines().any(|m| m == *l))
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    };
    bail!(
        "Trees differ.\nOnly in {}:\n{}Only in {}:\n{}",
        expected.display(),
        only(&want, &got),
        actual.display(),
        only(&got, &want)
    )
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        fs::read_dir(root.join(rel)).with_context(|| format!("Listing {}", rel.display()))?;
    for entry in entries {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        out.push(child.clone());
        if is_dir {
            collect(root, &child, out)?;
        }
    }
    Ok(())
}

/// `name="value"` lines from getfattr, sorted; `-h` lists a symlink's own xattrs.
fn xattrs(path: &Path) -> Result<Vec<String>> {
    let stdout = run(Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "--absolute-names"])
        .arg(path))?;
    let mut lines: Vec<String> = stdout
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    lines.sort();
    Ok(lines)
}
