#!/usr/bin/env python3
"""switchyard against llama.cpp on the same checkpoint, shapes and threads, in one run.

    python3 tools/bench_llamacpp.py --model /tmp/models/mini --model /tmp/models/qwen3-0.6b

For each checkpoint directory (Hugging Face layout, e.g. from `switchyard synth --preset
mini`): converts it to a GGUF with llama.cpp's own `convert_hf_to_gguf.py`, then runs
`switchyard bench`, `llama-bench`, and `switchyard bench` again (batch 1, `--prompt-len`,
`--gen-len`, `--threads`), and prints one table: llama.cpp's figure, switchyard's two, and
their ratio to llama.cpp. The machines are shared and noisy: only figures from one run compare,
and switchyard runs on both sides of llama.cpp so a drift shows as a spread.

A bf16 checkpoint becomes a bf16 GGUF. An FP8 one (`switchyard synth --dtype fp8`, DeepSeek's
layout) is converted with `--fp8-as-q8`: every tensor stored in FP8 becomes Q8_0 (one byte per
weight plus a scale per 32, the nearest GGUF type in bytes) and the rest stays bf16, while
switchyard keeps those tensors FP8 (`--weight-dtype`, default `fp8` for such a checkpoint).

llama.cpp is built once into `--cache` (default ~/.cache/switchyard/llama.cpp) from the
`llama-cpp-python` source package on PyPI, whose `vendor/llama.cpp` is a whole llama.cpp tree
(`cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF`, CMake from PyPI's wheel): the only registry these
machines reach. The converter's Python needs (torch, transformers, numpy, sentencepiece) go
into a virtual environment beside it. Synthetic tokenizers have no pre-tokenizer hash the
converter knows; an unknown one is converted as `gpt-2`, which keeps the vocabulary (all a
benchmark of random weights needs).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_NEEDS = ["cmake", "numpy", "torch", "transformers", "sentencepiece", "safetensors", "protobuf"]

# Runs llama.cpp's converter with an unknown BPE pre-tokenizer read as gpt-2.
CONVERT_SHIM = r"""
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg):
    print(f"bench_llamacpp: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_llamacpp(cache: Path) -> tuple[Path, Path]:
    """The llama.cpp tree and the venv's python, building what is missing."""
    tree = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    venv = cache / "venv"
    py = venv / "bin" / "python"
    if not (tree / "convert_hf_to_gguf.py").exists():
        cache.mkdir(parents=True, exist_ok=True)
        sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.exists():
            log(f"downloading {SDIST_URL}")
            urllib.request.urlretrieve(SDIST_URL, sdist)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            sdist.unlink()
            sys.exit(f"bench_llamacpp: {sdist.name} has sha256 {digest}, expected {SDIST_SHA256}")
        staging = cache / "extract"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist) as t:
            t.extractall(staging, filter="data")
        (staging / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp").rename(tree)
        shutil.rmtree(staging)
    if not py.exists():
        run([sys.executable, "-m", "venv", venv])
        run([py, "-m", "pip", "install", "-q", *CONVERTER_NEEDS])
    cmake = venv / "bin" / "cmake"
    if not (tree / "build" / "bin" / "llama-bench").exists():
        run([cmake, "-S", tree, "-B", tree / "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DCMAKE_BUILD_TYPE=Release"], stdout=subprocess.DEVNULL)
        run([cmake, "--build", tree / "build", "-j", str(os.cpu_count() or 2),
             "--target", "llama-bench", "llama-server"], stdout=subprocess.DEVNULL)
    return tree, py


def is_fp8(model: Path) -> bool:
    config = json.loads((model / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "fp8"


def gguf_type(model: Path) -> str:
    return "q8_0+bf16" if is_fp8(model) else "bf16"


def gguf_for(model: Path, tree: Path, py: Path, cache: Path) -> Path:
    """A GGUF of `model`, converted once per checkpoint (keyed by path and contents' times)."""
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(model.iterdir()))
    key = hashlib.sha256(f"{model.resolve()}|{stamp}".encode()).hexdigest()[:12]
    out = cache / "gguf" / f"{model.name}-{key}.{gguf_type(model)}.gguf"
    extra = ["--fp8-as-q8"] if is_fp8(model) else []
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        convert_log = out.with_suffix(".log")
        with open(convert_log, "w") as f:
            try:
                run([py, "-c", CONVERT_SHIM, tree, model, "--outtype", "bf16", *extra, "--outfile", partial],
                    stdout=f, stderr=subprocess.STDOUT)
            except subprocess.CalledProcessError:
                sys.exit(f"bench_llamacpp: converting {model} failed; its output is in {convert_log}")
        partial.rename(out)
    return out


def switchyard_bench(binary: str, model: Path, args) -> dict:
    weights = ["--weight-dtype", args.weight_dtype] if args.weight_dtype else []
    out = run([binary, "bench", "--model", model, "--batch", "1", "--prompt-len", args.prompt_len,
               "--gen-len", args.gen_len, "--threads", args.threads, *weights, "--json"],
              capture_output=True, text=True).stdout
    row = json.loads(out)["rows"][0]
    return {"prefill": row["prefill_tok_s"], "decode": row["decode_tok_s"], "kernels": json.loads(out)["kernels"]}


def llama_bench(tree: Path, gguf: Path, args) -> dict:
    out = run([tree / "build" / "bin" / "llama-bench", "-m", gguf, "-p", args.prompt_len,
               "-n", args.gen_len, "-t", args.threads, "-r", args.reps, "-o", "json"],
              capture_output=True, text=True).stdout
    got = {}
    for entry in json.loads(out):
        kind = "prefill" if entry["n_prompt"] > 0 else "decode"
        got[kind] = entry["avg_ts"]
        got[kind + "_sd"] = entry.get("stddev_ts", 0.0)
    return got


def cpu_name() -> str:
    flags, name = set(), "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    has = [f for f in ("amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name} ({', '.join(has) or 'no AVX'})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, type=Path, help="checkpoint directory (repeatable)")
    ap.add_argument("--switchyard", default="target/release/switchyard", help="the switchyard binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "switchyard" / "llama.cpp")
    ap.add_argument("--weight-dtype", choices=["auto", "fp8", "bf16"],
                    help="switchyard bench --weight-dtype (default: its own, as stored)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()
    for m in args.model:
        if not (m / "config.json").exists():
            sys.exit(f"bench_llamacpp: --model {m}: no config.json there (write one with `switchyard synth`)")
    if not Path(args.switchyard).exists() and shutil.which(args.switchyard) is None:
        sys.exit(f"bench_llamacpp: --switchyard {args.switchyard}: not found (cargo build --release)")
    tree, py = ensure_llamacpp(args.cache)
    results = []
    for model in args.model:
        gguf = gguf_for(model, tree, py, args.cache)
        before = switchyard_bench(args.switchyard, model, args)
        llama = llama_bench(tree, gguf, args)
        after = switchyard_bench(args.switchyard, model, args)
        results.append({"model": model.name, "gguf": gguf_type(model), "llama_cpp": llama,
                        "switchyard": [before, after]})
    print(f"{cpu_name()}, {args.threads} threads, batch 1, prompt {args.prompt_len}, "
          f"{args.gen_len} generated; switchyard kernels {results[0]['switchyard'][0]['kernels']}, "
          f"llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}")
    print(f"{'model':<16} {'gguf':<10} {'tok/s':<8} {'llama.cpp':>16} {'switchyard':>16} {'ratio':>13}")
    for r in results:
        for kind in ("prefill", "decode"):
            ll = r["llama_cpp"][kind]
            sy = sorted(s[kind] for s in r["switchyard"])
            print(f"{r['model']:<16} {r['gguf']:<10} {kind:<8} {ll:>9.1f} ± {r['llama_cpp'][kind + '_sd']:<4.1f} "
                  f"{sy[0]:>7.1f} – {sy[1]:<6.1f} {sy[0] / ll:>5.2f} – {sy[1] / ll:<5.2f}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
