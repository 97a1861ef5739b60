//! Brisk's gRPC surface: containerd's snapshots service (generated from the vendored protos in
//! `vendor/`, see `vendor/SOURCES.txt`) and Brisk's own control and zone peer services (`brisk/v1`).
//!
//! Generated code only. The module nesting mirrors the protobuf packages, because the
//! generated code refers across packages with `super::` paths.

#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub mod brisk {
    pub mod v1 {
        tonic::include_proto!("brisk.v1");
    }
}
