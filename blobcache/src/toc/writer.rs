//! Tar stream in, lazy layer out: cuts the tar into independently decodable zstd frames,
//! records every entry and chunk, and appends the TOC and footer.
//!
//! The tar bytes pass through unchanged: decompressing the output gives exactly the input tar,
//! so the layer's diff_id stays what it was and any runtime can still unpack it. Only where the
//! frame boundaries fall is Brisk's choice. Memory stays at about one chunk whatever the layer
//! size: the stream is read once and written once.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::rc::Rc;

use base64::Engine as _;
use tar::EntryType;

use super::footer::{skippable_header, Footer, TocPosition, TOC_FRAME_MAGIC};
use super::{
    limits, normalize_name, Chunk, Entry, EntryKind, Toc, DEFAULT_CHUNK_SIZE, FORMAT_VERSION,
    MAX_CHUNKS, MAX_ENTRIES,
};
use crate::digest::{Hasher, HashingWriter};
use crate::error::short;
use crate::toc::TocError;
use crate::{Digest, Error, Limit, Result};

/// zstd level for start-up chunks: past it, smaller frames cost far more time (about 14% smaller
/// than level 3 on binaries and bytecode in 256 KiB frames; level 19 gains under 1% more).
pub const DEFAULT_PREFETCH_LEVEL: i32 = 15;

/// Chunk size inside the start-up parts of large files (see `prefetch_chunk_size`): the
/// kernel's default readahead window, what one FUSE read of a mapped binary asks for.
pub const DEFAULT_PREFETCH_CHUNK_SIZE: u32 = 128 * 1024;

/// Files at least this large are sampled for a finer chunk size (see [`Scattered`]); below it
/// a file costs about one chunk however it is read.
const SCATTERED_MIN_FILE: u64 = 1 << 20;
/// How much of a file's start is sampled: its magic, and how well it compresses.
const SAMPLE: u64 = 64 * 1024;
/// Share of the layer's chunk limit that finer chunks may take: a layer of huge data files
/// keeps the layer's chunk size rather than failing at the limit.
const SCATTERED_CHUNK_SHARE: usize = 2;

/// Chunk sizes for large files read in scattered pieces rather than streamed. A page fault in a
/// mapped file makes the kernel read about 128 KiB around it, and each chunk that window
/// touches is fetched whole: in 1 MiB chunks a program paging in a library or looking up parts
/// of a weights file moves several times what it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scattered {
    /// Chunk size for ELF executables and libraries; 0 (the default) keeps the layer's.
    /// Smaller code chunks fetch fewer bytes but cost more round trips and more per-chunk work
    /// from the disk cache: on clang paging in libLLVM over a 20 ms link, 64 KiB chunks moved
    /// 23% fewer bytes than 1 MiB ones and made the lazy start 2.2 times as long.
    pub code_chunk_size: u32,
    /// zstd level for those chunks. Small frames compress worse and a higher level wins it
    /// back: on a 105 MiB libLLVM, 64 KiB frames at level 12 are the size of 1 MiB frames at
    /// level 3, at a quarter of the speed.
    pub code_level: i32,
    /// Chunk size for files that do not compress (weights, archives, media), which small
    /// frames cost nothing; 0 keeps the layer's.
    pub data_chunk_size: u32,
}

pub const DEFAULT_SCATTERED: Scattered = Scattered {
    code_chunk_size: 0,
    code_level: 12,
    data_chunk_size: 32 * 1024,
};

impl Default for Scattered {
    fn default() -> Self {
        DEFAULT_SCATTERED
    }
}

/// How a large file is likely to be read, judged from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Read through, or not at all: the layer's chunk size.
    Stream,
    /// An ELF file: mapped by the loader and paged in wherever the program runs.
    Code,
    /// Bytes that do not compress: usually mapped or read at offsets.
    Data,
}

impl Shape {
    /// ELF by its magic; data when zstd's fastest level saves under a fifth of `sample`.
    fn of(sample: &[u8]) -> Self {
        if sample.starts_with(b"\x7fELF") {
            return Shape::Code;
        }
        match zstd::bulk::compress(sample, 1) {
            Ok(packed) if packed.len() * 5 >= sample.len() * 4 => Shape::Data,
            _ => Shape::Stream,
        }
    }
}

