#!/usr/bin/env python3
"""CI-sized check of pyramid-eval: runs it on a tiny setting and checks its
output. Usage: check_eval.py PYRAMID_EVAL_EXE MODEL ($PYRAMIDINFER_MODEL wins).
Exits 77 (skipped) when the model is missing, 1 on the first failed check."""
import csv
import json
import math
import os
import subprocess
import sys
import tempfile

PASSAGES, LOOKUPS = 4, 2
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAILED:", what)


def main():
    exe = sys.argv[1]
    model = os.environ.get("PYRAMIDINFER_MODEL") or sys.argv[2]
    if not os.path.isfile(model):
        print("SKIPPED: model not found at %s (run examples/fetch_model.sh)" % model)
        return 77
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "smoke")
        # full last on the command line: the tool must still run it first.
        args = [exe, "--model", model, "--prefill", "160", "--continue", "4", "--passages", str(PASSAGES),
                "--passkey-trials", str(LOOKUPS), "--policies", "snapkv,expected,full", "--fractions", "0.5",
                "--out", out]
        run = subprocess.run(args, capture_output=True, text=True)
        print(run.stderr[-3000:])
        if run.returncode != 0:
            print("FAILED: pyramid-eval exited %d" % run.returncode)
            return 1
        with open(out + ".json") as f:
            data = json.load(f)
        with open(out + ".csv") as f:
            table = list(csv.DictReader(f))

    check(data["prefill"] == 160 and data["continue"] == 4 and data["passkey_trials"] == LOOKUPS, "run settings")
    check(len(data["texts"]) >= 3 and all(os.path.isfile(t) for t in data["texts"]), "at least 3 default texts")
    T = len(data["texts"])
    check([p["text"] for p in data["passages"]] == [i % T for i in range(PASSAGES)], "passages round-robin")
    check([r["policy"] for r in data["rows"]] == ["full", "snapkv", "expected"], "full first, then the order given")
    check(len(table) == len(data["rows"]), "one CSV line per JSON row")
    full = data["rows"][0]
    for row, line in zip(data["rows"], table):
        name = row["policy"]
        vs = row["vs_full"]
        check(len(row["passage_nll"]) == PASSAGES, name + ": one NLL per passage")
        check(all(math.isfinite(x) and x > 0 for x in row["passage_nll"]), name + ": finite NLLs")
        check(len(vs["ppl_change"]) == PASSAGES, name + ": one change per passage")
        check(vs["wins"] + vs["losses"] + vs["ties"] == PASSAGES, name + ": wins + losses + ties = passages")
        want = [math.expm1(a - b) for a, b in zip(row["passage_nll"], full["passage_nll"])]
        check(all(abs(a - b) <= 1e-8 * (1 + abs(b)) for a, b in zip(vs["ppl_change"], want)),
              name + ": change = exp(nll - full nll) - 1 per passage")
        mean = sum(want) / PASSAGES
        se = math.sqrt(sum((x - mean) ** 2 for x in want) / (PASSAGES - 1) / PASSAGES)
        check(abs(vs["ppl_change_mean"] - mean) <= 1e-8, name + ": mean change")
        check(abs(vs["ppl_change_se"] - se) <= 1e-8, name + ": standard error")
        check(vs["wins"] == sum(a < b for a, b in zip(row["passage_nll"], full["passage_nll"])), name + ": wins")
        check(len(row["passkey_found"]) == LOOKUPS and len(row["passkey_depth"]) == LOOKUPS, name + ": lookups")
        check(abs(row["passkey_accuracy"] - sum(row["passkey_found"]) / LOOKUPS) < 1e-12, name + ": lookup accuracy")
        check(line["policy"] == name and abs(float(line["ppl_change_mean"]) - vs["ppl_change_mean"]) < 1e-6,
              name + ": CSV agrees with JSON")
    vs = full["vs_full"]
    check(vs["ppl_change"] == [0] * PASSAGES and vs["ppl_change_mean"] == 0 and vs["ppl_change_se"] == 0,
          "full vs full: exactly zero change")
    check(vs["ties"] == PASSAGES and full["kv_fraction_prefill"] == 1, "full vs full: all ties, whole cache")
    for row in data["rows"][1:]:
        check(row["kv_fraction_prefill"] < 0.8, row["policy"] + ": compresses at --fractions 0.5")
    print("eval smoke: %d passed, %d failed" % (1 if not failures else 0, 1 if failures else 0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
