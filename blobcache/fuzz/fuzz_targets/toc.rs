//! Raw bytes into the TOC reader: whole blob, footer, TOC position, compressed TOC payload
//! (with and without its digest) and chunks. See `brisk_blobcache_fuzz::targets::toc`.
#![cfg_attr(feature = "libfuzzer", no_main)]

brisk_blobcache_fuzz::fuzz_main!(brisk_blobcache_fuzz::targets::toc);
