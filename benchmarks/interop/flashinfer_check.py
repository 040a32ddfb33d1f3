#!/usr/bin/env python3
"""FlashInfer interop, part 2: FlashInfer's paged decode over pyramidinfer's
per-layer page tables must match attention over the kept tokens.

    flashinfer_check.py [--require-flashinfer] DUMP_DIR [DUMP_DIR ...]

Each DUMP_DIR is one page size written by flashinfer_dump (page<P>/). Per
dump and layer it checks, in this order:

1. the tables (pure Python, no torch): CSR arrays well formed, lengths agree
   with indptr/last_page_len, no page held twice (within a layer or across
   layers), held pages plus free pages are the whole pool, and the pool bytes
   the table points at are exactly the kept K/V read through the cache's own
   accessors (bit for bit);
2. a torch reference that reads the pool the way FlashInfer documents the
   table (sequence i: pages indices[indptr[i]:indptr[i+1]], the last one cut
   to last_page_len) equals the logical K/V exactly and gives the same
   attention;
3. FlashInfer's BatchDecodeWithPagedKVCacheWrapper (NHD, fp16, no RoPE) over
   the pool, with return_lse: max |o - ref| and the base-2 LSE error against
   softmax(q k^T / sqrt(d)) v in fp32 over the logical K/V (GQA: query head h
   reads KV head h // (num_qo_heads / num_kv_heads)). A negative control
   (layers with a partly filled last page) re-runs with every last_page_len
   set to page_size: the error must then exceed the tolerance, or the check
   could not see a table that is off.

Dumps made with the same seed hold the same data for every page size, so the
kept K/V must also agree across them (page size does not change what is kept).

Exits 1 when any check fails, 2 when --require-flashinfer is given and
FlashInfer could not be imported, 3 when torch is missing (only part 1 ran).
"""
import argparse
import json
import math
import os
import struct
import sys
import time
from array import array

OUT_TOL = 2e-3  # |o - ref|: fp16 output rounding of values ~0.1 is ~1e-4
LSE_TOL = 1e-3  # base-2 LSE, computed in fp32 by FlashInfer
MAGIC = b"PIDUMP1\0"
ELEM = {1: ("float16", 2), 2: ("int32", 4)}


# ---- the dump format (see flashinfer_dump.cpp) --------------------------------

class Rec:
    """One array of a dump: dtype name, shape, raw little-endian bytes."""

    def __init__(self, dtype, shape, raw):
        self.dtype, self.shape, self.raw = dtype, shape, raw

    def ints(self):
        a = array("i")
        a.frombytes(self.raw)
        if sys.byteorder != "little":
            a.byteswap()
        return a.tolist()