/// Where one large file's content is cut besides every `chunk_size` from its start.
struct Cuts<'a> {
    chunk_size: u64,
    /// Tar ranges a start-up trace read: cut at their edges.
    read: &'a [std::ops::Range<u64>],
    /// Tar ranges listed for prefetch: cut every `hot_chunk_size` inside them.
    hot: &'a [std::ops::Range<u64>],
    hot_chunk_size: u64,
    scattered: &'a Scattered,
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Largest decoded chunk, and the size large files are cut into.
    pub chunk_size: u32,
    /// zstd level for chunk frames.
    pub level: i32,
    /// zstd level for the frames holding what the prefetch list names: every cold start
    /// fetches them before it can run, so they are worth compressing harder, once.
    pub prefetch_level: i32,
    /// Largest chunk holding what the prefetch list names in a large file: a reader waits for
    /// a whole chunk, so smaller ones let a start use the front of its set while the rest is
    /// still streaming in.
    pub prefetch_chunk_size: u32,
    /// Files (layer paths) whose chunks the TOC lists for prefetch, in this order.
    pub prefetch_files: Vec<String>,
    /// For prefetch files whose start read only parts: those byte ranges of the file. Chunks
    /// are cut at their edges and only the chunks holding them are listed. A prefetch file
    /// without an entry here is listed whole.
    pub prefetch_ranges: HashMap<String, Vec<std::ops::Range<u64>>>,
    /// Smaller chunks for large files read in pieces.
    pub scattered: Scattered,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: 3,
            prefetch_level: DEFAULT_PREFETCH_LEVEL,
            prefetch_chunk_size: DEFAULT_PREFETCH_CHUNK_SIZE,
            prefetch_files: Vec::new(),
            prefetch_ranges: HashMap::new(),
            scattered: DEFAULT_SCATTERED,
        }
    }
}

/// What the converter produced; everything a manifest and config need.
#[derive(Clone, Debug)]
pub struct ConvertedLayer {
    /// Digest and size of the converted blob.
    pub digest: Digest,
    pub size: u64,
    /// sha256 of the uncompressed tar: the layer's diff_id.
    pub diff_id: Digest,
    pub tar_size: u64,
    pub toc_digest: Digest,
    pub toc: TocPosition,
    pub chunks: usize,
    pub entries: usize,
    /// Compressed byte ranges of the chunks listed for prefetch, in list order, neighbours
    /// closer than 64 KiB joined (the value of `ANNOTATION_PREFETCH_SPANS`).
    pub prefetch_spans: Vec<std::ops::Range<u64>>,
}

