use crate::toc::TocError;
use std::io::Read;

use proptest::prelude::*;

use super::*;

/// Builds a tar in memory from (name, kind, content) triples, with fixed metadata so the
/// output is deterministic.
pub(super) struct TarBuilder(tar::Builder<Vec<u8>>);

impl TarBuilder {
    pub fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_700_000_000);
        h
    }

    pub fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0, 0o755);
        self.0.append_data(&mut h, name, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, data.len() as u64, 0o644);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    pub fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0, 0o777);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    pub fn device(mut self, kind: tar::EntryType, name: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0, 0o600);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, name, std::io::empty()).unwrap();
        self
    }

    pub fn xattr_file(mut self, name: &str, data: &[u8], key: &str, value: &[u8]) -> Self {
        let pax_key = format!("SCHILY.xattr.{key}");
        self.0
            .append_pax_extensions([(pax_key.as_str(), value)])
            .unwrap();
        self.file(name, data)
    }

    /// A file carrying every (key, value) of `xattrs` in one PAX header.
    pub fn xattrs_file(mut self, name: &str, xattrs: &[(String, Vec<u8>)]) -> Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
            .collect();
        self.0
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(name, b"x")
    }

    /// A raw header with an arbitrary name, bypassing the builder's own path checks.
    pub fn raw(
        mut self,
        kind: tar::EntryType,
        name: &str,
        link: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut h = Self::header(kind, data.len() as u64, 0o644);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub(super) fn convert(tar: &[u8], chunk_size: u32) -> (ConvertedLayer, Vec<u8>) {
    convert_layer(
        tar,
        Vec::new(),
        &ConvertOptions {
            chunk_size,
            ..ConvertOptions::default()
        },
    )
    .unwrap()
}

/// Reads the TOC back the way a lazy reader does: footer from the tail, then the TOC range.
pub(super) fn read_toc(blob: &[u8], layer: &ConvertedLayer) -> Toc {
    let footer = Footer::decode(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    assert_eq!(footer.toc, layer.toc);
    let r = footer.toc.range();
    Toc::decode(
        &blob[r.start as usize..r.end as usize],
        footer.toc.uncompressed_size,
        Some(&layer.toc_digest),
    )
    .unwrap()
}

fn zstd_decode_all(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(blob)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

pub(super) fn sample_tar() -> Vec<u8> {
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    TarBuilder::new()
        .dir("./")
        .dir("etc/")
        .file("etc/hostname", b"brisk\n")
        .file("etc/empty", b"")
        .file("usr/lib/big.bin", &big)
        .link(tar::EntryType::Symlink, "usr/lib/abs", "/app/nested")
        .link(tar::EntryType::Link, "etc/hostname.hard", "etc/hostname")
        .device(tar::EntryType::Char, "dev/null", 1, 3)
        .xattr_file("bin/ping", b"ELF", "security.capability", &[1, 0, 0, 2])
        .file("var/.wh.cache", b"")
        .file("opt/app/.wh..wh..opq", b"")
        .file("名前/ünïcödé.txt", "héllo".as_bytes())
        .finish()
}

#[test]
fn converted_layer_decodes_to_the_identical_tar() {
    let tar = sample_tar();
    let (layer, blob) = convert(&tar, 64 * 1024);
    assert_eq!(zstd_decode_all(&blob), tar);
    assert_eq!(layer.diff_id, Digest::sha256(&tar));
    assert_eq!(layer.digest, Digest::sha256(&blob));
    assert_eq!(layer.size, blob.len() as u64);
    assert_eq!(layer.tar_size, tar.len() as u64);
}

#[test]
fn every_chunk_decodes_alone_and_the_chunks_tile_the_tar() {
    let tar = sample_tar();
    let (layer, blob) = convert(&tar, 64 * 1024);
    let toc = read_toc(&blob, &layer);
    let mut joined = Vec::new();
    for (i, c) in toc.chunks.iter().enumerate() {
        let r = c.compressed_range();
        joined.extend_from_slice(
            decode_chunk(layer.digest, i, c, &blob[r.start as usize..r.end as usize])
                .unwrap()
                .data(),
        );
    }
    assert_eq!(joined, tar);
    assert_eq!(toc.chunks.len(), layer.chunks);
}

#[test]
fn large_files_start_their_own_chunks_and_are_cut_at_the_chunk_size() {
    let tar = sample_tar();
    let (layer, blob) = convert(&tar, 64 * 1024);
    let toc = read_toc(&blob, &layer);
    let big = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/lib/big.bin")
        .unwrap();
    let range = big.tar_range().unwrap();
    let chunks = &toc.chunks[toc.chunks_for(range.clone())];
    assert_eq!(chunks.first().unwrap().tar_offset, range.start);
    assert_eq!(chunks.last().unwrap().tar_range().end, range.end);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.tar_size == 64 * 1024));
    assert_eq!(chunks.len(), 700_000usize.div_ceil(64 * 1024));
}

#[test]
fn identical_content_in_two_layers_gives_identical_chunk_digests() {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let a = TarBuilder::new()
        .file("a.txt", b"x")
        .file("lib/one.so", &big)
        .finish();
    let b = TarBuilder::new()
        .dir("other/")
        .file("other/two.so", &big)
        .file("z", b"yy")
        .finish();
    let digests = |tar: &[u8], name: &str| {
        let (layer, blob) = convert(tar, 64 * 1024);
        let toc = read_toc(&blob, &layer);
        let e = toc.entries.iter().find(|e| e.name == name).unwrap().clone();
        toc.chunks[toc.chunks_for(e.tar_range().unwrap())]
            .iter()
            .map(|c| c.digest)
            .collect::<Vec<_>>()
    };
    assert_eq!(digests(&a, "lib/one.so"), digests(&b, "other/two.so"));
}

#[test]
fn small_files_are_packed_and_never_split_across_chunks() {
    let mut b = TarBuilder::new();
    for i in 0..200 {
        b = b.file(&format!("f{i:03}"), &vec![i as u8; 3000 + i * 7]);
    }
    let tar = b.finish();
    let (layer, blob) = convert(&tar, 64 * 1024);
    let toc = read_toc(&blob, &layer);
    // 200 files of ~3.7 KiB in 64 KiB chunks: about a dozen chunks, not 200.
    assert!(toc.chunks.len() < 20, "{} chunks", toc.chunks.len());
    for e in &toc.entries {
        assert_eq!(
            toc.chunks_for(e.tar_range().unwrap()).len(),
            1,
            "{} spans chunks",
            e.name
        );
    }
}

#[test]
fn toc_records_every_kind_of_entry() {
    let (layer, blob) = convert(&sample_tar(), 64 * 1024);
    let toc = read_toc(&blob, &layer);
    let get = |name: &str, kind: EntryKind| {
        toc.entries
            .iter()
            .find(|e| e.name == name && e.kind == kind)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    assert_eq!(get("", EntryKind::Dir).mode, 0o755);
    let host = get("etc/hostname", EntryKind::Reg);
    assert_eq!(
        (host.size, host.uid, host.gid, host.mode, host.mtime),
        (6, 1000, 1001, 0o644, 1_700_000_000)
    );
    assert_eq!(get("etc/empty", EntryKind::Reg).offset, None);
    assert_eq!(
        get("usr/lib/abs", EntryKind::Symlink).link.as_deref(),
        Some("/app/nested")
    );
    assert_eq!(
        get("etc/hostname.hard", EntryKind::Hardlink)
            .link
            .as_deref(),
        Some("etc/hostname")
    );
    let null = get("dev/null", EntryKind::Char);
    assert_eq!((null.dev_major, null.dev_minor), (Some(1), Some(3)));
    assert_eq!(
        get("bin/ping", EntryKind::Reg)
            .xattrs
            .get("security.capability")
            .map(String::as_str),
        Some("AQAAAg==")
    );
    get("var/cache", EntryKind::Whiteout);
    get("opt/app", EntryKind::Opaque);
    get("名前/ünïcödé.txt", EntryKind::Reg);
    assert!(!toc.entries.iter().any(|e| e.name.contains(".wh.")));
}

#[test]
fn conversion_is_deterministic() {
    let tar = sample_tar();
    let (a, blob_a) = convert(&tar, 64 * 1024);
    let (b, blob_b) = convert(&tar, 64 * 1024);
    assert_eq!(blob_a, blob_b);
    assert_eq!((a.digest, a.toc_digest), (b.digest, b.toc_digest));
}

#[test]
fn duplicate_entries_last_one_wins() {
    let tar = TarBuilder::new()
        .file("a", b"first")
        .file("a", b"second!")
        .finish();
    let (layer, blob) = convert(&tar, 64 * 1024);
    let toc = read_toc(&blob, &layer);
    let a: Vec<_> = toc.entries.iter().filter(|e| e.name == "a").collect();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].size, 7);
}

