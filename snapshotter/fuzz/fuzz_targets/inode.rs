//! A generated layer (TOC and tar stream) into the filesystem's inode table and every FUSE
//! metadata call and read plan on it. See `brisk_snapshotter_fuzz::inode`.
#![cfg_attr(feature = "libfuzzer", no_main)]

brisk_blobcache_fuzz::fuzz_main!(brisk_snapshotter_fuzz::inode);
