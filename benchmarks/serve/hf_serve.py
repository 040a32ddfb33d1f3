"""Hugging Face transformers serving the same requests as pyramid-serve (issue 12).

What it measures: the throughput of HF transformers (torch, fp16, attention
"sdpa") on the requests pyramid-serve serves, on a LlamaForCausalLM of the
same shape (random weights, normal std 0.02, so activations stay finite in
fp16) and with a KV budget of the same size (--pool-gb, default 40 GiB).
Arrivals are all at t = 0 (pyramid-serve's "saturation" runs). Prompt tokens
are random ids from a fixed seed; outputs run to each request's own length
(EOS never stops them). A row counts as useful output only each request's own
output_len tokens, and reports the tokens generated beyond them as waste.

Two ways of batching:
  --mode static  `model.generate` on static batches taken in request order. It
      is generate's natural mode: one call takes a padded batch and decodes
      until its longest output ends, with no way to add a request while it
      runs. A batch grows while its padded full-cache KV, batch x (longest
      prompt + longest output) x bytes per token (K and V of all layers), fits
      --pool-gb and it holds at most --max-batch requests. Left padding with
      an attention mask; max_new_tokens = min_new_tokens = the batch's longest
      output, so short requests decode (and pay for) tokens they do not need.
      The cache is generate's default, DynamicCache (it grows by torch.cat,
      copying every layer's K and V each step); --cache static preallocates
      batch x (padded prompt + new tokens), the budget above, instead (eager:
      generate's automatic torch.compile is off, as it would recompile for
      every batch shape).
  --mode cb      transformers' own continuous batching (transformers >= 5,
      generation/continuous_batching): a paged cache of --pool-gb
      (num_blocks = pool / (block_size x bytes per token)), the FIFO
      scheduler, every request with its own max_new_tokens and no EOS. The
      attention is "paged|sdpa" (set here, so that HF does not switch to flash
      attention where it is installed; --attn flash_attention_2 asks for it).

The rows are context for pyramid-serve's rows (benchmarks/RESULTS.md,
"Serving"), not a peer run of the same engine: another framework, eager
PyTorch with its Python overhead per step, another scheduler. They say where a
widely used stack stands on the same GPU, requests and memory budget.

Commands (on the GPU machine; benchmarks/serve/run_hf_serve_gpu.sh does all):
  pyramid-serve --requests 384 --prompt-median 512 --dump-requests req512.jsonl
  python3 benchmarks/serve/hf_serve.py --requests-file req512.jsonl --shape llama2-7b \\
      --mode static --pool-gb 40 --out hf_serve.jsonl
  python3 benchmarks/serve/hf_serve.py --requests-file req512.jsonl --shape llama2-7b \\
      --mode cb --pool-gb 40 --out hf_serve.jsonl
Smoke test without a GPU (both modes run on CPU; the dump can be any small workload):
  pyramid-serve --requests 12 --prompt-median 24 --prompt-cap 48 --output-min 4 --output-max 12 \\
      --dump-requests small.jsonl
  python3 benchmarks/serve/hf_serve.py --requests-file small.jsonl --shape tiny \\
      --device cpu --dtype float32 --mode static --limit 6
  (and --mode cb --pool-gb 0.01: HF checks its paged cache plus activations
  against free memory, RAM here, and a 40 GiB pool of the tiny shape fails it)

Output: one JSON line per run (--out FILE appends; default stdout) with
pyramid-serve's field names where they apply (requests, makespan_s, req_per_s,
out_tok_per_s, output_tokens, peak_concurrent, the workload header), plus
generated_tokens (with waste), batches or steps, peak_gpu_bytes
(torch.cuda.max_memory_allocated) and the KV sizes.
"""
import argparse
import datetime
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

