#!/usr/bin/env python3
"""Device serving runs against their host replay (pyramid-serve-plan).

For every saturation summary of pyramid-serve in SERVE_JSONL (a named shape,
or --model's file, which must be at the recorded path), runs pyramid-serve-plan with the same workload, limits and pool
(--pages, --ring-rows, --ring-reserve) and prints both. At saturation every
admission depends only on the pool, so iterations, prefills and peak
concurrency must be equal: a difference means the device's books or ring
differ from the host's rules. The plan's requests/s come from its cost model
(an estimate); their ratio to the measured rate says how far the model is off.

    python3 benchmarks/serve/compare_plan.py SERVE_JSONL PLAN_BINARY
Exits 1 if any replayed run differs in iterations, prefills or peak concurrency.
"""
import json
import subprocess
import sys

FLAGS = [("--requests", "requests"), ("--prompt-median", "prompt_median"), ("--prompt-sigma", "prompt_sigma"),
         ("--prompt-cap", "prompt_cap"), ("--output-min", "output_min"), ("--output-max", "output_max"),
         ("--seed", "seed"), ("--max-seqs", "max_seqs"), ("--prefill-tokens", "prefill_tokens"),
         ("--page-size", "page_size"), ("--fire-every", "fire_every"), ("--pages", "pool_pages"),
         ("--ring-rows", "ring_rows"), ("--ring-reserve", "ring_reserve")]
EXACT = ["iterations", "prefills", "peak_concurrent", "peak_pages_booked"]


def replay(plan_binary, run):
    model = ["--model", run["model"]] if "model" in run else ["--shape", run["shape"]]
    args = [plan_binary] + model + ["--policies", run["policy"], "--mode", "saturation"]
    for flag, key in FLAGS:
        if key in run:
            args += [flag, str(run[key])]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    runs = [r for r in runs if r.get("engine") == "ours" and r.get("mode") == "saturation"]
    same = True
    print("| shape | median | policy | iterations | prefills | peak seqs | peak pages | req/s measured / model |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        plan = replay(sys.argv[2], run)
        cells = []
        for key in EXACT:
            equal = run[key] == plan[key]
            same &= equal
            cells.append(str(run[key]) if equal else "%s (plan %s)" % (run[key], plan[key]))
        print("| %s | %g | %s | %s | %.2f / %.2f (%.2f) |" % (
            run["shape"], run["prompt_median"], run["policy"], " | ".join(cells), run["req_per_s"],
            plan["model_req_per_s"], plan["model_req_per_s"] / run["req_per_s"]))
    print("replay %s" % ("EQUAL: the device admitted what the host rules admit" if same else "DIFFERS"))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