#[test]
fn names_escaping_the_root_are_rejected() {
    for name in ["../evil", "a/../../evil", "/../evil"] {
        let tar = TarBuilder::new()
            .raw(tar::EntryType::Regular, name, None, b"x")
            .finish();
        let err = convert_layer(&tar[..], Vec::new(), &ConvertOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::Toc(TocError::EscapingPath(ref n)) if n == name),
            "{name}: {err}"
        );
    }
}

#[test]
fn leading_slash_is_stripped_and_absolute_symlink_targets_are_kept() {
    let tar = TarBuilder::new()
        .raw(tar::EntryType::Regular, "/abs/file", None, b"x")
        .raw(
            tar::EntryType::Symlink,
            "link",
            Some("/abs/../../outside"),
            b"",
        )
        .finish();
    let (layer, blob) = convert(&tar, 64 * 1024);
    let toc = read_toc(&blob, &layer);
    assert_eq!(toc.entries[0].name, "abs/file");
    assert_eq!(toc.entries[1].link.as_deref(), Some("/abs/../../outside"));
}

#[test]
fn hardlinks_to_missing_or_escaping_targets_are_rejected() {
    let missing = TarBuilder::new()
        .link(tar::EntryType::Link, "a", "nowhere")
        .finish();
    let err = convert_layer(&missing[..], Vec::new(), &ConvertOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Toc(TocError::DanglingHardlink { .. })),
        "{err}"
    );
    let escaping = TarBuilder::new()
        .raw(tar::EntryType::Link, "a", Some("../../etc/shadow"), b"")
        .finish();
    let err = convert_layer(&escaping[..], Vec::new(), &ConvertOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Toc(TocError::EscapingPath(_))),
        "{err}"
    );
}