/// Converts the uncompressed tar stream `tar` into a lazy layer written to `out`.
pub fn convert_layer<R: Read, W: Write>(
    tar: R,
    out: W,
    opts: &ConvertOptions,
) -> Result<(ConvertedLayer, W)> {
    let chunk_size = opts.chunk_size.clamp(4096, super::MAX_CHUNK_SIZE as u32) as u64;
    let mut frames = FrameWriter::new(out, chunk_size, opts.level)?;
    if !opts.prefetch_files.is_empty() && opts.prefetch_level != opts.level {
        frames.hot_compressor =
            Some(compressor(opts.prefetch_level).map_err(|e| Error::Toc(TocError::Write(e)))?);
    }
    if opts.scattered.code_chunk_size != 0 && opts.scattered.code_level != opts.level {
        frames.code_compressor = Some(
            compressor(opts.scattered.code_level).map_err(|e| Error::Toc(TocError::Write(e)))?,
        );
    }
    let frames = Rc::new(RefCell::new(frames));
    let prefetch: std::collections::HashSet<&str> =
        opts.prefetch_files.iter().map(String::as_str).collect();
    let tee = Tee {
        inner: tar,
        frames: frames.clone(),
    };
    let mut archive = tar::Archive::new(super::TarGuard::new(tee));
    let mut entries = EntryTable::new(MAX_ENTRIES);
    for entry in archive.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let Some(toc_entry) = toc_entry(&mut entry)? else {
            continue;
        };
        limits::check_entry(&toc_entry, &|| {
            format!("Tar entry {:?}", short(&toc_entry.name))
        })?;
        if let Some(range) = toc_entry.tar_range() {
            let read = opts
                .prefetch_ranges
                .get(&toc_entry.name)
                .map(|r| within(&range, r))
                .unwrap_or_default();
            let hot = match prefetch.contains(toc_entry.name.as_str()) {
                false => Vec::new(),
                true if read.is_empty() => vec![range.clone()],
                true => read.clone(),
            };
            let len = range.end - range.start;
            if len >= SCATTERED_MIN_FILE && len >= chunk_size / 4 {
                // The file's first bytes, read through the tee, wait in the frame buffer for
                // `plan_content` to judge them.
                frames
                    .borrow_mut()
                    .cut_at(range.start)
                    .map_err(write_error)?;
                let sample = SAMPLE.min(chunk_size / 2).min(len);
                io::copy(&mut (&mut entry).take(sample), &mut io::sink()).map_err(tar_error)?;
            }
            let mut frames = frames.borrow_mut();
            frames.hot.extend(hot.iter().cloned());
            let cuts = Cuts {
                chunk_size,
                read: &read,
                hot: &hot,
                hot_chunk_size: (opts.prefetch_chunk_size as u64).clamp(4096, chunk_size),
                scattered: &opts.scattered,
            };
            frames
                .plan_content(entry.raw_header_position(), range, &cuts)
                .map_err(write_error)?;
        }
        entries.insert(toc_entry)?;
        // Dropping the entry makes the archive read past its content, through the tee.
    }
    // The archive stops at the end-of-archive marker; the rest (the second zero block, record
    // padding) belongs to the tar stream as well and must pass through unchanged.
    let mut tee = archive.into_inner();
    io::copy(&mut tee, &mut io::sink()).map_err(tar_error)?;
    drop(tee);
    let frames = Rc::try_unwrap(frames)
        .ok()
        .expect("the tee is gone")
        .into_inner();
    frames.finish(
        entries.into_vec(),
        &opts.prefetch_files,
        &opts.prefetch_ranges,
    )
}

/// A failure reading the tar stream; a limit the frame writer hit while the tar parser read
/// through it comes back as itself, not as a tar error.
fn tar_error(err: io::Error) -> Error {
    limit_error(err).unwrap_or_else(|e| Error::Toc(TocError::Tar(e)))
}

fn write_error(err: io::Error) -> Error {
    limit_error(err).unwrap_or_else(|e| Error::Toc(TocError::Write(e)))
}

/// The crate error inside `err`, if the frame writer put one there (its writes run inside the
/// tar parser's reads, which only pass `io::Error`s on).
fn limit_error(err: io::Error) -> std::result::Result<Error, io::Error> {
    if !err.get_ref().is_some_and(|e| e.is::<Error>()) {
        return Err(err);
    }
    Ok(*err
        .into_inner()
        .expect("checked above")
        .downcast::<Error>()
        .expect("checked above"))
}

