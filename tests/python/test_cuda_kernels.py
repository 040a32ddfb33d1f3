"""The CUDA array kernels (pyramidinfer.cuda_kernels over pyramidinfer._cuda)
against the CPU binding on the same values.

Every test draws fresh random inputs; the seed is printed (shown with a
failure) and replays with PYRAMIDINFER_SEED=<seed>. float16 / bfloat16 inputs
are compared with the CPU functions on their values converted to float32
(exact), so only the kernels' arithmetic differs. Outputs are poisoned
first (NaN, -1) so that an element left unwritten fails.
"""

import os
import random
import sys
import zlib

import numpy as np
import pytest

import pyramidinfer as pi

try:
    from pyramidinfer import _cuda
except ImportError as e:  # built without nvcc
    pytest.skip(f"pyramidinfer._cuda is not built ({e})", allow_module_level=True)
if _cuda.device_count() == 0:
    pytest.skip("pyramidinfer._cuda is built but sees no CUDA device", allow_module_level=True)
torch = pytest.importorskip("torch", reason="the CUDA kernel tests make their arrays with torch")
if not torch.cuda.is_available():
    pytest.skip("torch was built without CUDA or sees no CUDA device", allow_module_level=True)

import pyramidinfer.cuda_kernels as pk  # noqa: E402

SEED = int(os.environ.get("PYRAMIDINFER_SEED", random.SystemRandom().randrange(2**31)))
DEV = torch.device("cuda", 0)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture
def rng(request):
    print(f"replay with: PYRAMIDINFER_SEED={SEED} python -m pytest '{request.node.nodeid}'")
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def to_dev(a, dtype=torch.float32, device=DEV):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device).to(dtype)


def to_host(t):
    """float32 numpy copy (float16 / bfloat16 convert exactly)."""
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def normal(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


# --- window scoring ------------------------------------------------------------


def assert_scores_close(got, want, dtype):
    got, want = to_host(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "unwritten (NaN) or non-finite scores"
    scale = float(np.abs(want).max()) if want.size else 0.0
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale + 1e-30)
    else:  # tensor cores: fp16 / bf16 products, fp32 accumulation in another order
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3 * scale + 1e-30)


