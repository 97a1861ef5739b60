//! Baking a start-up trace into a layer: the traced files move to the front of the tar
//! stream, right after the directories, so the start-up set is one contiguous run of chunks
//! that a single range request fetches; the TOC then lists those chunks for prefetch.
//!
//! Only regular files move. Directories stay first (every extractor then sees a parent before
//! its children), and everything else (links, whiteouts, devices) keeps its order after the
//! moved files, so a hardlink still follows its target. A file whose name occurs twice in the
//! layer never moves: the last occurrence must stay last to win.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use brisk_blobcache::toc::normalize_name;
use tar::EntryType;

use crate::{Error, Result};

/// The new order of the tar's byte ranges, and the traced files that moved (in trace order).
pub struct Plan {
    pub segments: Vec<Range<u64>>,
    pub files: Vec<String>,
}

/// Plans the reordering of the uncompressed tar at `path` for `trace_files` (layer paths in
/// first-read order). `None` when no traced file is in this layer.
pub fn plan(path: &Path, trace_files: &[String]) -> Result<Option<Plan>> {
    let tar_err = |e| {
        Error::Blob(brisk_blobcache::Error::Toc(
            brisk_blobcache::toc::TocError::Tar(e),
        ))
    };
    // The parser below seeks over file data, so the guard that bounds metadata entries
    // before the parser holds them reads the stream once on its own first.
    let mut guarded =
        brisk_blobcache::toc::TarGuard::new(File::open(path).map_err(|e| Error::io(path, e))?);
    std::io::copy(&mut guarded, &mut std::io::sink()).map_err(tar_err)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut archive = tar::Archive::new(file);
    let mut entries: Vec<(Range<u64>, String, EntryType)> = Vec::new();
    let mut end = 0u64;
    for entry in archive.entries_with_seek().map_err(tar_err)? {
        let entry = entry.map_err(tar_err)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let data_end = entry.raw_file_position() + entry.size().div_ceil(512) * 512;
        // An entry's bytes start where the previous one ended: that takes in its PAX and GNU
        // long-name headers, which precede the header the parser reports.
        entries.push((
            end..data_end,
            normalize_name(&name).unwrap_or(name),
            entry.header().entry_type(),
        ));
        end = data_end;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, name, _) in &entries {
        *count.entry(name.as_str()).or_default() += 1;
    }
    let movable: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, (_, name, kind))| kind.is_file() && count[name.as_str()] == 1)
        .map(|(i, (_, name, _))| (name.as_str(), i))
        .collect();
    let mut moved = vec![false; entries.len()];
    let mut files = Vec::new();
    for f in trace_files {
        let name = normalize_name(f).unwrap_or_default();
        if let Some(&i) = movable.get(name.as_str()) {
            if !moved[i] {
                moved[i] = true;
                files.push(name);
            }
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    let by_name: HashMap<&str, usize> = movable;
    let mut segments: Vec<Range<u64>> = Vec::with_capacity(entries.len() + 1);
    segments.extend(
        entries
            .iter()
            .filter(|(_, _, k)| k.is_dir())
            .map(|(r, _, _)| r.clone()),
    );
    segments.extend(files.iter().map(|f| entries[by_name[f.as_str()]].0.clone()));
    segments.extend(
        entries
            .iter()
            .enumerate()
            .filter(|(i, (_, _, k))| !k.is_dir() && !moved[*i])
            .map(|(_, (r, _, _))| r.clone()),
    );
    // The end-of-archive blocks and any padding after them.
    segments.push(end..len);
    Ok(Some(Plan { segments, files }))
}

/// Reads the byte ranges of a file one after the other.
pub struct Segments {
    file: File,
    segments: std::vec::IntoIter<Range<u64>>,
    current: Option<Range<u64>>,
}

impl Segments {
    pub fn new(path: &Path, segments: Vec<Range<u64>>) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            segments: segments.into_iter(),
            current: None,
        })
    }
}

impl Read for Segments {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match &mut self.current {
                Some(r) if r.start < r.end => {
                    self.file.seek(SeekFrom::Start(r.start))?;
                    let want = ((r.end - r.start) as usize).min(buf.len());
                    let n = self.file.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "tar shorter than planned",
                        ));
                    }
                    r.start += n as u64;
                    return Ok(n);
                }
                _ => match self.segments.next() {
                    Some(next) => self.current = Some(next),
                    None => return Ok(0),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn tar(files: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(if *kind == tar::EntryType::Link {
                0
            } else {
                data.len() as u64
            });
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if *kind == tar::EntryType::Link {
                b.append_link(&mut h, name, std::str::from_utf8(data).unwrap())
                    .unwrap();
            } else {
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn names(bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn traced_files_move_after_the_directories_and_links_keep_their_targets_first() {
        use tar::EntryType::*;
        let long = format!("deep/{}/file", "x".repeat(150));
        let input = tar(&[
            ("a/", Directory, b""),
            ("a/one", Regular, b"1"),
            ("a/two", Regular, b"2"),
            ("b/", Directory, b""),
            ("b/link", Link, b"a/two"),
            (long.as_str(), Regular, b"3"),
            ("dup", Regular, b"first"),
            ("dup", Regular, b"second"),
        ]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&input).unwrap();
        let trace: Vec<String> = [long.as_str(), "/a/two", "dup", "missing"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let plan = plan(f.path(), &trace).unwrap().unwrap();
        assert_eq!(plan.files, [long.as_str(), "a/two"]);
        let mut out = Vec::new();
        Segments::new(f.path(), plan.segments)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len(), input.len());
        assert_eq!(
            names(&out),
            [
                "a/",
                "b/",
                long.as_str(),
                "a/two",
                "a/one",
                "b/link",
                "dup",
                "dup"
            ]
        );
        assert!(super::plan(f.path(), &["nothing".to_string()])
            .unwrap()
            .is_none());
    }
}
