#!/usr/bin/env bash
# Runs a GPU bundle (made by tests/gpu/bundle.sh) on a GPU machine without cargo or network:
# finds the CUDA libraries (the driver's libcuda; cuBLAS, NVRTC and NCCL from a Python venv's
# `nvidia/*/lib` folders or a CUDA toolkit), prints nvidia-smi, runs every GPU-against-CPU
# test, the expert-layer throughput benchmark at DeepSeek-V3's shape, and `switchyard bench`
# on `mini` in one process and as router + worker on cuda:0 and on the CPU. Everything it
# prints also goes to REPORT_DIR/gpu-report.txt. Every step has a time limit; the whole run
# ends well inside 8 minutes.
#
#   target/gpu-bundle/run-on-device.sh REPORT_DIR
#
# Exit status: 0 all passed; 1 a step failed; 3 no usable CUDA device (one line says why).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
report_dir=${1:?usage: run-on-device.sh REPORT_DIR}
mkdir -p "$report_dir"
report="$report_dir/gpu-report.txt"
exec > >(tee "$report") 2>&1
tee_pid=$!

work=$(mktemp -d)
finish() {
    rm -rf "$work"
    # Let tee write the last lines to the report before the caller reads it.
    exec >&- 2>&-
    wait "$tee_pid" 2>/dev/null
}
trap finish EXIT
started=$(date +%s)
failed=()
step() { # step NAME SECONDS CMD...: runs CMD with a time limit, records a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, at $(($(date +%s) - started))s)"
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "-- $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
        failed+=("$name")
    fi
    return 0
}

echo "== bundle"
cat "$here/BUNDLE" 2>/dev/null || echo "(no BUNDLE file)"
tar -C "$work" -xzf "$here/bin.tar.gz" || { echo "run-on-device: cannot unpack $here/bin.tar.gz"; exit 1; }
bin="$work/bin"

echo "== CUDA libraries"
dirs=()
add_dir() { [ -d "$1" ] && case " ${dirs[*]-} " in *" $1 "*) ;; *) dirs+=("$1") ;; esac; }
# The driver's libcuda: where the loader already finds it, or the usual places.
for d in $(ldconfig -p 2>/dev/null | awk '/libcuda\.so/ { sub(/\/[^\/]*$/, "", $NF); print $NF }' | sort -u) \
    /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/lib/wsl/lib; do
    [ -e "$d/libcuda.so.1" ] && add_dir "$d"
done
# cuBLAS, NVRTC, NCCL: a Python venv's pip packages (nvidia-cublas, nvidia-cuda-nvrtc,
# nvidia-nccl-cu13, …), else a CUDA toolkit.
sites=()
for py in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" python3 python; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    while IFS= read -r s; do sites+=("$s"); done < <("$py" - 2>/dev/null <<'PY'
import site, sys
paths = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
print("\n".join(p for p in paths if p))
PY
)
done
while IFS= read -r s; do sites+=("$s"); done < <(timeout 20 find / -xdev -maxdepth 6 -type d -name site-packages 2>/dev/null)
for s in "${sites[@]}"; do
    for d in "$s"/nvidia/*/lib; do add_dir "$d"; done
done
for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64; do add_dir "$d"; done
# cudarc asks for `libX.so` or a few versioned names (libnccl.so.2 is not one of them):
# unversioned links in a folder of our own cover every library found.
links="$work/lib"
mkdir -p "$links"
for d in "${dirs[@]}"; do
    for f in "$d"/lib*.so.*; do
        [ -e "$f" ] || continue
        base=$(basename "$f")
        name=${base%%.so.*}.so
        [ -e "$links/$name" ] || [ -e "$d/$name" ] || ln -s "$f" "$links/$name"
    done
done
LD_LIBRARY_PATH="$links$(printf ':%s' "${dirs[@]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
for lib in libcuda libcublas libcublasLt libnvrtc libnccl; do
    found=""
    for d in "$links" "${dirs[@]}"; do
        f=$(ls "$d/$lib".so* 2>/dev/null | head -1)
        [ -n "$f" ] && { found=$(readlink -f "$f"); break; }
    done
    echo "$lib: ${found:-not found}"
done

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi || true
else
    echo "nvidia-smi: not installed"
fi

# One probe before anything long: the GPU tests say why no device opens.
probe=$(timeout 120 "$bin/engine-gpu-tests" --exact gpu_experts_match_cpu_experts --nocapture --test-threads 1 2>&1)
probe_rc=$?
if reason=$(grep -m1 "SKIPPED (no usable CUDA device)" <<<"$probe"); then
    reason=${reason#*: }
    echo "no usable CUDA device: ${reason#device: }"
    exit 3
fi
if [ "$probe_rc" -ne 0 ]; then
    echo "$probe"
    echo "run-on-device: the first GPU test failed (exit $probe_rc); going on with the rest"
fi

export SWITCHYARD_REQUIRE_NVRTC=1
step "CUDA unit tests (kernels compile, device errors)" 120 \
    "$bin/engine-cuda-tests" cuda:: --test-threads 1
step "GPU against CPU: per-op max |Δ|" 180 \
    "$bin/engine-gpu-tests" --nocapture --test-threads 1
step "expert layer at DeepSeek-V3's shape, 1..256 rows per expert" 120 \
    "$bin/engine-gpu-tests" expert_layer_throughput --ignored --nocapture

model="$work/mini"
step "synth mini (bf16)" 120 "$bin/switchyard" synth --preset mini --dtype bf16 --out "$model"
if [ -f "$model/config.json" ]; then
    devices=(cuda:0 cpu)
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    # Two GPUs or more: the router's weights split over the first two as well (NCCL).
    [ "${gpus:-0}" -ge 2 ] && devices=(cuda:0,1 "${devices[@]}")
    for device in "${devices[@]}"; do
        step "bench mini: in one process and router + 1 worker, on $device" 150 \
            "$bin/switchyard" bench --model "$model" --batch 1,8,32,64 --prompt-len 64 --gen-len 32 \
            --workers 1 --worker-threads 8 --worker-device "${device%%,*}" --router-device "$device"
    done
fi

echo "== done in $(($(date +%s) - started))s"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all steps passed"
