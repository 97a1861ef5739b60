//! End-to-end harness: starts the real registry and runs the built `brisk` binary against
//! images made by the real packaging tools (umoci, skopeo), for the system tests in `tests/`.
//! A fault-injecting proxy (`proxy`) can stand between the two.
//!
//! It is test support only: every helper either succeeds or returns an error that names the
//! command and its stderr. It never builds Brisk itself; the tests run whatever `brisk_bin`
//! points at, so build the binaries first.

pub mod bench;
pub mod cmd;
pub mod cri;
pub mod daemons;
pub mod image;
pub mod layout;
pub mod proxy;
pub mod registry;
pub mod server_thread;
pub mod token;
pub mod tree;
pub mod zone;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Result};

pub use cmd::{run, run_output};
pub use image::{
    build_sample_image, push_image, raw_manifest, sample_in_registry, sample_rootfs,
    unpack_image_from_layout, unpack_image_from_registry, OciImage, RegisteredSample,
};
pub use proxy::{Fault, Injection, Proxy};
pub use registry::{write_htpasswd, Registry, RegistryAuth};
pub use tree::{assert_same_tree, tree_manifest};

/// The environment variable that turns system tests on.
pub const ENABLE_VAR: &str = "BRISK_E2E";

/// Tools the conversion tests run. `getfattr` and `setfattr` come from the `attr` package.
pub const CONVERT_TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "umoci",
    "sha256sum",
    "getfattr",
    "setfattr",
];

/// Files the sample image is built from (from the `busybox-static` package).
pub const CONVERT_FILES: &[&str] = &["/bin/busybox"];

/// Tools the snapshotter tests run besides the conversion ones: a private containerd and runc.
pub const CONTAINERD_TOOLS: &[&str] = &["containerd", "ctr", "runc"];

/// Files the snapshotter tests need: the sample's busybox and the FUSE device.
pub const SNAPSHOTTER_FILES: &[&str] = &["/bin/busybox", "/dev/fuse"];

/// Decides whether a system test runs.
///
/// Without `BRISK_E2E=1` it prints `skipped: …` and returns false, so the test passes
/// visibly without doing anything. With it, every prerequisite must be present: running as
/// root, each of `tools` on `PATH`, each of `files`, and the `brisk` binary. A missing one
/// fails the test, naming everything that is missing at once.
pub fn gate(tools: &[&str], files: &[&str]) -> bool {
    if std::env::var(ENABLE_VAR).as_deref() != Ok("1") {
        println!("skipped: set {ENABLE_VAR}=1 to run system tests (needs root and {tools:?})");
        return false;
    }
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("running as root".to_string());
    }
    for tool in tools {
        if find_on_path(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    for file in files {
        if !Path::new(file).exists() {
            missing.push(format!("file {file}"));
        }
    }
    if let Err(err) = brisk_bin() {
        missing.push(format!("{err:#}"));
    }
    if !missing.is_empty() {
        panic!(
            "{ENABLE_VAR}=1 but prerequisites are missing:\n  - {}",
            missing.join("\n  - ")
        );
    }
    true
}

/// `gate` for the tests that run containers on Brisk: the conversion tools, containerd, runc
/// and FUSE.
pub fn snapshotter_gate() -> bool {
    gate(
        &[CONVERT_TOOLS, CONTAINERD_TOOLS].concat(),
        SNAPSHOTTER_FILES,
    )
}

/// Tools the private-registry tests run besides the snapshotter ones: `htpasswd` (from
/// `apache2-utils`) for basic auth, `openssl` for the token service's key and certificate.
pub const PRIVATE_REGISTRY_TOOLS: &[&str] = &["htpasswd", "openssl"];

/// `gate` for the tests of private registries behind basic or token auth.
pub fn private_registry_gate() -> bool {
    gate(
        &[CONVERT_TOOLS, CONTAINERD_TOOLS, PRIVATE_REGISTRY_TOOLS].concat(),
        SNAPSHOTTER_FILES,
    )
}

/// `/proc/self` belongs to the effective user of the process reading it.
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The first executable named `name` in `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives inside the workspace")
        .to_path_buf()
}

/// The `brisk` binary under test: `BRISK_BIN` if set, else the workspace's debug build.
pub fn brisk_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("BRISK_BIN") {
        Some(path) => PathBuf::from(path),
        None => workspace_root().join("target/debug/brisk"),
    };
    if !path.is_file() {
        bail!(
            "brisk binary not found at {} (run `cargo build --bins` first, or set BRISK_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `brisk ARGS` and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn brisk(args: &[&str]) -> Result<String> {
    run(Command::new(brisk_bin()?).args(args))
}

/// Runs `brisk ARGS` and returns how it ended, for tests that expect it to fail.
pub fn brisk_output(args: &[&str]) -> Result<Output> {
    run_output(Command::new(brisk_bin()?).args(args))
}
