//! The containerd remote snapshotter: snapshots gRPC service, snapshot metadata, FUSE layer
//! filesystem and the overlayfs fallback.
//!
//! Only this crate knows containerd's API and FUSE. Inside it, only `service` turns errors
//! into containerd's gRPC codes, and only `fs` turns them into errnos.

pub mod config;
mod control;
mod cri;
mod daemon;
mod error;
mod filter;
pub mod fs;
pub mod handover;
mod meta;
mod metrics;
mod proof;
mod readers;
mod remote;
mod service;
mod snapshots;
mod takeover;
mod traces;
mod usage;
mod zone;

pub use daemon::{run, Stop};
pub use error::{Error, Refusal, Result};
