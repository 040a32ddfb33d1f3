#!/usr/bin/env python3
"""The quality front of pyramid-eval runs: perplexity change against the
share of a full KV cache held after prefill, each point coloured by the share
of a full prefill's FLOPs the policy spends (token dropping saves FLOPs;
layer-local policies spend all of them). One panel per CSV.

    python3 benchmarks/quality/plot_front.py out.png "1K, tuning texts" a.csv,a2.csv "4K" b.csv ...

A panel may merge several CSVs (comma-separated) of runs over the same
passages. Rows that only repeat another of the same policy (a budget the policy could
not go below) are drawn once. Error bars: one standard error of the paired
per-passage change.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYER_LOCAL = ("snapkv", "h2o", "expected", "streaming")


def points(paths):
    seen, out = set(), []
    rows = [r for path in paths.split(",") for r in csv.DictReader(open(path))]
    for r in rows:
        if r["policy"] == "full":
            continue
        key = (r["policy"], round(float(r["kv_fraction_prefill"]), 4))
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def panel(ax, title, rows, cmap, norm):
    for r in rows:
        name, budget = r["policy"], r["budget"]
        x, y = 100 * float(r["kv_fraction_prefill"]), 100 * float(r["ppl_change_mean"])
        se = 100 * float(r["ppl_change_se"])
        local = name.split(":")[0] in LAYER_LOCAL or "mode=local" in name
        paper = name == "pyramid" and budget == "paper"
        marker = "*" if name == "pyramid-late" else "D" if paper else "s" if local else "o"
        size = 14 if marker == "*" else 6
        color = cmap(norm(float(r["prefill_flops"])))
        ax.errorbar(x, y, yerr=se, fmt=marker, color=color, ms=size, mec="k", mew=0.4, elinewidth=0.6, capsize=0)
        if name == "pyramid-late" or paper:
            ax.annotate("paper defaults" if paper else name, (x, y), textcoords="offset points",
                        xytext=(-70, 10) if paper else (6, -12), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("KV held after prefill (% of a full cache)")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.grid(alpha=0.3)


def main(argv):
    if len(argv) < 4 or len(argv) % 2:
        sys.exit(__doc__)
    out, pairs = argv[1], list(zip(argv[2::2], argv[3::2]))
    cmap, norm = plt.get_cmap("viridis"), matplotlib.colors.Normalize(0.4, 1.0)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), sharey=True, squeeze=False)
    for ax, (title, path) in zip(axes[0], pairs):
        panel(ax, title, points(path), cmap, norm)
    axes[0][0].set_ylabel("perplexity change vs full cache (%)")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes[0].tolist(), label="prefill FLOPs spent (share of full)")
    handles = [plt.Line2D([], [], ls="", marker=m, color="0.5", mec="k", label=l)
               for m, l in (("o", "token dropping (pyramid specs)"), ("s", "layer-local"), ("D", "paper defaults"),
                            ("*", "pyramid-late (preset)"))]
    axes[0][0].legend(handles=handles, fontsize=8, loc="upper right")
    fig.savefig(out, dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv)
