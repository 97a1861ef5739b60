//! The `brisk` command's library: converting images to the lazy format (`convert`), and
//! reading converted images back (`inspect`, `check`).
//!
//! It speaks to registries and OCI layout directories through `store`, and never to the
//! snapshotter: conversion works on a machine with neither it nor containerd. Only `pull`
//! talks to containerd, as a client, to unpack an image through a (remote) snapshotter.

pub mod cat;
pub mod convert;
mod error;
pub mod inspect;
mod layout;
pub mod pull;
pub mod status;
pub mod store;
pub mod trace;
mod view;

pub use error::{Error, Result};
