use std::collections::HashMap;

use super::*;
use crate::chunk::{ChunkRef, Codec, VerifiedChunk};
use crate::image::LazyLayer;
use crate::toc::EntryKind;

/// A zstd:chunked blob laid out as containers/storage writes one: each file chunk one zstd
/// frame starting at decoded offset 0, tar headers and padding in frames of their own, the
/// TOC (compact JSON, one zstd frame) in a skippable frame, then the footer's.
struct Written {
    blob: Vec<u8>,
    position: TocPosition,
    checksum: Digest,
}

fn frame(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).unwrap()
}

fn header(name: &str, size: usize) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_cksum();
    *h.as_bytes()
}

/// `files` with content cut at `chunk` bytes; `style_estargz` writes stargz-snapshotter's
/// variant (no `endOffset`, eStargz keys, padding and headers in the chunk's frame's wake).
fn write(
    files: &[(&str, &[u8])],
    chunk: usize,
    lie: impl FnOnce(&mut serde_json::Value),
) -> Written {
    let mut blob = Vec::new();
    let mut entries = Vec::new();
    let mut pad = 0;
    for (name, data) in files {
        let mut head = vec![0u8; pad];
        head.extend(header(name, data.len()));
        blob.extend(frame(&head));
        let mut main = serde_json::json!({
            "type": "reg", "name": format!("./{name}"), "mode": 0o644, "size": data.len(),
            "modtime": "2024-05-06T09:10:11.5+02:00", "accesstime": "0001-01-01T00:00:00Z",
            "digest": Digest::sha256(data).to_string(),
        });
        if data.is_empty() {
            entries.push(main);
            pad = 0;
            continue;
        }
        let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
        let mut chunks = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let offset = blob.len();
            blob.extend(frame(piece));
            chunks.push(serde_json::json!({
                "type": "chunk", "name": format!("./{name}"), "offset": offset,
                "chunkSize": piece.len(), "chunkOffset": i * chunk,
                "chunkDigest": Digest::sha256(piece).to_string(),
            }));
        }
        main["offset"] = chunks[0]["offset"].clone();
        main["endOffset"] = blob.len().into();
        if pieces.len() > 1 {
            main["chunkSize"] = chunks[0]["chunkSize"].clone();
            main["chunkDigest"] = chunks[0]["chunkDigest"].clone();
            entries.push(main);
            entries.extend(chunks.into_iter().skip(1));
        } else {
            entries.push(main);
        }
        pad = (512 - data.len() % 512) % 512;
    }
    let mut end = vec![0u8; pad];
    end.extend([0u8; 1024]);
    blob.extend(frame(&end));
    let mut toc = serde_json::json!({"version": 1, "entries": entries});
    lie(&mut toc);
    let json = serde_json::to_vec(&toc).unwrap();
    let compressed = frame(&json);
    blob.extend(0x184D_2A50u32.to_le_bytes());
    blob.extend((compressed.len() as u32).to_le_bytes());
    let offset = blob.len() as u64;
    blob.extend(&compressed);
    let position = TocPosition {
        offset,
        size: compressed.len() as u64,
        uncompressed_size: json.len() as u64,
        version: 1,
    };
    let mut footer = Vec::new();
    for v in [offset, position.size, position.uncompressed_size, 1] {
        footer.extend(v.to_le_bytes());
    }
    footer.extend([0u8; 24]);
    footer.extend(b"GNUlInUx");
    blob.extend(0x184D_2A50u32.to_le_bytes());
    blob.extend((footer.len() as u32).to_le_bytes());
    blob.extend(footer);
    Written {
        checksum: Digest::sha256(&compressed),
        blob,
        position,
    }
}

fn toc_of(w: &Written) -> Result<Toc> {
    check_within(&w.position, w.blob.len() as u64)?;
    let r = w.position.range();
    decode(
        &w.blob[r.start as usize..r.end as usize],
        &w.position,
        &w.checksum,
    )
}

fn read_file(w: &Written, toc: &Toc, name: &str) -> Vec<u8> {
    let e = toc.entries.iter().find(|e| e.name == name).unwrap();
    let range = e.tar_range().unwrap();
    let mut out = Vec::new();
    for i in toc.chunks_for(range.clone()) {
        let c = &toc.chunks[i];
        let r = ChunkRef::new(Digest::sha256(&w.blob), c);
        r.check().unwrap();
        let bytes = &w.blob[c.offset as usize..(c.offset + c.size) as usize];
        out.extend_from_slice(VerifiedChunk::decode(&r, bytes).unwrap().data());
    }
    out
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(seed) >> 5) as u8)
        .collect()
}