# examples/llama_cuda/llama_cuda.cuh, named_shape(): the shapes pyramid-serve runs.
SHAPES = {
    "llama2-7b": dict(layers=32, dim=4096, ffn=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000, rope=10000.0),
    "llama2-13b": dict(layers=40, dim=5120, ffn=13824, heads=40, kv_heads=40, head_dim=128, vocab=32000, rope=10000.0),
    "llama3-8b": dict(layers=32, dim=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, rope=500000.0),
    "tiny": dict(layers=4, dim=256, ffn=512, heads=4, kv_heads=2, head_dim=64, vocab=1000, rope=10000.0),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PAD_ID = 0
FIRST_PROMPT_ID = 3  # prompts avoid the ids a Llama tokenizer reserves (0 unk/pad, 1 bos, 2 eos)


def log(msg):
    print(f"hf_serve: {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests-file", required=True, help="pyramid-serve --dump-requests output")
    p.add_argument("--mode", choices=["static", "cb"], required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--pool-gb", type=float, default=40.0, help="KV budget in GiB (default 40)")
    p.add_argument("--max-batch", type=int, default=256, help="requests per batch at most (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="cb: tokens per forward (default 8192)")
    p.add_argument("--block-size", type=int, default=256, help="cb: tokens per KV block (default 256, HF's)")
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                   help="static mode: generate's cache_implementation (default dynamic, generate's own)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--seed", type=int, default=1, help="prompt token ids (default 1)")
    p.add_argument("--limit", type=int, default=0, help="serve only the first N requests (0: all)")
    p.add_argument("--warmup", type=int, default=1, help="tiny batches before timing (default 1)")
    p.add_argument("--out", default="", help="append the summary line here (default stdout)")
    a = p.parse_args(argv)
    if a.pool_gb <= 0 or a.max_batch < 1 or a.max_batch_tokens < 1 or a.block_size < 4 or a.limit < 0:
        p.error("--pool-gb, --max-batch, --max-batch-tokens must be > 0, --block-size >= 4, --limit >= 0")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch sees no CUDA device (use --device cpu --dtype float32 for a smoke test)")
    return a


def load_requests(path, limit):
    """The header (workload options) and the requests, in id order."""
    header, reqs = None, []
    for line in open(path):
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "id" in row:
            reqs.append(row)
        elif header is None:
            header = row
    if header is None or not reqs:
        raise SystemExit(f"hf_serve: {path}: no workload header or no requests (write it with --dump-requests)")
    if [r["id"] for r in reqs] != list(range(len(reqs))):
        raise SystemExit(f"hf_serve: {path}: request ids are not 0, 1, 2, ...")
    return header, reqs[:limit] if limit else reqs


def kv_bytes_per_token(s, dtype):
    """K and V of every layer for one token, as the padded and the paged caches hold them."""
    return 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * torch.finfo(dtype).bits // 8


def build_model(s, max_positions, args):
    """Random weights in the shape, made on the device (HF's init: normal std 0.02, norms 1)."""
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": s["rope"]},
        pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(42)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype], attn_implementation=args.attn)
    model.eval()
    model.generation_config = GenerationConfig(pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None)
    with torch.no_grad():  # random weights must not overflow: a NaN would make every timing meaningless
        logits = model(torch.arange(FIRST_PROMPT_ID, FIRST_PROMPT_ID + 8, device=args.device)[None]).logits
    if not torch.isfinite(logits).all():
        raise SystemExit("hf_serve: the random model's logits are not finite")
    return model


def prompt_ids(reqs, vocab, seed):
    """Random token ids, one stream in request order: the same prompts in both modes and at any --limit."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_PROMPT_ID, vocab, (r["prompt_len"],), generator=g) for r in reqs]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- static batching: model.generate ---------------------------------------------------


def static_batches(reqs, per_token, pool_bytes, max_batch):
    """Request indices in order, cut where the padded full-cache KV would pass the pool."""
    batches, cur, longest_p, longest_o = [], [], 0, 0
    for i, r in enumerate(reqs):
        if (r["prompt_len"] + r["output_len"]) * per_token > pool_bytes:
            raise SystemExit(f"hf_serve: request {r['id']} alone needs more KV than --pool-gb")
        p, o = max(longest_p, r["prompt_len"]), max(longest_o, r["output_len"])
        if cur and (len(cur) == max_batch or (len(cur) + 1) * (p + o) * per_token > pool_bytes):
            batches.append(cur)
            cur, p, o = [], r["prompt_len"], r["output_len"]
        cur.append(i)
        longest_p, longest_o = p, o
    return batches + [cur] if cur else batches


def generate_batch(model, prompts, new_tokens, device, cache):
    """One left-padded generate call; returns the generated tokens per row (prompt excluded)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None,
                           cache_implementation=None if cache == "dynamic" else cache,
                           disable_compile=True)  # a static cache would compile anew for every batch shape
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
    return out.shape[1] - width


