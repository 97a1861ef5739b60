//! The recorder: a cheap, lossy sink on the read path, and the recording sessions it feeds.
//!
//! Nothing here blocks its caller: `Recorder::record` hands the record to the recorder thread
//! unless `capacity` records already wait (then it counts a drop), and opening or abandoning a
//! session is a message that always fits (there are as many as `Prepare` calls). A background thread turns records into traces,
//! one session per image being started, and hands each finished trace to a callback after a
//! quiet period or a maximum duration.
//!
//! A container's read enters an image's trace only if the container's root filesystem is
//! stacked from exactly that image's lazy layers: layers are shared between images (a common
//! base, or a blob another image merely names), and a container of one image must neither
//! shape nor see the trace of another. Reads by processes on the host (containerd and its
//! clients read a few files of an image through a temporary mount before its container
//! starts) are the node's own and count for every image being recorded whose layer they hit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brisk_blobcache::Digest;

use crate::trace::{FileTouch, Trace, TraceEntry};

/// One read through the FUSE layer: which chunks of which layer, for which file, when.
#[derive(Clone, Debug)]
pub struct ReadRecord {
    pub layer: Digest,
    /// (chunk index in the layer's TOC, chunk digest).
    pub chunks: Vec<(u32, Digest)>,
    pub path: String,
    /// The bytes of the file read.
    pub range: std::ops::Range<u64>,
    pub at: Instant,
    /// The lazy layers the reading process's root filesystem is stacked from; `None` when
    /// the reader is not a container on lazy layers (a process on the host).
    pub reader: Option<Reader>,
}

/// The set of lazy layers (blobs) a reader's root filesystem is stacked from.
pub type Reader = Arc<BTreeSet<Digest>>;

/// Distinct readers a session keeps reads of: the image's own containers share one, so a
/// handful covers any start; a session with more is being read by other images' containers,
/// whose reads are dropped.
const MAX_READERS: usize = 8;

/// A recording in progress for one image.
#[derive(Debug)]
pub struct Session {
    image: Digest,
    layers: HashSet<Digest>,
    created: Instant,
    first_read: Option<Instant>,
    last_read: Option<Instant>,
    /// Reads by reader (`None`: the host's): which container is the image's own is known
    /// only once the session ends, since its layer list may still grow while it reads.
    by_reader: HashMap<Option<Reader>, Gathered>,
}

/// First touches of one reader, each with when it happened: readers are merged when the
/// session ends, and times then counted from the first kept read.
#[derive(Debug, Default)]
struct Gathered {
    entries: Vec<(Instant, TraceEntry)>,
    seen: HashSet<(Digest, u32)>,
    files: Vec<(Instant, FileTouch)>,
    /// Index in `files` by path.
    seen_files: HashMap<String, usize>,
}

/// What a session's trace holds.
struct Kept {
    entries: Vec<TraceEntry>,
    files: Vec<FileTouch>,
}

type OnFinish = Box<dyn Fn(Trace) + Send>;

pub struct Recorder {
    tx: Sender<Command>,
    /// Reads sent and not yet taken by the recorder thread, at most `capacity`.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: AtomicU64,
    /// Images with a session open, so the read path can skip work for images not recorded.
    active: Arc<Mutex<HashSet<Digest>>>,
}

enum Command {
    Read(ReadRecord),
    Begin(Digest, Vec<Digest>),
    Abandon(Digest),
}

/// How sessions end.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A session ends this long after the last read (default 5 s).
    pub quiet: Duration,
    /// ... or this long after the first read (default 60 s).
    pub max: Duration,
    /// A session that never sees a read is dropped after this long.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(5),
            max: Duration::from_secs(60),
            idle: Duration::from_secs(600),
        }
    }
}

impl Recorder {
    /// Starts the recorder thread. `capacity` bounds the records waiting to be processed.
    pub fn start(
        capacity: usize,
        limits: Limits,
        on_finish: impl Fn(Trace) + Send + 'static,
    ) -> Arc<Self> {
        let (tx, rx) = channel();
        let active = Arc::new(Mutex::new(HashSet::new()));
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let recorder = Arc::new(Self {
            tx,
            queued,
            capacity,
            dropped: AtomicU64::new(0),
            active: active.clone(),
        });
        let on_finish: OnFinish = Box::new(on_finish);
        std::thread::Builder::new()
            .name("brisk-trace-recorder".into())
            .spawn(move || run(rx, taken, limits, active, on_finish))
            .expect("spawning the recorder thread");
        recorder
    }

