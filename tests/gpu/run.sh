#!/usr/bin/env bash
# The CUDA backend on a GPU machine that has cargo, in one go (well under 8 minutes): builds
# with `--features cuda-13` (or cuda-12), runs every GPU-against-CPU test (they fail, not skip,
# if no device opens here), then a short benchmark of the same expert layer on the device and
# on the host.
#
#   tests/gpu/run.sh [12|13]    # the CUDA major version (default 13: drivers 580 and later)
#
# For a GPU machine without cargo, build a bundle here instead: tests/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR=never
cuda=cuda-${1:-13}

echo "== nvidia-smi"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== build (release, --features $cuda)"
# Every step has a time limit, so a hang cannot eat a lent machine's budget.
timeout 300 cargo build --release --locked -p switchyard --features $cuda

echo "== GPU tests against the CPU"
timeout 200 cargo test --release --locked -p switchyard-engine --features $cuda --lib cuda::
status=0
out=$(timeout 120 cargo test --release --locked -p switchyard-engine --features $cuda --test gpu -- --nocapture --test-threads 1 2>&1) || status=$?
echo "$out"
if [ "$status" -ne 0 ]; then
    echo "error: the GPU tests failed (exit $status)" >&2
    exit "$status"
fi
if grep -q "SKIPPED (no usable CUDA device)" <<<"$out"; then
    echo "error: the GPU tests skipped on a machine that should have a device" >&2
    exit 1
fi

echo "== benchmark: one expert layer at DeepSeek-V3's shape, 1..256 rows per expert"
timeout 120 cargo test --release --locked -p switchyard-engine --features $cuda --test gpu \
    expert_layer_throughput -- --ignored --nocapture

echo "== benchmark: mini (bf16) in one process and as router + one worker, on cuda:0 then on the CPU"
model=target/gpu-bench/mini
mkdir -p target/gpu-bench
[ -f "$model/config.json" ] || timeout 120 target/release/switchyard synth --preset mini --dtype bf16 --out "$model"
devices=(cuda:0 cpu)
# Two GPUs or more: the router's weights split over the first two as well (NCCL).
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then devices=(cuda:0,1 "${devices[@]}"); fi
for device in "${devices[@]}"; do
    echo "-- router projections and worker experts on $device"
    timeout 120 target/release/switchyard bench --model "$model" --batch 1,8,64 --prompt-len 64 --gen-len 32 \
        --workers 1 --worker-threads 8 --worker-device "${device%%,*}" --router-device "$device"
done
