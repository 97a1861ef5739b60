use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

use super::*;
use crate::chunk::{ChunkRef, Codec, VerifiedChunk};
use crate::toc::EntryKind;
use crate::{Digest, Result};

/// What the test writer puts in a layer, in order.
pub(crate) enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    /// `.prefetch.landmark`: the files before it are the start-up set.
    Landmark,
}

/// An eStargz blob as its writers lay one out (every chunk starts a gzip member; tar headers
/// and padding ride in the member before; a TOC member holding `stargz.index.json`; the
/// 51-byte footer), with the TOC JSON the blob's TOC member holds.
pub(crate) struct Written {
    pub blob: Vec<u8>,
    pub json: Vec<u8>,
    pub toc_offset: u64,
}

pub(crate) fn write(items: &[Item<'_>], chunk_size: usize) -> Written {
    write_with(items, chunk_size, |_| {})
}

/// `write`, with the TOC JSON edited by `lie` before it is stored (digests stay those of what
/// is stored, as a hostile writer would make them).
pub(crate) fn write_with(
    items: &[Item<'_>],
    chunk_size: usize,
    lie: impl FnOnce(&mut serde_json::Value),
) -> Written {
    let mut blob = Vec::new();
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    let mut entries = Vec::new();
    let header = |name: &str, kind: tar::EntryType, size: usize, link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_size(size as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_566_297_043);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        h
    };
    for item in items {
        match *item {
            Item::Dir(name) => {
                gz.write_all(header(name, tar::EntryType::Directory, 0, None).as_bytes())
                    .unwrap();
                entries.push(
                    serde_json::json!({"name": name, "type": "dir", "mode": 0o40755,
                    "modtime": "2019-08-20T10:30:43Z"}),
                );
            }
            Item::Symlink(name, target) | Item::Hardlink(name, target) => {
                let (kind, t) = match item {
                    Item::Symlink(..) => (tar::EntryType::Symlink, "symlink"),
                    _ => (tar::EntryType::Link, "hardlink"),
                };
                gz.write_all(header(name, kind, 0, Some(target)).as_bytes())
                    .unwrap();
                entries.push(
                    serde_json::json!({"name": name, "type": t, "linkName": target,
                    "mode": 0o777}),
                );
            }
            Item::File(name, b"") => {
                gz.write_all(header(name, tar::EntryType::Regular, 0, None).as_bytes())
                    .unwrap();
                entries.push(
                    serde_json::json!({"name": name, "type": "reg", "mode": 0o644,
                    "digest": Digest::sha256(b"").to_string()}),
                );
            }
            Item::File(name, data) => {
                gz.write_all(header(name, tar::EntryType::Regular, data.len(), None).as_bytes())
                    .unwrap();
                for (i, chunk) in data.chunks(chunk_size).enumerate() {
                    let offset = restart(&mut gz, &mut blob);
                    gz.write_all(chunk).unwrap();
                    let mut e = serde_json::json!({
                        "name": name,
                        "type": if i == 0 { "reg" } else { "chunk" },
                        "offset": offset,
                        "chunkDigest": Digest::sha256(chunk).to_string(),
                    });
                    if i == 0 {
                        e["size"] = data.len().into();
                        e["mode"] = 0o100644.into();
                        e["uid"] = 1000.into();
                        e["modtime"] = "2019-08-20T10:30:43Z".into();
                        e["digest"] = Digest::sha256(data).to_string().into();
                    } else {
                        e["chunkOffset"] = (i * chunk_size).into();
                    }
                    if chunk.len() == chunk_size && (i + 1) * chunk_size < data.len() {
                        e["chunkSize"] = chunk_size.into();
                    }
                    entries.push(e);
                }
                let pad = (512 - data.len() % 512) % 512;
                gz.write_all(&vec![0; pad]).unwrap();
            }
            Item::Landmark => {
                gz.write_all(
                    header(".prefetch.landmark", tar::EntryType::Regular, 1, None).as_bytes(),
                )
                .unwrap();
                let offset = restart(&mut gz, &mut blob);
                gz.write_all(&[0x0f]).unwrap();
                gz.write_all(&[0; 511]).unwrap();
                entries.push(
                    serde_json::json!({"name": ".prefetch.landmark", "type": "reg",
                    "size": 1, "offset": offset,
                    "chunkDigest": Digest::sha256(&[0x0f]).to_string()}),
                );
            }
        }
    }
    let toc_offset = restart(&mut gz, &mut blob);
    let mut toc = serde_json::json!({"version": 1, "entries": entries});
    lie(&mut toc);
    let json = serde_json::to_vec_pretty(&toc).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path(TOC_NAME).unwrap();
    h.set_size(json.len() as u64);
    h.set_mode(0o444);
    h.set_cksum();
    tar.append(&h, &json[..]).unwrap();
    let mut toc_gz = GzEncoder::new(Vec::new(), Compression::best());
    toc_gz.write_all(&tar.into_inner().unwrap()).unwrap();
    blob.extend(toc_gz.finish().unwrap());
    blob.extend(footer(toc_offset));
    Written {
        blob,
        json,
        toc_offset,
    }
}

/// Ends the current gzip member and starts the next; the new member's blob offset.
fn restart(gz: &mut GzEncoder<Vec<u8>>, blob: &mut Vec<u8>) -> u64 {
    let done = std::mem::replace(gz, GzEncoder::new(Vec::new(), Compression::default()));
    blob.extend(done.finish().unwrap());
    blob.len() as u64
}

fn footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    f.extend(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.len(), FOOTER_SIZE);
    f
}

