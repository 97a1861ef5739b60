//! The containerd remote snapshotter: snapshots gRPC service, snapshot metadata, FUSE layer
//! filesystem and the overlayfs fallback.
//!
//! Only this crate knows containerd's API and FUSE. The daemon lands with the snapshotter work;
//! until then the crate has no code, so that nothing pretends to serve snapshots.
