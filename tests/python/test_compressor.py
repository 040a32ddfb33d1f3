"""The compressor and the paged cache through Python: kept positions equal
what the library's own calls select (its scoring and top-k kernels on the
same keys and queries), counts equal the planner's, windows and sinks are
kept, and continuous batching returns every page."""

import numpy as np
import pytest

import pyramidinfer as pi

L, H, KV, D = 6, 4, 2, 16


def max_keep(context, ratio, min_context=64):
    """TopKSelection::max_keep."""
    if context <= min_context or ratio >= 1.0:
        return context
    k = int(context * ratio)
    return k if k > min_context else context


def make(num_pages=512, max_seqs=3, max_seq_len=1024, page_size=16, granularity="shared", **kw):
    pc = pi.PyramidCompressor(L, H, KV, D, **kw)
    cache = pi.PagedCache(L, KV, D, num_pages=num_pages, max_seqs=max_seqs, max_seq_len=max_seq_len,
                          page_size=page_size, granularity=granularity)
    return pc, cache


def prefill(pc, cache, seq, prompt_len, rng, check=True):
    """Runs every prefill layer of `seq` and checks each layer's selection."""
    pc.begin(cache, seq, prompt_len)
    w = pc.window(seq)
    assert w == 1 + int(prompt_len * pc.recent_ratio)
    trace = pc.trace(prompt_len, 0)["prefill_len"]
    for l in range(L):
        toks = pc.tokens(seq)
        n = len(toks)  # in per-KV-head mode the union of the heads' tokens
        shared = cache.granularity == "shared"
        k = rng.standard_normal((KV, n, D), dtype=np.float32)
        v = rng.standard_normal((KV, n, D), dtype=np.float32)
        q = rng.standard_normal((H, w, D), dtype=np.float32)
        pc.prefill_store(l, cache, seq, k, v)
        if pc.selection.name == "topk":  # the planner's count (exact for top-k)
            assert cache.length(l, seq) == trace[l]
        if shared:
            assert n == cache.length(l, seq)
            np.testing.assert_array_equal(cache.keys(l, seq), k)
            np.testing.assert_array_equal(cache.values(l, seq), v)
        nxt = pc.prefill_select(l, cache, seq, q)
        if shared:  # never more than top-k keeps from this layer's context
            assert len(nxt) - w <= max_keep(n - w, pc.keep_ratio(l), pc.selection.min_context)
        if check and pc.scoring.name == "recent_window" and pc.selection.name == "topk":
            # The same selection from the library's kernels on the same arrays.
            scores = pi.window_attention_scores(k, q, distance_weight=pc.scoring.distance_weight)[0]
            keep = max_keep(n - w, pc.keep_ratio(l), pc.selection.min_context)
            want = np.concatenate([pi.topk_indices(scores, keep, sinks=pc.selection.sinks), np.arange(n - w, n)])
            np.testing.assert_array_equal(nxt, want)
        # The window and the first `sinks` tokens always survive.
        np.testing.assert_array_equal(toks[nxt[-w:]], np.arange(prompt_len - w, prompt_len))
        assert set(range(min(pc.selection.sinks, prompt_len - w))) <= set(toks[nxt].tolist())
        if shared:
            np.testing.assert_array_equal(cache.positions(l, seq), toks)
    return w


@pytest.mark.parametrize("schedule", ["cosine", pi.UniformSchedule(0.6), pi.LinearSchedule(0.5)])
def test_prefill_matches_library_kernels_and_planner(schedule):
    rng = np.random.default_rng(0)
    pc, cache = make(schedule=schedule)
    prompt = 400
    prefill(pc, cache, 0, prompt, rng)
    plan = pc.pages(prompt, 0, cache.page_size)
    trace = pc.trace(prompt, 0)["prefill_len"]
    for l in range(L):
        assert cache.length(l, 0) == trace[l]
        assert len(cache.page_table(l, 0)) == plan["after_prefill"][l]
    assert cache.num_pages - cache.free_pages == plan["total_after_prefill"]
    pc.end(cache, 0)
    assert cache.free_pages == cache.num_pages


