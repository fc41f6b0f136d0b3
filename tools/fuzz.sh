#!/usr/bin/env bash
# Coverage-guided fuzzing of Switchyard's input parsers with libFuzzer, on the stable
# toolchain: `libfuzzer-sys` builds libFuzzer from source (needs a C++ compiler), and the
# targets are instrumented with rustc's stable sanitizer-coverage pass. (cargo-fuzz is not
# needed, and its -Zsanitizer flags are nightly-only; no AddressSanitizer here — the targets
# are safe Rust, and release builds keep debug assertions and overflow checks.)
#
#   tools/fuzz.sh                       # every target, 1,000,000 inputs each
#   tools/fuzz.sh --runs 20000          # a short run of each (CI)
#   tools/fuzz.sh --seconds 60 http_request wire_codec
#
# Targets (fuzz/fuzz_targets/): wire_codec, worker_request, http_request, safetensors_header,
# config_json. Corpora grow in fuzz/corpus/TARGET (not committed), seeded from fuzz/seeds/;
# a crashing input is written to fuzz/artifacts/TARGET/ and the script fails.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

runs=1000000
seconds=0
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "unknown flag $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
all=(wire_codec worker_request http_request safetensors_header config_json)
[[ ${#targets[@]} -eq 0 ]] && targets=("${all[@]}")

triple="$(rustc -vV | sed -n 's/^host: //p')"
# Instrument only the target's code: with --target, RUSTFLAGS skip build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
export CARGO_INCREMENTAL=0
cargo build --release --locked --target "$triple" $(printf -- '--bin %s ' "${targets[@]}")

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [[ -d "seeds/$t" ]] && seeds=("seeds/$t")
    limit=(-runs="$runs")
    [[ "$seconds" != 0 ]] && limit=(-max_total_time="$seconds")
    echo "== fuzz $t (${limit[*]})"
    start=$(date +%s)
    # -rss_limit_mb: the worker target holds a model; a leak still shows as a failure.
    "target/$triple/release/$t" "corpus/$t" "${seeds[@]}" "${limit[@]}" \
        -artifact_prefix="artifacts/$t/" -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 \
        2> "artifacts/$t.log" || { tail -40 "artifacts/$t.log"; echo "fuzz $t FAILED" >&2; exit 1; }
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|cov:' "artifacts/$t.log" | tail -3
    echo "fuzz $t: ok in $(( $(date +%s) - start )) s"
done
