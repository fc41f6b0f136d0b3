#!/usr/bin/env python3
"""The same benchmark as `switchyard bench`, on transformers' own model class for the checkpoint
(DeepseekV3ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM, ... through AutoModelForCausalLM).

Loads a checkpoint directory (e.g. one written by `switchyard synth --preset mini --dtype bf16`
or `--preset llama-3.2-1b`) in bf16 and reports prefill tok/s (one forward over `--prompt-len`
random tokens per sequence), greedy decode tok/s per batch size with the KV cache, on
`--threads` CPU threads, and the process's peak RSS.

    python3 tools/bench_transformers.py --model DIR --batch 1,8 --prompt-len 128 --gen-len 64

Run it right after `switchyard bench` with the same flags and report the ratio of the two: the
machines are shared and noisy, so only figures from one run compare.
"""

import argparse
import json
import resource
import time
import warnings

import torch
from transformers import AutoModelForCausalLM


def main():
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    with torch.inference_mode():
        for batch in [int(b) for b in args.batch.split(",")]:
            ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=g)
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill = time.perf_counter() - start
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(args.gen_len):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            decode = time.perf_counter() - start
            rows.append({
                "batch": batch,
                "prefill_tok_s": batch * args.prompt_len / prefill,
                "decode_tok_s": batch * args.gen_len / decode if args.gen_len else 0.0,
            })
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"torch": torch.__version__, "model_type": model.config.model_type,
                      "threads": args.threads, "peak_rss_bytes": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
