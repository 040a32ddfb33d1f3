#!/usr/bin/env python3
"""Plots pyramid-eval's CSV: perplexity (and passkey accuracy) against the
share of a full KV cache each policy holds after prefill.

    python3 benchmarks/plot_quality.py pyramid_eval.csv quality.png
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = list(csv.DictReader(open(src)))
    by_policy = defaultdict(list)
    for r in rows:
        by_policy[r["policy"]].append(r)
    fig, (ppl_ax, key_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rs in sorted(by_policy.items()):
        rs.sort(key=lambda r: float(r["kv_fraction_prefill"]))
        x = [100 * float(r["kv_fraction_prefill"]) for r in rs]
        style = "o-" if name != "full" else "k*"
        ppl_ax.plot(x, [float(r["perplexity"]) for r in rs], style, label=name, markersize=8 if name == "full" else 5)
        key_ax.plot(x, [100 * float(r["passkey_accuracy"]) for r in rs], style, label=name)
        for r in rs:
            if r["budget"] == "paper":
                ppl_ax.annotate("paper defaults", (100 * float(r["kv_fraction_prefill"]), float(r["perplexity"])),
                                textcoords="offset points", xytext=(5, 8), fontsize=8)
    ppl_ax.set_xlabel("KV cache held after prefill (% of full)")
    ppl_ax.set_ylabel("continuation perplexity")
    ppl_ax.set_title("Perplexity against KV budget")
    ppl_ax.grid(alpha=0.3)
    ppl_ax.legend()
    key_ax.set_xlabel("KV cache held after prefill (% of full)")
    key_ax.set_ylabel("passkey retrieval (%)")
    key_ax.set_title("Passkey retrieval against KV budget")
    key_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
