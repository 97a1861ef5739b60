//! `key=value` lines into the lazy-layer annotation and label parsers. See
//! `brisk_blobcache_fuzz::targets::annotations`.
#![cfg_attr(feature = "libfuzzer", no_main)]

brisk_blobcache_fuzz::fuzz_main!(brisk_blobcache_fuzz::targets::annotations);