def run_static(model, reqs, prompts, args, per_token):
    pool_bytes = args.pool_gb * 2**30
    batches = static_batches(reqs, per_token, pool_bytes, args.max_batch)
    for _ in range(args.warmup):
        generate_batch(model, [prompts[0][:16]] * 2, 4, args.device, args.cache)
    sync(args.device)
    reset_peak(args.device)
    generated, kv_peak, t0 = 0, 0, time.perf_counter()
    for b, idx in enumerate(batches):
        new = max(reqs[i]["output_len"] for i in idx)
        tb = time.perf_counter()
        got = generate_batch(model, [prompts[i] for i in idx], new, args.device, args.cache)
        sync(args.device)
        if got != new:
            raise SystemExit(f"hf_serve: batch {b} generated {got} tokens per row, asked for {new}")
        generated += len(idx) * new
        kv_peak = max(kv_peak, len(idx) * (max(reqs[i]["prompt_len"] for i in idx) + new) * per_token)
        log(f"batch {b + 1}/{len(batches)}: {len(idx)} requests, {new} new tokens, {time.perf_counter() - tb:.2f} s")
    seconds = time.perf_counter() - t0
    return dict(makespan_s=seconds, generated_tokens=generated, batches=len(batches), cache=args.cache,
                peak_concurrent=max(len(b) for b in batches), kv_budget_peak_bytes=kv_peak)


# ---- continuous batching: transformers' manager -----------------------------------------


class Probe:
    """Counts the manager's steps, its largest batch and live set, and evictions, by
    wrapping two methods of its scheduler and offloading manager (internals of 5.x)."""

    def __init__(self, processor):
        self.steps = self.peak_batch = self.peak_concurrent = self.evicted = 0
        sched, off = processor.scheduler, processor.offloading_manager
        schedule, offload = sched.schedule_batch, off.offload_requests

        def schedule_batch(*a, **k):
            out = schedule(*a, **k)
            if out[0]:
                self.steps += 1
                self.peak_batch = max(self.peak_batch, len(out[0]))
                self.peak_concurrent = max(self.peak_concurrent, len(sched.active_requests))
            return out

        def offload_requests(*a, **k):
            n = offload(*a, **k)
            self.evicted += n
            return n

        sched.schedule_batch, off.offload_requests = schedule_batch, offload_requests

    def reset(self):
        self.steps = self.peak_batch = self.peak_concurrent = self.evicted = 0


def serve_cb(manager, prompts, max_new, tag):
    """Adds the requests (each with its own max_new_tokens, no EOS) and waits for all of them."""
    ids = [manager.add_request(input_ids=p.tolist(), request_id=f"{tag}{i}", max_new_tokens=n, eos_token_id=-1,
                               record_timestamps=True) for i, (p, n) in enumerate(zip(prompts, max_new))]
    done = {}
    while len(done) < len(ids):
        res = manager.get_result(timeout=0.1)
        if res is None and not manager.is_running():
            raise SystemExit(f"hf_serve: the generation thread stopped: {manager.background_thread_status.fatal_error}")
        if res is not None and res.is_finished():
            if res.error is not None:
                raise SystemExit(f"hf_serve: request {res.request_id} failed: {res.error}")
            done[res.request_id] = res
    return [done[i] for i in ids]


