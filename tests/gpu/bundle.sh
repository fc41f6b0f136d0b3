#!/usr/bin/env bash
# Builds the GPU bundle here, on a machine with cargo and no GPU: the release `switchyard`
# binary and the GPU test binaries with the CUDA backend for one CUDA major version, stripped
# and packed with `run-on-device.sh` into one folder that a GPU machine without cargo or
# network can run (tests/gpu/README.md). Fails if the folder, with the working tree that
# travels beside it, would not fit the 64 MiB a run may carry.
#
#   tests/gpu/bundle.sh [--cuda 12|13] [--out DIR]
#
# --cuda: the CUDA major version of the GPU machine's libraries (13 for driver 580 and later,
#         the default; 12 for drivers 525-575). --out: the bundle folder (target/gpu-bundle).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR=never

cuda=13
out=target/gpu-bundle
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) cuda=${2:?--cuda needs 12 or 13}; shift 2 ;;
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$cuda" in
    12|13) ;;
    *) echo "bundle.sh: --cuda must be 12 or 13, got '$cuda'" >&2; exit 2 ;;
esac
feature="cuda-$cuda"

echo "== build (release, --features $feature)"
cargo build --release --locked -p switchyard --features "$feature"
# The engine's CUDA unit tests and its GPU-against-CPU tests, as binaries that run without
# cargo; their paths come from cargo's JSON messages.
tests_json=$(mktemp)
trap 'rm -f "$tests_json"' EXIT
cargo test --release --locked -p switchyard-engine --features "$feature" --lib --test gpu \
    --no-run --message-format=json >"$tests_json"
executable() { # $1: "lib" or "gpu"
    python3 - "$tests_json" "$1" <<'PY'
import json, sys
path, want = sys.argv[1], sys.argv[2]
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        kind = "lib" if "lib" in t.get("kind", []) else t.get("name")
        if kind == want:
            print(m["executable"])
PY
}
lib_tests=$(executable lib)
gpu_tests=$(executable gpu)
if [ -z "$lib_tests" ] || [ -z "$gpu_tests" ]; then
    echo "bundle.sh: cargo did not name the engine's test binaries" >&2
    exit 1
fi

echo "== bundle $out"
rm -rf "$out"
stage="$out.stage"
rm -rf "$stage"
mkdir -p "$out" "$stage/bin"
cp target/release/switchyard "$stage/bin/switchyard"
cp "$lib_tests" "$stage/bin/engine-cuda-tests"
cp "$gpu_tests" "$stage/bin/engine-gpu-tests"
strip "$stage"/bin/*
tar -C "$stage" -czf "$out/bin.tar.gz" bin
rm -rf "$stage"
cp tests/gpu/run-on-device.sh "$out/run-on-device.sh"
chmod +x "$out/run-on-device.sh"
{
    echo "cuda=$cuda"
    echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$out/BUNDLE"

limit=$((64 << 20))
bundle=$(du -sb "$out" | cut -f1)
tree=$(git ls-files -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
total=$((bundle + tree))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "bundle: $(mib "$bundle") in $out (binaries $(mib "$(stat -c %s "$out/bin.tar.gz")") packed); with the working tree ($(mib "$tree")): $(mib "$total") of $(mib "$limit")"
if [ "$total" -gt "$limit" ]; then
    echo "bundle.sh: the bundle and the working tree come to $(mib "$total"), over the $(mib "$limit") a run may carry" >&2
    exit 1
fi
echo "run it on the GPU machine from the repository root: $out/run-on-device.sh \"\$OUT\""