def read_dump(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: not a pyramidinfer dump")
    recs, at = {}, 8
    i64 = lambda: struct.unpack_from("<q", data, at)[0]
    while at < len(data):
        n = i64(); at += 8
        name = data[at:at + n].decode(); at += n
        code = i64(); at += 8
        ndim = i64(); at += 8
        shape = list(struct.unpack_from(f"<{ndim}q", data, at)); at += 8 * ndim
        dtype, size = ELEM[code]
        nbytes = size * math.prod(shape)
        if at + nbytes > len(data):
            raise ValueError(f"{path}: record {name} runs past the end")
        recs[name] = Rec(dtype, shape, data[at:at + nbytes]); at += nbytes
    return recs


class Dump:
    """One page size: the summary, the pool, and the layers."""

    def __init__(self, d):
        with open(os.path.join(d, "summary.json")) as f:
            self.summary = json.load(f)
        self.dir = d
        self.pool = read_dump(os.path.join(d, "pool.bin"))
        self.layers = [read_dump(os.path.join(d, f"layer{l}.bin")) for l in range(self.summary["layers"])]
        num_pages, self.page, self.kv_heads, self.dim = self.pool["k_pool"].shape
        self.num_pages = num_pages
        self.qo_heads = self.summary["num_qo_heads"]
        self.row = self.kv_heads * self.dim * 2  # bytes of one token (all KV heads) in NHD

    def name(self):
        return f"page {self.page:3d}"


# ---- 1. the tables, pure Python ------------------------------------------------

def check_csr(dump, l, fails):
    """Well-formed CSR; returns the pages this layer holds."""
    L = dump.layers[l]
    indptr, indices = L["indptr"].ints(), L["indices"].ints()
    last, lens = L["last_page_len"].ints(), L["lens"].ints()
    where = f"{dump.name()} layer {l}"
    if len(indptr) != len(lens) + 1 or indptr[0] != 0 or indptr[-1] != len(indices):
        fails.append(f"{where}: indptr {indptr} does not frame {len(indices)} indices for {len(lens)} sequences")
        return []
    for i, n in enumerate(lens):
        np_ = indptr[i + 1] - indptr[i]
        ok = np_ >= 1 and 1 <= last[i] <= dump.page and (np_ - 1) * dump.page + last[i] == n
        if not ok:
            fails.append(f"{where}: sequence {i} holds {n} tokens but has {np_} pages, last_page_len {last[i]}")
    if any(not 0 <= p < dump.num_pages for p in indices):
        fails.append(f"{where}: a page id outside [0, {dump.num_pages})")
    if len(set(indices)) != len(indices):
        fails.append(f"{where}: a page is listed twice")
    return indices


def check_pool_accounting(dump, held, fails):
    """Every page is held by one layer or free, never both, none lost."""
    seen = {}
    for l, pages in enumerate(held):
        for p in pages:
            if p in seen:
                fails.append(f"{dump.name()}: page {p} held by layers {seen[p]} and {l}")
            seen[p] = l
    free = dump.pool["free_pages"].ints()
    if set(free) & set(seen):
        fails.append(f"{dump.name()}: {len(set(free) & set(seen))} pages both free and held")
    if set(free) | set(seen) != set(range(dump.num_pages)) or len(free) != len(set(free)):
        fails.append(f"{dump.name()}: held + free pages are not the pool exactly once")


def check_bytes(dump, l, fails):
    """The pool bytes the table points at are the logical K/V, bit for bit."""
    L = dump.layers[l]
    indptr, indices = L["indptr"].ints(), L["indices"].ints()
    last, lens = L["last_page_len"].ints(), L["lens"].ints()
    page_bytes = dump.page * dump.row
    bad, base = 0, 0
    for i, n in enumerate(lens):
        for j, p in enumerate(indices[indptr[i]:indptr[i + 1]]):
            rows = last[i] if indptr[i] + j == indptr[i + 1] - 1 else dump.page
            at, want = p * page_bytes, (base + j * dump.page) * dump.row
            for kv in ("k", "v"):
                if dump.pool[kv + "_pool"].raw[at:at + rows * dump.row] != L[kv].raw[want:want + rows * dump.row]:
                    bad += 1
        base += n
    if bad:
        fails.append(f"{dump.name()} layer {l}: {bad} pages differ from the logical K/V")


def check_tables(dump, fails):
    before = len(fails)
    held = [check_csr(dump, l, fails) for l in range(len(dump.layers))]
    check_pool_accounting(dump, held, fails)
    if len(fails) == before:  # bytes only make sense over sane tables
        for l in range(len(dump.layers)):
            check_bytes(dump, l, fails)
    s = dump.summary
    print(f"{dump.name()}: tables {'ok' if len(fails) == before else 'FAILED'} "
          f"({dump.num_pages} pages, {len(dump.pool['free_pages'].ints())} free; batch slots {s['batch_slots']}; "
          f"lens per layer {s['lens_per_layer']}; decode compressions per layer "
          f"{s['decode_compressions_per_layer']}; {s['reused_pages']} of the ended sequence's "
          f"{s['ended_pages']} pages reused)", flush=True)


def check_same_data(dumps, fails):
    """Same seed, same kept tokens, whatever the page size."""
    by_seed = {}
    for d in dumps:
        by_seed.setdefault(d.summary["seed"], []).append(d)
    for seed, group in by_seed.items():
        before = len(fails)
        a = group[0]
        for b in group[1:]:
            for l in range(len(a.layers)):
                for name in ("lens", "slots", "k", "v", "q"):
                    if a.layers[l][name].raw != b.layers[l][name].raw:
                        fails.append(f"layer {l}: {name} differs between {a.name()} and {b.name()}")
        if len(group) > 1:
            verdict = "identical" if len(fails) == before else "DIFFERENT"
            print(f"seed {seed}: kept K/V, lengths and queries {verdict} across page sizes "
                  f"{[d.page for d in group]}", flush=True)


# ---- 2. and 3., torch ----------------------------------------------------------

def tensor(torch, rec, device):
    dt = {"float16": torch.float16, "int32": torch.int32}[rec.dtype]
    return torch.frombuffer(bytearray(rec.raw), dtype=dt).reshape(rec.shape).to(device)


def attention(torch, q, k, v, lens):
    """fp32 softmax(q k^T * scale) v per sequence over [n, kv_heads, d] K/V;
    returns o [B, Hq, d] and the LSE in base 2 [B, Hq]."""
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[2])
    outs, lses, base = [], [], 0
    for i, n in enumerate(lens):
        kk = k[base:base + n].float().repeat_interleave(group, dim=1)  # head h reads KV head h // group
        vv = v[base:base + n].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), kk) * scale
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv))
        lses.append(torch.logsumexp(s, -1) / math.log(2))
        base += n
    return torch.stack(outs), torch.stack(lses)


