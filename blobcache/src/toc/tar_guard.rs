//! A tar stream's metadata entries bounded before the tar parser reads them: a PAX extended
//! header or a GNU long name is held whole in memory by the parser, so one that claims
//! gigabytes would be an allocation the image chose.
//!
//! The guard follows the stream's block structure as it passes through (a 512-byte header,
//! then the entry's data rounded up to whole blocks), so it sees every header the parser will;
//! it reads a PAX header's `size` record, which overrides the next entry's header, to stay in
//! step. It never changes a byte.

use std::io::{self, Read};

use super::limits::MAX_TAR_METADATA;
use crate::{Error, Limit};

const BLOCK: usize = 512;

/// `Read` over a tar stream that fails, naming the limit, at the header of a metadata entry
/// over [`MAX_TAR_METADATA`] bytes.
pub struct TarGuard<R> {
    inner: R,
    state: State,
    header: [u8; BLOCK],
    filled: usize,
    /// Bytes of the current entry's data (and padding) still to pass.
    skip: u64,
    /// The body of a PAX header being passed, to find its `size` record.
    pax: Option<Vec<u8>>,
    /// The size a PAX header gave the next entry.
    next_size: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    /// GNU sparse extension blocks follow the header.
    SparseExtension,
    Data,
}

impl<R> TarGuard<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            state: State::Header,
            header: [0; BLOCK],
            filled: 0,
            skip: 0,
            pax: None,
            next_size: None,
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.state {
                State::Data => {
                    let n = (self.skip.min(bytes.len() as u64)) as usize;
                    if let Some(pax) = &mut self.pax {
                        pax.extend_from_slice(&bytes[..n]);
                    }
                    self.skip -= n as u64;
                    bytes = &bytes[n..];
                    if self.skip == 0 {
                        self.end_of_data();
                    }
                }
                State::Header | State::SparseExtension => {
                    let n = (BLOCK - self.filled).min(bytes.len());
                    self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                    self.filled += n;
                    bytes = &bytes[n..];
                    if self.filled == BLOCK {
                        self.filled = 0;
                        self.block()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn block(&mut self) -> io::Result<()> {
        let h = &self.header;
        if self.state == State::SparseExtension {
            // Each extension block says whether another follows (byte 504).
            if h[504] == 0 {
                self.start_data();
            }
            return Ok(());
        }
        if h.iter().all(|&b| b == 0) {
            // End-of-archive blocks: nothing follows them that the parser reads.
            return Ok(());
        }
        let kind = h[156];
        let header_size = parse_size(&h[124..136])?;
        let size = match kind {
            b'x' | b'g' | b'L' | b'K' => header_size,
            _ => self.next_size.take().unwrap_or(header_size),
        };
        if matches!(kind, b'x' | b'g' | b'L' | b'K') {
            Error::check_limit(
                || format!("Tar metadata entry (type {:?})", kind as char),
                Limit::TarMetadata,
                size,
                MAX_TAR_METADATA,
            )
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        self.pax = (kind == b'x').then(Vec::new);
        self.skip = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if kind == b'S' && h[482] != 0 {
            self.state = State::SparseExtension;
        } else {
            self.start_data();
        }
        Ok(())
    }

    fn start_data(&mut self) {
        if self.skip == 0 {
            self.end_of_data();
        } else {
            self.state = State::Data;
        }
    }

    fn end_of_data(&mut self) {
        self.state = State::Header;
        if let Some(pax) = self.pax.take() {
            self.next_size = pax_size(&pax);
        }
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

/// A header's size field: octal digits (NUL- or space-terminated), or base-256 when the high
/// bit of its first byte is set.
fn parse_size(field: &[u8]) -> io::Result<u64> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "tar header has a bad size field",
        )
    };
    if field[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(u64::from(b)))
                .ok_or_else(bad)?;
        }
        return Ok(n);
    }
    let digits = field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| b != 0 && b != b' ');
    let mut n: u64 = 0;
    for &b in digits {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad());
        }
        n = n
            .checked_mul(8)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(n)
}

/// The `size` record of a PAX header body (`<len> size=<n>\n`), if it has a valid one.
fn pax_size(body: &[u8]) -> Option<u64> {
    let mut rest = body;
    let mut found = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return found;
        }
        let record = &rest[space + 1..len];
        if let Some(value) = record.strip_prefix(b"size=") {
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            found = std::str::from_utf8(value).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64) -> [u8; BLOCK] {
        let mut h = tar::Header::new_gnu();
        h.set_path("name").unwrap();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        *h.as_bytes()
    }

    fn read_all(stream: &[u8], piece: usize) -> io::Result<()> {
        let mut guard = TarGuard::new(stream);
        let mut buf = vec![0; piece];
        while guard.read(&mut buf)? > 0 {}
        Ok(())
    }

    #[test]
    fn a_metadata_entry_over_the_limit_is_refused_at_its_header() {
        let mut stream = header(b'0', 600).to_vec();
        stream.extend_from_slice(&[7u8; 1024]);
        stream.extend_from_slice(&header(b'x', 1 << 40));
        let err = read_all(&stream, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over the limit"), "{err}");
        // Nothing is refused short of it.
        assert!(read_all(&stream[..BLOCK + 1024], 100).is_ok());
        // The converter refuses such a layer with an error, before the parser buffers it.
        let err = crate::toc::convert_layer(&stream[..], Vec::new(), &Default::default())
            .map(|_| ())
            .unwrap_err();
        assert!(
            crate::error_chain(&err).contains("metadata entry size"),
            "{}",
            crate::error_chain(&err)
        );
    }

    #[test]
    fn a_pax_size_is_followed_so_headers_after_a_large_file_are_seen() {
        // A PAX header giving the next entry 2000 bytes while its own header says 0: the
        // guard must skip 2000 (rounded to 2048) to find the oversized long name after it.
        let record = b"13 size=2000\n";
        let mut stream = header(b'x', record.len() as u64).to_vec();
        let mut body = record.to_vec();
        body.resize(BLOCK, 0);
        stream.extend_from_slice(&body);
        stream.extend_from_slice(&header(b'0', 0));
        stream.extend_from_slice(&[1u8; 2048]);
        stream.extend_from_slice(&header(b'L', MAX_TAR_METADATA + 1));
        for piece in [1, 512, 4096] {
            assert!(read_all(&stream, piece).is_err(), "piece {piece}");
        }
        assert_eq!(pax_size(b"13 size=2000\n20 path=some/where\n"), Some(2000));
        assert_eq!(pax_size(b"garbage"), None);
    }

    #[test]
    fn real_tar_streams_pass_untouched() {
        let mut builder = tar::Builder::new(Vec::new());
        let long = "d/".repeat(80) + "file";
        let data = vec![5u8; 70_000];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        builder.append_data(&mut h, &long, &data[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        builder
            .append_pax_extensions([("SCHILY.xattr.user.x", &b"v"[..])])
            .unwrap();
        builder.append_data(&mut h, "x", &b"abc"[..]).unwrap();
        let stream = builder.into_inner().unwrap();
        let mut out = Vec::new();
        TarGuard::new(&stream[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, stream);
        let mut archive = tar::Archive::new(TarGuard::new(&stream[..]));
        assert_eq!(archive.entries().unwrap().count(), 2);
    }
}
