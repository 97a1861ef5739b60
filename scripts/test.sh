#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, unit, integration and (as root) end-to-end
# tests against the real registry, skopeo, umoci, zstd and tar.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz crates live outside the workspace (their own lock files and features); they must
# keep building against it. Their plain replay build: the fuzzing engines want a C++ toolchain
# the tests do not otherwise need.
for crate in blobcache/fuzz snapshotter/fuzz; do
    (cd "$crate" && CARGO_TARGET_DIR="$OLDPWD/target/fuzz" cargo check --all-targets --locked --no-default-features)
done
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked --quiet
# The system tests run the built binaries.
cargo build --workspace --bins --locked
if [[ $(id -u) -eq 0 ]]; then
    export BRISK_E2E=1
else
    echo "not root: end-to-end tests will report themselves skipped" >&2
fi
cargo test --workspace --locked
