//! The TOC's JSON into validation and, when it is valid, the rest of the reader. See
//! `brisk_blobcache_fuzz::targets::toc_json`.
#![cfg_attr(feature = "libfuzzer", no_main)]

brisk_blobcache_fuzz::fuzz_main!(brisk_blobcache_fuzz::targets::toc_json);