/// File-relative `ranges` as tar offsets inside `content`, clipped to it.
fn within(
    content: &std::ops::Range<u64>,
    ranges: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    ranges
        .iter()
        .map(|r| {
            (content.start + r.start).min(content.end)..(content.start + r.end).min(content.end)
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// Passes everything the tar parser reads on to the frame writer, so the output holds the
/// input's bytes exactly, including headers and padding the parser does not expose.
struct Tee<R, W: Write> {
    inner: R,
    frames: Rc<RefCell<FrameWriter<W>>>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.frames.borrow_mut().write(&buf[..n])?;
        Ok(n)
    }
}

/// Cuts the tar stream into frames. Bytes wait in `buf` until their frame is complete, so a
/// boundary can still be placed before bytes that were already seen (a tar header read before
/// the parser knew which file follows it).
/// A frame compressor at `level`: content size in every frame header, no zstd checksum (chunks
/// are verified by sha256; the checksum would only cost time).
fn compressor(level: i32) -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.include_checksum(false)?;
    c.include_contentsize(true)?;
    Ok(c)
}

struct FrameWriter<W: Write> {
    out: HashingWriter<W>,
    compressor: zstd::bulk::Compressor<'static>,
    /// For frames that hold start-up bytes (`hot`), when their level differs.
    hot_compressor: Option<zstd::bulk::Compressor<'static>>,
    /// For frames of ELF files in finer chunks, when their level differs.
    code_compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Tar ranges of start-up bytes not yet behind the current frame, ascending.
    hot: Vec<std::ops::Range<u64>>,
    /// Decoded bytes of the frame being built; never longer than `chunk_size`.
    buf: Vec<u8>,
    compressed: Vec<u8>,
    /// Tar offset of `buf[0]`.
    frame_start: u64,
    /// Boundaries still ahead in the stream, ascending: the end of the current large file,
    /// and the edges of the parts of it a start-up trace read.
    planned_cuts: std::collections::VecDeque<u64>,
    chunk_size: u64,
    /// The chunk size and shape of the large file being written, until its end.
    file_chunk_size: u64,
    file_shape: Shape,
    chunks: Vec<Chunk>,
    /// `MAX_CHUNKS`, as a field so that tests can reach it without a gigabyte of tar.
    max_chunks: usize,
    diff_id: Hasher,
}

impl<W: Write> FrameWriter<W> {
    fn new(out: W, chunk_size: u64, level: i32) -> Result<Self> {
        Ok(Self {
            out: HashingWriter::new(out),
            compressor: compressor(level).map_err(|e| Error::Toc(TocError::Write(e)))?,
            hot_compressor: None,
            code_compressor: None,
            hot: Vec::new(),
            buf: Vec::with_capacity(chunk_size as usize),
            compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk_size as usize)),
            frame_start: 0,
            planned_cuts: std::collections::VecDeque::new(),
            chunk_size,
            file_chunk_size: chunk_size,
            file_shape: Shape::Stream,
            chunks: Vec::new(),
            max_chunks: MAX_CHUNKS,
            diff_id: Hasher::new(),
        })
    }

    fn pos(&self) -> u64 {
        self.frame_start + self.buf.len() as u64
    }

    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.diff_id.update(data);
        while !data.is_empty() {
            let n = ((self.limit() - self.pos()) as usize).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.flush_complete()?;
        }
        Ok(())
    }

    /// Where the current frame ends: one chunk past its start, or the next planned cut.
    fn limit(&self) -> u64 {
        let limit = self.frame_start + self.file_chunk_size;
        match self.planned_cuts.front() {
            Some(&cut) if cut < limit => cut,
            _ => limit,
        }
    }

    /// Writes every frame that the buffer completes; after a large file's last one, the
    /// layer's chunk size and level apply again.
    fn flush_complete(&mut self) -> io::Result<()> {
        loop {
            let limit = self.limit();
            if self.pos() < limit {
                return Ok(());
            }
            self.flush_frame((limit - self.frame_start) as usize)?;
            if self.planned_cuts.front() == Some(&limit) {
                self.planned_cuts.pop_front();
                if self.planned_cuts.is_empty() {
                    self.file_chunk_size = self.chunk_size;
                    self.file_shape = Shape::Stream;
                }
            }
        }
    }

    /// Ends the current frame at tar offset `at`, which may lie in the buffered past.
    fn cut_at(&mut self, at: u64) -> io::Result<()> {
        if at > self.frame_start && at <= self.pos() {
            self.flush_frame((at - self.frame_start) as usize)?;
        }
        Ok(())
    }

    /// Decides the boundaries around one file's content.
    ///
    /// A large file starts a frame and is cut every `chunk_size` bytes from its own start, so
    /// the same content yields the same chunks in any layer or image (the disk cache stores it
    /// once). Its chunk size depends on its shape, judged from its first bytes, which the
    /// buffer holds already; that is the same for the same content too. Small files are packed
    /// with their neighbours, but never split across two frames when a fresh frame would hold
    /// them: reading a small file costs one chunk.
    fn plan_content(
        &mut self,
        header: u64,
        content: std::ops::Range<u64>,
        plan: &Cuts<'_>,
    ) -> io::Result<()> {
        let chunk_size = plan.chunk_size;
        let len = content.end - content.start;
        if len >= chunk_size / 4 {
            self.cut_at(content.start)?;
            // The parts a start reads become chunks of their own, so prefetch fetches them
            // without the rest of the file; inside them chunks are smaller.
            let mut cuts: Vec<u64> = plan.read.iter().flat_map(|r| [r.start, r.end]).collect();
            for hot in plan.hot {
                cuts.extend((hot.start..hot.end).step_by(plan.hot_chunk_size as usize));
            }
            cuts.retain(|&c| c > content.start && c < content.end);
            cuts.push(content.end);
            cuts.sort_unstable();
            cuts.dedup();
            self.planned_cuts = cuts.into();
            self.plan_shape(content, plan.scattered)?;
        } else if content.end - self.frame_start > chunk_size {
            self.cut_at(header)?;
        }
        Ok(())
    }

    /// Chooses the chunk size of the large file whose content starts the buffer, and cuts what
    /// the buffer holds of it already.
    fn plan_shape(
        &mut self,
        content: std::ops::Range<u64>,
        scattered: &Scattered,
    ) -> io::Result<()> {
        let len = content.end - content.start;
        if len < SCATTERED_MIN_FILE || self.frame_start != content.start {
            return Ok(());
        }
        let sampled = (self.buf.len() as u64).min(len) as usize;
        let shape = Shape::of(&self.buf[..sampled]);
        let size = match shape {
            Shape::Stream => 0,
            Shape::Code => scattered.code_chunk_size,
            Shape::Data => scattered.data_chunk_size,
        };
        if size == 0 {
            return Ok(());
        }
        let size = u64::from(size).clamp(4096, self.chunk_size);
        let chunks = self.chunks.len() as u64 + len.div_ceil(size);
        if chunks > (self.max_chunks / SCATTERED_CHUNK_SHARE) as u64 {
            return Ok(());
        }
        self.file_chunk_size = size;
        self.file_shape = shape;
        self.flush_complete()
    }

    fn flush_frame(&mut self, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.chunks.len() >= self.max_chunks {
            return Err(io::Error::other(Error::OverLimit {
                what: "Layer".into(),
                limit: Limit::Chunks,
                value: self.chunks.len() as u64 + 1,
                max: self.max_chunks as u64,
            }));
        }
        let data = &self.buf[..len];
        self.compressed.clear();
        let (start, end) = (self.frame_start, self.frame_start + len as u64);
        self.hot.retain(|r| r.end > start);
        let hot = self.hot.iter().any(|r| r.start < end && r.end > start);
        let compressor = match (&mut self.hot_compressor, &mut self.code_compressor) {
            (Some(c), _) if hot => c,
            (_, Some(c)) if self.file_shape == Shape::Code => c,
            _ => &mut self.compressor,
        };
        compressor.compress_to_buffer(data, &mut self.compressed)?;
        self.out.write_all(&self.compressed)?;
        self.chunks.push(Chunk {
            codec: Default::default(),
            offset: self.out.written() - self.compressed.len() as u64,
            size: self.compressed.len() as u64,
            tar_offset: self.frame_start,
            tar_size: len as u64,
            digest: Digest::sha256(data),
        });
        self.buf.drain(..len);
        self.frame_start += len as u64;
        Ok(())
    }

    fn finish(
        mut self,
        entries: Vec<Entry>,
        prefetch_files: &[String],
        prefetch_ranges: &HashMap<String, Vec<std::ops::Range<u64>>>,
    ) -> Result<(ConvertedLayer, W)> {
        self.flush_frame(self.buf.len()).map_err(write_error)?;
        let toc = Toc {
            format: Default::default(),
            version: FORMAT_VERSION,
            tar_size: self.frame_start,
            chunks: self.chunks,
            entries,
            prefetch: Vec::new(),
        };
        let mut toc = toc;
        toc.prefetch = prefetch_chunks(&toc, prefetch_files, prefetch_ranges);
        let (payload, uncompressed_size) = toc.encode()?;
        let out = &mut self.out;
        out.write_all(
            &skippable_header(TOC_FRAME_MAGIC, payload.len())
                .map_err(|e| Error::Toc(TocError::Write(e)))?,
        )
        .map_err(|e| Error::Toc(TocError::Write(e)))?;
        let position = TocPosition {
            offset: out.written(),
            size: payload.len() as u64,
            uncompressed_size,
            version: FORMAT_VERSION,
        };
        out.write_all(&payload)
            .map_err(|e| Error::Toc(TocError::Write(e)))?;
        out.write_all(
            &Footer {
                toc: position,
                flags: 0,
            }
            .encode(),
        )
        .map_err(|e| Error::Toc(TocError::Write(e)))?;
        out.flush().map_err(|e| Error::Toc(TocError::Write(e)))?;
        let (digest, size, inner) = self.out.finish();
        let layer = ConvertedLayer {
            digest,
            size,
            diff_id: self.diff_id.finish(),
            tar_size: toc.tar_size,
            toc_digest: Digest::sha256(&payload),
            toc: position,
            chunks: toc.chunks.len(),
            entries: toc.entries.len(),
            prefetch_spans: prefetch_spans(&toc),
        };
        Ok((layer, inner))
    }
}

