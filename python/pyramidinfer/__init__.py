"""pyramidinfer: PyramidInfer's pyramid-shaped, compressed KV cache.

The C++ library is header-only; this module binds its host (CPU) backend, and
:mod:`pyramidinfer.cuda` (built when nvcc was found) its CUDA backend.
Arrays are taken through DLPack / the buffer protocol and used in place (no
copies; strides are honoured). Every rejected argument raises
:class:`pyramidinfer.Error` (a ``ValueError``) with the library's message,
which names the function and the argument.

    import numpy as np, pyramidinfer as pi
    L, H, KV, D, n = 4, 8, 2, 64, 512
    pc = pi.PyramidCompressor(L, H, KV, D)  # the paper's defaults
    cache = pi.PagedCache(L, KV, D, num_pages=256, max_seqs=4, max_seq_len=1024, page_size=16)
    rng = np.random.default_rng(0); f = lambda *s: rng.standard_normal(s, dtype=np.float32)
    pc.begin(cache, 0, n)
    for l in range(L):  # your layer computes Q, K, V for the tokens at positions pc.tokens(0)
        pc.prefill_store(l, cache, 0, f(KV, len(pc.tokens(0)), D), f(KV, len(pc.tokens(0)), D))
        keep = pc.prefill_select(l, cache, 0, f(H, pc.window(0), D))  # rows layer l + 1 computes
    print([cache.length(l, 0) for l in range(L)], cache.num_pages - cache.free_pages)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from . import _core
from ._core import Error, PagedCache, compact_rows, gather_rows, topk_indices, window_attention_scores

__all__ = [
    "Error",
    "PagedCache",
    "PyramidCompressor",
    "window_attention_scores",
    "topk_indices",
    "compact_rows",
    "gather_rows",
    # schedules
    "CosineSchedule",
    "LinearSchedule",
    "GeometricSchedule",
    "UniformSchedule",
    "TableSchedule",
    "DecodeSchedule",
    # selection
    "TopK",
    "TopP",
    # scoring
    "RecentWindow",
    "AccumulatedAttention",
    "KeyNorm",
    "Position",
]

__version__ = "0.1.0"


# --- schedules: the fraction of its context each prefill layer keeps ---------


@dataclass(frozen=True)
class CosineSchedule:
    """The paper's: ratio_l = (1 - r) * (cos(pi * l / L) + 1) / 2 + r."""

    final_ratio: float = 0.9
    name = "cosine"


@dataclass(frozen=True)
class LinearSchedule:
    """ratio_l = (1 - r) * (1 - l / L) + r."""

    final_ratio: float = 0.9
    name = "linear"


@dataclass(frozen=True)
class GeometricSchedule:
    """ratio_l = r ** (l / L)."""

    final_ratio: float = 0.9
    name = "geometric"


@dataclass(frozen=True)
class UniformSchedule:
    """The same ratio at every layer (1.0 keeps the full cache)."""

    ratio: float = 1.0
    name = "uniform"


@dataclass(frozen=True)
class TableSchedule:
    """An explicit ratio per layer."""

    ratios: Sequence[float] = ()
    name = "table"


@dataclass(frozen=True)
class DecodeSchedule:
    """Decode: every `segment` tokens before the window shrink to
    max(1, floor(segment * gen_ratio * cosine(final_ratio)_l)). Paper defaults."""

    segment: int = 16
    gen_ratio: float = 0.9
    final_ratio: float = 0.1


# --- selection: how many context tokens survive ------------------------------


@dataclass(frozen=True)
class TopK:
    """The paper's rule: keep floor(context * ratio) by score (all when that is
    at most `min_context`); the first `sinks` tokens are always kept."""

    sinks: int = 4
    min_context: int = 64
    granularity: str = "shared"  # or "per_kv_head"
    name = "topk"


@dataclass(frozen=True)
class TopP:
    """The fewest best tokens reaching `mass` of the scores, never more than TopK."""

    mass: float = 0.9
    sinks: int = 4
    min_context: int = 64
    granularity: str = "shared"
    name = "topp"


# --- scoring: how important each cached token is -----------------------------


@dataclass(frozen=True)
class RecentWindow:
    """The paper's recent attention consistency (window queries' attention)."""

    distance_weight: float = 1.2
    name = "recent_window"


@dataclass(frozen=True)
class AccumulatedAttention:
    """H2O-style: unweighted attention mass from the held queries."""

    name = "accumulated_attention"


@dataclass(frozen=True)
class KeyNorm:
    """Small key norm = important (needs no queries)."""

    name = "key_norm"


@dataclass(frozen=True)
class Position:
    """StreamingLLM: sinks plus the most recent tokens (needs no queries)."""

    name = "position"


