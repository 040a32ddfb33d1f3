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
hold different lengths) score the continuation one token per forward, the
others in one forward (the same numbers, faster on a CPU). Budgets are
shares of a full cache's slots after prefill (0.7, 0.5): kvpress gets
compression_ratio = 1 - budget, our policies the ratio whose planned share is
nearest (pyramidinfer.hf.ratio_for_fraction); the share each method really
held is measured and reported.

Paired per passage: mean and standard error over passages of
log(ppl_method) - log(ppl_full), and for the methods both libraries have
(SnapKV, StreamingLLM, Knorm) of log(ppl_ours) - log(ppl_kvpress).

    python benchmarks/kvpress/compare.py --passages 8 --out benchmarks/kvpress/results_cpu.md

--eval-json FILE takes the passages from a pyramid-eval JSON instead (its
"prefill" n, "continue" m, "texts", read from examples/data/<basename>, and
"passages": {"text", "token_begin"}): passage i is tokens [token_begin,
token_begin + n + m) of the whole text tokenized without special tokens (no
BOS), as pyramid-eval does. The full cache's per-passage NLLs are checked
against that JSON's "full" row (pyramid-eval's own, fp16 on a GPU there): the
largest difference is printed, and the run stops (exit 1) above
--max-full-diff (default 5e-3), which would mean misaligned passages. Then
the table is pyramid-eval's comparison with the full cache (compare() in
examples/generate/pyramid_eval.cpp): per passage the perplexity ratio - 1,
expm1(nll_method - nll_full), its mean over passages and standard error,
the pooled change expm1(mean nll_method - mean nll_full), and wins/losses/
ties (lower/higher/equal NLL than the full cache); and the same statistics
of the JSON's rows of our policies against the like-named kvpress presses
(snapkv/SnapKV, streaming/StreamingLLM, expected/ExpectedAttention, at the
same budget), so ours (GPU) and theirs (here) pair passage by passage.
--json-out FILE writes every row (per-passage mean NLLs, the KV share held
per passage, those statistics, times) in either mode.

    python benchmarks/kvpress/compare.py --eval-json quality_n1024.json --only kvpress \
        --budgets 0.7 0.5 --json-out benchmarks/kvpress/presses_n1024.json --out benchmarks/kvpress/presses_n1024.md

--device cpu|cuda and --dtype float32|float16|bfloat16 (default float32 on
the CPU, float16 on CUDA) place the model and the passages. A row that
raises pyramidinfer.Error (our policies where pyramidinfer.hf does not run
on that device or dtype) is reported as skipped, with the error; the others
go on. benchmarks/kvpress/run_kvpress_gpu.sh runs this on the GPU machine.