/// The compressed ranges of `toc`'s prefetch list: runs of listed chunks that follow each
/// other in the blob (gaps under 64 KiB are taken along), at most `MAX_PREFETCH_SPANS`.
fn prefetch_spans(toc: &Toc) -> Vec<std::ops::Range<u64>> {
    const GAP: u64 = 64 * 1024;
    let mut spans: Vec<std::ops::Range<u64>> = Vec::new();
    for chunk in toc
        .prefetch
        .iter()
        .filter_map(|&i| toc.chunks.get(i as usize))
    {
        let range = chunk.offset..chunk.offset + chunk.size;
        let full = spans.len() == super::MAX_PREFETCH_SPANS;
        match spans.last_mut() {
            Some(last) if range.start >= last.end && range.start - last.end <= GAP => {
                last.end = range.end
            }
            _ if full => break,
            _ => spans.push(range),
        }
    }
    spans
}

/// The chunks holding `files`' contents (only their read parts where `ranges` has them), in
/// the files' order, each chunk once.
fn prefetch_chunks(
    toc: &Toc,
    files: &[String],
    ranges: &HashMap<String, Vec<std::ops::Range<u64>>>,
) -> Vec<u32> {
    let by_name: std::collections::HashMap<&str, &Entry> =
        toc.entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for f in files {
        let Some(content) = by_name.get(f.as_str()).and_then(|e| e.tar_range()) else {
            continue;
        };
        let parts = match ranges.get(f) {
            Some(r) => within(&content, r),
            None => vec![content],
        };
        for part in parts {
            for i in toc.chunks_for(part) {
                if seen.insert(i) {
                    out.push(i as u32);
                }
            }
        }
    }
    out
}