def gather_pages(torch, pool, indptr, indices, last, page):
    """The pool read as FlashInfer's docs define the table: sequence i is pages
    indices[indptr[i]:indptr[i+1]] in order, the last cut to last_page_len[i]."""
    parts, lens = [], []
    for i in range(len(indptr) - 1):
        pages = indices[indptr[i]:indptr[i + 1]]
        n = (len(pages) - 1) * page + last[i]
        parts.append(pool[torch.tensor(pages, dtype=torch.long, device=pool.device)].flatten(0, 1)[:n])
        lens.append(n)
    return torch.cat(parts), lens


def check_paged_reference(torch, dump, l, t, fails):
    """Part 2: the documented table semantics, in torch, against the logical K/V."""
    L = dump.layers[l]
    indptr, indices, last = L["indptr"].ints(), L["indices"].ints(), L["last_page_len"].ints()
    k, lens = gather_pages(torch, t["k_pool"], indptr, indices, last, dump.page)
    v, _ = gather_pages(torch, t["v_pool"], indptr, indices, last, dump.page)
    if lens != L["lens"].ints() or not torch.equal(k, t["k"]) or not torch.equal(v, t["v"]):
        fails.append(f"{dump.name()} layer {l}: K/V gathered through the page table differ from the logical K/V")
        return
    # Same fp32 math on equal inputs; a tiny tolerance only allows for a
    # library that picks a different kernel for the second call.
    o, lse = attention(torch, t["q"], k, v, lens)
    err = max((o - t["ref_o"]).abs().max().item(), (lse - t["ref_lse"]).abs().max().item())
    if err > 1e-5:
        fails.append(f"{dump.name()} layer {l}: attention over the gathered pages differs from the reference by {err:.2e}")


def flashinfer_decode(torch, w, dump, t, last):
    """Plan + run over the separate K and V pools, as an engine would pass
    them (FlashInfer takes a (k_cache, v_cache) tuple for separate pools).
    Each layer has its own table, so each layer plans anew."""
    w.plan(t["indptr"], t["indices"], last, dump.qo_heads, dump.kv_heads, dump.dim, dump.page,
           pos_encoding_mode="NONE", q_data_type=torch.float16, kv_data_type=torch.float16)
    o, lse = w.run(t["q"], (t["k_pool"], t["v_pool"]), return_lse=True)
    torch.cuda.synchronize()
    return o, lse


def check_flashinfer(torch, w, dump, l, t, fails):
    """Part 3: FlashInfer over the pool and the table, against the reference."""
    o, lse = flashinfer_decode(torch, w, dump, t, t["last_page_len"])
    o_err = (o.float() - t["ref_o"]).abs().max().item()
    lse_err = (lse.float() - t["ref_lse"]).abs().max().item()
    ok = o_err <= OUT_TOL and lse_err <= LSE_TOL
    line = f"{dump.name()} layer {l}: FlashInfer max |o - ref| {o_err:.2e}, LSE (base 2) err {lse_err:.2e}"
    # Negative control: a table that claims full last pages reads past the
    # kept tokens (junk or stale rows); the error must then be visible.
    if bool((t["last_page_len"] < dump.page).any()):
        full = torch.full_like(t["last_page_len"], dump.page)
        o2, _ = flashinfer_decode(torch, w, dump, t, full)
        ctrl = (o2.float() - t["ref_o"]).abs().max().item()
        line += f"; control (last pages read full) {ctrl:.2e}"
        if ctrl <= OUT_TOL:
            fails.append(f"{dump.name()} layer {l}: the negative control stayed within tolerance ({ctrl:.2e})")
    print(line + ("" if ok else "  FAIL"), flush=True)
    if not ok:
        fails.append(f"{dump.name()} layer {l}: FlashInfer error o {o_err:.2e} (tol {OUT_TOL}), "
                     f"LSE {lse_err:.2e} (tol {LSE_TOL})")