fn read_toc(w: &Written) -> Result<Toc> {
    let position = footer_position(&w.blob[w.blob.len() - FOOTER_SIZE..], w.blob.len() as u64)?;
    let member = &w.blob[position.range().start as usize..position.range().end as usize];
    let json = toc_json(member)?;
    assert_eq!(json, w.json);
    parse(&json, position.offset)
}

/// A file's bytes as the read path gets them: its chunks, each decoded and verified.
fn read_file(w: &Written, toc: &Toc, name: &str) -> Vec<u8> {
    let e = toc.entries.iter().find(|e| e.name == name).unwrap();
    let Some(range) = e.tar_range() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in toc.chunks_for(range.clone()) {
        let c = &toc.chunks[i];
        let r = ChunkRef::new(Digest::sha256(&w.blob), c);
        r.check().unwrap();
        let frame = &w.blob[c.offset as usize..(c.offset + c.size) as usize];
        let chunk = VerifiedChunk::decode(&r, frame).unwrap();
        out.extend_from_slice(chunk.data());
    }
    let start = (range.start - toc.chunks[toc.chunks_for(range.clone()).start].tar_offset) as usize;
    out[start..start + e.size as usize].to_vec()
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(seed) >> 3) as u8)
        .collect()
}

#[test]
fn an_estargz_layer_reads_back_its_files_through_verified_chunks() {
    let big = data(300_000, 7919);
    let small = data(5_000, 31);
    let w = write(
        &[
            Item::Dir("etc/"),
            Item::File("etc/small", &small),
            Item::File("./usr/lib/big", &big),
            Item::File("etc/empty", b""),
            Item::Symlink("etc/link", "small"),
            Item::Hardlink("etc/hard", "etc/small"),
            Item::File("etc/.wh.gone", b""),
            Item::File("usr/.wh..wh..opq", b""),
        ],
        64 << 10,
    );
    let toc = read_toc(&w).unwrap();
    assert_eq!(toc.format, LayerFormat::Estargz);
    assert_eq!(
        toc.tar_size,
        (300_000 + 5_000) as u64,
        "the contents stream"
    );
    assert_eq!(
        toc.chunks.len(),
        1 + 5,
        "5 KB in one chunk, 300 KB in 64 KiB chunks"
    );
    assert!(toc
        .chunks
        .iter()
        .all(|c| c.codec == Codec::GzipPrefix && c.offset > 0));
    assert_eq!(
        toc.chunks.last().unwrap().offset + toc.chunks.last().unwrap().size,
        w.toc_offset,
        "the last chunk's range ends at the TOC"
    );
    assert_eq!(read_file(&w, &toc, "etc/small"), small);
    assert_eq!(read_file(&w, &toc, "usr/lib/big"), big);
    let kind = |name: &str| toc.entries.iter().find(|e| e.name == name).map(|e| e.kind);
    assert_eq!(kind("etc/empty"), Some(EntryKind::Reg));
    assert_eq!(kind("etc/gone"), Some(EntryKind::Whiteout));
    assert_eq!(kind("usr"), Some(EntryKind::Opaque));
    let link = toc.entries.iter().find(|e| e.name == "etc/hard").unwrap();
    assert_eq!(
        (link.kind, link.link.as_deref()),
        (EntryKind::Hardlink, Some("etc/small"))
    );
    let small_entry = toc.entries.iter().find(|e| e.name == "etc/small").unwrap();
    assert_eq!(
        (small_entry.mode, small_entry.uid, small_entry.mtime),
        (0o644, 1000, 1_566_297_043),
        "mode without its type bits, uid, modtime in seconds"
    );
    assert!(toc.prefetch.is_empty(), "no landmark, nothing to prefetch");
}

#[test]
fn the_prefetch_landmark_lists_the_chunks_before_it_and_is_not_a_file() {
    let (a, b) = (data(100_000, 3), data(70_000, 5));
    let w = write(
        &[
            Item::File("bin/start", &a),
            Item::Landmark,
            Item::File("lib/rest", &b),
        ],
        32 << 10,
    );
    let toc = read_toc(&w).unwrap();
    assert_eq!(toc.prefetch, vec![0, 1, 2, 3], "bin/start's four chunks");
    assert!(toc.entries.iter().all(|e| !e.name.contains("landmark")));
    let last_start = &toc.chunks[3];
    assert!(
        last_start.offset + last_start.size < toc.chunks[4].offset,
        "the landmark's member lies between the two files' chunks"
    );
    assert_eq!(read_file(&w, &toc, "lib/rest"), b);
}