/// Entries in tar order, where a later entry of the same name replaces the earlier one (what
/// `tar -x` and containerd's unpacker do with duplicates).
pub(super) struct EntryTable {
    entries: Vec<Option<Entry>>,
    by_name: HashMap<(bool, String), usize>,
    /// Tar entries taken at most (`MAX_ENTRIES`; a field so tests can reach it). Replaced
    /// duplicates count too: their slots are held until the end.
    max: usize,
}

impl EntryTable {
    pub(super) fn new(max: usize) -> Self {
        Self {
            entries: Vec::new(),
            by_name: HashMap::new(),
            max,
        }
    }

    pub(super) fn insert(&mut self, entry: Entry) -> Result<()> {
        Error::check_limit(
            || "Layer".into(),
            Limit::Entries,
            self.entries.len() as u64 + 1,
            self.max as u64,
        )?;
        if entry.kind == EntryKind::Hardlink {
            let target = entry.link.clone().unwrap_or_default();
            let ok = self
                .by_name
                .get(&(false, target.clone()))
                .and_then(|&i| self.entries[i].as_ref())
                .is_some_and(|t| {
                    !matches!(
                        t.kind,
                        EntryKind::Dir | EntryKind::Whiteout | EntryKind::Opaque
                    )
                });
            if !ok {
                return Err(Error::Toc(TocError::DanglingHardlink {
                    name: entry.name,
                    target,
                }));
            }
        }
        // Whiteouts and opaque markers name paths of lower layers; they live in their own
        // namespace so a marker and a real entry of one name do not replace each other.
        let marker = matches!(entry.kind, EntryKind::Whiteout | EntryKind::Opaque);
        let key = (marker, entry.name.clone());
        if let Some(old) = self.by_name.insert(key, self.entries.len()) {
            self.entries[old] = None;
        }
        self.entries.push(Some(entry));
        Ok(())
    }