def test_paper_defaults():
    pc = pi.PyramidCompressor(L, H, KV, D)
    assert pc.scoring == pi.RecentWindow(1.2) and pc.selection == pi.TopK(4, 64, "shared")
    assert pc.schedule_policy == pi.CosineSchedule(0.9) and pc.decode == pi.DecodeSchedule(16, 0.9, 0.1)
    assert pc.recent_ratio == 0.2 and pc.keep_ratio(0) == 1.0
    ratios = [pc.keep_ratio(l) for l in range(L)]
    assert all(a > b for a, b in zip(ratios, ratios[1:])) and ratios[-1] > 0.9
    # Decode keeps max(1, floor(16 * 0.9 * cosine(0.1)_l)).
    want = [max(1, int(16 * 0.9 * ((1 - 0.1) * (np.cos(np.pi * l / L) + 1) / 2 + 0.1))) for l in range(L)]
    assert [pc.decode_keep(l) for l in range(L)] == want


def decode_step(pc, cache, seqs, pos, rng, lengths=None):
    B = len(seqs)
    seqs = np.asarray(seqs, np.int32)
    for l in range(L):
        k = rng.standard_normal((B, KV, 1, D), dtype=np.float32)
        v = rng.standard_normal((B, KV, 1, D), dtype=np.float32)
        q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
        pc.decode_append(l, cache, seqs, k, v, np.asarray(pos, np.int64), q)
        if lengths is not None:
            lengths[l] = max(lengths[l], cache.length(l, int(seqs[0])))
        pc.decode_compress(l, cache, seqs)


