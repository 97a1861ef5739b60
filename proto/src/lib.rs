//! Brisk's own gRPC service definitions: the control API of the snapshotter daemon and the zone
//! peer service.
//!
//! This crate holds generated tonic/prost code and nothing else. The services arrive with the
//! snapshotter and peer work; until then the crate is an empty leaf so that the dependency
//! direction (everything may use `proto`, `proto` uses nothing) is fixed from the start.
