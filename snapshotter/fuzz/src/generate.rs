//! A layer from fuzzer bytes: a TOC (and usually the tar stream its chunks were cut from)
//! shaped to reach the inode table's corner cases rather than die in JSON syntax.
//!
//! Names come from a small pool of awkward components (whiteout prefixes, `..`, non-ASCII,
//! NAME_MAX and one past it) and from the entries made so far: duplicates, children of
//! earlier names (files under files), their parents, paths thousands of directories deep and
//! unnormalized spellings. Links name earlier entries, their parents, nothing, or themselves;
//! sizes, offsets, ids and times include the extremes. Much of what comes out fails
//! `Toc::validate`, as it should; the rest is what a hostile but well-formed TOC can hold.

use std::collections::BTreeMap;

use arbitrary::{Result, Unstructured};
use base64::Engine as _;
use brisk_blobcache::toc::{Chunk, Entry, EntryKind, Toc, FORMAT_VERSION, MAX_CHUNK_SIZE};
use brisk_blobcache::Digest;

/// A generated layer: its TOC, and the tar stream when the chunks' digests are of real bytes.
pub struct Layer {
    pub toc: Toc,
    pub tar: Option<Vec<u8>>,
}

pub fn layer(u: &mut Unstructured) -> Result<Layer> {
    let (chunks, tar) = if u.ratio(3, 4)? {
        let (chunks, tar) = real_chunks(u)?;
        (chunks, Some(tar))
    } else {
        (claimed_chunks(u)?, None)
    };
    let mut tar_size = chunks
        .iter()
        .map(|c| c.tar_size)
        .fold(0u64, u64::saturating_add);
    if u.ratio(1, 64)? {
        tar_size = tar_size.wrapping_add(1);
    }
    let mut entries: Vec<Entry> = Vec::new();
    let count = if u.ratio(1, 32)? {
        u.int_in_range(100..=600)?
    } else {
        u.int_in_range(0..=40)?
    };
    for _ in 0..count {
        if u.is_empty() {
            break;
        }
        let e = entry(u, &entries, tar_size)?;
        entries.push(e);
    }
    let mut prefetch = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        prefetch.push(u.int_in_range(0..=chunks.len() as u32)?);
    }
    let version = if u.ratio(1, 64)? {
        FORMAT_VERSION + 1
    } else {
        FORMAT_VERSION
    };
    Ok(Layer {
        toc: Toc {
            format: Default::default(),
            version,
            tar_size,
            chunks,
            entries,
            prefetch,
        },
        tar,
    })
}

/// The byte at `pos` of a generated tar stream: never the same at nearby offsets, so a read
/// cut one byte off shows.
fn tar_byte(pos: usize) -> u8 {
    (pos.wrapping_mul(0x9E37_79B1) >> 11) as u8 ^ pos as u8
}

/// Up to 8 KiB of tar stream cut into up to 8 chunks, with the digests of their bytes.
fn real_chunks(u: &mut Unstructured) -> Result<(Vec<Chunk>, Vec<u8>)> {
    let len = u.int_in_range(0..=8192usize)?;
    let tar: Vec<u8> = (0..len).map(tar_byte).collect();
    let mut cuts = vec![0, len];
    if len > 1 {
        for _ in 0..u.int_in_range(0..=7)? {
            cuts.push(u.int_in_range(1..=len - 1)?);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut chunks = Vec::new();
    let mut offset = 0;
    for pair in cuts.windows(2) {
        let size = u.int_in_range(1..=4096u64)?;
        chunks.push(Chunk {
            codec: Default::default(),
            offset,
            size,
            tar_offset: pair[0] as u64,
            tar_size: (pair[1] - pair[0]) as u64,
            digest: Digest::sha256(&tar[pair[0]..pair[1]]),
        });
        offset += size;
    }
    Ok((chunks, tar))
}

/// Chunks with sizes at and past the limits and digests of nothing; mostly tiling.
fn claimed_chunks(u: &mut Unstructured) -> Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    let (mut offset, mut tar_offset) = (0u64, 0u64);
    for _ in 0..u.int_in_range(0..=6)? {
        let tar_size = pick(
            u,
            &[1, 511, 4096, 1 << 20, MAX_CHUNK_SIZE, MAX_CHUNK_SIZE + 1, 0],
        )?;
        let size = pick(u, &[1, 100, u64::MAX / 2, u64::MAX])?;
        let skew = u64::from(u.ratio(1, 32)?);
        chunks.push(Chunk {
            codec: Default::default(),
            offset: offset.wrapping_add(skew),
            size,
            tar_offset,
            tar_size,
            digest: Digest::from_bytes(u.arbitrary()?),
        });
        offset = offset.wrapping_add(size);
        tar_offset = tar_offset.wrapping_add(tar_size);
    }
    Ok(chunks)
}

fn entry(u: &mut Unstructured, earlier: &[Entry], tar_size: u64) -> Result<Entry> {
    use EntryKind::*;
    let kind = *u.choose(&[
        Reg, Reg, Reg, Dir, Dir, Symlink, Hardlink, Hardlink, Whiteout, Whiteout, Opaque, Char,
        Block, Fifo,
    ])?;
    let name = name(u, earlier)?;
    let (size, offset) = content(u, kind, tar_size)?;
    let link = if matches!(kind, Symlink | Hardlink) || u.ratio(1, 16)? {
        link(u, earlier, &name)?
    } else {
        None
    };
    let mut xattrs = BTreeMap::new();
    let count = if u.ratio(1, 32)? {
        u.int_in_range(64..=256)?
    } else {
        u.int_in_range(0..=3)?
    };
    for _ in 0..count {
        let key = match u.int_in_range(0..=6)? {
            0 => "user.a".to_owned(),
            1 => "user.b".to_owned(),
            2 => "trusted.overlay.opaque".to_owned(),
            3 => "security.capability".to_owned(),
            4 => String::new(),
            _ => short(u)?,
        };
        let value = match u.int_in_range(0..=7)? {
            0 => "@@not base64".to_owned(),
            1 => "dg=".to_owned(),
            _ => {
                let len = u.int_in_range(0..=32)?;
                base64::engine::general_purpose::STANDARD.encode(u.bytes(len)?)
            }
        };
        xattrs.insert(key, value);
    }
    Ok(Entry {
        kind,
        name,
        mode: pick(u, &[0o644, 0o755, 0o4755, 0o1777, 0, u32::MAX.into()])? as u32,
        uid: pick(
            u,
            &[0, 1000, u32::MAX.into(), u64::from(u32::MAX) + 1, u64::MAX],
        )?,
        gid: pick(u, &[0, 1000, u32::MAX.into(), u64::MAX])?,
        mtime: *u.choose(&[0, 1_700_000_000, -1, i64::MIN, i64::MAX])?,
        size,
        offset,
        link,
        dev_major: u.arbitrary()?,
        dev_minor: u.arbitrary()?,
        xattrs,
    })
}

/// One of `values`, or now and then any value.
fn pick(u: &mut Unstructured, values: &[u64]) -> Result<u64> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    u.choose(values).copied()
}