def test_decode_follows_planner_and_keeps_window():
    rng = np.random.default_rng(1)
    pc, cache = make()
    prompt, steps = 300, 120
    w = prefill(pc, cache, 0, prompt, rng)
    trace = pc.trace(prompt, steps)
    peak = [0] * L
    for t in range(steps):
        decode_step(pc, cache, [0], [prompt + t], rng, peak)
        cur = prompt + t
        for l in range(L):
            pos = cache.positions(l, 0)
            np.testing.assert_array_equal(pos[-w:], np.arange(cur - w + 1, cur + 1))
            np.testing.assert_array_equal(pos[:4], np.arange(4))
            assert np.all(np.diff(pos) > 0)
    # Each layer's most slots equal the planner's capacity, and its pages the planner's peak.
    assert peak == trace["capacity"]
    plan = pc.pages(prompt, steps, cache.page_size)
    assert [-(-p // cache.page_size) for p in peak] == plan["peak"]
    assert any(pc.boundary(l, 0) > trace["prefill_len"][l] - w - 1 for l in range(L))  # decode compressed
    pc.end(cache, 0)
    assert cache.free_pages == cache.num_pages


def test_continuous_batching_returns_every_page():
    rng = np.random.default_rng(2)
    pc, cache = make(num_pages=400, max_seqs=3)
    pos = {}
    prefill(pc, cache, 0, 200, rng)
    pos[0] = 200
    prefill(pc, cache, 2, 150, rng)
    pos[2] = 150
    for step in range(40):
        live = sorted(pos)
        decode_step(pc, cache, live, [pos[s] for s in live], rng)
        for s in live:
            pos[s] += 1
        if step == 10:  # seq 0 leaves, its slot takes a new request, seq 1 joins
            pc.end(cache, 0)
            del pos[0]
            assert not pc.live(0)
            prefill(pc, cache, 0, 120, rng)
            pos[0] = 120
            prefill(pc, cache, 1, 90, rng)
            pos[1] = 90
        used = sum(len(cache.page_table(l, s)) for l in range(L) for s in pos)
        assert cache.num_pages - cache.free_pages == used
    for s in list(pos):
        pc.end(cache, s)
    assert cache.free_pages == cache.num_pages
    assert all(cache.length(l, s) == 0 for l in range(L) for s in range(3))


def test_position_scoring_is_streaming_llm():
    rng = np.random.default_rng(3)
    pc, cache = make(scoring="position", schedule=pi.UniformSchedule(0.5), selection=pi.TopK(sinks=4))
    prompt = 300
    pc.begin(cache, 0, prompt)
    w = pc.window(0)
    n = prompt
    pc.prefill_store(0, cache, 0, rng.standard_normal((KV, n, D), dtype=np.float32),
                     rng.standard_normal((KV, n, D), dtype=np.float32))
    nxt = pc.prefill_select(0, cache, 0)  # needs no queries
    keep = max_keep(n - w, 0.5)
    np.testing.assert_array_equal(nxt, np.concatenate([np.arange(4), np.arange(n - w - (keep - 4), n)]))


@pytest.mark.parametrize("scoring", ["key_norm", pi.AccumulatedAttention(), pi.RecentWindow(1.0)])
@pytest.mark.parametrize("selection", [pi.TopK(sinks=2), pi.TopP(mass=0.5), "topp"])
def test_policies_by_name_and_class(scoring, selection):
    rng = np.random.default_rng(4)
    pc, cache = make(scoring=scoring, selection=selection, schedule=pi.UniformSchedule(0.7))
    prefill(pc, cache, 0, 256, rng)
    decode_step(pc, cache, [0], [256], rng)
    pc.end(cache, 0)
    assert cache.free_pages == cache.num_pages


def test_per_kv_head_and_layer_local():
    rng = np.random.default_rng(5)
    pc, cache = make(selection=pi.TopK(granularity="per_kv_head"), granularity="per_kv_head",
                     schedule=pi.UniformSchedule(0.6))
    prefill(pc, cache, 0, 256, rng, check=False)
    decode_step(pc, cache, [0], [256], rng)
    pc.end(cache, 0)
    assert cache.free_pages == cache.num_pages
    pc, cache = make(prefill_mode="layer_local", schedule=pi.UniformSchedule(0.5))
    pc.begin(cache, 0, 200)
    w = pc.window(0)
    pc.prefill_store(0, cache, 0, np.zeros((KV, 200, D), np.float32), np.zeros((KV, 200, D), np.float32))
    nxt = pc.prefill_select(0, cache, 0, rng.standard_normal((H, w, D), dtype=np.float32))
    np.testing.assert_array_equal(nxt, np.arange(200))  # every token goes on
    assert cache.length(0, 0) == max_keep(200 - w, 0.5) + w  # the layer keeps its own selection


def test_strided_inputs_keep_the_same_positions():
    """A transposed (NHD) k/v and a strided q select what their contiguous copies select."""
    kept = []
    for strided in (False, True):
        rng = np.random.default_rng(6)
        pc, cache = make(schedule=pi.UniformSchedule(0.6))
        pc.begin(cache, 0, 300)
        w = pc.window(0)
        out = []
        for l in range(L):
            n = len(pc.tokens(0))
            k = rng.standard_normal((n, KV, D), dtype=np.float32)  # NHD
            v = rng.standard_normal((n, KV, D), dtype=np.float32)
            q = rng.standard_normal((H, w, 2 * D), dtype=np.float32)[:, :, ::2]
            k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
            if not strided:
                k, v, q = map(np.ascontiguousarray, (k, v, q))
            pc.prefill_store(l, cache, 0, k, v)
            out.append(pc.prefill_select(l, cache, 0, q).copy())
            np.testing.assert_array_equal(cache.keys(l, 0), k)
        kept.append(out)
    for a, b in zip(*kept):
        np.testing.assert_array_equal(a, b)


def test_pool_is_a_view():
    rng = np.random.default_rng(7)
    pc, cache = make(page_size=16)
    pool = cache.k_pool
    assert pool.shape == (cache.num_pages, 16, KV, D) and np.shares_memory(pool, cache.k_pool)
    pc.begin(cache, 0, 100)
    k = rng.standard_normal((KV, 100, D), dtype=np.float32)
    pc.prefill_store(0, cache, 0, k, k)
    first = cache.page_table(0, 0)[0]
    np.testing.assert_array_equal(pool[first].transpose(1, 0, 2), k[:, :16])  # NHD page, written in place
    del cache
    assert pool.sum() != 0  # the view keeps the storage alive


def test_bad_calls_name_the_argument():
    rng = np.random.default_rng(8)
    pc, cache = make()
    with pytest.raises(pi.Error, match=r"PyramidCompressor::tokens: argument 'seq' = 0 is not a live sequence"):
        pc.tokens(0)
    pc.begin(cache, 0, 100)
    w = pc.window(0)
    k = rng.standard_normal((KV, 100, D), dtype=np.float32)
    with pytest.raises(pi.Error, match=r"prefill_store: argument 'layer' = 1 is out of order"):
        pc.prefill_store(1, cache, 0, k, k)
    with pytest.raises(pi.Error, match=r"prefill_store: argument 'k'.*axis 1"):
        pc.prefill_store(0, cache, 0, k[:, :99], k)
    with pytest.raises(pi.Error, match=r"prefill_store: argument 'v'.*float32"):
        pc.prefill_store(0, cache, 0, k, k.astype(np.float16))
    with pytest.raises(pi.Error, match=r"prefill_store: argument 'layer' = 7"):
        pc.prefill_store(7, cache, 0, k, k)
    pc.prefill_store(0, cache, 0, k, k)
    with pytest.raises(pi.Error, match=r"prefill_select: argument 'window_q'"):
        pc.prefill_select(0, cache, 0, rng.standard_normal((H, w + 1, D), dtype=np.float32))
    with pytest.raises(pi.Error, match=r"prefill_select: argument 'window_q' = None"):
        pc.prefill_select(0, cache, 0)
    with pytest.raises(pi.Error, match=r"decode_append: argument 'seqs\[i\]' = 0 has not finished its prefill"):
        pc.decode_append(0, cache, np.array([0], np.int32), np.zeros((1, KV, 1, D), np.float32),
                         np.zeros((1, KV, 1, D), np.float32), np.array([100]), np.zeros((1, H, 1, D), np.float32))
    with pytest.raises(pi.Error, match=r"decode_append: argument 'pos'.*one position per sequence"):
        pc.decode_append(0, cache, np.array([0], np.int32), np.zeros((1, KV, 1, D), np.float32),
                         np.zeros((1, KV, 1, D), np.float32), np.array([100, 101]),
                         np.zeros((1, H, 1, D), np.float32))
    with pytest.raises(pi.Error, match=r"argument 'cache.granularity'"):
        pi.PyramidCompressor(L, H, KV, D, selection=pi.TopK(granularity="per_kv_head")).begin(cache, 1, 10)
    with pytest.raises(pi.Error, match=r"argument 'scoring' = 'h2o'"):
        pi.PyramidCompressor(L, H, KV, D, scoring="h2o")
    with pytest.raises(pi.Error, match=r"argument 'recent_ratio' = 1"):
        pi.PyramidCompressor(L, H, KV, D, recent_ratio=1.0)
    with pytest.raises(pi.Error, match=r"argument 'model.num_heads' = 3"):
        pi.PyramidCompressor(L, 3, KV, D)
    with pytest.raises(pi.Error, match=r"UniformSchedule: argument 'ratio' = 0"):
        pi.PyramidCompressor(L, H, KV, D, schedule=pi.UniformSchedule(0.0))
    with pytest.raises(pi.Error, match=r"PagedCache: argument 'shape.page_size' = 12"):
        pi.PagedCache(L, KV, D, num_pages=8, max_seqs=1, max_seq_len=64, page_size=12)


def test_topp_within_planner_bound():
    rng = np.random.default_rng(4)
    pc, cache = make(scoring=pi.RecentWindow(1.0), selection=pi.TopP(mass=0.5), schedule=pi.UniformSchedule(0.7))
    prefill(pc, cache, 0, 256, rng)
    trace = pc.trace(256, 0)["prefill_len"]
    assert all(cache.length(l, 0) <= trace[l] for l in range(L))
