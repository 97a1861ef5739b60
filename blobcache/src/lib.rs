//! Brisk's chunk layer: how chunks are named (digests), how a lazy layer lays them out (the TOC
//! format in `toc`), and how they are fetched from a registry (`registry`).
//!
//! It knows blobs and chunks by digest and nothing about FUSE, containerd or snapshots. The
//! tiered cache (memory, disk, peers, registry) composes on top of these pieces.

pub mod blocking;
pub mod chunk;
pub mod digest;
pub mod disk;
mod error;
pub mod image;
pub mod layered;
pub mod lazy;
pub mod media;
pub mod memory;
pub mod meta;
pub mod reference;
pub mod registry;
pub mod remote;
pub mod source;
#[cfg(test)]
mod test_util;
pub mod toc;
pub mod zone;

pub use digest::Digest;
pub use error::{chain as error_chain, Error, Limit, Result};