#[test]
fn truncated_tar_is_an_error() {
    let tar = sample_tar();
    let cut = &tar[..tar.len() / 2 + 100];
    let err = convert_layer(cut, Vec::new(), &ConvertOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Toc(TocError::Tar(_))), "{err}");
}

#[test]
fn toc_digest_mismatch_is_detected_before_decoding() {
    let (layer, blob) = convert(&sample_tar(), 64 * 1024);
    let r = layer.toc.range();
    let mut payload = blob[r.start as usize..r.end as usize].to_vec();
    payload[10] ^= 1;
    let err = Toc::decode(
        &payload,
        layer.toc.uncompressed_size,
        Some(&layer.toc_digest),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Toc(TocError::DigestMismatch { .. })),
        "{err}"
    );
}

#[test]
fn a_flipped_bit_in_a_chunk_fails_verification() {
    let (layer, blob) = convert(&sample_tar(), 64 * 1024);
    let toc = read_toc(&blob, &layer);
    let c = &toc.chunks[0];
    let mut bytes =
        blob[c.compressed_range().start as usize..c.compressed_range().end as usize].to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    assert!(matches!(
        decode_chunk(layer.digest, 0, c, &bytes),
        Err(Error::Toc(TocError::CorruptChunk { index: 0, .. }))
    ));
    // The bytes of another chunk are just as wrong, even if they decode.
    let other = &toc.chunks[1];
    let r = other.compressed_range();
    assert!(decode_chunk(layer.digest, 0, c, &blob[r.start as usize..r.end as usize]).is_err());
}

#[test]
fn lying_tocs_are_rejected() {
    let (layer, blob) = convert(&sample_tar(), 64 * 1024);
    let good = read_toc(&blob, &layer);
    let mut gap = good.clone();
    gap.chunks[1].offset += 1;
    let mut short = good.clone();
    short.tar_size += 1;
    let mut outside = good.clone();
    let reg = outside
        .entries
        .iter_mut()
        .find(|e| e.offset.is_some())
        .unwrap();
    reg.size = outside.tar_size;
    let mut huge = good.clone();
    huge.chunks[0].tar_size = MAX_CHUNK_SIZE + 1;
    let mut escaping = good.clone();
    escaping.entries[1].name = "../x".into();
    let mut version = good;
    version.version = 99;
    for (what, toc) in [
        ("gap", gap),
        ("short", short),
        ("outside", outside),
        ("huge", huge),
        ("escaping", escaping),
        ("version", version),
    ] {
        assert!(toc.validate().is_err(), "{what} accepted");
    }
}