def causal_lse(keys, queries, scale):
    """Natural-log LSE of each window query over the slots it saw (float64), (b, qh, w)."""
    B, KV, n, d = keys.shape
    _, QH, w, _ = queries.shape
    g = QH // KV
    out = np.empty((B, QH, w), np.float32)
    for b in range(B):
        for qh in range(QH):
            logits = scale * (queries[b, qh].astype(np.float64) @ keys[b, qh // g].astype(np.float64).T)
            for r in range(w):
                seen = logits[r, : n - w + r + 1]
                out[b, qh, r] = seen.max() + np.log(np.exp(seen - seen.max()).sum())
    return out


# (B, kv_heads, q_heads, n, w, d): tensor-core shapes (d 64 / 128, fused short
# cache and two-pass long cache) and CUDA-core fallback shapes (d 40, 24).
SCORE_SHAPES = {
    "fused_d64": (2, 2, 8, 300, 40, 64),
    "twopass_d128": (1, 2, 4, 1500, 96, 128),
    "fallback_d40": (1, 3, 3, 200, 17, 40),
    "gqa_d24": (2, 1, 4, 90, 90, 24),  # w == n: nothing to score
}


@pytest.mark.parametrize("granularity", ["shared", "per_kv_head"])
@pytest.mark.parametrize("shape", list(SCORE_SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_window_scores_match_cpu(rng, dtype, shape, granularity):
    B, KV, QH, n, w, d = SCORE_SHAPES[shape]
    keys = to_dev(normal(rng, B, KV, n, d), DTYPES[dtype])
    queries = to_dev(normal(rng, B, QH, w, d), DTYPES[dtype])
    k32, q32 = to_host(keys), to_host(queries)
    want = pi.window_attention_scores(k32, q32, granularity=granularity)
    out = torch.full(want.shape, float("nan"), device=DEV)
    got = pk.window_attention_scores(keys, queries, granularity=granularity, out=out)
    assert got is out
    assert_scores_close(out, want, dtype)
    # Allocated out, given LSE (stale by a little), explicit scale and distance weight.
    scale = 0.07
    lse = causal_lse(k32, q32, scale) + 0.05 * normal(rng, B, QH, w)
    want = pi.window_attention_scores(k32, q32, lse=lse, scale=scale, distance_weight=2.5, granularity=granularity)
    got = pk.window_attention_scores(keys, queries, to_dev(lse), scale=scale, distance_weight=2.5,
                                     granularity=granularity)
    assert got.dtype == torch.float32 and got.device == DEV
    assert_scores_close(got, want, dtype)
    # Unbatched (3-D) arrays give one sequence's rows.
    got = pk.window_attention_scores(keys[-1], queries[-1], granularity=granularity)
    want = pi.window_attention_scores(k32[-1], q32[-1], granularity=granularity)
    assert tuple(got.shape) == want.shape
    assert_scores_close(got, want, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_window_scores_strided_views(rng, dtype):
    B, KV, QH, n, w, d = 2, 2, 4, 260, 30, 64
    t = DTYPES[dtype]
    # Keys stored NHD (b, token, head, d) and read as (b, head, token, d).
    nhd = to_dev(normal(rng, B, n, KV, d), t)
    keys = nhd.transpose(1, 2)
    # Queries: d elements inside wider rows. For f16 / bf16 they start 16 bytes
    # in, so the rows stay aligned and take the tensor cores; float32 rows start
    # 12 bytes in (float32 always takes the CUDA-core kernels).
    start = 3 if dtype == "float32" else 8
    queries = to_dev(normal(rng, B, QH, w, d + 16), t)[..., start : start + d]
    assert not keys.is_contiguous() and not queries.is_contiguous()
    k32, q32 = to_host(keys), to_host(queries)
    for granularity in ("shared", "per_kv_head"):
        want = pi.window_attention_scores(k32, q32, granularity=granularity)
        groups, ctx = want.shape[1], want.shape[2]
        # out: a transposed view with a poisoned margin around it.
        big = torch.full((ctx + 6, groups, B), float("nan"), device=DEV)
        out = big[3 : 3 + ctx].permute(2, 1, 0)
        before = big.data_ptr()
        pk.window_attention_scores(keys, queries, granularity=granularity, out=out)
        assert big.data_ptr() == before
        assert_scores_close(out, want, dtype)
        assert torch.isnan(big[:3]).all() and torch.isnan(big[3 + ctx :]).all(), "wrote outside out"
    # Elements of a row not adjacent (every other one): the CUDA-core fallback.
    wide = to_dev(normal(rng, B, KV, n, 2 * d), t)
    keys2 = wide[..., ::2]
    want = pi.window_attention_scores(to_host(keys2), q32)
    assert_scores_close(pk.window_attention_scores(keys2, queries), want, dtype)


def test_window_scores_on_streams(rng):
    B, KV, QH, n, w, d = 1, 2, 4, 400, 50, 64
    keys = to_dev(normal(rng, B, KV, n, d), torch.float16)
    queries = to_dev(normal(rng, B, QH, w, d), torch.float16)
    want = pi.window_attention_scores(to_host(keys), to_host(queries))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for stream in (side, side.cuda_stream):
        out = torch.full(want.shape, float("nan"), device=DEV)
        side.wait_stream(torch.cuda.current_stream())  # out's fill
        got = pk.window_attention_scores(keys, queries, out=out, stream=stream)
        side.synchronize()
        assert_scores_close(got, want, "float16")
    # stream=None inside a stream context: torch's current stream.
    with torch.cuda.stream(side):
        assert pk._stream_handle(None, 0) == side.cuda_stream
        got = pk.window_attention_scores(keys, queries)
    side.synchronize()
    assert_scores_close(got, want, "float16")


def test_window_scores_workspace_sizes(rng):
    keys = to_dev(normal(rng, 3, 2, 500, 64), torch.float16)
    queries = to_dev(normal(rng, 3, 4, 60, 64), torch.float16)
    lse = torch.zeros(3, 4, 60, device=DEV)
    need = pk.window_attention_scores_workspace_bytes(keys, queries)
    assert need > 0 and need == _cuda.window_attention_scores_workspace_bytes(keys, queries, None, 0.0, 1.2, "shared")
    # A given LSE needs no pass-1 buffer.
    assert pk.window_attention_scores_workspace_bytes(keys, queries, lse) < need
    want = pi.window_attention_scores(to_host(keys), to_host(queries))
    ws = torch.full((need + 64,), 0xAB, dtype=torch.uint8, device=DEV)[64:]  # poisoned, 64-byte offset
    out = torch.full(want.shape, float("nan"), device=DEV)
    pk.window_attention_scores(keys, queries, out=out, workspace=ws)
    assert_scores_close(out, want, "float16")
    with pytest.raises(pi.Error, match=r"window_attention_scores: argument 'workspace' = array of \d+ bytes"):
        pk.window_attention_scores(keys, queries, out=out, workspace=ws[: need - 1])
    with pytest.raises(pi.Error, match=r"argument 'workspace'.*16-byte aligned"):
        pk.window_attention_scores(keys, queries, out=out, workspace=torch.empty(need + 8, dtype=torch.uint8,
                                                                                  device=DEV)[4:])
    with pytest.raises(pi.Error, match=r"argument 'workspace' = None"):
        _cuda.window_attention_scores(keys, queries, None, 0.0, 1.2, "shared", out, None, 0)


def test_window_scores_bad_inputs(rng):
    keys = to_dev(normal(rng, 2, 2, 50, 16), torch.float16)
    queries = to_dev(normal(rng, 2, 4, 10, 16), torch.float16)
    out = torch.empty(2, 1, 40, device=DEV)
    with pytest.raises(pi.Error, match=r"window_attention_scores: argument 'keys' = a CPU array must be a CUDA"):
        pk.window_attention_scores(keys.cpu(), queries)
    with pytest.raises(pi.Error, match=r"argument 'keys' = array of dtype float64 must have dtype float32, float16"):
        pk.window_attention_scores(keys.double(), queries.double())
    with pytest.raises(pi.Error, match=r"argument 'queries' = array of dtype float32 must have dtype float16"):
        pk.window_attention_scores(keys, queries.float())
    with pytest.raises(pi.Error, match=r"argument 'queries' = a CPU array must be an array on CUDA device 0"):
        pk.window_attention_scores(keys, queries.cpu())
    with pytest.raises(pi.Error, match=r"argument 'queries'.*head_dim"):
        pk.window_attention_scores(keys, queries[..., :8])
    with pytest.raises(pi.Error, match=r"argument 'queries'.*window"):
        pk.window_attention_scores(keys, to_dev(normal(rng, 2, 4, 51, 16), torch.float16))
    with pytest.raises(pi.Error, match=r"argument 'lse'"):
        pk.window_attention_scores(keys, queries, torch.zeros(2, 4, 9, device=DEV))
    with pytest.raises(pi.Error, match=r"argument 'lse' = array of dtype float16 must have dtype float32"):
        pk.window_attention_scores(keys, queries, torch.zeros(2, 4, 10, device=DEV, dtype=torch.float16))
    with pytest.raises(pi.Error, match=r"argument 'granularity'"):
        pk.window_attention_scores(keys, queries, granularity="per_head")
    with pytest.raises(pi.Error, match=r"argument 'scale'"):
        pk.window_attention_scores(keys, queries, scale=-1.0)
    with pytest.raises(pi.Error, match=r"argument 'out' = array of shape \(2, 1, 39\) must have shape \(2, 1, 40\)"):
        pk.window_attention_scores(keys, queries, out=out[..., :39])
    with pytest.raises(pi.Error, match=r"argument 'out' = array of dtype float16 must have dtype float32"):
        pk.window_attention_scores(keys, queries, out=out.half())
    with pytest.raises(pi.Error, match=r"argument 'out' = a CPU array"):
        pk.window_attention_scores(keys, queries, out=out.cpu())
    with pytest.raises(pi.Error, match=r"argument 'out'.*stride\[0\] = 0"):
        pk.window_attention_scores(keys, queries, out=out[:1].expand(2, 1, 40))


# --- top-k ----------------------------------------------------------------------


def distinct_scores(rng, rows, n):
    """float32 scores without ties: a shuffled range of integers per row (exact in float32)."""
    return np.stack([rng.permutation(n) for _ in range(rows)]).astype(np.float32) - np.float32(n // 2)


def cpu_topk(scores, k, sinks):
    return pi.topk_indices(np.ascontiguousarray(scores, dtype=np.float32), k, sinks)


@pytest.mark.parametrize("rows,n", [(5, 300), (1, 5000), (64, 1000), (3, 20000), (1, 40000)])
def test_topk_matches_cpu(rng, rows, n):
    scores = distinct_scores(rng, rows, n) * np.float32(rng.uniform(0.01, 3.0))
    ds = to_dev(scores)
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        for sinks in (0, 4, n + 2):
            want = cpu_topk(scores, k, sinks)
            out = torch.full((rows, k), -1, dtype=torch.int32, device=DEV)
            got = pk.topk_indices(ds, k, sinks, out=out)
            assert got is out
            np.testing.assert_array_equal(to_host(out), want, err_msg=f"rows={rows} n={n} k={k} sinks={sinks}")
    # Allocated out and workspace; long rows use the multi-block path (more workspace).
    if n >= 16384 and rows <= 256:
        assert pk.topk_indices_workspace_bytes(ds, n // 2) > pk.topk_indices_workspace_bytes(ds[:, :1000], 500)
    got = pk.topk_indices(ds, n // 2, 3)
    assert got.dtype == torch.int32 and tuple(got.shape) == (rows, n // 2)
    np.testing.assert_array_equal(to_host(got), cpu_topk(scores, n // 2, 3))
    # 1-D scores.
    np.testing.assert_array_equal(to_host(pk.topk_indices(ds[-1], n // 4, 2)), cpu_topk(scores[-1], n // 4, 2))


def test_topk_nan_inf_and_ties_follow_the_cpu_rule(rng):
    rows, n = 4, 3000
    scores = np.round(normal(rng, rows, n) * 4) / 4  # many equal scores
    scores[0, rng.integers(0, n, 50)] = np.nan
    scores[1, rng.integers(0, n, 50)] = -np.inf
    scores[1, rng.integers(0, n, 10)] = np.inf
    scores[2] = np.nan
    scores[3, ::2] = -0.0
    scores[3, 1::2] = 0.0
    ds = to_dev(scores)
    for k in (0, 7, n // 2, n):
        np.testing.assert_array_equal(to_host(pk.topk_indices(ds, k, 5)), cpu_topk(scores, k, 5), err_msg=f"k={k}")


def test_topk_strided_views(rng):
    rows, n, k = 6, 700, 90
    scores = distinct_scores(rng, rows, n)
    want = cpu_topk(scores, k, 2)
    transposed = to_dev(np.ascontiguousarray(scores.T)).t()  # (rows, n) with stride (1, rows)
    sliced = to_dev(np.pad(scores, ((0, 0), (5, 3)), constant_values=np.nan))[:, 5 : 5 + n]
    for view in (transposed, sliced):
        assert not view.is_contiguous()
        big = torch.full((k + 3, rows), -7, dtype=torch.int32, device=DEV)
        out = big[1 : 1 + k].t()  # a transposed out with a margin
        pk.topk_indices(view, k, 2, out=out)
        np.testing.assert_array_equal(to_host(out), want)
        assert (big[0] == -7).all() and (big[1 + k :] == -7).all(), "wrote outside out"
    # One column of a 2-D table as 1-D scores.
    table = to_dev(np.ascontiguousarray(scores.T))
    np.testing.assert_array_equal(to_host(pk.topk_indices(table[:, 2], k, 2)), want[2])


def test_topk_bad_inputs(rng):
    ds = to_dev(distinct_scores(rng, 2, 10))
    with pytest.raises(pi.Error, match=r"topk_indices: argument 'k' = 11 must be in \[0, n = 10\]"):
        pk.topk_indices(ds, 11)
    with pytest.raises(pi.Error, match=r"topk_indices: argument 'sinks' = -1 must be >= 0"):
        pk.topk_indices(ds, 3, -1)
    with pytest.raises(pi.Error, match=r"argument 'scores' = a CPU array must be a CUDA array"):
        pk.topk_indices(ds.cpu(), 3)
    with pytest.raises(pi.Error, match=r"argument 'scores' = array of dtype float16 must have dtype float32"):
        pk.topk_indices(ds.half(), 3)
    with pytest.raises(pi.Error, match=r"argument 'out' = array of dtype int64 must have dtype int32"):
        pk.topk_indices(ds, 3, out=torch.empty(2, 3, dtype=torch.int64, device=DEV))
    with pytest.raises(pi.Error, match=r"argument 'out' = array of shape \(2, 4\) must have shape \(2, 3\)"):
        pk.topk_indices(ds, 3, out=torch.empty(2, 4, dtype=torch.int32, device=DEV))
    with pytest.raises(pi.Error, match=r"argument 'workspace' = array of dtype int32"):
        pk.topk_indices(ds, 3, workspace=torch.empty(1024, dtype=torch.int32, device=DEV))


# --- compaction ------------------------------------------------------------------


def ascending(rng, n, m):
    return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int32)


def cpu_compact(x32, kept):
    x32 = x32.copy()
    pi.compact_rows(x32, kept)
    return x32


@pytest.mark.parametrize("d", [64, 7, 6, 8])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_compact_rows_match_cpu_in_place(rng, dtype, d):
    t = DTYPES[dtype]
    B, H, n = 2, 3, 300
    for m in (0, 1, 117, n):
        # Contiguous (b, h, n, d).
        x = to_dev(normal(rng, B, H, n, d), t)
        kept = ascending(rng, n, m)
        want = cpu_compact(to_host(x), kept)
        ptr = x.data_ptr()
        assert pk.compact_rows(x, to_dev(kept, torch.int32)) == m
        assert x.data_ptr() == ptr
        np.testing.assert_array_equal(to_host(x), want, err_msg=f"m={m}")
        # NHD storage (b, token, head, d + 4) read as (b, head, token, d): the
        # compaction edits the storage, and only the viewed elements.
        store = to_dev(normal(rng, B, n, H, d + 4), t)
        before = to_host(store)
        xv = store[..., 2 : 2 + d].transpose(1, 2)
        want = cpu_compact(to_host(xv), kept)
        pk.compact_rows(xv, to_dev(kept, torch.int32))
        after = to_host(store)
        np.testing.assert_array_equal(after[..., 2 : 2 + d].transpose(0, 2, 1, 3), want, err_msg=f"m={m} view")
        np.testing.assert_array_equal(after[..., :2], before[..., :2])
        np.testing.assert_array_equal(after[..., 2 + d :], before[..., 2 + d :])
    # Unbatched (h, n, d), kept as a strided view.
    x3 = to_dev(normal(rng, H, n, d), t)
    kept = ascending(rng, n, 50)
    kept_dev = to_dev(np.repeat(kept, 2), torch.int32)[::2]
    want = cpu_compact(to_host(x3), kept)
    assert pk.compact_rows(x3, kept_dev) == 50
    np.testing.assert_array_equal(to_host(x3), want)


def test_compact_rows_long_rows_and_stream(rng):
    B, H, n, d = 1, 2, 20000, 128
    x = to_dev(normal(rng, B, H, n, d), torch.bfloat16)
    kept = ascending(rng, n, 12345)
    want = cpu_compact(to_host(x), kept)
    side = torch.cuda.Stream()
    kd = to_dev(kept, torch.int32)
    side.wait_stream(torch.cuda.current_stream())
    pk.compact_rows(x, kd, stream=side)
    side.synchronize()
    np.testing.assert_array_equal(to_host(x), want)


def test_compact_rows_bad_kept_leaves_x_and_reports(rng):
    B, H, n, d = 2, 2, 64, 16
    x = to_dev(normal(rng, B, H, n, d), torch.float16)
    before = x.clone()
    need = pk.compact_rows_workspace_bytes(x, to_dev(np.arange(10), torch.int32))
    ws = torch.empty(need, dtype=torch.uint8, device=DEV)
    status = ws[:4].view(torch.int32)
    good = ascending(rng, n, 10)
    for bad in ([3, 2, 5], [1, 1, 2], [0, 5, n], [-1, 4, 9], [5, 9, 70]):
        pk.compact_rows(x, to_dev(np.array(bad, np.int32), torch.int32), workspace=ws)
        assert int(status.item()) == 1, f"kept={bad}"
        assert torch.equal(x, before), f"kept={bad} changed x"
        pk.compact_rows(before.clone(), to_dev(good, torch.int32), workspace=ws)
        assert int(status.item()) == 0


def test_compact_rows_bad_inputs(rng):
    x = to_dev(normal(rng, 2, 8, 4), torch.float32)
    kept = to_dev(np.arange(3), torch.int32)
    with pytest.raises(pi.Error, match=r"compact_rows: argument 'kept' = array of 9 indices must hold at most n = 8"):
        pk.compact_rows(x, to_dev(np.arange(9), torch.int32))
    with pytest.raises(pi.Error, match=r"argument 'kept' = array of dtype int64 must have dtype int32"):
        pk.compact_rows(x, kept.long())
    with pytest.raises(pi.Error, match=r"argument 'kept' = a CPU array must be an array on CUDA device 0"):
        pk.compact_rows(x, kept.cpu())
    with pytest.raises(pi.Error, match=r"argument 'x' = a CPU array must be a CUDA array"):
        pk.compact_rows(x.cpu(), kept)
    with pytest.raises(pi.Error, match=r"argument 'x' = array of dtype float64"):
        pk.compact_rows(x.double(), kept)
    with pytest.raises(pi.Error, match=r"argument 'x'.*stride\[0\] = 0"):
        pk.compact_rows(x[:1].expand(3, 8, 4), kept)
    with pytest.raises(pi.Error, match=r"argument 'x' = array of shape \(8, 4\) must have 4 dimensions"):
        pk.compact_rows(x[0], kept)


# --- gather ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gather_rows_match_cpu(rng, dtype):
    t = DTYPES[dtype]
    n, c = 500, 96
    src = to_dev(normal(rng, n, c), t)
    for m in (0, 1, 200, n):
        idx = ascending(rng, n, m)
        want = pi.gather_rows(to_host(src), idx)
        out = torch.full((m, c), float("nan"), dtype=t, device=DEV)
        got = pk.gather_rows(src, to_dev(idx, torch.int32), out=out)
        assert got is out
        np.testing.assert_array_equal(to_host(out), want, err_msg=f"m={m}")
    # Transposed src (elements of a row not adjacent), allocated out.
    srcT = to_dev(normal(rng, c, n), t).t()
    idx = ascending(rng, n, 77)
    got = pk.gather_rows(srcT, to_dev(idx, torch.int32))
    assert got.dtype == t and tuple(got.shape) == (77, c)
    np.testing.assert_array_equal(to_host(got), pi.gather_rows(to_host(srcT), idx))


def test_gather_rows_bad_inputs(rng):
    src = to_dev(normal(rng, 10, 4))
    idx = to_dev(np.arange(4), torch.int32)
    with pytest.raises(pi.Error, match=r"gather_rows: argument 'idx'.*must be contiguous"):
        pk.gather_rows(src, idx[::2])
    with pytest.raises(pi.Error, match=r"argument 'idx' = array of 11 indices must hold at most n = 10"):
        pk.gather_rows(src, to_dev(np.arange(11), torch.int32))
    with pytest.raises(pi.Error, match=r"argument 'src' = a CPU array must be a CUDA array"):
        pk.gather_rows(src.cpu(), idx)
    with pytest.raises(pi.Error, match=r"argument 'out' = array of dtype float16 must have dtype float32"):
        pk.gather_rows(src, idx, out=torch.empty(4, 4, dtype=torch.float16, device=DEV))
    with pytest.raises(pi.Error, match=r"argument 'out' = array of shape \(4, 5\) must have shape \(4, 4\)"):
        pk.gather_rows(src, idx, out=torch.empty(4, 5, device=DEV))


# --- devices, streams, no torch ----------------------------------------------------


def test_second_device(rng):
    if torch.cuda.device_count() < 2 or _cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    d1 = torch.device("cuda", 1)
    keys = to_dev(normal(rng, 1, 2, 100, 64), torch.float16)
    queries = to_dev(normal(rng, 1, 4, 10, 64), torch.float16)
    with pytest.raises(pi.Error, match=r"argument 'queries' = an array on CUDA device 1 must be an array on CUDA device 0"):
        pk.window_attention_scores(keys, queries.to(d1))
    with pytest.raises(pi.Error, match=r"argument 'out' = an array on CUDA device 1 must be an array on CUDA device 0"):
        pk.window_attention_scores(keys, queries, out=torch.empty(1, 1, 90, device=d1))
    with pytest.raises(pi.Error, match=r"argument 'kept' = an array on CUDA device 1"):
        pk.compact_rows(keys, torch.arange(3, dtype=torch.int32, device=d1))
    # Arrays on device 1 while device 0 is current: the call runs there and restores device 0.
    torch.cuda.set_device(0)
    want = pi.window_attention_scores(to_host(keys), to_host(queries))
    got = pk.window_attention_scores(keys.to(d1), queries.to(d1))
    assert got.device == d1 and torch.cuda.current_device() == 0
    assert_scores_close(got, want, "float16")
    scores = distinct_scores(rng, 3, 400)
    np.testing.assert_array_equal(to_host(pk.topk_indices(to_dev(scores, device=d1), 50, 1)), cpu_topk(scores, 50, 1))
    assert torch.cuda.current_device() == 0


def test_stream_handle():
    side = torch.cuda.Stream()
    assert pk._stream_handle(12345, 0) == 12345
    assert pk._stream_handle(side, 0) == side.cuda_stream

    class CupyLike:
        ptr = 777

    assert pk._stream_handle(CupyLike(), None) == 777
    assert pk._stream_handle(None, DEV) == torch.cuda.current_stream(0).cuda_stream
    with torch.cuda.stream(side):
        assert pk._stream_handle(None, "cuda:0") == side.cuda_stream
    with pytest.raises(pi.Error, match=r"argument 'stream'"):
        pk._stream_handle("default", 0)
    with pytest.raises(pi.Error, match=r"argument 'stream'"):
        pk._stream_handle(-1, 0)


def test_without_torch_out_and_workspace_must_be_given(rng, monkeypatch):
    scores = to_dev(distinct_scores(rng, 2, 50))
    need = pk.topk_indices_workspace_bytes(scores, 5)
    ws = torch.empty(need, dtype=torch.uint8, device=DEV)
    out = torch.full((2, 5), -1, dtype=torch.int32, device=DEV)
    torch.cuda.synchronize()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    assert pk._stream_handle(None, 0) == 0
    with pytest.raises(pi.Error, match=r"topk_indices: argument 'workspace' = None must be given when torch is not"):
        pk.topk_indices(scores, 5)
    with pytest.raises(pi.Error, match=r"topk_indices: argument 'out' = None must be given when torch is not"):
        pk.topk_indices(scores, 5, workspace=ws)
    assert pk.topk_indices(scores, 5, out=out, workspace=ws) is out
    monkeypatch.undo()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(to_host(out), cpu_topk(to_host(scores), 5, 0))
