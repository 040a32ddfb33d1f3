#!/usr/bin/env python3
"""Where a serving run's time went, from pyramid-serve's --steps-out file.

    python3 benchmarks/serve/step_profile.py serve_steps.jsonl

Per (policy, fire schedule, mode): the makespan (last iteration's end), the GPU
time of prefill and decode iterations (CUDA events), what is left (the GPU
waiting for the host: graph capture and instantiation, scheduling), the decode
steps' time percentiles and mean batch, and the share of decode time spent in
steps slower than twice the median (stash flushes and firings land there).
"""
import json
import sys
from collections import defaultdict


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
    print("| policy | fire | mode | makespan s | prefill s | decode s | rest s | decode steps | mean batch | "
          "decode ms p50 / p90 / p99 / max | decode time in steps > 2x p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (policy, fire, mode, _), st in runs.items():
        dec = [r["decode_ms"] for r in st if r["decode_ms"] > 0]
        pre = sum(r["prefill_ms"] for r in st) / 1e3
        dsum = sum(dec) / 1e3
        end = max(r["t_s"] for r in st)
        p50 = pct(dec, 0.5)
        slow = sum(x for x in dec if x > 2 * p50) / 1e3
        batch = sum(r["batch"] for r in st if r["decode_ms"] > 0) / max(1, len(dec))
        print(f"| {policy} | {fire} | {mode} | {end:.1f} | {pre:.1f} | {dsum:.1f} | {end - pre - dsum:.1f} | "
              f"{len(dec)} | {batch:.0f} | {p50:.1f} / {pct(dec, 0.9):.1f} / {pct(dec, 0.99):.1f} / {max(dec or [0]):.1f} | "
              f"{slow:.1f} s ({100 * slow / max(dsum, 1e-9):.0f}%) |")


if __name__ == "__main__":
    main()
