"""Side by side with kvpress: continuation perplexity of SmolLM2 (or any
Llama-structured model) whose prompt KV cache is compressed to the same share
of its slots by kvpress's presses and by pyramidinfer's policies.

Per passage: a prompt of --prompt tokens is prefilled with compression, then
--cont tokens of the same text follow, teacher-forced; the score is the
perplexity of those --cont tokens (the first predicted by the prefill's last
logits). kvpress compresses in prefill only, so our policies run with decode
eviction off here (compress_decode=False) for a like-for-like budget (with a
512-token prompt it would not fire within 64 tokens anyway: it starts after
window + 16 = 119 steps). Our policies and kvpress's PyramidKV (whose layers
hold different lengths) run the continuation one token per forward, the
others in one forward (the same numbers, faster on a CPU): compare
continuation times only between rows that ran it the same way. Budgets are
shares of a full cache's slots after prefill (0.7, 0.5): kvpress gets
compression_ratio = 1 - budget, our policies the ratio whose planned share is
nearest (pyramidinfer.hf.ratio_for_fraction); the share each method really
held is measured and reported.

Paired per passage: mean and standard error over passages of
log(ppl_method) - log(ppl_full), and for the methods both libraries have
(SnapKV, StreamingLLM, Knorm) of log(ppl_ours) - log(ppl_kvpress).

    python benchmarks/kvpress/compare.py --passages 8 --out benchmarks/kvpress/results_cpu.md
"""

import argparse
import math
import os
import time

import numpy as np
import torch
import transformers
from transformers import DynamicCache

import kvpress
from pyramidinfer import TopK
from pyramidinfer.hf import PyramidCache, ratio_for_fraction

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

KVPRESS = {
    "StreamingLLM": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
    "SnapKV": lambda r: kvpress.SnapKVPress(compression_ratio=r),
    "Knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
    "ExpectedAttention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
    "PyramidKV": lambda r: kvpress.PyramidKVPress(compression_ratio=r),
    "TOVA": lambda r: kvpress.TOVAPress(compression_ratio=r),
}
# name -> (policy, extra PyramidCompressor keywords)
OURS = {
    "pyramid": ("pyramid", dict(compress_decode=False)),
    # The paper's min_context (64) stops the cosine schedule near 55% of a
    # 512-token prompt; 16 lets it reach the 50% budget.
    "pyramid-mc16": ("pyramid", dict(compress_decode=False, selection=TopK(4, 16))),
    "snapkv": ("snapkv", dict(compress_decode=False)),
    "h2o": ("h2o", dict(compress_decode=False)),
    "streaming": ("streaming", dict(compress_decode=False)),
    "knorm": ("knorm", dict(compress_decode=False)),
}
PAIRS = [("snapkv", "SnapKV"), ("streaming", "StreamingLLM"), ("knorm", "Knorm")]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def nll(logits, targets):
    """Summed negative log-likelihood of targets (T,) under logits (T, vocab)."""
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def run_full(model, prompt, cont, device):
    sync(device)
    t0 = time.perf_counter()
    cache = DynamicCache()
    out = model(prompt[None], past_key_values=cache, use_cache=True)
    sync(device)
    t1 = time.perf_counter()
    logits = continue_in_one(model, cache, out.logits[0, -1], len(prompt), cont)
    sync(device)
    return nll(logits, cont), 1.0, t1 - t0, time.perf_counter() - t1


def continue_in_one(model, cache, first, start, cont):
    """Teacher-forces cont[:-1] in one forward, positions continuing the
    prompt's (a compressed cache holds fewer slots than positions). Needs
    every layer to hold as many slots (the forward's mask is made once).
    Returns the logits predicting cont."""
    pos = torch.arange(start, start + len(cont) - 1, device=cont.device)[None]
    rest = model(cont[None, :-1], past_key_values=cache, position_ids=pos, use_cache=True).logits[0]
    return torch.cat([first[None], rest])


def continue_one_by_one(model, cache, first, start, cont):
    """Teacher-forces cont[:-1] one token per forward (decode), positions
    continuing the prompt's (a compressed cache holds fewer slots than
    positions; with one query the attention needs no mask, so per-layer
    lengths, as PyramidKV's, work). Returns the logits predicting cont."""
    rows = [first]
    for i, t in enumerate(cont[:-1]):
        pos = torch.tensor([[start + i]], device=cont.device)
        rows.append(model(t.view(1, 1), past_key_values=cache, position_ids=pos, use_cache=True).logits[0, -1])
    return torch.stack(rows)


def run_kvpress(model, press, prompt, cont, device):
    cache = DynamicCache()
    sync(device)
    t0 = time.perf_counter()
    with press(model):
        out = model(prompt[None], past_key_values=cache, use_cache=True)
    sync(device)
    t1 = time.perf_counter()
    L = model.config.num_hidden_layers
    held = sum(cache.layers[l].keys.shape[2] for l in range(L)) / (L * len(prompt))
    lengths = {cache.layers[l].keys.shape[2] for l in range(L)}
    go_on = continue_in_one if len(lengths) == 1 else continue_one_by_one
    logits = go_on(model, cache, out.logits[0, -1], len(prompt), cont)
    sync(device)
    return nll(logits, cont), held, t1 - t0, time.perf_counter() - t1


