//! Start-up read traces: the recorder fed by the FUSE layer, the trace file format and the
//! prefetch plan built from it.
//!
//! It only knows chunk identities (`brisk_blobcache::Digest`), never file contents. The recorder,
//! the format and the replay plan land with the trace work; this crate exists now so the
//! workspace's dependency direction is fixed.
