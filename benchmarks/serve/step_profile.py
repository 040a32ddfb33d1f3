#!/usr/bin/env python3
"""Where a serving run's time went, from pyramid-serve's --steps-out file.

    python3 benchmarks/serve/step_profile.py serve_steps.jsonl

Per (policy, fire schedule, mode): the makespan (last iteration's end), the GPU
time of prefill and decode iterations (CUDA events), what is left (the GPU
waiting for the host: graph capture and instantiation, scheduling), the decode
steps and their mean batch; then the decode step time against its HBM floor
by batch size (decode steps of iterations without a prefill), since the batch
sweeps from its peak down to a few sequences over a saturation run and the
step time with it. Last, per run, a least-squares fit of its decode steps,
ms = fixed + per_seq x batch + kv_bytes / rate: the terms of
pyramid-serve-plan's cost model (plan.hpp), whose --hbm-gbps is the rate,
--gemm-tflops the shape's GEMM FLOPs per token / per_seq, and
--step-overhead-ms what is left of `fixed` once the weights are read.
"""
import json
import sys
from collections import defaultdict

BUCKET = 100  # sequences per batch-size bucket (the last bucket takes every larger batch)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def solve3(m, v):
    """x with m x = v for a 3 x 3 m (Cramer's rule); None when m is singular."""
    def det(a):
        return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0]) +
                a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    d = det(m)
    if abs(d) < 1e-12 * max(1.0, max(abs(x) for row in m for x in row)) ** 3:
        return None
    out = []
    for c in range(3):
        mc = [[v[r] if k == c else m[r][k] for k in range(3)] for r in range(3)]
        out.append(det(mc) / d)
    return out


def fit_steps(steps):
    """Least squares of decode_ms on (1, batch, kv GB) over decode steps without a prefill."""
    rows = [(1.0, float(r["batch"]), r["kv_read_bytes"] / 1e9, r["decode_ms"]) for r in steps
            if r["decode_ms"] > 0 and r["prefill_ms"] == 0]
    if len(rows) < 3:
        return None
    m = [[sum(x[i] * x[j] for x in rows) for j in range(3)] for i in range(3)]
    v = [sum(x[i] * x[3] for x in rows) for i in range(3)]
    coef = solve3(m, v)
    if coef is None:
        return None
    res = [x[3] - sum(c * x[i] for i, c in enumerate(coef)) for x in rows]
    rms = (sum(e * e for e in res) / len(rows)) ** 0.5
    return coef, rms, len(rows)


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
    print("\nDecode step fit, ms = fixed + per_seq x batch + KV GB / rate (steps without a prefill)\n")
    print("| policy | fire | mode | fixed ms | per_seq us | rate GB/s | rms ms | steps |")
    print("|---|---|---|---|---|---|---|---|")
    for (policy, fire, mode, _), st in runs.items():
        f = fit_steps(st)
        if f is None:
            continue
        (a, b, c), rms, n = f
        rate = f"{1e3 / c:.0f}" if c > 0 else "n/a"
        print(f"| {policy} | {fire} | {mode} | {a:.2f} | {1e3 * b:.1f} | {rate} | {rms:.2f} | {n} |")

if __name__ == "__main__":
    main()
