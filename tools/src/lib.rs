//! The `brisk` command's library: converting images to the lazy format (`convert`), and
//! reading converted images back (`inspect`, `check`).
//!
//! It speaks to registries and OCI layout directories through `store`, and never to
//! containerd or the snapshotter: conversion works on a machine with neither.

pub mod cat;
pub mod convert;
mod error;
pub mod inspect;
mod layout;
pub mod store;
mod view;

pub use error::{Error, Result};
