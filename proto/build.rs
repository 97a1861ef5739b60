//! Generates the gRPC code: containerd's snapshots service (server and client) from the
//! vendored protos, and Brisk's own control and zone peer services.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_arg("--experimental_allow_proto3_optional");
    // Chunk pieces are slices of cached chunks: shared, not copied.
    config.bytes([".brisk.v1.Piece.data"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "vendor/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
            "brisk/v1/control.proto",
            "brisk/v1/peer.proto",
        ],
        &["vendor", "."],
    )?;
    println!("cargo:rerun-if-changed=vendor");
    println!("cargo:rerun-if-changed=brisk");
    Ok(())
}
