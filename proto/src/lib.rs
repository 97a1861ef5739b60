//! Brisk's gRPC surface: containerd's snapshots service and the Kubernetes CRI (`runtime::v1`),
//! generated from the vendored protos in `vendor/` (see `vendor/SOURCES.txt`), and Brisk's own
//! control and zone peer services (`brisk/v1`).
//!
//! Generated code only, plus the redacted `Debug` of the CRI's `AuthConfig`. The module
//! nesting mirrors the protobuf packages, because the generated code refers across packages
//! with `super::` paths.

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

pub mod runtime {
    // The CRI's comments are Kubernetes' own prose, written for Go doc, not rustdoc.
    #[allow(
        rustdoc::bare_urls,
        rustdoc::invalid_html_tags,
        rustdoc::broken_intra_doc_links,
        rustdoc::invalid_rust_codeblocks
    )]
    pub mod v1 {
        tonic::include_proto!("runtime.v1");

        /// Registry secrets never reach a log through `{:?}`: only which fields are set.
        impl std::fmt::Debug for AuthConfig {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let set = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
                f.debug_struct("AuthConfig")
                    .field("username", &self.username)
                    .field("password", &set(&self.password))
                    .field("auth", &set(&self.auth))
                    .field("server_address", &self.server_address)
                    .field("identity_token", &set(&self.identity_token))
                    .field("registry_token", &set(&self.registry_token))
                    .finish()
            }
        }
    }
}