def run_ours(model, policy, ratio, extra, prompt, cont, device):
    cache = PyramidCache(model, policy, ratio, max_new_tokens=len(cont), **extra)
    sync(device)
    t0 = time.perf_counter()
    rows = [model(prompt[None], past_key_values=cache, use_cache=True).logits[0, -1]]
    sync(device)
    t1 = time.perf_counter()
    held = sum(len(p[0]) for p in cache.prefill_positions) / (cache.num_layers * len(prompt))
    for t in cont[:-1]:  # one token per forward (decode)
        rows.append(model(t.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1])
    sync(device)
    return nll(torch.stack(rows), cont), held, t1 - t0, time.perf_counter() - t1


def mean_se(x):
    x = np.asarray(x, dtype=np.float64)
    return x.mean(), (x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "models"))
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in --model-dir ('' for a HF checkpoint dir)")
    ap.add_argument("--text", default=os.path.join(ROOT, "examples", "data", "moby_dick_ch1-3.txt"))
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32 (the CPU binding needs it)")
    ap.add_argument("--only", nargs="*", help="run only these method names")
    ap.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy CPU)")
    ap.add_argument("--out", help="write the markdown tables here too")
    a = ap.parse_args()
    if a.device != "cpu":
        raise SystemExit("pyramidinfer.hf runs on the CPU in this version (the CUDA binding is not built yet); "
                         "use --device cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kw = dict(gguf_file=a.gguf) if a.gguf else {}
    tok = transformers.AutoTokenizer.from_pretrained(a.model_dir, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype),
                                                              attn_implementation="sdpa", **kw).eval().to(a.device)
    ids = tok(open(a.text).read(), return_tensors="pt").input_ids[0].to(a.device)
    span = a.prompt + a.cont
    if len(ids) < a.passages * span:
        raise SystemExit(f"--text has {len(ids)} tokens: fewer than {a.passages} passages of {span}")
    passages = [ids[i * span:(i + 1) * span] for i in range(a.passages)]

    methods = [("full", None, lambda p, c: run_full(model, p, c, a.device))]
    for b in a.budgets:
        for name, make in KVPRESS.items():
            press = make(round(1 - b, 6))
            methods.append((f"kvpress {name}", b, lambda p, c, press=press: run_kvpress(model, press, p, c, a.device)))
        for name, (policy, extra) in OURS.items():
            r = ratio_for_fraction(model, a.prompt, b, policy, **extra)
            methods.append((f"ours {name} (r={r:g})", b,
                            lambda p, c, policy=policy, r=r, extra=extra: run_ours(model, policy, r, extra, p, c,
                                                                                   a.device)))
    if a.only:
        methods = [m for m in methods if m[0] == "full" or any(o in m[0] for o in a.only)]

    res = {}
    with torch.no_grad():
        for name, b, fn in methods:
            rows = [fn(p[:a.prompt], p[a.prompt:]) for p in passages]
            res[(name, b)] = rows
            nl = [r[0] / a.cont for r in rows]
            print(f"{name:38s} budget {b}: ppl {math.exp(np.mean(nl)):.3f}, held {np.mean([r[1] for r in rows]):.3f}",
                  flush=True)

    full = [r[0] / a.cont for r in res[("full", None)]]
    lines = [f"SmolLM2-135M ({a.gguf or a.model_dir}), {a.dtype} on {a.device}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}; "
             f"{a.passages} passages of {a.prompt} prompt + {a.cont} continuation tokens.",
             "", "| budget | method | KV held | ppl | Δ log ppl vs full (± s.e.) | prefill s | continuation s |",
             "|---|---|---|---|---|---|---|"]
    for (name, b), rows in res.items():
        nl = [r[0] / a.cont for r in rows]
        d, se = mean_se(np.subtract(nl, full))
        lines.append(f"| {b if b else '-'} | {name} | {np.mean([r[1] for r in rows]):.3f} | "
                     f"{math.exp(np.mean(nl)):.3f} | {d:+.4f} ± {se:.4f} | {np.mean([r[2] for r in rows]):.3f} | "
                     f"{np.mean([r[3] for r in rows]):.3f} |")
    lines += ["", "Paired, ours − kvpress (Δ log ppl ± s.e.):", "", "| budget | ours | kvpress | Δ ± s.e. |",
              "|---|---|---|---|"]
    for b in a.budgets:
        for ours, theirs in PAIRS:
            ko = next((k for k in res if k[1] == b and k[0].startswith(f"ours {ours} ")), None)
            kt = (f"kvpress {theirs}", b)
            if ko and kt in res:
                d, se = mean_se([x[0] / a.cont - y[0] / a.cont for x, y in zip(res[ko], res[kt])])
                lines.append(f"| {b} | {ko[0]} | {theirs} | {d:+.4f} ± {se:.4f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
