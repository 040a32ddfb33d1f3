"""The array kernels through the binding against small numpy references."""

import numpy as np
import pytest

import pyramidinfer as pi


def row_weights(w, distance_weight):
    """host::distance_row_weight, in float32 like the library."""
    if w <= 1:
        return np.ones(1, np.float32)
    dw = np.float32(distance_weight)
    step = (dw - np.float32(1)) / np.float32(w - 1)
    r = np.arange(w)
    lo = np.float32(1) + step * r.astype(np.float32)
    hi = dw - step * (w - 1 - r).astype(np.float32)
    return np.where(r < w // 2, lo, hi).astype(np.float64)


def ref_scores(keys, queries, scale=None, distance_weight=1.2, shared=True):
    """Mean over heads and window rows of row_weight(r) * causal softmax_r(j), j < n - w."""
    B, H, n, d = keys.shape
    _, QH, w, _ = queries.shape
    group = QH // H
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    ctx = n - w
    out = np.zeros((B, 1 if shared else H, ctx))
    rw = row_weights(w, distance_weight)
    for b in range(B):
        for qh in range(QH):
            kvh = qh // group
            logits = scale * (queries[b, qh].astype(np.float64) @ keys[b, kvh].astype(np.float64).T)
            for r in range(w):
                seen = logits[r, : ctx + r + 1]
                m = seen.max()
                lse = m + np.log(np.exp(seen - m).sum())
                out[b, 0 if shared else kvh] += rw[r] * np.exp(logits[r, :ctx] - lse)
    return out / (w * (QH if shared else group))


def ref_topk(scores, k, sinks):
    """First min(sinks, k) slots, then the best others (NaN last, ties to the lower index), ascending."""
    n = len(scores)
    forced = min(sinks, k)
    rest = np.arange(forced, n)
    key = -scores[rest].astype(np.float64)  # NaN sorts last
    order = rest[np.lexsort((rest, key))]
    return np.concatenate([np.arange(forced), np.sort(order[: k - forced])]).astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["shared", "per_kv_head"])
def test_window_scores_match_numpy(seed, granularity):
    rng = np.random.default_rng(seed)
    B, H, QH, n, w, d = 2, 2, 4, 37, 9, 16
    keys = rng.standard_normal((B, H, n, d), dtype=np.float32)
    queries = rng.standard_normal((B, QH, w, d), dtype=np.float32)
    got = pi.window_attention_scores(keys, queries, granularity=granularity)
    want = ref_scores(keys, queries, shared=granularity == "shared")
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    # Unbatched (3-D) arrays give the batch's rows.
    np.testing.assert_array_equal(pi.window_attention_scores(keys[1], queries[1], granularity=granularity), got[1])