    /// Opens a session for `image`, whose layers are `layers`, or adds `layers` to the one
    /// open: a session may start with the first layer mounted, before the image's layer list
    /// is known, so that no read of the start is missed.
    pub fn begin(&self, image: Digest, layers: Vec<Digest>) {
        self.active.lock().expect("not poisoned").insert(image);
        let _ = self.tx.send(Command::Begin(image, layers));
    }

    /// Drops `image`'s session, if one is open, without producing a trace (one was found
    /// after all).
    pub fn abandon(&self, image: &Digest) {
        self.active.lock().expect("not poisoned").remove(image);
        let _ = self.tx.send(Command::Abandon(*image));
    }

    /// Whether any session is open: the read path skips building records otherwise.
    pub fn any_active(&self) -> bool {
        !self.active.lock().expect("not poisoned").is_empty()
    }

    pub fn is_recording(&self, image: &Digest) -> bool {
        self.active.lock().expect("not poisoned").contains(image)
    }

    /// Hands a read to the recorder without ever blocking the reader.
    pub fn record(&self, read: ReadRecord) {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(Command::Read(read)).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads the recorder could not keep up with.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn run(
    rx: Receiver<Command>,
    queued: Arc<AtomicUsize>,
    limits: Limits,
    active: Arc<Mutex<HashSet<Digest>>>,
    on_finish: OnFinish,
) {
    let mut sessions: HashMap<Digest, Session> = HashMap::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Command::Begin(image, layers)) => {
                sessions
                    .entry(image)
                    .or_insert_with(|| Session {
                        image,
                        layers: HashSet::new(),
                        created: Instant::now(),
                        first_read: None,
                        last_read: None,
                        by_reader: HashMap::new(),
                    })
                    .layers
                    .extend(layers);
            }
            Ok(Command::Abandon(image)) => {
                sessions.remove(&image);
            }
            Ok(Command::Read(read)) => {
                queued.fetch_sub(1, Ordering::SeqCst);
                for s in sessions
                    .values_mut()
                    .filter(|s| s.layers.contains(&read.layer))
                {
                    s.add(&read);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let done: Vec<Digest> = sessions
            .values()
            .filter(|s| s.is_done(now, &limits))
            .map(|s| s.image)
            .collect();
        for image in done {
            let s = sessions.remove(&image).expect("listed above");
            active.lock().expect("not poisoned").remove(&image);
            let (own, others) = s.own_reads();
            if own.entries.is_empty() {
                if others > 0 {
                    tracing::info!(image = %image, others, "no read of the start came from a container of the image; no trace");
                }
                continue;
            }
            tracing::info!(image = %image, chunks = own.entries.len(), others, "start-up trace recorded");
            on_finish(Trace {
                starts: 1,
                entries: own.entries,
                files: own.files,
                ..Trace::new(image)
            });
        }
    }
}

impl Session {
    fn add(&mut self, read: &ReadRecord) {
        if !self.by_reader.contains_key(&read.reader) && self.by_reader.len() >= MAX_READERS {
            return;
        }
        self.first_read.get_or_insert(read.at);
        self.last_read = Some(self.last_read.map_or(read.at, |l| l.max(read.at)));
        self.by_reader
            .entry(read.reader.clone())
            .or_default()
            .add(read);
    }

    /// The reads of the image's own containers (those stacked from exactly its layers) and
    /// of the host, merged in time order, times from the first of them; and how many other
    /// readers were left out.
    fn own_reads(mut self) -> (Kept, usize) {
        let own: BTreeSet<Digest> = self.layers.iter().copied().collect();
        let container = self.by_reader.remove(&Some(Arc::new(own)));
        let host = self.by_reader.remove(&None);
        let others = self.by_reader.len();
        let mut entries: Vec<(Instant, TraceEntry)> = Vec::new();
        let mut files: Vec<(Instant, FileTouch)> = Vec::new();
        for g in container.into_iter().chain(host) {
            entries.extend(g.entries);
            files.extend(g.files);
        }
        entries.sort_by_key(|(at, _)| *at);
        files.sort_by_key(|(at, _)| *at);
        let origin = match (entries.first(), files.first()) {
            (Some((e, _)), Some((f, _))) => (*e).min(*f),
            (Some((e, _)), None) => *e,
            (None, Some((f, _))) => *f,
            (None, None) => self.created,
        };
        let ms = |at: Instant| at.saturating_duration_since(origin).as_millis() as u64;
        let mut kept = Kept {
            entries: Vec::new(),
            files: Vec::new(),
        };
        let mut seen = HashSet::new();
        for (at, e) in entries {
            if seen.insert((e.layer, e.chunk)) {
                kept.entries.push(TraceEntry { at_ms: ms(at), ..e });
            }
        }
        let mut by_path: HashMap<String, usize> = HashMap::new();
        for (at, f) in files {
            match by_path.get(&f.path) {
                Some(&i) => {
                    for r in f.ranges {
                        kept.files[i].add_range(r[0]..r[1]);
                    }
                }
                None => {
                    by_path.insert(f.path.clone(), kept.files.len());
                    kept.files.push(FileTouch { at_ms: ms(at), ..f });
                }
            }
        }
        (kept, others)
    }

    fn is_done(&self, now: Instant, limits: &Limits) -> bool {
        match (self.first_read, self.last_read) {
            (Some(first), Some(last)) => now - last >= limits.quiet || now - first >= limits.max,
            _ => now - self.created >= limits.idle,
        }
    }
}

impl Gathered {
    fn add(&mut self, read: &ReadRecord) {
        let i = *self.seen_files.entry(read.path.clone()).or_insert_with(|| {
            let touch = FileTouch {
                path: read.path.clone(),
                at_ms: 0,
                ranges: Vec::new(),
            };
            self.files.push((read.at, touch));
            self.files.len() - 1
        });
        self.files[i].1.add_range(read.range.clone());
        for &(chunk, digest) in &read.chunks {
            if self.seen.insert((read.layer, chunk)) {
                let entry = TraceEntry {
                    layer: read.layer,
                    chunk,
                    digest,
                    at_ms: 0,
                    path: read.path.clone(),
                };
                self.entries.push((read.at, entry));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    /// A read of `layer` by a container stacked from `reader`.
    fn read_by(reader: &[Digest], layer: &Digest, chunks: &[u32], path: &str) -> ReadRecord {
        ReadRecord {
            reader: Some(Arc::new(reader.iter().copied().collect())),
            ..read(layer, chunks, path)
        }
    }

    /// A read by a process that is not a container on lazy layers.
    fn read(layer: &Digest, chunks: &[u32], path: &str) -> ReadRecord {
        ReadRecord {
            reader: None,
            layer: *layer,
            chunks: chunks
                .iter()
                .map(|&c| (c, Digest::sha256(&c.to_le_bytes())))
                .collect(),
            path: path.into(),
            range: 0..4096,
            at: Instant::now(),
        }
    }

    #[test]
    fn a_session_records_first_touches_of_its_layers_and_ends_when_reads_stop() {
        let (tx, rx) = channel();
        let limits = Limits {
            quiet: Duration::from_millis(300),
            ..Limits::default()
        };
        let recorder = Recorder::start(1024, limits, move |t| tx.send(t).unwrap());
        let (image, layer, other) = (
            Digest::sha256(b"img"),
            Digest::sha256(b"l1"),
            Digest::sha256(b"l2"),
        );
        recorder.begin(image, vec![layer]);
        assert!(recorder.is_recording(&image));
        recorder.record(read_by(&[layer], &layer, &[3, 4], "/bin/sh"));
        recorder.record(read_by(&[layer], &other, &[9], "/not/this/image"));
        std::thread::sleep(Duration::from_millis(20));
        recorder.record(read_by(&[layer], &layer, &[4, 1], "/lib/libc.so"));
        let trace = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(trace.image, image);
        let chunks: Vec<u32> = trace.entries.iter().map(|e| e.chunk).collect();
        assert_eq!(chunks, [3, 4, 1]);
        assert_eq!(trace.files(), ["/bin/sh", "/lib/libc.so"]);
        assert!(trace.entries[2].at_ms >= 20);
        assert!(!recorder.is_recording(&image));
    }

    #[test]
    fn a_session_grows_with_layers_and_an_abandoned_one_yields_nothing() {
        let (tx, rx) = channel();
        let limits = Limits {
            quiet: Duration::from_millis(200),
            ..Limits::default()
        };
        let recorder = Recorder::start(1024, limits, move |t| tx.send(t).unwrap());
        let (image, first, second) = (
            Digest::sha256(b"img"),
            Digest::sha256(b"l1"),
            Digest::sha256(b"l2"),
        );
        // Opened with the first layer mounted; the second joins when it is known.
        let both = [first, second];
        recorder.begin(image, vec![first]);
        recorder.record(read_by(&both, &first, &[1], "/etc/group"));
        recorder.record(read_by(&both, &second, &[7], "/too/early"));
        recorder.begin(image, vec![first, second]);
        recorder.record(read_by(&both, &second, &[2], "/bin/sh"));
        let trace = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let got: Vec<(Digest, u32)> = trace.entries.iter().map(|e| (e.layer, e.chunk)).collect();
        assert_eq!(got, [(first, 1), (second, 2)]);

        // A session abandoned before it ends produces no trace, even with reads in it.
        let other = Digest::sha256(b"other image");
        recorder.begin(other, vec![first]);
        recorder.record(read_by(&[first], &first, &[5], "/etc/passwd"));
        recorder.abandon(&other);
        assert!(!recorder.is_recording(&other));
        assert!(rx.recv_timeout(Duration::from_millis(600)).is_err());
    }

    #[test]
    fn reads_of_a_shared_layer_by_another_images_container_stay_out_of_the_trace() {
        let (tx, rx) = channel();
        let limits = Limits {
            quiet: Duration::from_millis(300),
            ..Limits::default()
        };
        let recorder = Recorder::start(1024, limits, move |t| tx.send(t).unwrap());
        let image = Digest::sha256(b"good");
        let (base, own, theirs) = (
            Digest::sha256(b"shared base"),
            Digest::sha256(b"good's layer"),
            Digest::sha256(b"another image's layer"),
        );
        recorder.begin(image, vec![base, own]);
        // Another image on the same base (or one that merely names it), and a container of
        // a subset of the image's layers: left out. A process on the host (containerd
        // reading /etc/group through a temporary mount) counts, as the node's own.
        recorder.record(read_by(&[base, theirs], &base, &[9], "/their/start"));
        recorder.record(read_by(&[base], &base, &[7], "/base/only"));
        recorder.record(read(&base, &[8], "/etc/group"));
        std::thread::sleep(Duration::from_millis(30));
        recorder.record(read_by(&[base, own], &base, &[1, 8], "/bin/sh"));
        recorder.record(read_by(&[base, own], &own, &[2], "/app"));
        let trace = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let got: Vec<(Digest, u32)> = trace.entries.iter().map(|e| (e.layer, e.chunk)).collect();
        assert_eq!(
            got,
            [(base, 8), (base, 1), (own, 2)],
            "in time order, once each"
        );
        assert_eq!(trace.files(), ["/etc/group", "/bin/sh", "/app"]);
        assert_eq!(trace.entries[0].at_ms, 0, "times from the first kept read");
        assert!(trace.entries[1].at_ms >= 30);

        // A session only other images' containers read yields no trace at all.
        let quiet = Digest::sha256(b"never started");
        recorder.begin(quiet, vec![base, own]);
        recorder.record(read_by(&[base, theirs], &base, &[3], "/their/start"));
        assert!(rx.recv_timeout(Duration::from_millis(900)).is_err());
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let recorder = Recorder::start(1, Limits::default(), |_| {});
        let layer = Digest::sha256(b"l");
        let started = Instant::now();
        for _ in 0..10_000 {
            recorder.record(read(&layer, &[1], "/x"));
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(recorder.dropped() > 0);
        // Opening sessions never waits for room behind reads (it runs on async workers).
        for i in 0..1_000u32 {
            recorder.begin(Digest::sha256(&i.to_le_bytes()), vec![layer]);
        }
        assert!(recorder.is_recording(&Digest::sha256(&999u32.to_le_bytes())));
    }
}
