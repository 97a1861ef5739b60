#!/usr/bin/env bash
# Quick start: builds Brisk, starts a private registry on loopback, builds a small Python image
# from the Debian archive, converts it to the lazy format, verifies it, shows that standard
# tools (skopeo, umoci, zstd, tar) still unpack and run it, and finally runs it lazily under a
# private containerd with brisk-snapshotter (the registry serves only what the start reads).
#
# Everything lives in one work directory (BRISK_WORKDIR, default a new temp dir); the registry
# started here is stopped on exit. Set BRISK_KEEP=1 to keep the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/deps.sh
echo "==> building brisk (release)"
cargo build --release --locked -p brisk-tools -p brisk-snapshotter
BRISK=$ROOT/target/release/brisk
SNAPSHOTTER=$ROOT/target/release/brisk-snapshotter

WORK=${BRISK_WORKDIR:-$(mktemp -d -t brisk-quickstart.XXXXXX)}
mkdir -p "$WORK"
REG_PID=
SNAP_PID=
CTD_PID=
cleanup() {
    [[ -n $CTD_PID ]] && kill "$CTD_PID" 2>/dev/null && wait "$CTD_PID" 2>/dev/null || true
    # SIGINT: the clean stop (unmounts every lazy layer and stops the holder); SIGTERM would
    # leave them to a successor.
    [[ -n $SNAP_PID ]] && kill -INT "$SNAP_PID" 2>/dev/null && wait "$SNAP_PID" 2>/dev/null || true
    # The holder of FUSE connections the daemon started, if a clean stop did not end it.
    [[ -f $WORK/brisk/holder.pid ]] && kill "$(cat "$WORK/brisk/holder.pid")" 2>/dev/null || true
    [[ -n $REG_PID ]] && kill "$REG_PID" 2>/dev/null || true
    # Anything still mounted under the work directory (container rootfs, FUSE layers).
    grep -o " $WORK[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    if [[ ${BRISK_KEEP:-0} != 1 && -z ${BRISK_WORKDIR:-} ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# A free loopback port for the registry.
PORT=5000
while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
REG=127.0.0.1:$PORT
cat > "$WORK/registry.yml" <<YAML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $WORK/registry}, delete: {enabled: true}}
http: {addr: $REG}
YAML
echo "==> starting docker-registry on $REG"
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$REG/v2/" >/dev/null || { echo "registry did not start; see $WORK/registry.log" >&2; exit 1; }

echo "==> building a Debian 12 + python3 image (mmdebstrap, umoci)"
mmdebstrap --quiet --variant=minbase --include=python3-minimal bookworm "$WORK/rootfs.tar"
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:sample"
umoci unpack --image "$WORK/oci:sample" "$WORK/bundle" >/dev/null
tar -C "$WORK/bundle/rootfs" -xf "$WORK/rootfs.tar"
umoci repack --refresh-bundle --image "$WORK/oci:sample" "$WORK/bundle"
# A second layer: the application.
mkdir -p "$WORK/bundle/rootfs/app"
printf 'import sys\nprint("hello from a lazily loadable image, python", sys.version.split()[0])\n' \
    >"$WORK/bundle/rootfs/app/hello.py"
umoci repack --refresh-bundle --image "$WORK/oci:sample" "$WORK/bundle"
umoci config --image "$WORK/oci:sample" --config.cmd python3 --config.cmd /app/hello.py
skopeo copy -q --dest-tls-verify=false "oci:$WORK/oci:sample" "docker://$REG/sample:v1"

echo "==> brisk convert $REG/sample:v1 $REG/sample:lazy"
"$BRISK" convert "$REG/sample:v1" "$REG/sample:lazy"
echo "==> brisk inspect"
"$BRISK" inspect "$REG/sample:lazy"
echo "==> brisk check"
"$BRISK" check "$REG/sample:lazy"

echo "==> standard tools: one converted layer through curl | zstd -d | tar -t"
LAYER=$(skopeo inspect --tls-verify=false --format '{{range .Layers}}{{println .}}{{end}}' \
    "docker://$REG/sample:lazy" | grep sha256 | tail -1)
curl -sf "http://$REG/v2/sample/blobs/$LAYER" | zstd -dc | tar -tv

echo "==> standard tools: skopeo + umoci unpack the converted image, then run it with chroot"
skopeo copy -q --src-tls-verify=false --dest-decompress "docker://$REG/sample:lazy" "dir:$WORK/plain"
skopeo copy -q --dest-oci-accept-uncompressed-layers "dir:$WORK/plain" "oci:$WORK/unpacked:lazy"
umoci unpack --image "$WORK/unpacked:lazy" "$WORK/run" >/dev/null
chroot "$WORK/run/rootfs" python3 /app/hello.py

echo "==> lazy start: brisk-snapshotter + a private containerd with Brisk as a proxy snapshotter"
"$SNAPSHOTTER" --root "$WORK/brisk" --address "$WORK/brisk.sock" >"$WORK/snapshotter.log" 2>&1 &
SNAP_PID=$!
cat >"$WORK/containerd.toml" <<TOML
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/containerd.sock"
[proxy_plugins]
  [proxy_plugins.brisk]
    type = "snapshot"
    address = "$WORK/brisk.sock"
TOML
containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 &
CTD_PID=$!
CTR=(ctr -a "$WORK/containerd.sock" -n brisk-quickstart)
for _ in $(seq 100); do "${CTR[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
"$BRISK" pull "$REG/sample:lazy" --containerd "$WORK/containerd.sock" --namespace brisk-quickstart
"${CTR[@]}" run --rm --snapshotter brisk "$REG/sample:lazy" quickstart-$$
echo "==> what the registry served for that start (brisk status):"
"$BRISK" status --snapshotter "$WORK/brisk.sock"
"${CTR[@]}" images rm --sync "$REG/sample:lazy" >/dev/null

echo "==> done: $REG/sample:lazy is a lazy image that every standard tool still reads"
