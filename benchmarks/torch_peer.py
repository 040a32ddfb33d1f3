"""PyTorch peer for the pyramidinfer CUDA benchmarks: the same shapes done
the eager way. Prints `peer,<case>,<median ms>` lines (case names match
bench.cu)."""
import sys
import torch

dev = "cuda"
quick = "--quick" in sys.argv


def median_ms(f, reps):
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def report(name, ms):
    print(f"peer,{name},{ms:.4f}", flush=True)


def bench_scoring(tag, B, Hq, Hkv, n, d, reps, chunk):
    w = 1 + int(0.2 * n)
    K = torch.randn(B, Hkv, n, d, device=dev, dtype=torch.float16)
    Q = torch.randn(B, Hq, w, d, device=dev, dtype=torch.float16)
    g = Hq // Hkv
    scale = d ** -0.5
    rows = torch.arange(w, device=dev)
    dw = 2.0
    wr = torch.linspace(1.0, dw, w, device=dev)
    mask = torch.arange(n, device=dev)[None, :] > (n - w + rows)[:, None]

    def run():
        outs = []
        for b0 in range(0, B, chunk):
            q = Q[b0:b0 + chunk]
            k = K[b0:b0 + chunk].repeat_interleave(g, dim=1)
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            s.masked_fill_(mask, float("-inf"))
            p = torch.softmax(s, dim=-1)
            sc = (p[..., : n - w] * wr[:, None]).mean(dim=2)
            outs.append(sc.mean(dim=1) if Hq == Hkv else sc.view(sc.shape[0], Hkv, g, -1).mean(2))
        return torch.cat(outs)

    ms = median_ms(run, reps)
    report(f"score_{tag}_lse_given", ms)
    report(f"score_{tag}_lse_computed", ms)


def bench_topk(tag, rows, n, k):
    s = torch.rand(rows, n, device=dev)

    def run():
        idx = torch.topk(s, k, dim=-1).indices
        return torch.sort(idx, dim=-1).values

    report(f"topk_{tag}", median_ms(run, 20))


def bench_compact(tag, B, H, n, d, keep):
    K = torch.randn(B, H, n, d, device=dev, dtype=torch.float16)
    V = torch.randn(B, H, n, d, device=dev, dtype=torch.float16)
    idx = torch.sort(torch.rand(B, H, n, device=dev).topk(keep, dim=-1).indices, dim=-1).values
    gi = idx[..., None].expand(B, H, keep, d)

    def run():
        return K.gather(2, gi), V.gather(2, gi)

    ms = median_ms(run, 20)
    report(f"compact_gather_{tag}", ms)
    report(f"compact_inplace_{tag}", ms)


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
    bench_scoring("l3_8b_b1_n32768", 1, 32, 8, 32768, 128, 1, 1)
