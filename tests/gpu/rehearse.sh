#!/usr/bin/env bash
# The GPU kit rehearsed on a machine without a GPU (CI): builds the bundle, checks that it
# fits, and runs run-on-device.sh here, where it must stop early with its one-line
# "no usable CUDA device" message and exit 3 — not a panic, not a missing-library crash —
# having written its report. With --nvrtc DIR (a folder holding libnvrtc of the bundle's CUDA
# version, e.g. from PyPI's nvidia-cuda-nvrtc), the bundle's CUDA unit tests also run here and
# must compile every kernel with it.
#
#   tests/gpu/rehearse.sh [--cuda 12|13] [--nvrtc DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."

cuda=13
nvrtc=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) cuda=${2:?--cuda needs 12 or 13}; shift 2 ;;
        --nvrtc) nvrtc=${2:?--nvrtc needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "rehearse.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
out=target/gpu-bundle-rehearsal
tests/gpu/bundle.sh --out "$out" --cuda "$cuda"
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
fail() { echo "rehearse.sh: $*" >&2; exit 1; }
if [ -n "$nvrtc" ]; then
    [ -d "$nvrtc" ] || fail "--nvrtc $nvrtc is not a folder"
    echo "== the bundle's CUDA unit tests with NVRTC from $nvrtc"
    tar -C "$report" -xzf "$out/bin.tar.gz"
    SWITCHYARD_REQUIRE_NVRTC=1 LD_LIBRARY_PATH="$nvrtc" timeout 120 "$report/bin/engine-cuda-tests" cuda:: \
        || fail "the bundle's CUDA unit tests failed with NVRTC from $nvrtc"
    rm -rf "$report/bin"
fi
rc=0
"$out/run-on-device.sh" "$report" >"$report/stdout" 2>&1 || rc=$?
cat "$report/stdout"
[ "$rc" -eq 3 ] || fail "run-on-device.sh exited $rc on a machine without a GPU; 3 (no usable CUDA device) was expected"
grep -q "^no usable CUDA device: " "$report/stdout" || fail "run-on-device.sh did not say 'no usable CUDA device'"
if grep -qiE "panicked|segmentation fault|core dumped|cannot open shared object" "$report/stdout"; then
    fail "run-on-device.sh crashed instead of stopping cleanly"
fi
[ -s "$report/gpu-report.txt" ] || fail "run-on-device.sh wrote no gpu-report.txt"
echo "rehearsal passed: the bundle fits and stops cleanly without a GPU ($(grep '^no usable' "$report/stdout"))"
rm -rf "$out"
