"""Markdown tables and PNG plots from pyramid-serve's JSON lines.

    python3 plot_serve.py serve.jsonl serve_steps.jsonl OUT_DIR

Prints a markdown table per workload (throughput at saturation, latency with
Poisson arrivals, the decode step against its HBM floor, ratios to the full
cache) and writes into OUT_DIR:
    serve_pages_<median>_<mode>.png   KV pages in use over time, per policy
    serve_throughput_<median>.png     requests/s and output tokens/s
    serve_latency_<median>.png        TTFT and TPOT, p50 and p99 (Poisson)
    serve_floor_<median>.png          decode step time / HBM floor vs batch
With matplotlib when it is installed; otherwise plain PNGs drawn here
(lines and bars, no text: the axes and the colour of each policy are written
beside each PNG in a .txt file).
"""
import json
import os
import struct
import sys
import zlib

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # the fallback below draws plain PNGs
    plt = None

COLORS = {"full": (31, 119, 180), "pyramid": (255, 127, 14), "pyramid45": (44, 160, 44), "snapkv": (214, 39, 40),
          "pyramid-perhead": (148, 103, 189), "streaming": (140, 86, 75), "h2o": (227, 119, 194)}


def color(policy):
    return COLORS.get(policy.split("/")[0], (100, 100, 100))  # a fire schedule keeps its policy's colour


def load(path):
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.startswith("{")]


# ---- fallback: a tiny PNG canvas ------------------------------------------------------


class Canvas:
    """RGB pixels, lines and rectangles, written as a PNG (zlib + struct)."""

    def __init__(self, w=640, h=400):
        self.w, self.h = w, h
        self.px = bytearray([255] * (w * h * 3))

    def dot(self, x, y, c):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c):  # Bresenham, 2 px wide
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, c)
            self.dot(x0, y0 + 1, c)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rect(self, x0, y0, x1, y1, c):
        for y in range(int(min(y0, y1)), int(max(y0, y1)) + 1):
            for x in range(int(min(x0, x1)), int(max(x0, x1)) + 1):
                self.dot(x, y, c)

    def save(self, path):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)) +
                    chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


M = 40  # margin of the fallback plots


def fallback_lines(path, title, xlabel, ylabel, series):
    """series: [(policy, xs, ys)] -> PNG + a .txt naming the axes and colours."""
    xs = [x for _, s, _ in series for x in s] or [0, 1]
    ys = [y for _, _, s in series for y in s] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, 0, max(ys) or 1
    cv = Canvas()
    cv.line(M, cv.h - M, cv.w - M, cv.h - M, (0, 0, 0))
    cv.line(M, M, M, cv.h - M, (0, 0, 0))
    sx = lambda x: M + (x - x0) / ((x1 - x0) or 1) * (cv.w - 2 * M)
    sy = lambda y: cv.h - M - (y - y0) / ((y1 - y0) or 1) * (cv.h - 2 * M)
    for pol, px, py in series:
        pts = list(zip(px, py))
        for (a, b), (c, d) in zip(pts, pts[1:]):
            cv.line(sx(a), sy(b), sx(c), sy(d), color(pol))
    cv.save(path)
    with open(path[:-4] + ".txt", "w") as f:
        f.write(f"{title}\nx: {xlabel} from {x0:g} to {x1:g}\ny: {ylabel} from {y0:g} to {y1:g}\n")
        for pol, _, _ in series:
            f.write(f"{pol}: rgb{color(pol)}\n")


def fallback_bars(path, title, groups, policies, values):
    """values[g][p] -> grouped bars, each group scaled to its own maximum."""
    cv = Canvas()
    cv.line(M, cv.h - M, cv.w - M, cv.h - M, (0, 0, 0))
    gw = (cv.w - 2 * M) / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(policies))
    for gi, g in enumerate(groups):
        top = max([values[g].get(p, 0) for p in policies] + [1e-12])
        for pi, p in enumerate(policies):
            v = values[g].get(p, 0)
            x = M + gi * gw + gw * 0.1 + pi * bw
            cv.rect(x, cv.h - M, x + bw - 2, cv.h - M - v / top * (cv.h - 2 * M), color(p))
    cv.save(path)
    with open(path[:-4] + ".txt", "w") as f:
        f.write(title + "\ngroups left to right, each scaled to its largest bar:\n")
        for g in groups:
            f.write(f"  {g}: " + ", ".join(f"{p} {values[g].get(p, 0):.4g}" for p in policies) + "\n")
        for p in policies:
            f.write(f"{p}: rgb{color(p)}\n")


# ---- plots ---------------------------------------------------------------------------


