#!/usr/bin/env bash
# Build containerd-stargz-grpc (the stargz-snapshotter daemon) from Debian's
# packaged Go sources, offline, in GOPATH mode.
#
#   bash e2e/stargz/build.sh OUTDIR
#
# Installs golang-go, the stargz-snapshotter library sources and ctr-remote
# with apt-get when missing (needs root), then writes
# OUTDIR/containerd-stargz-grpc. Does nothing if that binary is newer than
# main.go and this script.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
outdir="$(cd "$1" && pwd)"
bin="$outdir/containerd-stargz-grpc"

packages=(golang-go golang-github-containerd-stargz-snapshotter-dev stargz-snapshotter)
gocode=/usr/share/gocode
lib_import=github.com/containerd/stargz-snapshotter

print_versions() {
    echo "go:                 $(go version)"
    echo "stargz library:     golang-github-containerd-stargz-snapshotter-dev $(dpkg-query -W -f='${Version}' golang-github-containerd-stargz-snapshotter-dev)"
    echo "containerd library: golang-github-containerd-containerd-dev $(dpkg-query -W -f='${Version}' golang-github-containerd-containerd-dev)"
    echo "ctr-remote:         stargz-snapshotter $(dpkg-query -W -f='${Version}' stargz-snapshotter)"
    echo "binary:             $bin"
}

missing=()
for p in "${packages[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages (run as root to install them): ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # To stderr: stdout carries only the version lines the benchmark report quotes.
    echo "installing: ${missing[*]}" >&2
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
fi

if [ -x "$bin" ] && [ "$bin" -nt "$here/main.go" ] && [ "$bin" -nt "$here/build.sh" ]; then
    echo "up to date: $bin"
    print_versions
    exit 0
fi

if [ ! -d "$gocode/src/$lib_import/service" ]; then
    echo "stargz-snapshotter sources not found under $gocode/src/$lib_import" >&2
    exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/stargz-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Private GOPATH entry, searched before /usr/share/gocode. It holds a copy of
# the library without service/resolver/cri.go: that file imports
# k8s.io/cri-api, which Debian does not package, and only the CRI plugin
# integration (not used here) needs it.
gopath="$work/gopath"
mkdir -p "$gopath/src/github.com/containerd"
cp -a "$gocode/src/$lib_import" "$gopath/src/$lib_import"
rm -f "$gopath/src/$lib_import/service/resolver/cri.go"

main_dir="$gopath/src/brisk.local/containerd-stargz-grpc"
mkdir -p "$main_dir"
cp "$here/main.go" "$main_dir/main.go"

# go needs a build cache directory; give it one when HOME is not set (CI).
if [ -z "${GOCACHE:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ] && [ -z "${HOME:-}" ]; then
    export GOCACHE="$work/gocache"
fi

start=$(date +%s)
(
    cd "$main_dir"
    GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$gopath:$gocode" CGO_ENABLED=0 \
        nice -n 10 go build -trimpath -ldflags "-s -w" -o "$bin.tmp" .
)
mv -f "$bin.tmp" "$bin"
echo "built $bin in $(( $(date +%s) - start ))s"
print_versions