/// A short arbitrary string, at most 16 bytes.
fn short(u: &mut Unstructured) -> Result<String> {
    let s: &str = u.arbitrary()?;
    Ok(s.chars().take(16).collect())
}

const COMPONENTS: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "x",
    "dir",
    ".wh.a",
    ".wh..wh..opq",
    ".wh.",
    ".wh..wh.plnk",
    "..",
    ".",
    "é",
    "名前",
    "a b",
    "-",
];

fn component(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=19)? {
        0 => "n".repeat(255),
        1 => "n".repeat(256),
        2 => short(u)?,
        _ => (*u.choose(COMPONENTS)?).to_owned(),
    })
}

fn path(u: &mut Unstructured) -> Result<String> {
    let depth = u.int_in_range(0..=4)?;
    let parts = (0..depth)
        .map(|_| component(u))
        .collect::<Result<Vec<_>>>()?;
    Ok(parts.join("/"))
}

fn name(u: &mut Unstructured, earlier: &[Entry]) -> Result<String> {
    let some = |u: &mut Unstructured| -> Result<Option<String>> {
        Ok(if earlier.is_empty() {
            None
        } else {
            Some(u.choose(earlier)?.name.clone())
        })
    };
    Ok(match u.int_in_range(0..=15)? {
        // A duplicate of an earlier name.
        0 | 1 => some(u)?.unwrap_or_default(),
        // Under an earlier name, which may be a file.
        2..=4 => match some(u)? {
            Some(n) if !n.is_empty() => format!("{n}/{}", component(u)?),
            _ => component(u)?,
        },
        // The parent of an earlier name.
        5 => some(u)?
            .and_then(|n| n.rsplit_once('/').map(|(p, _)| p.to_owned()))
            .unwrap_or_default(),
        // Deep: up to a little past the 4096-byte path that the TOC limit allows.
        6 => {
            let depth = u.int_in_range(1..=2100)?;
            format!("{}{}", "d/".repeat(depth), component(u)?)
        }
        // Unnormalized spellings, which validation refuses.
        7 => {
            let p = path(u)?;
            (*u.choose(&[
                format!("/{p}"),
                format!("./{p}"),
                format!("{p}/"),
                format!("a//{p}"),
                format!("{p}/../x"),
            ])?)
            .clone()
        }
        _ => path(u)?,
    })
}

/// A size and content offset: mostly none or inside the tar stream, sometimes impossible.
fn content(u: &mut Unstructured, kind: EntryKind, tar_size: u64) -> Result<(u64, Option<u64>)> {
    if kind != EntryKind::Reg && !u.ratio(1, 16)? {
        return Ok((0, None));
    }
    Ok(match u.int_in_range(0..=9)? {
        0 | 1 => (0, None),
        2 if tar_size > 0 => (tar_size, Some(0)),
        3 => (
            *u.choose(&[1, u64::MAX])?,
            Some(*u.choose(&[u64::MAX, tar_size])?),
        ),
        4 => (u.int_in_range(1..=16)?, None),
        _ if tar_size > 0 => {
            let offset = u.int_in_range(0..=tar_size - 1)?;
            (u.int_in_range(1..=tar_size - offset)?, Some(offset))
        }
        _ => (0, None),
    })
}

fn link(u: &mut Unstructured, earlier: &[Entry], own: &str) -> Result<Option<String>> {
    let earlier_name = |u: &mut Unstructured| -> Result<String> {
        Ok(if earlier.is_empty() {
            String::new()
        } else {
            u.choose(earlier)?.name.clone()
        })
    };
    Ok(match u.int_in_range(0..=9)? {
        0 => None,
        1 => Some(own.to_owned()),
        2 => Some(path(u)?),
        3 => Some(format!("/{}", earlier_name(u)?)),
        4 => Some(
            earlier_name(u)?
                .rsplit_once('/')
                .map(|(p, _)| p.to_owned())
                .unwrap_or_default(),
        ),
        _ => Some(earlier_name(u)?),
    })
}