def plot_xy(path, title, xlabel, ylabel, series, style="-"):
    """Lines (style "-", x in order) or points (style ".", sorted by x for the fallback)."""
    if plt is None:
        return fallback_lines(path, title, xlabel, ylabel, [(p, sorted(xs), [y for _, y in sorted(zip(xs, ys))])
                                                            for p, xs, ys in series])
    fig, ax = plt.subplots(figsize=(7, 4))
    for pol, xs, ys in series:
        ax.plot(xs, ys, style, lw=1.2, ms=3, label=pol, color=[c / 255 for c in color(pol)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(path, title, groups, policies, values):
    if plt is None:
        return fallback_bars(path, title, groups, policies, values)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6))
    if len(groups) == 1:
        axes = [axes]
    for ax, g in zip(axes, groups):
        vals = [values[g].get(p, 0) for p in policies]
        ax.bar(range(len(policies)), vals, color=[[c / 255 for c in color(p)] for p in policies])
        ax.set_xticks(range(len(policies)))
        ax.set_xticklabels(policies, rotation=30, fontsize=8)
        ax.set_title(g, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(r):
    """A run's policy, with its fire schedule when decode compression is not offered every step."""
    every = r.get("fire_every", 1)
    return r["policy"] if every == 1 or r["policy"] == "full" else f"{r['policy']}/fire{every}"


def kv_budget(r):
    """The run's KV memory: one budget (pages + cache and compressor state) since pyramid-serve
    counted the ring, split per policy (the split column); before, a page pool with the ring
    beside it."""
    G = 1 << 30
    if "budget_bytes" in r:
        return f"KV budget {r['budget_bytes'] / G:.1f} GiB per policy (pages of {r['page_size']})"
    return (f"KV pool {r['pool_bytes'] / G:.1f} GiB ({r['pool_pages']} pages of {r['page_size']}; "
            "ring beside it, uncounted)")


def split(r):
    """A policy's share of the budget: pages and ring, GiB."""
    G = 1 << 30
    return f"{r['pages_bytes'] / G:.1f} / {r['ring_bytes'] / G:.2f}" if "budget_bytes" in r else ""


def main():
    runs, steps, out = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
    for r in runs + steps:
        r["policy"] = label(r)
    os.makedirs(out, exist_ok=True)
    G = 1 << 30
    for median in sorted({r["prompt_median"] for r in runs}):
        rs = [r for r in runs if r["prompt_median"] == median]
        pols = list(dict.fromkeys(r["policy"] for r in rs))
        sat = {r["policy"]: r for r in rs if r["mode"] == "saturation"}
        poi = {r["policy"]: r for r in rs if r["mode"] == "poisson"}
        any_r = rs[0]
        print(f"\n### {any_r['shape']}, prompts log-normal median {median:g} (sigma {any_r['prompt_sigma']:g}, cap "
              f"{any_r['prompt_cap']}), outputs {any_r['output_min']}-{any_r['output_max']}, {any_r['requests']} "
              f"requests, {kv_budget(any_r)}, {any_r['device']}\n")
        print("| policy | pages / ring GiB | sat. req/s (x full) | out tok/s | peak seqs | peak pages (dev / booked) | "
              "decode ms p50 | floor fraction p50 | Poisson rate | TTFT p50 / p99 s | TPOT p50 / p99 ms | "
              "books violations |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = sat.get("full", {}).get("req_per_s")
        for p in pols:
            s, q = sat.get(p, {}), poi.get(p, {})
            x = f" ({s['req_per_s'] / base:.2f}x)" if s and base else ""
            print(f"| {p} | {split(s or q)} | {s.get('req_per_s', 0):.2f}{x} | {s.get('out_tok_per_s', 0):.0f} | "
                  f"{s.get('peak_concurrent', 0)} | {s.get('peak_pages_device', 0)} / {s.get('peak_pages_booked', 0)} | "
                  f"{s.get('decode_ms_p50', 0):.2f} | {s.get('floor_fraction_p50', 0):.2f} | "
                  f"{q.get('rate', 0):.2f} | {q.get('ttft_p50_s', 0):.2f} / {q.get('ttft_p99_s', 0):.2f} | "
                  f"{1e3 * q.get('tpot_p50_s', 0):.1f} / {1e3 * q.get('tpot_p99_s', 0):.1f} | "
                  f"{s.get('books_violations', 0) + q.get('books_violations', 0)} |")
        tag = f"{int(median)}"
        for mode in ("saturation", "poisson"):
            series = []
            for p in pols:
                st = [s for s in steps if s["policy"] == p and s["mode"] == mode and s["prompt_median"] == median]
                if st:
                    series.append((p, [s["t_s"] for s in st], [s["pages_device"] for s in st]))
            if series:
                plot_xy(f"{out}/serve_pages_{tag}_{mode}.png",
                           f"KV pages in use, median prompt {tag}, {mode}", "time (s)", "pages on the device", series)
        if sat:
            plot_bars(f"{out}/serve_throughput_{tag}.png", f"Saturation, median prompt {tag}",
                      ["requests/s", "output tokens/s", "peak concurrent"], pols,
                      {"requests/s": {p: sat[p]["req_per_s"] for p in sat},
                       "output tokens/s": {p: sat[p]["out_tok_per_s"] for p in sat},
                       "peak concurrent": {p: sat[p]["peak_concurrent"] for p in sat}})
        if poi:
            plot_bars(f"{out}/serve_latency_{tag}.png", f"Poisson at 70% of saturation, median prompt {tag}",
                      ["TTFT p50 (s)", "TTFT p99 (s)", "TPOT p50 (ms)", "TPOT p99 (ms)"], pols,
                      {"TTFT p50 (s)": {p: poi[p]["ttft_p50_s"] for p in poi},
                       "TTFT p99 (s)": {p: poi[p]["ttft_p99_s"] for p in poi},
                       "TPOT p50 (ms)": {p: 1e3 * poi[p]["tpot_p50_s"] for p in poi},
                       "TPOT p99 (ms)": {p: 1e3 * poi[p]["tpot_p99_s"] for p in poi}})
        series = []
        for p in pols:
            st = [s for s in steps if s["policy"] == p and s["mode"] == "saturation" and s["prompt_median"] == median
                  and s["decode_ms"] > 0 and s["prefill_reqs"] == 0]
            if st:
                series.append((p, [s["batch"] for s in st], [s["floor_fraction"] for s in st]))
        if series:
            plot_xy(f"{out}/serve_floor_{tag}.png", f"Decode step: HBM floor / step time, median prompt {tag}",
                    "decode batch", "fraction of the floor reached", series, style=".")


if __name__ == "__main__":
    main()
