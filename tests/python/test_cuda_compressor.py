"""pyramidinfer.cuda's paged cache and compressor against the host ones: the
same settings on the same random keys, values and queries keep the same
positions in every layer, in prefill and through decode firings (float32:
the library promises the host's bytes), the stored K/V rows are the inputs'
(float16, bfloat16), pages come back, and bad calls raise pyramidinfer.Error.
Skipped without the CUDA extension or a GPU (torch with CUDA allocates)."""

import os
import random

import numpy as np
import pytest

import pyramidinfer as pi
import pyramidinfer.cuda as pc_cuda

torch = pytest.importorskip("torch")
if not pc_cuda.available() or not torch.cuda.is_available():
    pytest.skip("no CUDA extension or no GPU: the CUDA compressor tests need both", allow_module_level=True)

L, H, KV, D = 6, 4, 2, 64
SEED = int(os.environ.get("PYRAMIDINFER_SEED", random.randrange(1 << 31)))
print(f"test_cuda_compressor: seed {SEED} (PYRAMIDINFER_SEED replays it)")

POLICIES = {
    "paper": dict(),
    "per_head": dict(selection=pi.TopK(4, 64, "per_kv_head")),
    "snapkv": dict(scoring=pi.RecentWindow(1.0), selection=pi.TopK(4, 64, "per_kv_head"),
                   schedule=pi.UniformSchedule(0.5), prefill_mode="layer_local", decode=pi.DecodeSchedule(16, 0.5, 1.0)),
    "h2o": dict(scoring="accumulated_attention", schedule=pi.UniformSchedule(0.6), prefill_mode="layer_local"),
    "streaming": dict(scoring="position", schedule=pi.UniformSchedule(0.5), prefill_mode="layer_local"),
    "knorm": dict(scoring="key_norm", schedule=pi.LinearSchedule(0.5)),
    "topp": dict(selection=pi.TopP(0.9)),
}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pair(policy, dtype="float32", num_pages=256, max_seq_len=1024):
    """(host compressor, host cache, CUDA compressor, CUDA cache) with the same settings."""
    kw = POLICIES[policy]
    gran = kw.get("selection", pi.TopK()).granularity
    hc = pi.PyramidCompressor(L, H, KV, D, **kw)
    hcache = pi.PagedCache(L, KV, D, num_pages=num_pages, max_seqs=2, max_seq_len=max_seq_len, granularity=gran)
    dc = pc_cuda.PyramidCompressor(L, H, KV, D, **kw)
    dcache = pc_cuda.PagedCache(L, KV, D, num_pages=num_pages, max_seqs=2, max_seq_len=max_seq_len, dtype=dtype,
                                granularity=gran)
    dc.attach(dcache)
    return hc, hcache, dc, dcache


def rounded(x, dtype):
    """x as the device stores it (a float32 numpy copy of the dtype's values)."""
    return torch.from_numpy(x).to(TORCH[dtype]).float().numpy()


def prefill_both(hc, hcache, dc, dcache, n, rng, dtype="float32"):
    """Prefills both; returns the window and each layer's keys as stored (float32 copies)."""
    stored = []
    hc.begin(hcache, 0, n)
    dc.begin(dcache, 0, n)
    w = hc.window(0)
    assert dc.window(0) == w
    for l in range(L):
        rows = len(hc.tokens(0))
        assert dc.token_count(0) == rows
        k, v = (rounded(rng.standard_normal((KV, rows, D), dtype=np.float32), dtype) for _ in range(2))
        q = rounded(rng.standard_normal((H, w, D), dtype=np.float32), dtype)
        stored.append(k)
        hc.prefill_store(l, hcache, 0, k, v)
        dev = [torch.from_numpy(x).to(TORCH[dtype]).cuda() for x in (k, v, q)]
        dc.prefill_store(l, dcache, 0, dev[0], dev[1])
        nxt = hc.prefill_select(l, hcache, 0, q)
        index, total = dc.prefill_select(l, dcache, 0, dev[2])
        got = torch.from_dlpack(index)[0, : dc.token_count(0)].cpu().numpy()
        assert total == dc.token_count(0)
        if dtype == "float32":
            np.testing.assert_array_equal(got, nxt, err_msg=f"layer {l}")
    return w, stored


