//! The merged view of an image's layers, as a container would see its root filesystem:
//! upper layers win, whiteouts delete, opaque directories hide what lies below, symlinks
//! resolve inside the image root, hardlinks lead to their content.
//!
//! It works on TOCs alone; reading content is the caller's business.

use std::collections::HashMap;

use brisk_blobcache::toc::{normalize_name, Entry, EntryKind, Toc};

use crate::{Error, Result};

/// Symlinks followed while resolving one path before giving up (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

pub struct MergedView<'a> {
    /// Bottom layer first.
    layers: Vec<LayerIndex<'a>>,
}

struct LayerIndex<'a> {
    entries: HashMap<&'a str, &'a Entry>,
    whiteouts: HashMap<&'a str, ()>,
    opaque: HashMap<&'a str, ()>,
}

/// Where a path's entry lives: the layer (bottom is 0) and the entry.
#[derive(Clone, Copy, Debug)]
pub struct Found<'a> {
    pub layer: usize,
    pub entry: &'a Entry,
}

impl<'a> MergedView<'a> {
    pub fn new(tocs: &'a [Toc]) -> Self {
        let layers = tocs
            .iter()
            .map(|toc| {
                let mut idx = LayerIndex {
                    entries: HashMap::new(),
                    whiteouts: HashMap::new(),
                    opaque: HashMap::new(),
                };
                for e in &toc.entries {
                    match e.kind {
                        EntryKind::Whiteout => idx.whiteouts.insert(&e.name, ()),
                        EntryKind::Opaque => idx.opaque.insert(&e.name, ()),
                        _ => idx.entries.insert(&e.name, e).map(drop),
                    };
                }
                idx
            })
            .collect();
        Self { layers }
    }

    /// The entry at `path` without following a final symlink (lstat).
    fn lstat(&self, path: &str) -> Option<Found<'a>> {
        for (layer, idx) in self.layers.iter().enumerate().rev() {
            if let Some(entry) = idx.entries.get(path) {
                return Some(Found { layer, entry });
            }
            // A whiteout of the path or of any ancestor, or an opaque ancestor, hides every
            // layer below this one.
            let mut p = path;
            loop {
                if idx.whiteouts.contains_key(p) {
                    return None;
                }
                match p.rfind('/') {
                    Some(i) => p = &p[..i],
                    None if !p.is_empty() => p = "",
                    None => break,
                }
                if idx.opaque.contains_key(p) {
                    return None;
                }
            }
        }
        None
    }

    /// Resolves `path` as `open` would: every symlink on the way and at the end is followed
    /// inside the image root, and a hardlink is replaced by the entry holding its content.
    pub fn resolve(&self, path: &str) -> Result<Found<'a>> {
        let not_found = || Error::invalid(format!("path {path:?}"), "no such file in the image");
        let mut pending: Vec<String> = components(path)?;
        pending.reverse();
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        let mut found = self.lstat("");
        while let Some(part) = pending.pop() {
            if part == ".." {
                resolved.pop();
                found = self.lstat(&resolved.join("/"));
                continue;
            }
            resolved.push(part);
            let here = resolved.join("/");
            let Some(f) = self.lstat(&here) else {
                // Tars often omit parent directories; a missing ancestor is implicitly a
                // directory, and the final component decides whether the path exists.
                if pending.is_empty() {
                    return Err(not_found());
                }
                continue;
            };
            if f.entry.kind == EntryKind::Symlink {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(Error::invalid(
                        format!("path {path:?}"),
                        "too many levels of symbolic links",
                    ));
                }
                let target = f.entry.link.clone().unwrap_or_default();
                resolved.pop();
                if target.starts_with('/') {
                    resolved.clear();
                }
                let mut t = components(&target)?;
                t.reverse();
                pending.extend(t);
                continue;
            }
            if !pending.is_empty() && f.entry.kind != EntryKind::Dir {
                return Err(Error::invalid(
                    format!("path {path:?}"),
                    format!("{here:?} is not a directory"),
                ));
            }
            found = Some(f);
        }
        let mut f = found.ok_or_else(not_found)?;
        for _ in 0..MAX_SYMLINKS {
            if f.entry.kind != EntryKind::Hardlink {
                return Ok(f);
            }
            let target = f.entry.link.as_deref().unwrap_or_default();
            let entry = self.layers[f.layer]
                .entries
                .get(target)
                .ok_or_else(not_found)?;
            f = Found {
                layer: f.layer,
                entry,
            };
        }
        Err(Error::invalid(
            format!("path {path:?}"),
            "hardlink chain too long",
        ))
    }
}

/// Path components, keeping `..` (resolved against the walk, never above the root).
fn components(path: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => out.push("..".to_owned()),
            p => out.push(normalize_name(p)?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, name: &str, link: Option<&str>) -> Entry {
        Entry {
            kind,
            name: name.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: link.map(Into::into),
            offset: None,
            dev_major: None,
            dev_minor: None,
            xattrs: Default::default(),
        }
    }

    fn toc(entries: Vec<Entry>) -> Toc {
        Toc {
            format: Default::default(),
            version: 1,
            tar_size: 0,
            chunks: vec![],
            entries,
            prefetch: vec![],
        }
    }

    fn layers() -> Vec<Toc> {
        use EntryKind::*;
        vec![
            toc(vec![
                entry(Dir, "usr", None),
                entry(Dir, "usr/lib", None),
                entry(Reg, "usr/lib/libc.so", None),
                entry(Symlink, "lib", Some("usr/lib")),
                entry(Reg, "etc/old", None),
                entry(Dir, "opt/app", None),
                entry(Reg, "opt/app/lower", None),
                entry(Reg, "data", None),
                entry(Hardlink, "data-link", Some("data")),
                entry(Symlink, "loop", Some("/loop")),
                entry(Symlink, "abs", Some("/usr/lib/../lib/libc.so")),
            ]),
            toc(vec![
                entry(Whiteout, "etc/old", None),
                entry(Opaque, "opt/app", None),
                entry(Reg, "opt/app/upper", None),
                entry(Reg, "usr/lib/libc.so", None),
            ]),
        ]
    }

    #[test]
    fn upper_layers_win_and_whiteouts_and_opaque_dirs_hide_lower_entries() {
        let tocs = layers();
        let view = MergedView::new(&tocs);
        assert_eq!(view.resolve("/usr/lib/libc.so").unwrap().layer, 1);
        assert!(view.resolve("etc/old").is_err());
        assert!(view.resolve("opt/app/lower").is_err());
        assert_eq!(view.resolve("opt/app/upper").unwrap().layer, 1);
    }

    #[test]
    fn symlinks_resolve_inside_the_root_and_hardlinks_lead_to_content() {
        let tocs = layers();
        let view = MergedView::new(&tocs);
        assert_eq!(
            view.resolve("lib/libc.so").unwrap().entry.name,
            "usr/lib/libc.so"
        );
        assert_eq!(view.resolve("/abs").unwrap().entry.name, "usr/lib/libc.so");
        assert_eq!(
            view.resolve("/../../usr/lib/libc.so").unwrap().entry.name,
            "usr/lib/libc.so"
        );
        assert_eq!(view.resolve("data-link").unwrap().entry.name, "data");
        let err = view.resolve("loop").unwrap_err().to_string();
        assert!(err.contains("too many levels"), "{err}");
        assert!(view.resolve("usr/lib/libc.so/x").is_err());
    }
}
