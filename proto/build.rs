//! Generates the gRPC code: containerd's snapshots service and the Kubernetes CRI (`runtime.v1`,
//! server and client) from the vendored protos, and Brisk's own control and zone peer services.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_arg("--experimental_allow_proto3_optional");
    // Chunk pieces are slices of cached chunks: shared, not copied.
    config.bytes([".brisk.v1.Piece.data"]);
    // Registry secrets: upstream marks these fields `debug_redact`, which this protoc does not
    // know (stripped from the vendored file), so the Debug impl is written by hand, redacted.
    config.skip_debug([".runtime.v1.AuthConfig"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "vendor/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
            "vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto",
            "brisk/v1/control.proto",
            "brisk/v1/peer.proto",
        ],
        &["vendor", "."],
    )?;
    println!("cargo:rerun-if-changed=vendor");
    println!("cargo:rerun-if-changed=brisk");
    Ok(())
}