@pytest.mark.parametrize("policy", list(POLICIES))
def test_prefill_and_decode_keep_the_hosts_positions(policy):
    rng = np.random.default_rng(SEED)
    hc, hcache, dc, dcache = pair(policy)
    n = 400
    prefill_both(hc, hcache, dc, dcache, n, rng)
    heads = KV if hc.granularity == "per_kv_head" else 1
    for l in range(L):
        assert dcache.length(l, 0) == hcache.length(l, 0) == dc.host_length(l, 0)
        for h in range(heads):
            np.testing.assert_array_equal(dcache.positions(l, 0, h), hcache.positions(l, 0, h))
        np.testing.assert_array_equal(dcache.keys(l, 0), hcache.keys(l, 0))
    steps = hc.window(0) + 40  # past the first decode firing (window + 16 tokens)
    for step in range(steps):
        pos = n + step
        for l in range(L):
            k, v = (rng.standard_normal((1, KV, 1, D), dtype=np.float32) for _ in range(2))
            q = rng.standard_normal((1, H, 1, D), dtype=np.float32)
            hc.decode_append(l, hcache, np.zeros(1, np.int32), k, v, np.array([pos], np.int32), q)
            dc.decode_append(l, dcache, 0, *(torch.from_numpy(x).cuda() for x in (k, v)),
                             torch.tensor([pos], dtype=torch.int32, device="cuda"), torch.from_numpy(q).cuda())
            hc.decode_compress(l, hcache, np.zeros(1, np.int32))
            dc.decode_compress(l, dcache, 0)
    assert dc.evict_launches > 0 or not hc._settings["compress_decode"]
    for l in range(L):
        assert dcache.length(l, 0) == hcache.length(l, 0) == dc.host_length(l, 0)
        for h in range(heads):
            np.testing.assert_array_equal(dcache.positions(l, 0, h), hcache.positions(l, 0, h), err_msg=f"layer {l}")
        np.testing.assert_array_equal(dcache.values(l, 0), hcache.values(l, 0))
    dc.end(dcache, 0)
    assert dcache.free_pages == dcache.num_pages


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores_the_rows_it_keeps(dtype):
    rng = np.random.default_rng(SEED + 1)
    hc, hcache, dc, dcache = pair("paper", dtype)
    w, stored = prefill_both(hc, hcache, dc, dcache, 300, rng, dtype)
    trace = hc.trace(300, 0)["prefill_len"]
    for l in range(L):
        assert dcache.length(l, 0) == trace[l]  # top-k counts are score-free
        pos = dcache.positions(l, 0)
        assert np.all(np.diff(pos) > 0) and pos[-w:].tolist() == list(range(300 - w, 300))
        assert pos[:4].tolist() == [0, 1, 2, 3]  # the sinks
        # Token dropping stores every row layer l computes: the inputs, in the cache's dtype.
        np.testing.assert_array_equal(dcache.keys(l, 0), stored[l], err_msg=f"layer {l}")


def test_cache_over_callers_memory_and_views():
    """The cache reads the arrays it is given (no copies): an HND pool that is a
    slice of a larger tensor, and page_tables() / positions_view() alias the state."""
    kw = dict(num_pages=64, max_seqs=1, max_seq_len=512, page_size=16)
    big = torch.zeros(2, 64, KV, 16, D + 8, dtype=torch.float16, device="cuda")
    nbytes = pc_cuda.PagedCache.state_bytes(L, KV, D, **kw)
    mem = dict(k_pool=big[0, :, :, :, :D], v_pool=big[1, :, :, :, :D],
               free_pages=torch.empty(64, dtype=torch.int32, device="cuda"),
               free_count=torch.empty(1, dtype=torch.int32, device="cuda"),
               state=torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
    cache = pc_cuda.PagedCache(L, KV, D, **kw, layout="hnd", memory=mem)
    assert int(mem["free_count"][0]) == 64
    dc = pc_cuda.PyramidCompressor(L, H, KV, D)
    dc.attach(cache)
    dc.begin(cache, 0, 100)
    k = torch.randn(KV, 100, D, dtype=torch.float16, device="cuda")
    dc.prefill_store(0, cache, 0, k, k)
    table = torch.from_dlpack(cache.page_tables())
    page = int(table[0, 0, 0])
    torch.testing.assert_close(big[0, page, :, :, :D], k[:, :16], rtol=0, atol=0)
    assert torch.all(big[..., D:] == 0)  # nothing written past head_dim
    positions = torch.from_dlpack(cache.positions_view())
    assert positions[page, :, 0].tolist() == list(range(16))


def test_bad_calls_raise_pyramidinfer_error():
    hc, hcache, dc, dcache = pair("paper")
    k = torch.zeros(KV, 10, D, device="cuda")
    with pytest.raises(pi.Error, match="begin"):
        dc.prefill_store(0, dcache, 0, k, k)  # not begun
    dc.begin(dcache, 0, 10)
    with pytest.raises(pi.Error, match="CUDA"):
        dc.prefill_store(0, dcache, 0, k.cpu(), k.cpu())
    with pytest.raises(pi.Error, match="dtype"):
        dc.prefill_store(0, dcache, 0, k.half(), k.half())
    with pytest.raises(pi.Error, match="shape"):
        dc.prefill_store(0, dcache, 0, k[:, :5], k[:, :5])
    with pytest.raises(pi.Error, match="layer"):
        dc.prefill_store(3, dcache, 0, k, k)
    other = pc_cuda.PagedCache(L, KV, D, num_pages=16, max_seqs=2, max_seq_len=256, dtype="float32")
    with pytest.raises(pi.Error, match="cache"):
        dc.prefill_store(0, other, 0, k, k)
    with pytest.raises(pi.Error, match="dtype"):
        pc_cuda.PagedCache(L, KV, D, num_pages=16, max_seqs=2, max_seq_len=256, dtype="int8")
    small = dict(k_pool=torch.empty(8, 16, KV, D, device="cuda"), v_pool=torch.empty(8, 16, KV, D, device="cuda"),
                 free_pages=torch.empty(8, dtype=torch.int32, device="cuda"),
                 free_count=torch.empty(1, dtype=torch.int32, device="cuda"),
                 state=torch.empty(16, dtype=torch.uint8, device="cuda"))
    with pytest.raises(pi.Error, match="state"):
        pc_cuda.PagedCache(L, KV, D, num_pages=8, max_seqs=1, max_seq_len=64, dtype="float32", memory=small)
    dc.prefill_store(0, dcache, 0, k, k)  # the failed calls changed nothing
    assert dcache.length(0, 0) == 10
