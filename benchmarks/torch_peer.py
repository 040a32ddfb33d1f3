"""PyTorch peer for the pyramidinfer CUDA benchmarks: the same shapes done
the eager way, on the SAME tensors as benchmarks/bench.cu: every input is
the same fixed hash of (element index, seed) that bench.cu's fill kernels
use (hash_fill below reproduces it bit for bit), and the compaction index
lists use the same formula. Prints `peer,<case>,<median ms>,<note>` lines
(case names match bench.cu); notes carry the same checksums bench.cu prints
(sum of scores, sum of kept indices) so the two can be compared."""
import sys
import torch

dev = "cuda"
quick = "--quick" in sys.argv
M32 = 0xFFFFFFFF


def hash_u32(i, seed):
    h = ((i * 2654435761) & M32) ^ seed
    h = h ^ (h >> 13)
    h = (h * 0x5BD1E995) & M32
    return h ^ (h >> 15)


def hash_fill(shape, seed, dtype, sd=2.0):
    """bench.cu fill_rand (fp16: (u - 0.5) * sd) / fill_randf (fp32: u)."""
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, device=dev, dtype=dtype)
    step = 1 << 26
    for a in range(0, n, step):
        i = torch.arange(a, min(n, a + step), device=dev, dtype=torch.int64)
        u = (hash_u32(i, seed) & 0xFFFFFF).to(torch.float32) / 16777216.0
        out[a:a + i.numel()] = u if dtype == torch.float32 else ((u - 0.5) * sd).to(dtype)
    return out.view(*shape)


_props = torch.cuda.get_device_properties(0)
_l2 = getattr(_props, "L2_cache_size", 0) or (64 << 20)
_flush = torch.ones(max(4 * _l2, 64 << 20) // 4, device=dev, dtype=torch.float32)


def median_ms(f, reps):
    """bench.cu's harness: per repetition an L2 flush that reads 4x the L2
    size, then a spin kernel that holds the stream while the host enqueues the
    events and the work, so the events time the GPU work, not launch latency."""
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _flush.sum()
        torch.cuda._sleep(250_000)  # about 125 us at 2 GHz
        a.record()
        f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def report(name, ms, note=""):
    print(f"peer,{name},{ms:.4f},{note}", flush=True)


def bench_scoring(tag, B, Hq, Hkv, n, d, reps, chunk, shared=False, hchunk=None):
    """chunk: sequences per matmul; hchunk: query heads per matmul (None: all;
    the 128K rows need one head at a time: a [w, n] fp32 row block is 14 GB)."""
    w = 1 + int(0.2 * n)
    K = hash_fill((B, Hkv, n, d), 11, torch.float16)
    Q = hash_fill((B, Hq, w, d), 12, torch.float16)
    g = Hq // Hkv
    scale = d ** -0.5
    rows = torch.arange(w, device=dev)
    dw = 2.0
    wr = torch.linspace(1.0, dw, w, device=dev)
    mask = torch.arange(n, device=dev)[None, :] > (n - w + rows)[:, None]
    one_row = Hq == Hkv or shared  # one score row per sequence, else per KV head

    def scores(q, k):  # [b, h, w, d] x [b, h, n, d] -> [b, h, n - w]
        s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        s.masked_fill_(mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return (p[..., : n - w] * wr[:, None]).mean(dim=2)

    def run():
        if hchunk is None:
            outs = []
            for b0 in range(0, B, chunk):
                sc = scores(Q[b0:b0 + chunk], K[b0:b0 + chunk].repeat_interleave(g, dim=1))
                outs.append(sc.mean(dim=1) if one_row else sc.view(sc.shape[0], Hkv, g, -1).mean(2))
            return torch.cat(outs)
        out = torch.zeros(B, 1 if one_row else Hkv, n - w, device=dev)
        for b0 in range(0, B, chunk):
            for h0 in range(0, Hq, hchunk):
                heads = torch.arange(h0, min(Hq, h0 + hchunk), device=dev)
                sc = scores(Q[b0:b0 + chunk, h0:h0 + hchunk], K[b0:b0 + chunk].index_select(1, heads // g))
                if one_row:
                    out[b0:b0 + chunk, 0] += sc.sum(dim=1) / Hq
                else:
                    out[b0:b0 + chunk].index_add_(1, heads // g, sc / g)
        return out

    ms = median_ms(run, reps)
    note = f"sum={run().double().sum().item():.6f}"
    report(f"score_{tag}_lse_given", ms, note)
    report(f"score_{tag}_lse_computed", ms, note)
    del K, Q


def bench_topk(tag, rows, n, k):
    s = hash_fill((rows, n), 21, torch.float32)
    forced = 4  # bench.cu keeps 4 sinks, then the best k - 4 of the rest
    sinks = torch.arange(forced, device=dev, dtype=torch.int64).expand(rows, forced)

    def run():
        idx = torch.topk(s[:, forced:], k - forced, dim=-1).indices + forced
        return torch.cat([sinks, torch.sort(idx, dim=-1).values], dim=1)

    ms = median_ms(run, 20)
    report(f"topk_{tag}", ms, f"idx_sum={int(run().sum().item())}")


def bench_compact(tag, B, H, n, d, keep):
    K = hash_fill((B, H, n, d), 11, torch.float16)
    V = hash_fill((B, H, n, d), 13, torch.float16)
    i = torch.arange(B * H * keep, device=dev, dtype=torch.int64)
    idx = (2 * (i % keep) + (hash_u32(i, 31) & 1)).view(B, H, keep)
    gi = idx[..., None].expand(B, H, keep, d)

    def run():
        return K.gather(2, gi), V.gather(2, gi)

    ms = median_ms(run, 20)
    report(f"compact_gather_{tag}", ms)
    report(f"compact_inplace_{tag}", ms)
    del K, V


for n in (512, 4096):
    t = f"l2_13b_b32_n{n}"
    bench_scoring(t, 32, 40, 40, n, 128, 10 if n < 1000 else 3, 32 if n < 1000 else 4)
    ctx = n - (1 + int(0.2 * n))
    bench_topk(t + "_shared", 32, ctx, ctx // 2)
    bench_topk(t + "_perhead", 32 * 40, ctx, ctx // 2)
    bench_compact(t, 32, 40, n, 128, n // 2)
for n in (32768, 131072):
    for B in (1, 4):
        t = f"l3_8b_b{B}_n{n}"
        ctx = n - (1 + int(0.2 * n))
        bench_topk(t + "_shared", B, ctx, ctx // 2)
        bench_topk(t + "_perhead", B * 8, ctx, ctx // 2)
        bench_compact(t, B, 8, n, 128, n // 2)
if not quick:
    # Llama-3-8B per-KV-head scoring, batch 1 and 4, 32K and 128K slots.
    bench_scoring("l3_8b_b1_n32768", 1, 32, 8, 32768, 128, 1, 1)
    bench_scoring("l3_8b_b4_n32768", 4, 32, 8, 32768, 128, 1, 1, hchunk=8)
    bench_scoring("l3_8b_b1_n131072", 1, 32, 8, 131072, 128, 1, 1, hchunk=1)
    bench_scoring("l3_8b_b4_n131072", 4, 32, 8, 131072, 128, 1, 1, hchunk=1)
    for B in (1, 4):
        for n in (4096, 8192):
            bench_scoring(f"l3_8b_b{B}_n{n}_shared", B, 32, 8, n, 128, 3, 1, shared=True)
