#!/usr/bin/env bash
# Fuzzes the TOC reader (blobcache/fuzz) and the FUSE filesystem's inode table and callbacks
# (snapshotter/fuzz) with AFL++ on the stable toolchain, one target after another, one fuzzer
# process at a time, SECONDS_PER_TARGET each (default 300), starting from the committed seeds.
# Prints executions, crashes and hangs per target and exits non-zero if any target crashed.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Installs what is missing: Debian's afl++ (which brings the clang, llvm and make that
# cargo-afl's own build of AFL++ uses) and cargo-afl. Builds go to target/fuzz-afl, fuzzer
# output to target/fuzz-out/<target> (or $BRISK_FUZZ_OUT), never into the sources.
# BRISK_FUZZ_TARGETS="toc inode" limits the run to some targets.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-300}
targets=${BRISK_FUZZ_TARGETS:-"toc toc_json annotations inode inode_json"}
root=$PWD
out=${BRISK_FUZZ_OUT:-$root/target/fuzz-out}

if ! command -v afl-fuzz >/dev/null; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "afl++ is missing (run as root to install it, or apt-get install afl++)" >&2
        exit 1
    fi
    echo "installing afl++" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq afl++ >/dev/null
fi
if ! cargo afl --version >/dev/null 2>&1; then
    echo "installing cargo-afl" >&2
    # Its build also builds AFL++ itself, matched to this rustc, under ~/.local/share/afl.rs.
    nice -n 15 cargo install --locked cargo-afl
fi

export CARGO_TARGET_DIR=$root/target/fuzz-afl
for crate in blobcache/fuzz snapshotter/fuzz; do
    nice -n 15 cargo afl build --release --locked --no-default-features --features afl \
        --manifest-path "$crate/Cargo.toml"
done

# A busy shared machine: no CPU binding, no governor check; AFL's own UI off for logs.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1

total=0
crashed=0
summary=()
for target in $targets; do
    case $target in
        toc | toc_json | annotations) crate=blobcache/fuzz ;;
        inode | inode_json) crate=snapshotter/fuzz ;;
        *) echo "unknown target $target" >&2; exit 2 ;;
    esac
    dict=()
    case $target in
        toc_json | inode_json) dict=(-x blobcache/fuzz/dict/toc.dict) ;;
        annotations) dict=(-x blobcache/fuzz/dict/annotations.dict) ;;
    esac
    dir=$out/$target
    rm -rf "$dir"
    mkdir -p "$out"
    echo "fuzzing $target for ${seconds}s (output in $dir)" >&2
    # -m: a 1 GiB address-space limit turns an unbounded allocation into a crash.
    nice -n 15 cargo afl fuzz -V "$seconds" -m 1024 -i "$crate/seeds/$target" -o "$dir" \
        "${dict[@]}" -- "$CARGO_TARGET_DIR/release/$target" >"$dir.log" 2>&1 || {
        echo "afl-fuzz failed on $target; see $dir.log" >&2
        tail -20 "$dir.log" >&2
        exit 1
    }
    stats=$dir/default/fuzzer_stats
    stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
    execs=$(stat execs_done)
    crashes=$(stat saved_crashes)
    hangs=$(stat saved_hangs)
    total=$((total + execs))
    summary+=("$(printf '%-12s %12s execs %8s/s  %s crashes  %s hangs' \
        "$target" "$execs" "$(stat execs_per_sec)" "$crashes" "$hangs")")
    if ((crashes > 0)); then
        crashed=1
        echo "$target crashed; replay an input with:" >&2
        echo "  cargo run --release --manifest-path $crate/Cargo.toml --no-default-features" \
            "--bin $target -- $dir/default/crashes" >&2
    fi
    if ((hangs > 0)); then
        echo "$target hung on inputs in $dir/default/hangs" >&2
    fi
done

printf '%s\n' "${summary[@]}"
echo "total: $total executions"
exit $crashed
