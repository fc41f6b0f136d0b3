#!/usr/bin/env python3
"""Switchyard's placement against DeepSeek's EPLB on the same expert loads.

Makes Zipf-shaped loads for a DeepSeek-V3-sized cluster (58 MoE layers x 256 experts, 32
redundant experts per layer: 288 slots per layer, 2 per worker on 144 workers), runs

  * `switchyard plan --load FILE --redundant-experts 32 --json` (a plan made for the load, and
    the load-blind plan rebalanced within `--max-moves`), and
  * EPLB's global policy (`rebalance_experts(weight, 288, 1, 1, 144)`: replicate, then
    balanced packing) on the same loads,

and prints the predicted per-layer worker imbalance (max / mean tokens per worker, an expert's
tokens split evenly over its copies) of each, and how many expert copies each loads compared
with the load-blind placement in force.

    python3 tools/eplb_compare.py --switchyard target/release/switchyard [--skew 1.0] [--seeds 3]
        [--drift 0.25]

Then the load drifts: in every layer a fraction (`--drift`) of the experts trade their loads
at random. The cluster runs the plan made for the first load; Switchyard rebalances it within
`--max-moves` (`plan --previous-load FIRST --load SECOND`), EPLB re-plans from scratch. EPLB's
moves are counted generously: its new packs are matched to its old ones layer by layer, most
shared experts first, as if a GPU could be renumbered per layer (it cannot: a GPU holds its
slots of every layer).

EPLB's `eplb.py` (https://github.com/deepseek-ai/EPLB, MIT, Copyright (c) 2025 DeepSeek) needs
torch; the two functions the global policy uses (`replicate_experts`, `balanced_packing`) are
transcribed below in plain Python, loop for loop, so the comparison runs without torch. With
`--eplb PATH` and torch installed, the original file is used instead.

EPLB packs exactly 2 slots per worker per layer; Switchyard's workers have 116 slots over all
layers, so a worker may hold 3 experts of one layer and 1 of another: a looser constraint,
said here so the figures are read fairly.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

LAYERS, EXPERTS, REDUNDANT, WORKERS = 58, 256, 32, 144


def zipf_loads(seed, skew):
    rng = random.Random(seed)
    loads = []
    for _ in range(LAYERS):
        ranks = list(range(EXPERTS))
        rng.shuffle(ranks)
        loads.append([round(100000.0 / (r + 1) ** skew) for r in ranks])
    return loads


def drifted(loads, fraction, seed):
    """In every layer, `fraction` of the experts trade their loads among themselves."""
    rng = random.Random(1000 + seed)
    out = []
    for row in loads:
        row = list(row)
        chosen = rng.sample(range(EXPERTS), max(2, round(fraction * EXPERTS)))
        values = [row[e] for e in chosen]
        rng.shuffle(values)
        for e, v in zip(chosen, values):
            row[e] = v
        out.append(row)
    return out


# --- EPLB's global policy, transcribed from eplb.py (MIT, DeepSeek) ---------------------------


def replicate_experts(weight, num_phy):
    """eplb.replicate_experts for one layer: phy2log, logcnt."""
    num_log = len(weight)
    phy2log = list(range(num_log))
    logcnt = [1] * num_log
    for _ in range(num_log, num_phy):
        best = max(range(num_log), key=lambda e: (weight[e] / logcnt[e], -e))
        phy2log.append(best)
        logcnt[best] += 1
    return phy2log, logcnt


def balanced_packing(weight, num_packs):
    """eplb.balanced_packing for one layer: the pack of each item."""
    per_pack = len(weight) // num_packs
    order = sorted(range(len(weight)), key=lambda i: -weight[i])
    pack_weights = [0.0] * num_packs
    pack_items = [0] * num_packs
    pack_of = [-1] * len(weight)
    for item in order:
        pack = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_weights.__getitem__)
        pack_of[item] = pack
        pack_weights[pack] += weight[item]
        pack_items[pack] += 1
    return pack_of


def eplb_layer(weight):
    """Per worker, the experts it holds (with multiplicity), for one layer."""
    phy2log, logcnt = replicate_experts(weight, EXPERTS + REDUNDANT)
    tokens_per_phy = [weight[e] / logcnt[e] for e in phy2log]
    pack_of = balanced_packing(tokens_per_phy, WORKERS)
    held = [[] for _ in range(WORKERS)]
    for phy, pack in enumerate(pack_of):
        held[pack].append(phy2log[phy])
    return held


def eplb_original(path, loads):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    import torch  # noqa: F401 (only with --eplb)
    import eplb

    phy2log, _, _ = eplb.rebalance_experts(torch.tensor(loads, dtype=torch.float), EXPERTS + REDUNDANT, 1, 1, WORKERS)
    per = (EXPERTS + REDUNDANT) // WORKERS
    return [[[int(e) for e in row[w * per:(w + 1) * per]] for w in range(WORKERS)] for row in phy2log.tolist()]


# --- shared figures -------------------------------------------------------------------------


def imbalance(weight, held):
    copies = [0] * EXPERTS
    for experts in held:
        for e in experts:
            copies[e] += 1
    loads = [sum(weight[e] / copies[e] for e in experts) for experts in held]
    return max(loads) / (sum(loads) / len(loads))


def blind_layer(layer):
    """Switchyard's load-blind plan for this shape: experts dealt round-robin (rule 4 with equal
    load), redundant copies to the lowest experts — what the plan in force looks like before any
    load is known; used only to count moves."""
    held = [[] for _ in range(WORKERS)]
    for e in range(EXPERTS):
        held[e % WORKERS].append(e)
    for r in range(REDUNDANT):
        held[(EXPERTS + r) % WORKERS].append(r)
    return held


def moves(before, after):
    n = 0
    for b, a in zip(before, after):
        left = list(b)
        for e in a:
            if e in left:
                left.remove(e)
            else:
                n += 1
    return n


def relabeled_moves(before, after):
    """Copies `after` loads that `before` lacked, its packs matched to `before`'s for the most
    shared experts (greedy, largest overlap first)."""
    overlaps = []
    for i, b in enumerate(before):
        for j, a in enumerate(after):
            left, shared = list(b), 0
            for e in a:
                if e in left:
                    left.remove(e)
                    shared += 1
            if shared:
                overlaps.append((shared, -i, -j))
    overlaps.sort(reverse=True)
    used_b, used_a, kept = set(), set(), 0
    for shared, i, j in overlaps:
        if -i not in used_b and -j not in used_a:
            used_b.add(-i)
            used_a.add(-j)
            kept += shared
    return sum(len(a) for a in after) - kept


def run_plan(args, expert_bytes, slots_per_worker, loads, previous=None):
    paths = []
    try:
        for data in [loads] + ([previous] if previous else []):
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(data, f)
                paths.append(f.name)
        cmd = [args.switchyard, "plan", "--model", "deepseek-v3", "--workers", str(WORKERS),
               "--worker-memory", str(slots_per_worker * expert_bytes), "--dtype", "fp8",
               "--redundant-experts", str(REDUNDANT), "--load", paths[0], "--max-moves", str(args.max_moves),
               "--json"]
        if previous:
            cmd += ["--previous-load", paths[1]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    finally:
        for path in paths:
            os.unlink(path)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switchyard", default="target/release/switchyard")
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the loads")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-moves", type=int, default=2000)
    ap.add_argument("--drift", type=float, default=0.25,
                    help="share of each layer's experts that trade loads for the drift comparison (0: skip it)")
    ap.add_argument("--eplb", help="path to DeepSeek's eplb.py (needs torch); default: the transcription")
    args = ap.parse_args()

    plan = json.loads(
        subprocess.run(
            [args.switchyard, "plan", "--model", "deepseek-v3", "--workers", "1", "--worker-memory", "1TiB",
             "--dtype", "fp8", "--json"],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    expert_bytes = plan["expert_bytes"]
    slots_per_worker = (EXPERTS + REDUNDANT) * LAYERS // WORKERS
    print(f"DeepSeek-V3 shape: {LAYERS} MoE layers x {EXPERTS} experts + {REDUNDANT} redundant, "
          f"{WORKERS} workers x {slots_per_worker} slots; Zipf skew {args.skew}")
    print(f"{'seed':>4} {'blind':>7} {'EPLB':>7} {'moves':>6} {'planned':>8} {'moves':>6} {'rebal.':>7} {'moves':>6}")
    mean = lambda xs: sum(xs) / len(xs)
    eplb = (lambda loads: eplb_original(args.eplb, loads)) if args.eplb else (lambda loads: [eplb_layer(w) for w in loads])
    for seed in range(args.seeds):
        loads = zipf_loads(seed, args.skew)
        ours = run_plan(args, expert_bytes, slots_per_worker, loads)
        eplb_held = eplb(loads)
        eplb_im = [imbalance(w, h) for w, h in zip(loads, eplb_held)]
        eplb_moves = sum(moves(blind_layer(i), h) for i, h in enumerate(eplb_held))
        print(f"{seed:>4} {ours['blind']['mean']:>7.3f} {mean(eplb_im):>7.3f} {eplb_moves:>6} "
              f"{ours['planned_for_load']['mean']:>8.3f} {ours['planned_for_load']['moves_from_blind']:>6} "
              f"{ours['rebalanced']['mean']:>7.3f} {ours['rebalanced']['moves_from_blind']:>6}")
    print("imbalance: mean over layers of max / mean predicted tokens per worker; moves: expert copies "
          "loaded compared with the load-blind placement (EPLB's numbered as its packs come out)")
    if args.drift <= 0:
        return
    print(f"\nthe load drifts: {args.drift:.0%} of each layer's experts trade loads; the plan in force was "
          f"made for the first load")
    print(f"{'seed':>4} {'in force':>9} {'EPLB':>7} {'moves':>6} {'rebal.':>7} {'moves':>6} {'planned':>8} {'moves':>6}")
    for seed in range(args.seeds):
        first = zipf_loads(seed, args.skew)
        second = drifted(first, args.drift, seed)
        ours = run_plan(args, expert_bytes, slots_per_worker, second, previous=first)
        before, after = eplb(first), eplb(second)
        eplb_im = [imbalance(w, h) for w, h in zip(second, after)]
        eplb_moves = sum(relabeled_moves(b, a) for b, a in zip(before, after))
        print(f"{seed:>4} {ours['in_force']['mean']:>9.3f} {mean(eplb_im):>7.3f} {eplb_moves:>6} "
              f"{ours['rebalanced']['mean']:>7.3f} {ours['rebalanced']['moves']:>6} "
              f"{ours['planned_for_load']['mean']:>8.3f} {ours['planned_for_load']['moves']:>6}")
    print("moves: copies loaded compared with the plan in force (Switchyard's: made for the first load; "
          "EPLB's: its plan for the first load, packs matched per layer)")


if __name__ == "__main__":
    main()