def test_window_scores_given_lse_and_scale():
    rng = np.random.default_rng(3)
    H, QH, n, w, d = 1, 2, 20, 5, 8
    keys = rng.standard_normal((H, n, d), dtype=np.float32)
    queries = rng.standard_normal((QH, w, d), dtype=np.float32)
    scale = 0.3
    logits = scale * np.einsum("qwd,nd->qwn", queries.astype(np.float64), keys[0].astype(np.float64))
    lse = np.empty((QH, w), np.float32)
    for q in range(QH):
        for r in range(w):
            seen = logits[q, r, : n - w + r + 1]
            lse[q, r] = seen.max() + np.log(np.exp(seen - seen.max()).sum())
    got = pi.window_attention_scores(keys, queries, lse=lse, scale=scale, distance_weight=1.0)
    want = ref_scores(keys[None], queries[None], scale=scale, distance_weight=1.0)[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_topk_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    scores = rng.standard_normal(n).astype(np.float32)
    scores[rng.integers(0, n, size=max(1, n // 20))] = np.nan
    for k in sorted({0, 1, n // 3, n // 2, n}):
        for sinks in (0, 4, n + 2):
            got = pi.topk_indices(scores, k, sinks=sinks)
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, ref_topk(scores, k, sinks), err_msg=f"n={n} k={k} sinks={sinks}")
    rows = rng.standard_normal((3, n)).astype(np.float32)
    got = pi.topk_indices(rows, n // 2, sinks=2)
    for r in range(3):
        np.testing.assert_array_equal(got[r], ref_topk(rows[r], n // 2, 2))


def test_strided_views_equal_contiguous_copies():
    rng = np.random.default_rng(4)
    H, QH, n, w, d = 2, 4, 30, 7, 8
    # Keys stored NHD (token, head, d) and read as (head, token, d): a transposed view.
    nhd = rng.standard_normal((n, H, d), dtype=np.float32)
    keys = nhd.transpose(1, 0, 2)
    assert not keys.flags.c_contiguous
    # Queries: every other element of a wider array.
    wide = rng.standard_normal((QH, w, 2 * d), dtype=np.float32)
    queries = wide[:, :, ::2]
    got = pi.window_attention_scores(keys, queries)
    np.testing.assert_array_equal(got, pi.window_attention_scores(np.ascontiguousarray(keys),
                                                                  np.ascontiguousarray(queries)))
    # Scores as a strided column of a 2-D array; rows of a Fortran-ordered array.
    table = rng.standard_normal((n, 3)).astype(np.float32)
    np.testing.assert_array_equal(pi.topk_indices(table[:, 1], 10, 2),
                                  pi.topk_indices(np.ascontiguousarray(table[:, 1]), 10, 2))
    fortran = np.asfortranarray(rng.standard_normal((4, n)).astype(np.float32))
    np.testing.assert_array_equal(pi.topk_indices(fortran, 5), pi.topk_indices(np.ascontiguousarray(fortran), 5))
    # Read-only arrays are accepted as they are.
    ro = np.ascontiguousarray(keys)
    ro.flags.writeable = False
    np.testing.assert_array_equal(pi.window_attention_scores(ro, queries), got)


def test_bad_input_names_the_argument():
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((2, 20, 8), dtype=np.float32)
    queries = rng.standard_normal((4, 5, 8), dtype=np.float32)
    assert issubclass(pi.Error, ValueError)
    with pytest.raises(pi.Error, match=r"window_attention_scores: argument 'keys'.*float64.*float32"):
        pi.window_attention_scores(keys.astype(np.float64), queries)
    with pytest.raises(pi.Error, match=r"argument 'queries'.*dimensions"):
        pi.window_attention_scores(keys, queries[0])
    with pytest.raises(pi.Error, match=r"argument 'queries'.*head_dim"):
        pi.window_attention_scores(keys, queries[:, :, :4])
    with pytest.raises(pi.Error, match=r"argument 'queries'.*window"):
        pi.window_attention_scores(keys, rng.standard_normal((4, 21, 8), dtype=np.float32))
    with pytest.raises(pi.Error, match=r"argument 'lse'"):
        pi.window_attention_scores(keys, queries, lse=np.zeros((4, 6), np.float32))
    with pytest.raises(pi.Error, match=r"argument 'granularity'"):
        pi.window_attention_scores(keys, queries, granularity="per_head")
    with pytest.raises(pi.Error, match=r"argument 'scores'.*int32"):
        pi.topk_indices(np.arange(10, dtype=np.int32), 3)
    with pytest.raises(pi.Error, match=r"topk_indices: argument 'k' = 11 must be in \[0, n = 10\]"):
        pi.topk_indices(np.zeros(10, np.float32), 11)
    with pytest.raises(pi.Error, match=r"argument 'keys'.*non-negative strides"):
        pi.window_attention_scores(keys[:, ::-1], queries)


def test_compact_rows_in_place_through_strides():
    rng = np.random.default_rng(6)
    n, H, d = 40, 2, 8
    kept = np.sort(rng.choice(n, size=17, replace=False)).astype(np.int32)
    nhd = rng.standard_normal((3, n, H, d), dtype=np.float32)  # (b, token, head, d)
    want = nhd.copy()
    want[:, : len(kept)] = want[:, kept]
    x = nhd.transpose(0, 2, 1, 3)  # (b, head, token, d): a view, written in place
    assert pi.compact_rows(x, kept) == len(kept)
    np.testing.assert_array_equal(nhd, want)
    x3 = rng.standard_normal((H, n, d), dtype=np.float32)
    want3 = x3.copy()
    want3[:, : len(kept)] = want3[:, kept]
    pi.compact_rows(x3, kept.astype(np.int64))
    np.testing.assert_array_equal(x3, want3)
    ro = x3.copy()
    ro.flags.writeable = False
    with pytest.raises(pi.Error, match=r"compact_rows: argument 'x'.*writable"):
        pi.compact_rows(ro, kept)
    with pytest.raises(pi.Error, match=r"compact_rows: argument 'kept'.*ascending"):
        pi.compact_rows(x3, kept[::-1].copy())
    with pytest.raises(pi.Error, match=r"compact_rows: argument 'kept'.*int32 or int64"):
        pi.compact_rows(x3, kept.astype(np.float32))


def test_gather_rows():
    rng = np.random.default_rng(7)
    src = rng.standard_normal((50, 12), dtype=np.float32)
    idx = np.sort(rng.choice(50, size=20, replace=False)).astype(np.int32)
    np.testing.assert_array_equal(pi.gather_rows(src, idx), src[idx])
    view = src[:, ::3]  # strided columns
    np.testing.assert_array_equal(pi.gather_rows(view, idx), np.ascontiguousarray(view)[idx])
    with pytest.raises(pi.Error, match=r"gather_rows: argument 'idx'.*ascending"):
        pi.gather_rows(src, np.array([3, 2], np.int32))
