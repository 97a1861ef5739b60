//! Who a read comes from: the lazy layers the reading process's root filesystem is stacked
//! from, found in its mount table, so that a start-up trace keeps only its own image's reads.
//!
//! Layers are shared between images (a common base, or a blob another image merely names),
//! so the layer a read hits does not say whose start it belongs to; the container's root
//! overlay does. Asked only while a recording is open, and answered from a short-lived cache
//! per thread id, so a container start costs one mount-table read per new thread.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brisk_blobcache::Digest;
use brisk_trace_recorder::Reader;

/// How long a thread's answer is trusted: long enough for a start's burst of reads, short
/// enough that a reused thread id is not taken for the old one.
const FRESH: Duration = Duration::from_secs(2);

/// Threads remembered at once; past it, stale answers go, then all of them.
const MAX_REMEMBERED: usize = 4096;

/// A mount table longer than this is not read to the end (a container's has a few dozen
/// lines; the root mount comes early).
const MAX_MOUNTINFO: u64 = 1 << 20;

#[derive(Default)]
pub struct Readers {
    /// Mounted lazy layers: their mount path and blob, by snapshot id.
    mounted: Mutex<HashMap<u64, (PathBuf, Digest)>>,
    remembered: Mutex<HashMap<u32, (Instant, Option<Reader>)>>,
}

impl Readers {
    pub fn mounted(&self, id: u64, path: &Path, blob: Digest) {
        self.lock().insert(id, (path.to_owned(), blob));
    }

    pub fn unmounted(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (PathBuf, Digest)>> {
        self.mounted.lock().expect("not poisoned")
    }

    /// The lazy layers thread `pid`'s root filesystem is stacked from; `None` if its root is
    /// not an overlay of lazy layers mounted here (a process on the host, or one gone).
    pub fn reader(&self, pid: u32) -> Option<Reader> {
        let now = Instant::now();
        if let Some((at, reader)) = self.remembered.lock().expect("not poisoned").get(&pid) {
            if now.duration_since(*at) < FRESH {
                return reader.clone();
            }
        }
        let reader = self.look_up(pid);
        let mut remembered = self.remembered.lock().expect("not poisoned");
        if remembered.len() >= MAX_REMEMBERED {
            remembered.retain(|_, (at, _)| now.duration_since(*at) < FRESH);
            if remembered.len() >= MAX_REMEMBERED {
                remembered.clear();
            }
        }
        remembered.insert(pid, (now, reader.clone()));
        reader
    }

    fn look_up(&self, pid: u32) -> Option<Reader> {
        use std::io::Read;
        let file = std::fs::File::open(format!("/proc/{pid}/mountinfo")).ok()?;
        let mut table = String::new();
        file.take(MAX_MOUNTINFO).read_to_string(&mut table).ok()?;
        let lower = root_lowerdirs(&table)?;
        let mounted = self.lock();
        let blobs: BTreeSet<Digest> = lower
            .iter()
            .filter_map(|dir| layer_of(dir, &mounted))
            .collect();
        (!blobs.is_empty()).then(|| Arc::new(blobs))
    }
}

/// The blob of the lazy layer mounted at `dir`, a lower directory as the overlay shows it:
/// absolute, or relative to the snapshots directory (containerd shortens long lower-directory
/// lists that way: `<id>/fs`).
fn layer_of(dir: &str, mounted: &HashMap<u64, (PathBuf, Digest)>) -> Option<Digest> {
    let path = Path::new(dir);
    if path.is_absolute() {
        return mounted
            .values()
            .find(|(p, _)| p == path)
            .map(|(_, blob)| *blob);
    }
    let id: u64 = dir.strip_suffix("/fs")?.parse().ok()?;
    mounted.get(&id).map(|(_, blob)| *blob)
}

/// The lower directories of the overlay mounted at `/` in a mount table (`/proc/PID/mountinfo`
/// form); `None` if the root is not an overlay.
fn root_lowerdirs(table: &str) -> Option<Vec<String>> {
    // The last mount at "/" is the one in effect.
    let line = table.lines().rev().find(|l| {
        let mut fields = l.split(' ');
        fields.nth(4) == Some("/")
    })?;
    let (_, tail) = line.split_once(" - ")?;
    let mut fields = tail.split(' ');
    if fields.next()? != "overlay" {
        return None;
    }
    let options = fields.nth(1)?;
    let mut lower = Vec::new();
    for option in options.split(',') {
        let Some(value) = option
            .strip_prefix("lowerdir=")
            .or_else(|| option.strip_prefix("lowerdir+="))
        else {
            continue;
        };
        lower.extend(
            unescape(value)
                .split(':')
                .filter(|d| !d.is_empty())
                .map(str::to_owned),
        );
    }
    Some(lower)
}

/// The kernel writes space, tab, newline, backslash (and in options also `,` and `=`) in mount
/// tables as `\` and three octal digits.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')));
        match octal {
            Some(n) if n <= 0xff => {
                out.push(n as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINER: &str = "\
612 520 0:95 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/brisk/snapshots/12/fs:/var/lib/brisk/snapshots/7/fs:/var/lib/brisk/snapshots/3/fs,upperdir=/var/lib/brisk/snapshots/13/fs,workdir=/var/lib/brisk/snapshots/13/work,index=off
613 612 0:97 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
614 612 0:98 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
";

    #[test]
    fn a_containers_root_names_its_lazy_layers_and_nothing_else_does() {
        let mounted = HashMap::from([
            (
                12,
                (
                    "/var/lib/brisk/snapshots/12/fs".into(),
                    Digest::sha256(b"top"),
                ),
            ),
            (
                3,
                (
                    "/var/lib/brisk/snapshots/3/fs".into(),
                    Digest::sha256(b"base"),
                ),
            ),
            (
                40,
                (
                    "/var/lib/brisk/snapshots/40/fs".into(),
                    Digest::sha256(b"other"),
                ),
            ),
        ]);
        let lower = root_lowerdirs(CONTAINER).unwrap();
        assert_eq!(lower.len(), 3);
        let blobs: BTreeSet<Digest> = lower.iter().filter_map(|d| layer_of(d, &mounted)).collect();
        // Snapshot 7 was unpacked (not lazy): only the lazy layers count.
        assert_eq!(
            blobs,
            BTreeSet::from([Digest::sha256(b"top"), Digest::sha256(b"base")])
        );
        // containerd's short form of a long list, relative to the snapshots directory.
        assert_eq!(layer_of("3/fs", &mounted), Some(Digest::sha256(b"base")));
        assert_eq!(layer_of("3/work", &mounted), None);
        assert_eq!(layer_of("/elsewhere/3/fs", &mounted), None);

        let host = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        assert_eq!(root_lowerdirs(host), None);
        assert_eq!(root_lowerdirs("garbage"), None);
        assert_eq!(root_lowerdirs(""), None);
    }

    #[test]
    fn the_last_root_mount_wins_and_escaped_paths_are_read_back() {
        let table = format!(
            "{CONTAINER}700 612 0:99 / / rw - overlay overlay rw,lowerdir=/a\\040b/fs:/c/fs,upperdir=/u,workdir=/w\n"
        );
        assert_eq!(root_lowerdirs(&table).unwrap(), ["/a b/fs", "/c/fs"]);
        assert_eq!(unescape("x\\134y\\0"), "x\\y\\0");
    }

    #[test]
    fn a_thread_that_does_not_exist_is_no_reader() {
        let readers = Readers::default();
        assert_eq!(readers.reader(u32::MAX), None);
        // This test's own root is not an overlay of layers mounted here.
        assert_eq!(readers.reader(std::process::id()), None);
    }
}