def run_cb(model, reqs, prompts, args, per_token):
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    num_blocks = int(args.pool_gb * 2**30 // (args.block_size * per_token))
    cbc = ContinuousBatchingConfig(block_size=args.block_size, num_blocks=num_blocks,
                                   max_batch_tokens=args.max_batch_tokens, max_requests_per_batch=args.max_batch,
                                   allow_block_sharing=False, scheduler_type="fifo")
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r["output_len"] for r in reqs),
                           pad_token_id=PAD_ID, eos_token_id=-1)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in prompts),
                          max_generated_length=gen.max_new_tokens, num_requests=len(reqs))
    attn = args.attn if args.attn.startswith("paged|") else "paged|" + args.attn
    model.set_attn_implementation(attn)  # as asked: HF would switch sdpa to flash where flash is installed
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc,
                                             workload_hints=hints)
    try:
        manager.warmup()  # makes the batch processor (the paged cache) here, so that the probe can wrap it
        cache = manager.batch_processor.cache
        probe = Probe(manager.batch_processor)
        manager.start()
        for w in range(args.warmup):
            serve_cb(manager, [prompts[0][:16]] * 2, [4, 4], f"warmup{w}_")
        sync(args.device)
        reset_peak(args.device)
        probe.reset()
        t0 = time.perf_counter()
        results = serve_cb(manager, prompts, [r["output_len"] for r in reqs], "r")
        seconds = time.perf_counter() - t0
        cfg = manager.continuous_batching_config
    finally:
        manager.stop(block=True)
        manager.destroy()
    lens = [len(res.generated_tokens) for res in results]
    ttft = [res.timestamps[0] - t0 for res in results]
    tpot = [(res.timestamps[-1] - res.timestamps[0]) / (n - 1) for res, n in zip(results, lens) if n >= 2]
    return dict(makespan_s=seconds, generated_tokens=sum(lens), steps=probe.steps, peak_batch=probe.peak_batch,
                peak_concurrent=probe.peak_concurrent, evicted=probe.evicted,
                short_outputs=sum(n < r["output_len"] for n, r in zip(lens, reqs)),
                ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
                tpot_p50_s=percentile(tpot, 50), tpot_p99_s=percentile(tpot, 99),
                attn=attn, block_size=cache.block_size, num_blocks=cache.num_blocks,
                kv_cache_bytes=sum(t.numel() * t.element_size() for t in cache.key_cache + cache.value_cache),
                max_batch_tokens=cache.max_batch_tokens, max_requests_per_batch=cfg.max_requests_per_batch,
                cuda_graphs=list(cfg.cuda_graph_booleans), per_request_max_new_tokens=True)


# ---- the summary ------------------------------------------------------------------------


def percentile(v, p):
    """numpy's default (linear between the nearest ranks), as examples/serve/metrics.hpp."""
    if not v:
        return None
    v = sorted(v)
    rank = p / 100 * (len(v) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (rank - lo) * (v[hi] - v[lo])


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def summary(header, reqs, args, per_token, model, run):
    useful = sum(r["output_len"] for r in reqs)
    cuda = args.device.startswith("cuda")
    row = dict(bench="serve-hf", engine=f"hf-transformers-{transformers.__version__}", shape=args.shape,
               policy="full (HF static batching)" if args.mode == "static" else "full (HF continuous batching)",
               ratio=1, mode="saturation", batching=args.mode, rate=0, requests=len(reqs),
               workload_requests=header.get("requests"))
    row.update({k: header.get(k) for k in ("prompt_median", "prompt_sigma", "prompt_min", "prompt_cap",
                                           "output_min", "output_max", "seed")})
    row.update(prompt_seed=args.seed, pool_bytes=int(args.pool_gb * 2**30), kv_bytes_per_token=per_token,
               max_batch=args.max_batch, dtype=args.dtype, attn=args.attn, output_tokens=useful,
               prompt_tokens=sum(r["prompt_len"] for r in reqs))
    row.update(run)
    s = row["makespan_s"]
    row.update(req_per_s=len(reqs) / s, out_tok_per_s=useful / s, generated_tok_per_s=row["generated_tokens"] / s,
               waste_tokens=row["generated_tokens"] - useful,
               peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda else None,
               weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
               device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"))
    return row


def main(argv):
    args = parse_args(argv)
    header, reqs = load_requests(args.requests_file, args.limit)
    s = SHAPES[args.shape]
    per_token = kv_bytes_per_token(s, DTYPES[args.dtype])
    longest = max(r["prompt_len"] + r["output_len"] for r in reqs)
    t = time.perf_counter()
    model = build_model(s, max(4096, longest + 64), args)
    log(f"{args.shape} on {args.device}, {args.dtype}, {args.attn}: built in {time.perf_counter() - t:.1f} s; "
        f"{len(reqs)} requests, KV {per_token} bytes per token, budget {args.pool_gb} GiB")
    prompts = prompt_ids(reqs, s["vocab"], args.seed)
    run = (run_static if args.mode == "static" else run_cb)(model, reqs, prompts, args, per_token)
    line = json.dumps(summary(header, reqs, args, per_token, model, run), separators=(",", ":"))
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
        log(f"{args.mode}: {line}")
    else:
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