#[test]
fn a_zstd_chunked_layer_reads_back_its_files_through_verified_chunks() {
    let (big, small) = (data(200_000, 7), data(3_000, 11));
    let w = write(
        &[("usr/big", &big), ("etc/small", &small), ("etc/empty", b"")],
        64 << 10,
        |_| {},
    );
    let toc = toc_of(&w).unwrap();
    assert_eq!(toc.format, LayerFormat::ZstdChunked);
    assert_eq!(toc.chunks.len(), 4 + 1);
    assert!(toc.chunks.iter().all(|c| c.codec == Codec::ZstdPrefix));
    assert_eq!(read_file(&w, &toc, "usr/big"), big);
    assert_eq!(
        read_file(&w, &toc, "etc/small"),
        small,
        "named by its file digest"
    );
    let small_chunk = &toc.chunks[4];
    assert_eq!(
        small_chunk.size,
        frame(&small).len() as u64,
        "endOffset ends the range at the file's own frame, not the header frame after it"
    );
    let empty = toc.entries.iter().find(|e| e.name == "etc/empty").unwrap();
    assert_eq!((empty.kind, empty.size), (EntryKind::Reg, 0));
    let e = toc.entries.iter().find(|e| e.name == "usr/big").unwrap();
    assert_eq!(
        e.mtime, 1_714_979_411,
        "RFC 3339 with a fraction and an offset"
    );
}

#[test]
fn the_toc_is_checked_before_it_is_decompressed_and_its_position_bounded() {
    let w = write(&[("a", b"hello")], 1 << 20, |_| {});
    let r = w.position.range();
    let payload = &w.blob[r.start as usize..r.end as usize];
    let err = decode(payload, &w.position, &Digest::sha256(b"other")).unwrap_err();
    assert!(matches!(
        err,
        Error::Toc(crate::toc::TocError::DigestMismatch { .. })
    ));
    let longer = TocPosition {
        uncompressed_size: w.position.uncompressed_size + 1,
        ..w.position
    };
    assert!(
        decode(payload, &longer, &w.checksum).is_err(),
        "length differs"
    );
    let n = w.blob.len() as u64;
    for bad in [
        TocPosition {
            version: 2,
            ..w.position
        },
        TocPosition {
            offset: 4,
            ..w.position
        },
        TocPosition {
            size: n,
            ..w.position
        },
        TocPosition {
            uncompressed_size: MAX_TOC_SIZE + 1,
            ..w.position
        },
    ] {
        assert!(check_within(&bad, n).is_err(), "{bad}");
    }
}

#[test]
fn a_hostile_zstd_chunked_toc_is_refused_with_the_reason() {
    let big = data(150_000, 13);
    type Lie = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Lie)> = vec![
        (
            "ends before its last chunk starts",
            Box::new(|t| t["entries"][0]["endOffset"] = 1.into()),
        ),
        (
            "at or after the TOC itself",
            Box::new(|t| t["entries"][0]["endOffset"] = (1u64 << 40).into()),
        ),
        (
            "no chunkDigest",
            Box::new(|t| {
                let e = t["entries"][0].as_object_mut().unwrap();
                e.remove("chunkDigest");
            }),
        ),
    ];
    for (why, lie) in cases {
        let w = write(&[("f", &big[..])], 64 << 10, lie);
        let err = crate::error_chain(&toc_of(&w).unwrap_err());
        assert!(err.contains(why), "{why}: {err}");
    }
}

#[test]
fn both_generations_of_annotations_make_a_layer_zstd_chunked() {
    let w = write(&[("a", b"hello")], 1 << 20, |_| {});
    let blob = Digest::sha256(&w.blob);
    let size = w.blob.len() as u64;
    for (checksum, position) in [
        (ANNOTATION_CHECKSUM, ANNOTATION_POSITION),
        (LEGACY_ANNOTATION_CHECKSUM, LEGACY_ANNOTATION_POSITION),
    ] {
        // stargz-snapshotter's zstd variant also names an eStargz TOC digest: the zstd TOC
        // is the one read.
        let annotations = HashMap::from([
            (checksum.to_owned(), w.checksum.to_string()),
            (position.to_owned(), w.position.to_string()),
            (
                crate::toc::estargz::ANNOTATION_TOC_DIGEST.to_owned(),
                Digest::sha256(b"json").to_string(),
            ),
        ]);
        let layer = LazyLayer::from_descriptor(blob, size, Some(&annotations))
            .unwrap()
            .unwrap();
        assert_eq!(layer.format, LayerFormat::ZstdChunked);
        assert_eq!(layer.position, Some(w.position));
        assert_eq!(layer.toc_digest, w.checksum);
        let r = w.position.range();
        let toc = layer
            .decode_toc(&w.blob[r.start as usize..r.end as usize], &w.position)
            .unwrap();
        assert_eq!(toc.entries.len(), 1);
    }
}

#[test]
fn without_end_offsets_a_chunks_range_runs_to_the_next_and_still_decodes() {
    // stargz-snapshotter's zstd variant: eStargz entries, no endOffset, so a file's last
    // range also holds the frames of the tar headers after it.
    let (a, b) = (data(100_000, 3), data(5_000, 5));
    let w = write(&[("a", &a), ("b", &b)], 64 << 10, |t| {
        for e in t["entries"].as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("endOffset");
        }
    });
    let toc = toc_of(&w).unwrap();
    assert_eq!(read_file(&w, &toc, "a"), a);
    assert_eq!(read_file(&w, &toc, "b"), b);
    let last = toc.chunks.last().unwrap();
    assert_eq!(last.offset + last.size, w.position.offset - 8);
    assert!(
        last.size > frame(&b).len() as u64,
        "the end-of-archive frame too"
    );
}