#[test]
fn footer_rejects_garbage_and_positions_outside_the_blob() {
    let (layer, blob) = convert(&sample_tar(), 64 * 1024);
    let tail = &blob[blob.len() - FOOTER_SIZE..];
    assert!(Footer::decode(tail, blob.len() as u64 + 1).is_err());
    assert!(Footer::decode(&[0u8; FOOTER_SIZE], 1000).is_err());
    assert!(Footer::decode(&tail[1..], blob.len() as u64).is_err());
    let pos: TocPosition = layer.toc.to_string().parse().unwrap();
    assert_eq!(pos, layer.toc);
    assert!("1:2:3".parse::<TocPosition>().is_err());
    assert!("1:2:3:4:5".parse::<TocPosition>().is_err());
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let kinds = prop_oneof![
        Just(EntryKind::Dir),
        Just(EntryKind::Reg),
        Just(EntryKind::Symlink),
        Just(EntryKind::Whiteout),
        Just(EntryKind::Opaque),
    ];
    (
        kinds,
        "[a-z]{1,8}(/[a-zé]{1,8}){0,3}",
        0u32..0o7777,
        any::<u32>(),
        any::<i64>(),
        proptest::option::of(".{0,20}"),
    )
        .prop_map(|(kind, name, mode, uid, mtime, link)| Entry {
            kind,
            name,
            mode,
            uid: uid as u64,
            gid: 7,
            size: 0,
            mtime,
            link: if kind == EntryKind::Symlink {
                Some(link.unwrap_or_default())
            } else {
                None
            },
            offset: None,
            dev_major: None,
            dev_minor: None,
            xattrs: BTreeMap::from([("user.k".to_owned(), "dg==".to_owned())]),
        })
}

