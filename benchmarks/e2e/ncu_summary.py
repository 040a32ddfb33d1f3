#!/usr/bin/env python3
"""Per-kernel time summary of an `ncu --csv --metrics gpu__time_duration.sum` log.

    ncu_summary.py LOG.csv [TITLE]

Groups the profiled kernels by name (template arguments dropped), and prints
count, total microseconds and share of the profiled time, largest first.
"""
import csv
import re
import signal
import sys
from collections import defaultdict


def short(name):
    name = re.sub(r"<.*>", "<>", name)       # template arguments
    name = re.sub(r"\(.*\)", "", name)       # parameter lists
    return name.strip()[:90]


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    path = sys.argv[1]
    title = sys.argv[2] if len(sys.argv) > 2 else path
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's own messages start with ==
    total = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        us = v / 1e3 if unit.startswith("n") else v if unit.startswith("u") else v * 1e3
        k = short(row["Kernel Name"])
        total[k] += us
        count[k] += 1
    all_us = sum(total.values())
    print(f"== {title}: {sum(count.values())} kernels, {all_us:.1f} us")
    for k, us in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{us:10.1f} us {100 * us / all_us:5.1f}%  x{count[k]:<5d} {k}")


if __name__ == "__main__":
    main()
