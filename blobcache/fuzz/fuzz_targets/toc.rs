//! Fuzzes the reader side of the lazy layer format: footer, TOC position, TOC decode and
//! validation, and chunk decoding. Any input must give `Ok` or `Err`, never a panic, a hang
//! or an allocation sized by unchecked input. Run: `cargo fuzz run toc` in `blobcache/`.
#![no_main]

use brisk_blobcache::toc::{decode_chunk, Footer, Toc, FOOTER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    brisk_blobcache::toc::fuzz_read_blob(data);
    let _ = std::str::from_utf8(data).map(|s| s.parse::<brisk_blobcache::toc::TocPosition>());
    if data.len() >= FOOTER_SIZE {
        let _ = Footer::decode(&data[data.len() - FOOTER_SIZE..], data.len() as u64);
    }
    if let Ok(toc) = Toc::decode(data, 1 << 20, None) {
        for (i, c) in toc.chunks.iter().enumerate() {
            let _ = decode_chunk(i, c, data);
        }
    }
});