def check_layers(torch, flashinfer, dump, device, fails):
    paged_fails = []
    pool = {n: tensor(torch, dump.pool[n], device) for n in ("k_pool", "v_pool")}
    w = None
    if flashinfer:  # one wrapper for all layers, as an engine keeps it
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    for l, L in enumerate(dump.layers):
        t = dict(pool)
        for n in ("k", "v", "q", "indptr", "indices", "last_page_len"):
            t[n] = tensor(torch, L[n], device)
        t["ref_o"], t["ref_lse"] = attention(torch, t["q"], t["k"], t["v"], L["lens"].ints())
        check_paged_reference(torch, dump, l, t, paged_fails)
        if w is not None:
            check_flashinfer(torch, w, dump, l, t, fails)
    fails += paged_fails
    print(f"{dump.name()}: torch over the page tables as FlashInfer documents them "
          f"{'equals' if not paged_fails else 'DIFFERS FROM'} the logical K/V reference in every layer", flush=True)


def import_torch_and_flashinfer():
    try:
        import torch
    except ImportError:
        return None, None, "torch is not installed"
    try:
        t0 = time.time()
        import flashinfer
        print(f"flashinfer {flashinfer.__version__} (import {time.time() - t0:.1f} s), torch {torch.__version__}",
              flush=True)
        return torch, flashinfer, None
    except Exception as e:  # a broken install shows up here too, not only ImportError
        return torch, None, f"flashinfer could not be imported: {type(e).__name__}: {e}"


def banner(msg):
    bar = "!" * 78
    print(f"{bar}\n!!! {msg}\n{bar}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dumps", nargs="+", help="dump directories (page<P>/ from flashinfer_dump)")
    ap.add_argument("--require-flashinfer", action="store_true", help="fail when FlashInfer cannot run")
    args = ap.parse_args()
    fails = []
    t0 = time.time()
    dumps = [Dump(d) for d in args.dumps]
    for d in dumps:
        if not d.summary.get("exercised", False):
            fails.append(f"{d.name()}: the dump tool says the run did not exercise compression or page reuse")
        check_tables(d, fails)
    check_same_data(dumps, fails)

    torch, flashinfer, why = import_torch_and_flashinfer()
    if torch is None:
        for f in fails:
            print("FAIL:", f)
        banner(f"{why}: only the pure-Python table checks ran; NEITHER the torch reference NOR FlashInfer ran")
        return 1 if fails else 3
    # The reference must be true fp32: TF32 matmuls alone would err ~1e-3.
    if hasattr(torch, "set_float32_matmul_precision"):
        torch.set_float32_matmul_precision("highest")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"
    print(f"device: {gpu}", flush=True)
    if flashinfer is not None and device != "cuda":
        why, flashinfer = "flashinfer imported but no CUDA device is visible", None
    if flashinfer is None:
        banner(f"FLASHINFER DID NOT RUN ({why}); checking the documented page-table semantics in torch only")
    for d in dumps:
        check_layers(torch, flashinfer, d, device, fails)

    print(f"done in {time.time() - t0:.1f} s", flush=True)
    for f in fails:
        print("FAIL:", f)
    if fails:
        return 1
    if flashinfer is None:
        banner("tables and torch reference OK, but FlashInfer itself did NOT run")
        return 2 if args.require_flashinfer else 0
    print(f"OK: FlashInfer {flashinfer.__version__} on {gpu} matches the reference over the kept tokens "
          f"in every layer of {len(dumps)} page sizes (tol |o| {OUT_TOL}, LSE {LSE_TOL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