_SCORINGS = {c.name: c for c in (RecentWindow, AccumulatedAttention, KeyNorm, Position)}
_SELECTIONS = {c.name: c for c in (TopK, TopP)}
_SCHEDULES = {c.name: c for c in (CosineSchedule, LinearSchedule, GeometricSchedule, UniformSchedule)}


def _policy(value, table: dict, what: str):
    if isinstance(value, str):
        if value not in table:
            raise Error(
                f"pyramidinfer::PyramidCompressor: argument '{what}' = '{value}' must be one of "
                + ", ".join(repr(k) for k in table)
            )
        return table[value]()
    if not isinstance(value, tuple(table.values()) + ((TableSchedule,) if what == "schedule" else ())):
        raise Error(
            f"pyramidinfer::PyramidCompressor: argument '{what}' = {value!r} must be a name or one of "
            + ", ".join(c.__name__ for c in table.values())
        )
    return value


class PyramidCompressor:
    """PyramidInfer's compressor over a :class:`PagedCache` (host backend).

    Defaults are the paper's: recent window 20 % of the prompt, cosine schedule
    to 0.9, top-k with 4 sinks and min context 64, decode segments of 16.
    Policies are given as names ("recent_window", "topk", "cosine", ...) or as
    the small classes of this module (``TopK(sinks=8)``, ``UniformSchedule(0.5)``).

    Prefill, per sequence and layer l in order: compute Q, K, V for the tokens
    ``tokens(seq)``, ``prefill_store(l, cache, seq, k, v)`` with k, v
    (kv_heads, n, head_dim), run attention, then ``prefill_select(l, cache,
    seq, window_q)`` with the last ``window(seq)`` tokens' queries (num_heads,
    w, head_dim); it returns the indices into ``tokens(seq)`` that layer l + 1
    computes. Decode, per layer: ``decode_append`` before attention (k, v
    (B, kv_heads, 1, d), q (B, num_heads, 1, d), pos (B,)), ``decode_compress``
    after it.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        scoring: Union[str, RecentWindow, AccumulatedAttention, KeyNorm, Position] = "recent_window",
        selection: Union[str, TopK, TopP] = "topk",
        schedule: Union[str, CosineSchedule, LinearSchedule, GeometricSchedule, UniformSchedule,
                        TableSchedule] = "cosine",
        decode: DecodeSchedule = DecodeSchedule(),
        recent_ratio: float = 0.2,
        softmax_scale: float = 0.0,
        compress_decode: bool = True,
        prefill_mode: str = "drop_tokens",
        lse_base: str = "natural",
    ):
        sc = _policy(scoring, _SCORINGS, "scoring")
        se = _policy(selection, _SELECTIONS, "selection")
        sh = _policy(schedule, _SCHEDULES, "schedule")
        if not isinstance(decode, DecodeSchedule):
            raise Error(f"pyramidinfer::PyramidCompressor: argument 'decode' = {decode!r} must be a DecodeSchedule")
        sched_ratio = getattr(sh, "final_ratio", getattr(sh, "ratio", 1.0))
        self.scoring, self.selection, self.schedule_policy, self.decode = sc, se, sh, decode
        self._settings = dict(
            num_layers=num_layers, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
            recent_ratio=float(recent_ratio),
            softmax_scale=float(softmax_scale),
            compress_decode=bool(compress_decode),
            prefill_mode=prefill_mode,
            lse_base=lse_base,
            scoring=sc.name,
            distance_weight=float(getattr(sc, "distance_weight", 1.2)),
            selection=se.name,
            sinks=se.sinks,
            min_context=se.min_context,
            mass=float(getattr(se, "mass", 0.9)),
            granularity=se.granularity,
            schedule=sh.name,
            schedule_ratio=float(sched_ratio),
            schedule_table=[float(r) for r in getattr(sh, "ratios", ())],
            decode_segment=decode.segment,
            decode_gen_ratio=float(decode.gen_ratio),
            decode_final_ratio=float(decode.final_ratio),
        )
        self._c = self._make(self._settings)

    @staticmethod
    def _make(settings):
        return _core._make_compressor(settings)

    def __getattr__(self, name):  # begin, end, prefill_store, ... come from the binding
        if name == "_c":
            raise AttributeError(name)
        return getattr(self._c, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self._c)))

    def __repr__(self):
        return (f"PyramidCompressor(num_layers={self._c.num_layers}, num_heads={self._c.num_heads}, "
                f"kv_heads={self._c.kv_heads}, head_dim={self._c.head_dim}, scoring={self.scoring}, "
                f"selection={self.selection}, schedule={self.schedule_policy}, decode={self.decode})")