    pub(super) fn into_vec(self) -> Vec<Entry> {
        self.entries.into_iter().flatten().collect()
    }
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_NAME: &str = ".wh..wh..opq";

/// The TOC entry for one tar entry; `None` for entries that are tar bookkeeping only.
fn toc_entry<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Entry>> {
    let raw_name = utf8(entry.path_bytes().into_owned(), "")?;
    let header = entry.header();
    let kind = match header.entry_type() {
        EntryType::Regular | EntryType::Continuous => EntryKind::Reg,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Char => EntryKind::Char,
        EntryType::Block => EntryKind::Block,
        EntryType::Fifo => EntryKind::Fifo,
        EntryType::XGlobalHeader => return Ok(None),
        EntryType::GNUSparse => {
            return Err(Error::Toc(TocError::UnsupportedEntry {
                name: raw_name,
                reason: "GNU sparse files are not supported",
            }))
        }
        _ => {
            return Err(Error::Toc(TocError::UnsupportedEntry {
                name: raw_name,
                reason: "unknown tar entry type",
            }))
        }
    };
    let Some((kind, name)) = classify(&raw_name, kind)? else {
        return Ok(None);
    };
    let mut toc = Entry {
        kind,
        name,
        mode: header.mode().map_err(|e| Error::Toc(TocError::Tar(e)))? & 0o7777,
        uid: header.uid().map_err(|e| Error::Toc(TocError::Tar(e)))?,
        gid: header.gid().map_err(|e| Error::Toc(TocError::Tar(e)))?,
        size: 0,
        mtime: header.mtime().map_err(|e| Error::Toc(TocError::Tar(e)))? as i64,
        link: None,
        offset: None,
        dev_major: None,
        dev_minor: None,
        xattrs: BTreeMap::new(),
    };
    match kind {
        EntryKind::Reg => {
            toc.size = entry.size();
            if toc.size > 0 {
                toc.offset = Some(entry.raw_file_position());
            }
        }
        EntryKind::Symlink | EntryKind::Hardlink => {
            let target = entry
                .link_name_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default();
            let target = utf8(target, &raw_name)?;
            toc.link = Some(if kind == EntryKind::Hardlink {
                normalize_name(&target)?
            } else {
                target
            });
        }
        EntryKind::Char | EntryKind::Block => {
            toc.dev_major = header
                .device_major()
                .map_err(|e| Error::Toc(TocError::Tar(e)))?;
            toc.dev_minor = header
                .device_minor()
                .map_err(|e| Error::Toc(TocError::Tar(e)))?;
        }
        _ => {}
    }
    apply_pax(entry, &mut toc)?;
    Ok(Some(toc))
}

/// An entry's place in the layer from its raw tar name: the normalized name, with whiteout
/// and opaque markers turned into the path they act on; `None` for aufs bookkeeping. Shared
/// by every reader of a tar's names (the converter, and the TOCs of other formats).
pub(super) fn classify(raw_name: &str, kind: EntryKind) -> Result<Option<(EntryKind, String)>> {
    let mut name = normalize_name(raw_name)?;
    if name.is_empty() && kind != EntryKind::Dir {
        return Err(Error::Toc(TocError::UnsupportedEntry {
            name: raw_name.to_owned(),
            reason: "only a directory can be the root",
        }));
    }
    let (parent, base) = match name.rfind('/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => ("", name.as_str()),
    };
    let mut kind = kind;
    if base == OPAQUE_NAME {
        name = parent.to_owned();
        kind = EntryKind::Opaque;
    } else if base.starts_with(".wh..wh.") {
        // aufs bookkeeping (hardlink stash dirs); it never describes image content.
        return Ok(None);
    } else if let Some(deleted) = base.strip_prefix(WHITEOUT_PREFIX) {
        name = if parent.is_empty() {
            deleted.to_owned()
        } else {
            format!("{parent}/{deleted}")
        };
        kind = EntryKind::Whiteout;
    }
    Ok(Some((kind, name)))
}

/// PAX records override the ustar header's numeric fields and carry xattrs.
fn apply_pax<R: Read>(entry: &mut tar::Entry<'_, R>, toc: &mut Entry) -> Result<()> {
    let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| Error::Toc(TocError::Tar(e)))?
    else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext.map_err(|e| Error::Toc(TocError::Tar(e)))?;
        let Ok(key) = ext.key() else { continue };
        let value = ext.value_bytes();
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
        };
        match key {
            "uid" => toc.uid = number().unwrap_or(toc.uid as i64) as u64,
            "gid" => toc.gid = number().unwrap_or(toc.gid as i64) as u64,
            "mtime" => toc.mtime = number().unwrap_or(toc.mtime),
            _ => {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    toc.xattrs.insert(
                        name.to_owned(),
                        base64::engine::general_purpose::STANDARD.encode(value),
                    );
                }
            }
        }
    }
    Ok(())
}