proptest! {
    #[test]
    fn toc_encode_decode_round_trips(entries in proptest::collection::vec(arb_entry(), 0..40),
                                     sizes in proptest::collection::vec((1u64..1000, 1u64..5000), 0..20)) {
        let mut chunks = Vec::new();
        let (mut off, mut tar_off) = (0, 0);
        for (i, (size, tar_size)) in sizes.into_iter().enumerate() {
            // Within what a frame of `tar_size` bytes can compress to.
            let size = 1 + size % compressed_bound(tar_size);
            chunks.push(Chunk { codec: Default::default(), offset: off, size, tar_offset: tar_off, tar_size, digest: Digest::sha256(&i.to_le_bytes()) });
            off += size;
            tar_off += tar_size;
        }
        let toc = Toc { format: Default::default(), version: FORMAT_VERSION, tar_size: tar_off, chunks, entries, prefetch: Vec::new() };
        let (payload, len) = toc.encode().unwrap();
        let digest = Digest::sha256(&payload);
        prop_assert_eq!(Toc::decode(&payload, len, Some(&digest)).unwrap(), toc);
    }

    #[test]
    fn any_file_set_round_trips_through_the_converter(
        files in proptest::collection::vec(("[a-z]{1,6}", 0usize..40_000, any::<u8>()), 1..25),
        chunk_size in 4096u32..32_768,
    ) {
        let mut b = TarBuilder::new();
        for (i, (name, len, seed)) in files.iter().enumerate() {
            let data: Vec<u8> = (0..*len).map(|j| seed.wrapping_add((j / 97) as u8)).collect();
            b = b.file(&format!("d{i}/{name}"), &data);
        }
        let tar = b.finish();
        let (layer, blob) = convert(&tar, chunk_size);
        prop_assert_eq!(zstd_decode_all(&blob), tar.clone());
        let toc = read_toc(&blob, &layer);
        for e in toc.entries.iter().filter(|e| e.offset.is_some()) {
            let r = e.tar_range().unwrap();
            let mut content = Vec::new();
            for i in toc.chunks_for(r.clone()) {
                let c = &toc.chunks[i];
                let cr = c.compressed_range();
                let data =
                    decode_chunk(layer.digest, i, c, &blob[cr.start as usize..cr.end as usize])
                        .unwrap();
                let data = data.data();
                let lo = r.start.max(c.tar_offset) - c.tar_offset;
                let hi = r.end.min(c.tar_offset + c.tar_size) - c.tar_offset;
                content.extend_from_slice(&data[lo as usize..hi as usize]);
            }
            prop_assert_eq!(&content[..], &tar[r.start as usize..r.end as usize]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The reader survives arbitrary damage to a real blob (the fuzz target's property, run
    /// briefly on every test run).
    #[test]
    fn reader_never_panics_on_damaged_blobs(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                            cut in any::<prop::sample::Index>()) {
        let (_, blob) = convert(&sample_tar(), 64 * 1024);
        let mut damaged = blob.clone();
        for (at, byte) in flips {
            let i = at.index(damaged.len());
            damaged[i] ^= byte | 1;
        }
        fuzz_read_blob(&damaged);
        fuzz_read_blob(&blob[cut.index(blob.len())..]);
        fuzz_read_blob(&blob[..cut.index(blob.len())]);
    }
}

#[test]
fn read_parts_of_a_prefetch_file_become_chunks_of_their_own_and_only_they_are_listed() {
    let tar = sample_tar();
    let chunk_size = 256 * 1024;
    let read = vec![100_000..120_000, 400_000..401_000];
    let (layer, blob) = convert_layer(
        tar.as_slice(),
        Vec::new(),
        &ConvertOptions {
            chunk_size,
            prefetch_files: vec!["usr/lib/big.bin".into(), "etc/hostname".into()],
            prefetch_ranges: [("usr/lib/big.bin".to_owned(), read.clone())].into(),
            ..ConvertOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        zstd_decode_all(&blob),
        tar,
        "the tar stream passes through unchanged"
    );
    let toc = read_toc(&blob, &layer);
    let big = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/lib/big.bin")
        .unwrap()
        .tar_range()
        .unwrap();
    let starts: Vec<u64> = toc.chunks.iter().map(|c| c.tar_offset).collect();
    for r in &read {
        assert!(
            starts.contains(&(big.start + r.start)),
            "a chunk starts at {r:?}"
        );
        assert!(
            starts.contains(&(big.start + r.end)),
            "a chunk starts after {r:?}"
        );
    }
    let listed: Vec<std::ops::Range<u64>> = toc
        .prefetch
        .iter()
        .map(|&i| {
            let c = &toc.chunks[i as usize];
            c.tar_offset..c.tar_offset + c.tar_size
        })
        .collect();
    let hostname = toc
        .entries
        .iter()
        .find(|e| e.name == "etc/hostname")
        .unwrap()
        .tar_range()
        .unwrap();
    let expected = vec![
        big.start + read[0].start..big.start + read[0].end,
        big.start + read[1].start..big.start + read[1].end,
    ];
    assert_eq!(listed[..2], expected, "only the read parts of the big file");
    assert_eq!(listed.len(), 3);
    assert!(listed[2].start <= hostname.start && hostname.end <= listed[2].end);
}

#[test]
fn start_up_chunks_are_compressed_at_the_prefetch_level_and_the_rest_is_not() {
    // Text that compresses, but better with more effort.
    let text: Vec<u8> = (0..120_000u64)
        .flat_map(|i| format!("{i} {}\n", i.wrapping_mul(7919) % 100_003).into_bytes())
        .collect();
    let tar = TarBuilder::new()
        .file("app/hot.txt", &text)
        .file("app/cold.txt", &text)
        .finish();
    let convert_at = |prefetch_level| {
        let (layer, blob) = convert_layer(
            tar.as_slice(),
            Vec::new(),
            &ConvertOptions {
                chunk_size: 256 * 1024,
                level: 1,
                prefetch_level,
                prefetch_files: vec!["app/hot.txt".into()],
                ..ConvertOptions::default()
            },
        )
        .unwrap();
        assert_eq!(zstd_decode_all(&blob), tar, "the tar stream is unchanged");
        let toc = read_toc(&blob, &layer);
        let size = |listed: bool| -> u64 {
            toc.chunks
                .iter()
                .enumerate()
                .filter(|(i, _)| toc.prefetch.contains(&(*i as u32)) == listed)
                .map(|(_, c)| c.size)
                .sum()
        };
        (toc.chunks.clone(), size(true), size(false))
    };
    let (plain_chunks, plain_hot, plain_cold) = convert_at(1);
    let (chunks, hot, cold) = convert_at(15);
    assert_eq!(
        chunks.iter().map(|c| c.digest).collect::<Vec<_>>(),
        plain_chunks.iter().map(|c| c.digest).collect::<Vec<_>>(),
        "the same chunks"
    );
    assert!(
        hot * 100 < plain_hot * 97,
        "start-up chunks at level 15: {hot} bytes, at level 1: {plain_hot}"
    );
    assert_eq!(cold, plain_cold, "other chunks keep the layer's level");
}

#[test]
fn start_up_parts_of_large_files_are_cut_into_smaller_chunks_and_nothing_else_is() {
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let tar = TarBuilder::new()
        .file("app/ranged.bin", &data)
        .file("app/whole.bin", &data)
        .file("app/cold.bin", &data)
        .finish();
    let read = 500_000..1_500_000u64;
    let (layer, blob) = convert_layer(
        tar.as_slice(),
        Vec::new(),
        &ConvertOptions {
            prefetch_files: vec!["app/ranged.bin".into(), "app/whole.bin".into()],
            prefetch_ranges: [("app/ranged.bin".to_owned(), vec![read.clone()])].into(),
            ..ConvertOptions::default()
        },
    )
    .unwrap();
    assert_eq!(zstd_decode_all(&blob), tar, "the tar stream is unchanged");
    let toc = read_toc(&blob, &layer);
    let content = |name: &str| {
        toc.entries
            .iter()
            .find(|e| e.name == name)
            .unwrap()
            .tar_range()
            .unwrap()
    };
    let inside = |r: &std::ops::Range<u64>| -> Vec<&Chunk> {
        toc.chunks
            .iter()
            .filter(|c| c.tar_offset >= r.start && c.tar_offset + c.tar_size <= r.end)
            .collect()
    };
    let small = u64::from(DEFAULT_PREFETCH_CHUNK_SIZE);
    let ranged = content("app/ranged.bin");
    let hot = ranged.start + read.start..ranged.start + read.end;
    let hot_chunks = inside(&hot);
    assert_eq!(
        hot_chunks.iter().map(|c| c.tar_size).sum::<u64>(),
        read.end - read.start,
        "chunks tile the read part"
    );
    assert!(hot_chunks.iter().all(|c| c.tar_size <= small));
    assert!(inside(&content("app/whole.bin"))
        .iter()
        .all(|c| c.tar_size <= small));
    let mib = u64::from(DEFAULT_CHUNK_SIZE);
    assert_eq!(
        inside(&content("app/cold.bin"))
            .iter()
            .map(|c| c.tar_size)
            .collect::<Vec<_>>(),
        vec![mib, mib, 3_000_000 - 2 * mib],
        "a file outside the list keeps 1 MiB chunks"
    );
}

#[test]
fn the_prefetch_spans_cover_exactly_the_listed_chunks_and_read_back() {
    let tar = sample_tar();
    let (layer, blob) = convert_layer(
        tar.as_slice(),
        Vec::new(),
        &ConvertOptions {
            chunk_size: 256 * 1024,
            prefetch_files: vec!["usr/lib/big.bin".into(), "etc/hostname".into()],
            prefetch_ranges: [(
                "usr/lib/big.bin".to_owned(),
                vec![100_000..120_000, 300_000..310_000],
            )]
            .into(),
            ..ConvertOptions::default()
        },
    )
    .unwrap();
    let toc = read_toc(&blob, &layer);
    assert!(!layer.prefetch_spans.is_empty());
    for &i in &toc.prefetch {
        let c = &toc.chunks[i as usize];
        assert!(
            layer
                .prefetch_spans
                .iter()
                .any(|s| s.start <= c.offset && c.offset + c.size <= s.end),
            "listed chunk {i} lies in a span"
        );
    }
    for s in &layer.prefetch_spans {
        assert!(
            toc.prefetch
                .iter()
                .any(|&i| toc.chunks[i as usize].offset == s.start),
            "a span starts at a listed chunk"
        );
    }
    let value = format_spans(&layer.prefetch_spans);
    assert_eq!(parse_spans(&value, layer.size), layer.prefetch_spans);
    // Nothing is listed without a trace, so nothing is annotated.
    assert!(convert(&tar, 256 * 1024).0.prefetch_spans.is_empty());
}

#[test]
fn a_malformed_or_oversized_spans_annotation_yields_nothing_usable() {
    assert_eq!(parse_spans("0-10,20-30", 100), vec![0..10, 20..30]);
    assert!(parse_spans("0-10,banana", 100).is_empty());
    assert!(parse_spans("10-5", 100).is_empty(), "empty or reversed");
    assert!(parse_spans("0-101", 100).is_empty(), "past the blob's end");
    assert!(parse_spans("", 100).is_empty());
    let many = (0..1000u64)
        .map(|i| format!("{}-{}", i * 2, i * 2 + 1))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(parse_spans(&many, 10_000).len(), MAX_PREFETCH_SPANS);
}

#[test]
fn the_label_copies_match_the_annotations_and_fit_containerds_limit() {
    let digest = crate::Digest::sha256(b"toc");
    let few = vec![0..100, 200..300];
    let a = layer_annotations(&digest, "10:20:30:1", &few);
    for (annotation, label) in [
        (ANNOTATION_TOC_DIGEST, LABEL_TOC_DIGEST),
        (ANNOTATION_TOC_POSITION, LABEL_TOC_POSITION),
        (ANNOTATION_PREFETCH_SPANS, LABEL_PREFETCH_SPANS),
    ] {
        assert!(label.starts_with(SNAPSHOT_LABEL_PREFIX));
        assert_eq!(a[annotation], a[label], "{label}");
    }
    assert_eq!(a[LABEL_PREFETCH_SPANS], "0-100,200-300");
    // No spans, no span annotation or label.
    let none = layer_annotations(&digest, "10:20:30:1", &[]);
    assert!(!none.contains_key(ANNOTATION_PREFETCH_SPANS));
    assert!(!none.contains_key(LABEL_PREFETCH_SPANS));
    // The full list stays in the annotation; the label keeps the leading spans that fit.
    let many: Vec<_> = (0..MAX_PREFETCH_SPANS as u64)
        .map(|i| i * 10_000_000_000..i * 10_000_000_000 + 1_000_000)
        .collect();
    let a = layer_annotations(&digest, "10:20:30:1", &many);
    assert_eq!(parse_spans(&a[ANNOTATION_PREFETCH_SPANS], u64::MAX), many);
    let label = &a[LABEL_PREFETCH_SPANS];
    assert!(LABEL_PREFETCH_SPANS.len() + label.len() <= MAX_LABEL_BYTES);
    let kept = parse_spans(label, u64::MAX);
    assert!(
        kept.len() > 100 && kept.len() < many.len(),
        "{}",
        kept.len()
    );
    assert_eq!(kept, many[..kept.len()]);
}

/// Bytes no compressor shrinks, the same for the same seed.
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text that compresses well, but better with more effort, like code and symbol tables.
fn compressible(len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..)
        .flat_map(|i: u64| format!("{i} {}\n", i.wrapping_mul(7919) % 100_003).into_bytes())
        .take(len)
        .collect();
    out.truncate(len);
    out
}

#[test]
fn elf_files_and_data_that_does_not_compress_get_finer_chunks_and_other_files_do_not() {
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.extend(compressible(3_000_000 - elf.len()));
    let weights = noise(3_000_000, 7);
    let text = compressible(3_000_000);
    let small_elf = [b"\x7fELF".as_slice(), &compressible(500_000)].concat();
    let tar = TarBuilder::new()
        .file("usr/lib/libbig.so", &elf)
        .file("data/weights.bin", &weights)
        .file("usr/share/big.txt", &text)
        .file("usr/bin/small", &small_elf)
        .finish();
    let convert_with = |scattered: Scattered| {
        let (layer, blob) = convert_layer(
            tar.as_slice(),
            Vec::new(),
            &ConvertOptions {
                scattered,
                ..ConvertOptions::default()
            },
        )
        .unwrap();
        assert_eq!(zstd_decode_all(&blob), tar, "the tar stream is unchanged");
        read_toc(&blob, &layer)
    };
    let fine = Scattered {
        code_chunk_size: 64 * 1024,
        ..DEFAULT_SCATTERED
    };
    let toc = convert_with(fine);
    let chunks_of = |toc: &Toc, name: &str| -> Vec<Chunk> {
        let entry = toc.entries.iter().find(|e| e.name == name).unwrap();
        let range = entry.tar_range().unwrap();
        let chunks = toc.chunks[toc.chunks_for(range.clone())].to_vec();
        assert_eq!(chunks[0].tar_offset, range.start, "{name} starts a chunk");
        assert_eq!(chunks.last().unwrap().tar_range().end, range.end, "{name}");
        chunks
    };
    let sizes = |chunks: &[Chunk]| -> Vec<u64> { chunks.iter().map(|c| c.tar_size).collect() };
    let cut = |len: u64, size: u64| -> Vec<u64> {
        let mut v = vec![size; (len / size) as usize];
        if len % size != 0 {
            v.push(len % size);
        }
        v
    };
    let code = u64::from(fine.code_chunk_size);
    let data = u64::from(DEFAULT_SCATTERED.data_chunk_size);
    let mib = u64::from(DEFAULT_CHUNK_SIZE);
    assert_eq!(
        sizes(&chunks_of(&toc, "usr/lib/libbig.so")),
        cut(3_000_000, code)
    );
    assert_eq!(
        sizes(&chunks_of(&toc, "data/weights.bin")),
        cut(3_000_000, data)
    );
    assert_eq!(
        sizes(&chunks_of(&toc, "usr/share/big.txt")),
        cut(3_000_000, mib)
    );
    assert_eq!(
        sizes(&chunks_of(&toc, "usr/bin/small")),
        vec![500_004],
        "under 1 MiB a file keeps one chunk"
    );

    // The ELF file's frames are compressed at the code level, everything else at the layer's.
    let level_of = |chunk: &Chunk| -> i32 {
        let r = chunk.tar_range();
        let data = &tar[r.start as usize..r.end as usize];
        [3, DEFAULT_SCATTERED.code_level]
            .into_iter()
            .find(|&level| {
                let mut c = zstd::bulk::Compressor::new(level).unwrap();
                c.include_checksum(false).unwrap();
                c.include_contentsize(true).unwrap();
                c.compress(data).unwrap().len() as u64 == chunk.size
            })
            .unwrap_or(0)
    };
    let levels = |name: &str| -> Vec<i32> { chunks_of(&toc, name).iter().map(level_of).collect() };
    assert!(levels("usr/lib/libbig.so")
        .iter()
        .all(|&l| l == DEFAULT_SCATTERED.code_level));
    assert!(levels("usr/share/big.txt").iter().all(|&l| l == 3));

    // Zero turns each class off.
    let off = convert_with(Scattered {
        code_chunk_size: 0,
        data_chunk_size: 0,
        ..fine
    });
    for name in ["usr/lib/libbig.so", "data/weights.bin"] {
        assert_eq!(sizes(&chunks_of(&off, name)), cut(3_000_000, mib), "{name}");
    }
}

#[test]
fn by_default_only_data_that_does_not_compress_gets_finer_chunks() {
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.extend(compressible(3_000_000 - elf.len()));
    let tar = TarBuilder::new()
        .file("usr/lib/libbig.so", &elf)
        .file("data/weights.bin", &noise(3_000_000, 9))
        .finish();
    let (layer, blob) =
        convert_layer(tar.as_slice(), Vec::new(), &ConvertOptions::default()).unwrap();
    let toc = read_toc(&blob, &layer);
    let largest = |name: &str| -> u64 {
        let entry = toc.entries.iter().find(|e| e.name == name).unwrap();
        let chunks = &toc.chunks[toc.chunks_for(entry.tar_range().unwrap())];
        chunks.iter().map(|c| c.tar_size).max().unwrap()
    };
    assert_eq!(largest("usr/lib/libbig.so"), u64::from(DEFAULT_CHUNK_SIZE));
    assert_eq!(
        largest("data/weights.bin"),
        u64::from(DEFAULT_SCATTERED.data_chunk_size)
    );
}
