"""Compares logits files written by llama-logits-cpu, llama-logits-cuda and
hf_logits.py. Relative error of a row = max |a - b| / max |b| (b the
reference); reports the worst row and the share of rows whose argmax agrees.

    python3 compare_logits.py A.bin B.bin [label]
"""
import sys

import numpy as np


def load(path):
    with open(path, "rb") as f:
        shape = np.fromfile(f, dtype=np.int32, count=3)
        data = np.fromfile(f, dtype=np.float32)
    n = int(np.prod(shape))
    if data.size < n:  # a truncated file (writer killed before its last flush): missing values are NaN, ignored
        print(f"note: {path} holds {data.size} of {n} values; the missing tail is ignored")
        data = np.concatenate([data, np.full(n - data.size, np.nan, np.float32)])
    return data.reshape(shape)


def compare(a, b):
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    rel = np.nanmax(np.abs(a - b), axis=-1) / np.nanmax(np.abs(b), axis=-1)
    agree = (np.nanargmax(a, -1) == np.nanargmax(b, -1)).mean()
    return rel, agree


if __name__ == "__main__":
    a, b = load(sys.argv[1]), load(sys.argv[2])
    label = sys.argv[3] if len(sys.argv) > 3 else ""
    rel, agree = compare(a, b)
    print(f"{label}: rows {rel.size} (steps x batch), max rel err {rel.max():.3e} "
          f"(prefill {rel[0].max():.3e}, decode {rel[1:].max() if rel.shape[0] > 1 else 0:.3e}), "
          f"median {np.median(rel):.3e}, argmax agreement {100 * agree:.1f}%")