Times, every row measured the same way: each method first runs --warmup
times (default 1) on the first passage, uncounted; then per passage the
prefill (the compressed prefill forward, with kvpress's press hooks) and the
decode time per token (the first --time-decode single-token forwards right
after that prefill, teacher-forced with the continuation's tokens, at most
--cont - 1 of them). Rows that score the continuation one token per forward
time its first forwards; the others, after scoring it in one forward, cut
their cache back to what the prefill left (DynamicCache.crop) and run those
forwards. On CUDA the device is synchronized around every timed region. The
tables give medians over passages (ms); --json-out has each passage's too.
"""

import argparse
import collections
import contextlib
import importlib.metadata
import json
import math
import os
import time

import numpy as np
import torch
import transformers
from transformers import DynamicCache

import kvpress
from pyramidinfer import Error, TopK
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
# pyramid-eval policy (a row of --eval-json) -> the kvpress press it pairs with
EVAL_PAIRS = [("snapkv", "SnapKV"), ("streaming", "StreamingLLM"), ("expected", "ExpectedAttention")]

# One method on one passage: the continuation's summed NLL, the share of a
# full cache's slots held after prefill, the prefill's seconds, the decode
# seconds per token (the first single-token forwards after the prefill) and
# the seconds the scored continuation took (in one forward or one per token).
Run = collections.namedtuple("Run", "nll held prefill decode continuation")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def now(device):
    """time.perf_counter() once the device has done the work queued (CUDA
    runs asynchronously: a timed region starts and ends with this)."""
    sync(device)
    return time.perf_counter()


def nll(logits, targets):
    """Summed negative log-likelihood of targets (T,) under logits (T, vocab)."""
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def continue_in_one(model, cache, first, start, cont):
    """Teacher-forces cont[:-1] in one forward, positions continuing the
    prompt's (a compressed cache holds fewer slots than positions). Needs
    every layer to hold as many slots (the forward's mask is made once).
    Returns the logits predicting cont."""
    pos = torch.arange(start, start + len(cont) - 1, device=cont.device)[None]
    rest = model(cont[None, :-1], past_key_values=cache, position_ids=pos, use_cache=True).logits[0]
    return torch.cat([first[None], rest])


def decode(model, cache, start, tokens):
    """One forward per token of `tokens` (decode), positions start, start + 1,
    ... (a compressed cache holds fewer slots than positions; with one query
    the attention needs no mask, so per-layer lengths, as PyramidKV's and
    ours, work). Returns each forward's logits, a list."""
    positions = torch.arange(start, start + len(tokens), device=tokens.device)  # made once: no copy per step
    rows = []
    for t, pos in zip(tokens, positions):
        rows.append(model(t.view(1, 1), past_key_values=cache, position_ids=pos.view(1, 1), use_cache=True)
                    .logits[0, -1])
    return rows


def continue_one_by_one(model, cache, first, start, cont, steps, device):
    """Teacher-forces cont[:-1] one token per forward. Returns the logits
    predicting cont and the seconds per token of the first `steps` forwards."""
    t0 = now(device)
    rows = decode(model, cache, start, cont[:steps])
    per_token = (now(device) - t0) / steps
    rows += decode(model, cache, start + steps, cont[steps:-1])
    return torch.stack([first] + rows), per_token


def time_decode(model, cache, held, start, cont, steps, device):
    """Seconds per token of `steps` single-token forwards teacher-forced with
    cont, from the prefill's state: `cache` (a DynamicCache of `held` slots in
    every layer after the prefill, which continue_in_one extended) is cut
    back to those slots first."""
    cache.crop(held)
    t0 = now(device)
    decode(model, cache, start, cont[:steps])
    return (now(device) - t0) / steps


def after_prefill(model, cache, first, prompt, cont, prefill, steps, device):
    """The Run of a DynamicCache just prefilled (`first`: the prompt's last
    logits, `prefill`: its seconds): the continuation scored in one forward
    when every layer holds as many slots, then timed decode from the
    prefill's state, else scored one token per forward, its first `steps`
    timed."""
    L = model.config.num_hidden_layers
    lengths = [cache.layers[l].keys.shape[2] for l in range(L)]
    held = sum(lengths) / (L * len(prompt))
    t0 = now(device)
    if len(set(lengths)) == 1:
        logits = continue_in_one(model, cache, first, len(prompt), cont)
        took = now(device) - t0
        per_token = time_decode(model, cache, lengths[0], len(prompt), cont, steps, device)
    else:
        logits, per_token = continue_one_by_one(model, cache, first, len(prompt), cont, steps, device)
        took = now(device) - t0
    return Run(nll(logits, cont), held, prefill, per_token, took)


def run_dynamic(model, press, prompt, cont, steps, device):
    """The full cache (press None) or a kvpress press (compressing in the
    prefill forward), on a DynamicCache."""
    cache = DynamicCache()
    t0 = now(device)
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(prompt[None], past_key_values=cache, use_cache=True)
    prefill = now(device) - t0
    return after_prefill(model, cache, out.logits[0, -1], prompt, cont, prefill, steps, device)


def run_shared(model, presses, prompt, cont, steps, device):
    """The full cache and every press of `presses` from one uncompressed
    prefill: kvpress compresses a layer's cache after that layer's attention
    (the forward itself sees the full prompt), so all presses' prefills are
    the same forward. A hook on each attention layer copies the layer's full
    keys/values into one DynamicCache per press and runs the press's own
    forward_hook on it (what `with press(model)` registers), leaving the
    model's cache full. Returns the full cache's Run, then each press's; the
    prefill time, shared, is the same in all."""
    language_model = model.model
    caches = [DynamicCache() for _ in presses]
    for press in presses:
        press.post_init_from_model(model)

    def hook(module, args, kwargs, output):
        full = kwargs["past_key_values"].layers[module.layer_idx]
        for press, cache in zip(presses, caches):
            cache.update(full.keys, full.values, module.layer_idx)  # a copy (concatenated to an empty tensor)
            press.forward_hook(module, args, {**kwargs, "past_key_values": cache}, output)
        return output

    hooks = []
    cache = DynamicCache()
    t0 = now(device)
    try:
        for layer in language_model.layers:
            layer.self_attn.rotary_emb = language_model.rotary_emb  # as BasePress.__call__ does
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        out = model(prompt[None], past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    prefill = now(device) - t0
    first = out.logits[0, -1]
    return [after_prefill(model, c, first, prompt, cont, prefill, steps, device) for c in [cache] + caches]


def run_ours(model, policy, ratio, extra, prompt, cont, steps, device):
    """One of our policies on a PyramidCache; the continuation one token per
    forward (decode)."""
    cache = PyramidCache(model, policy, ratio, max_new_tokens=len(cont), **extra)
    t0 = now(device)
    first = model(prompt[None], past_key_values=cache, use_cache=True).logits[0, -1]
    prefill = now(device) - t0
    held = sum(len(p[0]) for p in cache.prefill_positions) / (cache.num_layers * len(prompt))
    t0 = now(device)
    logits, per_token = continue_one_by_one(model, cache, first, len(prompt), cont, steps, device)
    return Run(nll(logits, cont), held, prefill, per_token, now(device) - t0)


def run_row(fn, passages, n, warmup):
    """fn's Run on every passage (prompt: its first n tokens) after `warmup`
    uncounted runs on the first passage."""
    for _ in range(warmup):
        fn(passages[0][:n], passages[0][n:])
    return [fn(p[:n], p[n:]) for p in passages]


def median(rows, field):
    return float(np.median([getattr(r, field) for r in rows]))


def times_ms(rows):
    """The table's time cells: median prefill ms | median decode ms per token."""
    return f"{1e3 * median(rows, 'prefill'):.2f} | {1e3 * median(rows, 'decode'):.2f}"


def mean_se(x):
    x = np.asarray(x, dtype=np.float64)
    return x.mean(), (x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan"))


def paired(nll_row, nll_full):
    """pyramid-eval's compare() (examples/generate/pyramid_eval.cpp): per
    passage the perplexity ratio - 1 of row against full (mean NLLs, natural
    log), its mean over passages and standard error, the pooled change of the
    mean NLLs, and wins/losses/ties (lower/higher/equal NLL)."""
    d = np.subtract(nll_row, nll_full, dtype=np.float64)
    change = np.expm1(d)
    P = len(d)
    return {"ppl_change_mean": float(change.mean()),
            "ppl_change_se": float(change.std(ddof=1) / math.sqrt(P)) if P > 1 else 0.0,
            "ppl_change_pooled": float(np.expm1(d.mean())),
            "wins": int((d < 0).sum()), "losses": int((d > 0).sum()), "ties": int((d == 0).sum()),
            "ppl_change": change.tolist()}


def eval_passages(path, tok, device):
    """Passages of a pyramid-eval JSON: (n, m, texts, [(text index, begin)],
    token ids (n + m,) per passage, the JSON)."""
    with open(path) as f:
        ev = json.load(f)
    n, m = int(ev["prefill"]), int(ev["continue"])
    texts = [os.path.join(ROOT, "examples", "data", os.path.basename(t)) for t in ev["texts"]]
    ids = [tok(open(t, encoding="utf-8").read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
           for t in texts]
    where, passages = [], []
    for p in ev["passages"]:
        t, b = int(p["text"]), int(p["token_begin"])
        if b + n + m > len(ids[t]):
            raise SystemExit(f"--eval-json: passage at token {b} of {texts[t]} runs past its {len(ids[t])} tokens")
        where.append((t, b))
        passages.append(ids[t][b:b + n + m].to(device))
    return n, m, texts, where, passages, ev


def eval_budget(s):
    """A pyramid-eval row's budget as a number ('0.70' -> 0.7; 'paper' -> None)."""
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "models"))
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in --model-dir ('' for a HF checkpoint dir)")
    ap.add_argument("--text", default=os.path.join(ROOT, "examples", "data", "moby_dick_ch1-3.txt"))
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--eval-json", help="take the passages (and --prompt, --cont) from this pyramid-eval JSON")
    ap.add_argument("--max-full-diff", type=float, default=5e-3,
                    help="with --eval-json: stop if a passage's full-cache NLL differs from the JSON's by more")
    ap.add_argument("--share-prefill", action="store_true",
                    help="one prefill per passage for the full cache and all kvpress presses (run_shared)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="the model's dtype (default float32 on cpu, float16 on cuda)")
    ap.add_argument("--time-decode", type=int, default=32, metavar="N",
                    help="decode time per token over the first N single-token forwards after the prefill "
                         "(at most --cont - 1)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs of each method on the first passage")
    ap.add_argument("--only", nargs="*", help="run only these method names (substrings; the full cache always runs)")
    ap.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy CPU)")
    ap.add_argument("--out", help="write the markdown tables here too")
    ap.add_argument("--json-out", help="write every row (per-passage NLLs, KV shares, paired statistics) here")
    a = ap.parse_args()
    a.dtype = a.dtype or ("float16" if a.device == "cuda" else "float32")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if a.time_decode < 1 or a.warmup < 0:
        raise SystemExit("--time-decode must be >= 1 and --warmup >= 0")
    return a


def load_model(a):
    kw = dict(gguf_file=a.gguf) if a.gguf else {}
    tok = transformers.AutoTokenizer.from_pretrained(a.model_dir, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype),
                                                              attn_implementation="sdpa", **kw).eval().to(a.device)
    return tok, model


def make_methods(a, model, steps):
    """(name, budget, run(prompt, cont) -> Run, details for --json-out) of
    every method asked for; the full cache first."""
    def wanted(name):
        return not a.only or any(o in name for o in a.only)

    methods = [("full", None, lambda p, c: run_dynamic(model, None, p, c, steps, a.device), {})]
    for b in a.budgets:
        for name, make in KVPRESS.items():
            if not wanted(f"kvpress {name}"):
                continue
            r = round(1 - b, 6)
            press = make(r)
            methods.append((f"kvpress {name}", b,
                            lambda p, c, press=press: run_dynamic(model, press, p, c, steps, a.device),
                            dict(library="kvpress", press=name, compression_ratio=r, _press=press)))
        for name, (policy, extra) in OURS.items():
            if not wanted(f"ours {name} "):
                continue
            r = ratio_for_fraction(model, a.prompt, b, policy, **extra)
            methods.append((f"ours {name} (r={r:g})", b,
                            lambda p, c, policy=policy, r=r, extra=extra: run_ours(model, policy, r, extra, p, c,
                                                                                   steps, a.device),
                            dict(library="pyramidinfer", policy=name, ratio=r)))
    return methods


def check_full(nl, ev, n_passages, max_diff):
    """With --eval-json: the full cache's passage NLLs (a prefix of them)
    against the JSON's full row; stops the run when misaligned."""
    if ev is None:
        return None
    ev_full = next((r for r in ev.get("rows", []) if r["policy"] == "full"), None)
    if ev_full is None or len(ev_full["passage_nll"]) != n_passages:
        raise SystemExit(f"--eval-json: no full row with {n_passages} passage NLLs to check against")
    diff = np.subtract(nl, ev_full["passage_nll"][:len(nl)])
    check = {"max_abs_diff": float(np.abs(diff).max()), "mean_diff": float(diff.mean()), "diff": diff.tolist()}
    print(f"full cache vs --eval-json's full row: max |NLL difference| {check['max_abs_diff']:.2e} "
          f"(mean {check['mean_diff']:+.2e}) over {len(nl)} passages", flush=True)
    if check["max_abs_diff"] > max_diff:
        raise SystemExit(f"--eval-json: full-cache NLLs differ by up to {check['max_abs_diff']:.2e} "
                         f"> {max_diff:g}: the passages are misaligned")
    return check


def main():
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    started = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok, model = load_model(a)
    ev = None
    if a.eval_json:
        a.prompt, a.cont, texts, where, passages, ev = eval_passages(a.eval_json, tok, a.device)
        a.passages = len(passages)
        ev_rows = ev.get("rows", [])
        source = (f"the {a.passages} passages of {a.eval_json} "
                  f"({', '.join(sorted({os.path.basename(t) for t in texts}))})")
    else:
        ids = tok(open(a.text).read(), return_tensors="pt").input_ids[0].to(a.device)
        span = a.prompt + a.cont
        if len(ids) < a.passages * span:
            raise SystemExit(f"--text has {len(ids)} tokens: fewer than {a.passages} passages of {span}")
        passages = [ids[i * span:(i + 1) * span] for i in range(a.passages)]
        texts, where = [a.text], [(0, i * span) for i in range(a.passages)]
        source = f"{a.passages} consecutive passages of {os.path.basename(a.text)}"
    if a.cont < 2:
        raise SystemExit("--cont must be >= 2 (decode is timed on the continuation's tokens)")
    steps = min(a.time_decode, a.cont - 1)
    methods = make_methods(a, model, steps)

    res, skipped, full_check = {}, {}, None
    shared = [m for m in methods if m[0] == "full" or "_press" in m[3]] if a.share_prefill else []
    with torch.no_grad():
        if shared:
            presses = [m[3]["_press"] for m in shared[1:]]
            for m in shared:
                res[(m[0], m[1])] = []
            for _ in range(a.warmup):
                run_shared(model, presses, passages[0][:a.prompt], passages[0][a.prompt:], steps, a.device)
            for i, p in enumerate(passages):
                t0 = time.perf_counter()
                outs = run_shared(model, presses, p[:a.prompt], p[a.prompt:], steps, a.device)
                for m, r in zip(shared, outs):
                    res[(m[0], m[1])].append(r)
                print(f"passage {i + 1}/{len(passages)}: full and {len(shared) - 1} presses, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
                full_check = check_full([r.nll / a.cont for r in res[("full", None)]], ev, len(passages),
                                        a.max_full_diff)
        for name, b, fn, _ in methods:
            t0 = time.perf_counter()
            if (name, b) not in res:
                try:
                    res[(name, b)] = run_row(fn, passages, a.prompt, a.warmup)
                except Error as e:  # pyramidinfer.hf refusing this device / dtype: report, skip the row
                    skipped[(name, b)] = f"pyramidinfer.Error: {e}"
                    print(f"{name:38s} budget {b}: SKIPPED ({skipped[(name, b)]})", flush=True)
                    continue
            rows = res[(name, b)]
            nl = [r.nll / a.cont for r in rows]
            print(f"{name:38s} budget {b}: ppl {math.exp(np.mean(nl)):.3f}, held {np.mean([r.held for r in rows]):.3f}, "
                  f"prefill {1e3 * median(rows, 'prefill'):.2f} ms, decode {1e3 * median(rows, 'decode'):.2f} ms/token "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if name == "full" and not shared:
                full_check = check_full(nl, ev, len(passages), a.max_full_diff)

    full = [r.nll / a.cont for r in res[("full", None)]]
    nll_of = {k: [r.nll / a.cont for r in rows] for k, rows in res.items()}
    stats = {k: paired(v, full) for k, v in nll_of.items()}
    version = importlib.metadata.version("kvpress")
    on = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    lines = [f"SmolLM2-135M ({a.gguf or a.model_dir}), {a.dtype} on {on}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, kvpress {version}; "
             f"{source}: {a.prompt} prompt + {a.cont} continuation tokens each.", ""]
    if ev is None:
        lines += ["| budget | method | KV held | ppl | Δ log ppl vs full (± s.e.) | prefill ms | decode ms/token |",
                  "|---|---|---|---|---|---|---|"]
        for name, b, _, _ in methods:
            if (name, b) in skipped:
                lines.append(f"| {b if b else '-'} | {name} | skipped: {skipped[(name, b)]} | | | | |")
                continue
            rows, nl = res[(name, b)], nll_of[(name, b)]
            d, se = mean_se(np.subtract(nl, full))
            lines.append(f"| {b if b else '-'} | {name} | {np.mean([r.held for r in rows]):.3f} | "
                         f"{math.exp(np.mean(nl)):.3f} | {d:+.4f} ± {se:.4f} | {times_ms(rows)} |")
        pair_lines = []
        for b in a.budgets:
            for ours, theirs in PAIRS:
                ko = next((k for k in res if k[1] == b and k[0].startswith(f"ours {ours} ")), None)
                kt = (f"kvpress {theirs}", b)
                if ko and kt in res:
                    d, se = mean_se([x - y for x, y in zip(nll_of[ko], nll_of[kt])])
                    pair_lines.append(f"| {b} | {ko[0]} | {theirs} | {d:+.4f} ± {se:.4f} |")
        if pair_lines:
            lines += ["", "Paired, ours − kvpress (Δ log ppl ± s.e.):", "", "| budget | ours | kvpress | Δ ± s.e. |",
                      "|---|---|---|---|"] + pair_lines
    else:
        lines += [f"Full cache here vs pyramid-eval's full row: max |NLL difference| over passages "
                  f"{full_check['max_abs_diff']:.2e} (mean {full_check['mean_diff']:+.2e}).", "",
                  "vs the full cache here, pyramid-eval's definitions (mean over passages of the perplexity "
                  "ratio − 1 ± s.e.; pooled: of the mean NLLs; W/L/T: passages with lower/higher/equal NLL):", "",
                  "| method | budget | KV held | ppl | change ± s.e. | pooled | W/L/T | prefill ms | decode ms/token |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, b, _, _ in methods:
            if (name, b) in skipped:
                lines.append(f"| {name} | {b if b else '-'} | skipped: {skipped[(name, b)]} | | | | | | |")
                continue
            rows, st = res[(name, b)], stats[(name, b)]
            lines.append(f"| {name} | {b if b else '-'} | {np.mean([r.held for r in rows]):.4f} | "
                         f"{math.exp(np.mean(nll_of[(name, b)])):.3f} | "
                         f"{100 * st['ppl_change_mean']:+.2f}% ± {100 * st['ppl_change_se']:.2f}% | "
                         f"{100 * st['ppl_change_pooled']:+.2f}% | {st['wins']}/{st['losses']}/{st['ties']} | "
                         f"{times_ms(rows)} |")
    # Our policies' rows of --eval-json against the like-named presses run here.
    ev_pairs = []
    if ev is not None:
        for r in ev_rows:
            b = eval_budget(r["budget"])
            for ours, theirs in [("full", "full")] + EVAL_PAIRS:
                k = ("full", None) if theirs == "full" else (f"kvpress {theirs}", b)
                if r["policy"] == ours and k in nll_of and (theirs == "full" or b in a.budgets):
                    ev_pairs.append(dict(policy=ours, budget=r["budget"], press=theirs,
                                         kv_fraction_ours=r["kv_fraction_prefill"],
                                         kv_fraction_press=float(np.mean([x.held for x in res[k]])),
                                         ours_vs_full=r["vs_full"]["ppl_change_mean"],
                                         ours_vs_full_se=r["vs_full"]["ppl_change_se"],
                                         vs_press=paired(r["passage_nll"], nll_of[k])))
        if ev_pairs:
            lines += ["", "Paired, our policy (pyramid-eval's row, fp16 GPU) vs the kvpress press here "
                      f"({a.dtype} {a.device}): "
                      "mean over passages of exp(nll_ours − nll_press) − 1 ± s.e.; W/L/T: passages where ours "
                      "has lower/higher/equal NLL. The full-vs-full row is the numeric floor.", "",
                      "| ours | press | budget | KV held ours / press | ours vs its full | ours vs press | W/L/T |",
                      "|---|---|---|---|---|---|---|"]
            for e in ev_pairs:
                v = e["vs_press"]
                lines.append(f"| {e['policy']} | {e['press']} | {e['budget']} | {e['kv_fraction_ours']:.4f} / "
                             f"{e['kv_fraction_press']:.4f} | {100 * e['ours_vs_full']:+.2f}% ± "
                             f"{100 * e['ours_vs_full_se']:.2f}% | {100 * v['ppl_change_mean']:+.2f}% ± "
                             f"{100 * v['ppl_change_se']:.2f}% | {v['wins']}/{v['losses']}/{v['ties']} |")
    wall = time.perf_counter() - started
    lines += ["", f"Times: medians over the {len(passages)} passages after {a.warmup} uncounted run(s) of each "
              f"method on the first; prefill: the prefill forward; decode: per token, the first {steps} "
              f"single-token forwards after the prefill" + (" (CUDA synchronized around each)." if a.device == "cuda"
                                                            else "."),
              "", f"Wall time {wall / 60:.1f} min ({torch.get_num_threads()} torch threads)"
              + ("; the full cache and the presses shared one prefill per passage (--share-prefill: their prefill "
                 "time is that pass, all compressions included)." if shared else ".")]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.json_out:
        out_rows = []
        for name, b, _, details in methods:
            details = {k: v for k, v in details.items() if not k.startswith("_")}
            row = dict(method=name, budget=b if b is not None else 1.0, **details)
            if (name, b) in skipped:
                out_rows.append(dict(row, skipped=True, error=skipped[(name, b)]))
                continue
            rows = res[(name, b)]
            nl = nll_of[(name, b)]
            out_rows.append(dict(row, kv_fraction_prefill=float(np.mean([r.held for r in rows])),
                                 kv_fraction_passage=[float(r.held) for r in rows],
                                 nll=float(np.mean(nl)), perplexity=math.exp(np.mean(nl)), passage_nll=nl,
                                 vs_full=stats[(name, b)],
                                 prefill_seconds=median(rows, "prefill"),
                                 decode_seconds_per_token=median(rows, "decode"),
                                 continuation_seconds=median(rows, "continuation"),
                                 prefill_seconds_passage=[r.prefill for r in rows],
                                 decode_seconds_per_token_passage=[r.decode for r in rows]))
        doc = dict(model=a.gguf or a.model_dir, dtype=a.dtype, device=a.device, device_name=on,
                   torch=torch.__version__, transformers=transformers.__version__, kvpress=version,
                   threads=torch.get_num_threads(), eval_json=a.eval_json, share_prefill=bool(shared),
                   prefill=a.prompt, cont=a.cont, warmup=a.warmup, decode_steps=steps, texts=texts,
                   passages=[{"text": t, "token_begin": b} for t, b in where],
                   full_check=full_check, rows=out_rows, eval_pairs=ev_pairs, wall_seconds=wall)
        with open(a.json_out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