fn utf8(bytes: Vec<u8>, context: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        Error::Toc(TocError::UnsupportedEntry {
            name: if context.is_empty() {
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            } else {
                context.to_owned()
            },
            reason: "names and link targets must be UTF-8",
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::TarBuilder;
    use super::*;

    fn limit_of(err: Error) -> (Limit, u64, u64) {
        match err {
            Error::OverLimit {
                limit, value, max, ..
            } => (limit, value, max),
            other => panic!("expected a limit error, got {other}"),
        }
    }

    fn entry(name: &str) -> Entry {
        Entry {
            kind: EntryKind::Reg,
            name: name.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: None,
            offset: None,
            dev_major: None,
            dev_minor: None,
            xattrs: BTreeMap::new(),
        }
    }

    #[test]
    fn the_entry_table_stops_at_its_limit_duplicates_included() {
        let mut table = EntryTable::new(3);
        for name in ["a", "b", "a"] {
            table.insert(entry(name)).unwrap();
        }
        let err = table.insert(entry("c")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Layer: entry count 4 is over the limit of 3"
        );
        assert_eq!(limit_of(err), (Limit::Entries, 4, 3));
        assert_eq!(MAX_ENTRIES, 1 << 19);
    }

    #[test]
    fn the_frame_writer_stops_at_the_chunk_limit_and_the_limit_comes_back_as_itself() {
        let mut frames = FrameWriter::new(Vec::new(), 4096, 1).unwrap();
        frames.max_chunks = 2;
        frames.write(&[1u8; 8192]).unwrap();
        let err = frames.write(&[2u8; 4096]).unwrap_err();
        assert_eq!(limit_of(write_error(err)), (Limit::Chunks, 3, 2));
        // Through the tar parser, which only passes `io::Error`s on: a plain failure stays a
        // tar error.
        let cut = TarBuilder::new().file("f", &[0u8; 10_000]).finish();
        let err = convert_layer(&cut[..700], Vec::new(), &ConvertOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Toc(TocError::Tar(_))), "{err}");
    }

    #[test]
    fn finer_chunks_give_way_when_they_would_take_over_half_the_chunk_limit() {
        let chunk_size = 1 << 20;
        let len = 2u64 << 20;
        let weights = super::super::tests::noise(len as usize, 3);
        let plan = |max_chunks: usize| -> Vec<u64> {
            let mut frames = FrameWriter::new(Vec::new(), chunk_size, 3).unwrap();
            frames.max_chunks = max_chunks;
            frames.write(&weights[..SAMPLE as usize]).unwrap();
            let cuts = Cuts {
                chunk_size,
                read: &[],
                hot: &[],
                hot_chunk_size: chunk_size,
                scattered: &DEFAULT_SCATTERED,
            };
            frames.plan_content(0, 0..len, &cuts).unwrap();
            frames.write(&weights[SAMPLE as usize..]).unwrap();
            frames.chunks.iter().map(|c| c.tar_size).collect()
        };
        let fine = u64::from(DEFAULT_SCATTERED.data_chunk_size);
        assert_eq!(plan(128), vec![fine; (len / fine) as usize]);
        assert_eq!(plan(127), vec![chunk_size; 2]);
    }
}
