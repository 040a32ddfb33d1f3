#!/usr/bin/env python3
"""Where a serving run's time went, from pyramid-serve's --steps-out file.

    python3 benchmarks/serve/step_profile.py serve_steps.jsonl

Per (policy, fire schedule, mode): the makespan (last iteration's end), the GPU
time of prefill and decode iterations (CUDA events), what is left (the GPU
waiting for the host: graph capture and instantiation, scheduling), the decode
steps and their mean batch; then the decode step time against its HBM floor
by batch size (decode steps of iterations without a prefill), since the batch
sweeps from its peak down to a few sequences over a saturation run and the
step time with it.
"""
import json
import sys
from collections import defaultdict

BUCKET = 100  # sequences per batch-size bucket (the last bucket takes every larger batch)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: step_profile.py serve_steps.jsonl")
    runs = defaultdict(list)
    with open(sys.argv[1]) as f:
        for line in f:
            r = json.loads(line)
            runs[(r["policy"], r["fire_every"], r["mode"], r["prompt_median"])].append(r)
    print("| policy | fire | mode | makespan s | prefill s | decode s | rest s | decode steps | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (policy, fire, mode, _), st in runs.items():
        dec = [r for r in st if r["decode_ms"] > 0]
        pre = sum(r["prefill_ms"] for r in st) / 1e3
        dsum = sum(r["decode_ms"] for r in dec) / 1e3
        end = max(r["t_s"] for r in st)
        batch = sum(r["batch"] for r in dec) / max(1, len(dec))
        print(f"| {policy} | {fire} | {mode} | {end:.1f} | {pre:.1f} | {dsum:.1f} | {end - pre - dsum:.1f} | "
              f"{len(dec)} | {batch:.0f} |")
    print("\nDecode steps without a prefill in their iteration, by batch: median step ms / median floor ms (steps)\n")
    heads = [f"batch {b}-{b + BUCKET - 1}" for b in range(0, 7 * BUCKET, BUCKET)]
    print("| policy | fire | mode | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * 7)
    for (policy, fire, mode, _), st in runs.items():
        by = defaultdict(list)
        for r in st:
            if r["decode_ms"] > 0 and r["prefill_ms"] == 0:
                by[min(r["batch"] // BUCKET, 6)].append(r)
        cells = []
        for k in range(7):
            rs = by.get(k, [])
            cells.append(f"{pct([r['decode_ms'] for r in rs], 0.5):.1f} / {pct([r['floor_ms'] for r in rs], 0.5):.1f} "
                         f"({len(rs)})" if rs else "")
        print(f"| {policy} | {fire} | {mode} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
