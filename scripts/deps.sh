#!/usr/bin/env bash
# Installs the Debian 12 packages Brisk's build, tests and quick start use, if any is missing.
set -euo pipefail

PACKAGES=(containerd runc fuse3 docker-registry skopeo umoci mmdebstrap zstd attr iproute2
          protobuf-compiler busybox-static curl ca-certificates tar apache2-utils openssl
          stargz-snapshotter)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: Brisk needs a Rust toolchain (1.85 or newer), e.g. from rustup" >&2
    exit 1
fi