#[test]
fn the_legacy_footer_is_read_and_a_garbled_one_refused() {
    let w = write(&[Item::File("a", b"hello")], 1 << 20);
    let n = w.blob.len() as u64;
    let mut legacy = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
    legacy.extend(format!("{:016x}STARGZ", w.toc_offset).as_bytes());
    legacy.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(legacy.len(), LEGACY_FOOTER_SIZE);
    let mut blob = w.blob[..w.blob.len() - FOOTER_SIZE].to_vec();
    blob.extend(&legacy);
    let p = footer_position(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    assert_eq!((p.offset, p.version), (w.toc_offset, 47));
    assert_eq!(p.offset + p.size + 47, blob.len() as u64);

    let tail = &w.blob[w.blob.len() - FOOTER_SIZE..];
    let p = footer_position(tail, n).unwrap();
    assert_eq!((p.offset, p.version), (w.toc_offset, 51));
    check_within(&p, n).unwrap();
    assert!(
        check_within(&p, n + 1).is_err(),
        "the recorded size decides"
    );
    let mut past = footer(n + 10);
    assert!(footer_position(&past, n).is_err(), "TOC past the end");
    past[33] = b'X';
    assert!(footer_position(&past, n).is_err(), "no STARGZ");
    assert!(footer_position(&[0u8; FOOTER_SIZE], n).is_err());
    assert!(footer_position(b"short", n).is_err());
}

#[test]
fn a_toc_member_that_is_not_the_index_is_refused() {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("other.json").unwrap();
    h.set_size(2);
    h.set_cksum();
    tar.append(&h, &b"{}"[..]).unwrap();
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let err = toc_json(&gz.finish().unwrap()).unwrap_err();
    assert!(err.to_string().contains("stargz.index.json"), "{err}");
    assert!(toc_json(b"not gzip at all").is_err());
}

#[test]
fn a_hostile_toc_is_refused_with_the_reason() {
    let big = data(200_000, 13);
    let items = [Item::File("a", &big[..]), Item::File("b", b"tail")];
    type Lie = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Lie)> = vec![
        (
            "not in blob order",
            Box::new(|t| {
                let first = t["entries"][0]["offset"].clone();
                t["entries"][1]["offset"] = first;
            }),
        ),
        (
            "innerOffset",
            Box::new(|t| t["entries"][1]["innerOffset"] = 5.into()),
        ),
        (
            "negative size",
            Box::new(|t| t["entries"][0]["size"] = (-1).into()),
        ),
        (
            "does not start where the last one ended",
            Box::new(|t| t["entries"][1]["chunkOffset"] = 1.into()),
        ),
        (
            "ends before its chunks cover it",
            Box::new(|t| {
                t["entries"].as_array_mut().unwrap().remove(3);
            }),
        ),
        (
            "runs past the end of the file",
            Box::new(|t| t["entries"][0]["chunkSize"] = 300_000.into()),
        ),
        (
            "unknown type",
            Box::new(|t| t["entries"][0]["type"] = "sparse".into()),
        ),
        (
            "no chunkDigest",
            Box::new(|t| {
                t["entries"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("chunkDigest");
            }),
        ),
        (
            "chunk size",
            Box::new(|t| {
                t["entries"][0]["size"] = (17u64 << 20).into();
                t["entries"][0]["chunkSize"] = (17u64 << 20).into();
            }),
        ),
        (
            "escapes the layer root",
            Box::new(|t| t["entries"][0]["name"] = "../../etc/passwd".into()),
        ),
        ("version 2", Box::new(|t| t["version"] = 2.into())),
        (
            "more than 128 xattrs",
            Box::new(|t| {
                let many: serde_json::Map<String, serde_json::Value> = (0..129)
                    .map(|i| (format!("user.{i}"), "eA==".into()))
                    .collect();
                t["entries"][0]["xattrs"] = many.into();
            }),
        ),
        (
            "modtime",
            Box::new(|t| t["entries"][0]["modtime"] = "yesterday".into()),
        ),
    ];
    for (why, lie) in cases {
        let w = write_with(&items, 64 << 10, lie);
        let err = read_toc(&w).expect_err(why);
        let text = crate::error_chain(&err);
        assert!(text.contains(why), "{why}: {text}");
    }
}

#[test]
fn a_chunk_whose_bytes_differ_from_its_digest_is_not_served() {
    let file = data(90_000, 17);
    let w = write(&[Item::File("f", &file)], 1 << 20);
    let toc = read_toc(&w).unwrap();
    let c = &toc.chunks[0];
    let r = ChunkRef::new(Digest::sha256(&w.blob), c);
    let mut other = write(&[Item::File("f", &data(90_000, 19))], 1 << 20).blob;
    other.truncate((c.offset + c.size) as usize);
    let frame = &other[c.offset as usize..];
    assert!(matches!(
        VerifiedChunk::decode(&r, frame),
        Err(crate::chunk::BadFrame::Mismatch(_) | crate::chunk::BadFrame::Undecodable(_))
    ));
    let good = &w.blob[c.offset as usize..(c.offset + c.size) as usize];
    assert!(matches!(
        VerifiedChunk::decode(&r, &good[..good.len() / 2]),
        Err(crate::chunk::BadFrame::Undecodable(_))
    ));
}
