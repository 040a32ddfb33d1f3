"""pyramidinfer.cuda: the CUDA backend over DLPack CUDA arrays (torch, cupy, ...).

The same compressor as :class:`pyramidinfer.PyramidCompressor` (the same
settings, policies and schedules), running the library's CUDA kernels over a
paged cache in device memory, in float32, float16 or bfloat16. Arrays are
used in place through DLPack (no copies; strides honoured). As in an engine
that includes the headers, the memory is the caller's: pass your own arrays
(``memory=``) or let these classes allocate them with torch. Every per-step
call enqueues work on a stream and returns without synchronising; ``stream``
is a ``torch.cuda.Stream``, a cupy stream, a raw handle (int), or None for
torch's current stream (the legacy default stream without torch).

    import torch, pyramidinfer.cuda as pc
    cache = pc.PagedCache(L, kv_heads, d, num_pages=4096, max_seqs=8, max_seq_len=8192, dtype=torch.float16)
    comp = pc.PyramidCompressor(L, heads, kv_heads, d)   # the paper's defaults
    comp.attach(cache)                                     # its state memory (torch) and ring pool
    comp.begin(cache, 0, n)
    for l in range(L):   # K, V (kv_heads, rows, d) of the rows comp.tokens(0) names
        comp.prefill_store(l, cache, [0], k, v)
        index, rows = comp.prefill_select(l, cache, [0], q_window)  # q (heads, w, d)
    ...

The module exists whether or not the CUDA extension was built
(:func:`available` says whether it can run here).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import Error
from . import PyramidCompressor as _HostCompressor

try:
    from . import _cuda
except ImportError:  # built without nvcc
    _cuda = None

if _cuda is not None:
    from .cuda_kernels import _stream_handle, compact_rows, topk_indices, window_attention_scores  # noqa: F401

__all__ = ["available", "PagedCache", "PyramidCompressor", "window_attention_scores", "topk_indices",
           "compact_rows"]


def available() -> bool:
    """Whether the CUDA extension was built and a CUDA device is visible."""
    return _cuda is not None and _cuda.device_count() > 0


def _need_module(what: str):
    if _cuda is None:
        raise Error(f"pyramidinfer.cuda.{what}: the CUDA extension is not built (nvcc was not found when "
                    "pyramidinfer was installed; reinstall with nvcc on the PATH)")
    return _cuda


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return {"half": "float16", "float": "float32", "bfloat": "bfloat16"}.get(name, name)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise Error("pyramidinfer.cuda: memory=None allocates with torch, which is not installed; pass the "
                    "arrays (memory=dict(...)) from your own allocator") from e
    return torch


def _seqs(seqs) -> np.ndarray:
    """Sequence slots as the binding takes them: an int, a list or an array."""
    return np.asarray([seqs] if isinstance(seqs, int) else seqs, dtype=np.int32)


class PagedCache:
    """The paged KV cache on a CUDA device: the library's views over five
    arrays: ``k_pool``, ``v_pool`` ((num_pages, page_size, kv_heads, head_dim)
    for layout "nhd", (num_pages, kv_heads, page_size, head_dim) for "hnd",
    any strides with a unit last one), ``free_pages`` (int32, num_pages),
    ``free_count`` (int32, 1) and ``state`` (``state_bytes(...)`` bytes).
    Given as ``memory=dict(...)`` they are yours and must outlive the cache
    (it keeps references); without, torch allocates them on ``device``. The
    constructor puts every page on the free list and zeroes the state (it
    waits for that on ``stream``).

    ``page_tables()`` and ``lengths()`` are device views (no copy) for your
    attention kernels; ``length``, ``positions``, ``keys``, ``values`` and
    ``free_pages`` read the device back (they synchronise: tests and tools).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_pages: int, max_seqs: int,
                 max_seq_len: int, page_size: int = 16, *, dtype="float16", granularity: str = "shared",
                 layout: str = "nhd", device=None, memory: Optional[dict] = None, stream=None):
        m = _need_module("PagedCache")
        shape = (num_layers, kv_heads, head_dim, num_pages, max_seqs, max_seq_len, page_size)
        name = _dtype_name(dtype)
        if memory is None:
            memory = self._allocate(shape, name, granularity, layout, device)
        missing = {"k_pool", "v_pool", "free_pages", "free_count", "state"} - set(memory)
        if missing:
            raise Error(f"pyramidinfer.cuda.PagedCache: memory lacks {sorted(missing)}")
        dev = getattr(memory["k_pool"], "device", None)
        self._c = m.PagedCache(*shape, name, granularity, layout, memory["k_pool"], memory["v_pool"],
                               memory["free_pages"], memory["free_count"], memory["state"],
                               _stream_handle(stream, dev))

    @staticmethod
    def state_bytes(num_layers: int, kv_heads: int, head_dim: int, num_pages: int, max_seqs: int, max_seq_len: int,
                    page_size: int = 16, *, dtype="float16", granularity: str = "shared") -> int:
        """Bytes of ``state`` a cache of this shape needs."""
        return _need_module("PagedCache.state_bytes").cache_state_bytes(
            num_layers, kv_heads, head_dim, num_pages, max_seqs, max_seq_len, page_size, _dtype_name(dtype),
            granularity)

    @classmethod
    def _allocate(cls, shape, dtype: str, granularity: str, layout: str, device) -> dict:
        torch = _torch()
        L, kv, d, pages, seqs, length, ps = shape
        dev = torch.device("cuda" if device is None else device)
        if dev.type != "cuda":
            raise Error(f"pyramidinfer.cuda.PagedCache: device = {device!r} must be a CUDA device")
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
        if tdt is None:
            raise Error(f"pyramidinfer.cuda.PagedCache: dtype = {dtype!r} must be float32, float16 or bfloat16")
        nbytes = cls.state_bytes(*shape, dtype=dtype, granularity=granularity)  # checks the shape first
        pool = (pages, ps, kv, d) if layout.lower() == "nhd" else (pages, kv, ps, d)
        return dict(k_pool=torch.empty(pool, dtype=tdt, device=dev), v_pool=torch.empty(pool, dtype=tdt, device=dev),
                    free_pages=torch.empty(pages, dtype=torch.int32, device=dev),
                    free_count=torch.empty(1, dtype=torch.int32, device=dev),
                    state=torch.empty(nbytes, dtype=torch.uint8, device=dev))

    def __getattr__(self, name):  # shape properties, page_tables, lengths, reads
        if name == "_c":
            raise AttributeError(name)
        return getattr(self._c, name)

    def __repr__(self):
        c = self._c
        return (f"cuda.PagedCache(num_layers={c.num_layers}, kv_heads={c.kv_heads}, head_dim={c.head_dim}, "
                f"num_pages={c.num_pages}, page_size={c.page_size}, max_seqs={c.max_seqs}, "
                f"max_seq_len={c.max_seq_len}, dtype={c.dtype}, device={c.device})")


class PyramidCompressor(_HostCompressor):
    """:class:`pyramidinfer.PyramidCompressor` on the CUDA backend: the same
    settings. ``attach(cache)`` gives it its state memory for that cache;
    then the calls of the C++ ``PyramidCompressor<..., CudaBackend>``
    (compressor_cuda.cuh) take a list of sequence slots (a batch; an int
    for one), device arrays and a stream:

    - prefill, every layer l in order: ``prefill_store(l, cache, seqs, k, v)``
      (k, v: (kv_heads, rows, head_dim), the batch's rows of ``tokens(seq)``
      packed in batch order), your attention, then ``prefill_select(l, cache,
      seqs, q, lse=None)`` (q: (num_heads, rows, head_dim) after RoPE, or for
      one sequence just its window rows) -> ``(index, rows)``: entry i's
      indices into its own rows are ``index[seq_i, :token_count(seq_i)]``
      (valid until its next prefill_select); ``gather_next(seqs, hidden,
      dst)`` packs the hidden states layer l + 1 computes;
    - decode, every layer: ``decode_append(l, cache, seqs, k, v, pos, q)``
      (k, v (B, kv_heads, 1, d), q (B, num_heads, 1, d), pos device int32
      (B,)), your attention, ``decode_compress(l, cache, seqs)``;
    - ``end(cache, seq)`` frees its pages.
    """

    @staticmethod
    def _make(settings):
        return _need_module("PyramidCompressor")._make_compressor(settings)

    def attach(self, cache: PagedCache, ring_rows: Optional[int] = None, memory=None, stream=None) -> None:
        """Takes ``memory`` (a CUDA array of ``state_bytes(cache, ring_rows)``
        bytes or more; torch allocates it when None) for ``cache``. ring_rows:
        the window-query pool shared by live sequences (each takes
        ``ring_rows_for(prompt_len)`` at begin and keeps
        ``decode_rows_for(prompt_len)`` after its prefill: fewer when the
        policy's decode scores accumulate, none without decode compression);
        default: every slot at max_seq_len."""
        if ring_rows is None:
            ring_rows = cache.max_seqs * self._c.ring_rows_for(cache.max_seq_len)
        if memory is None:
            torch = _torch()
            memory = torch.empty(self._c.state_bytes(cache._c, ring_rows), dtype=torch.uint8,
                                 device=torch.device("cuda", cache.device))
        self._cache_device = cache.device
        self._c.attach(cache._c, ring_rows, memory, _stream_handle(stream, cache.device))

    def state_bytes(self, cache: PagedCache, ring_rows: int) -> int:
        return self._c.state_bytes(cache._c, ring_rows)

    def ring_rows_for(self, prompt_len: int) -> int:
        """Ring-pool rows a sequence with this prompt takes at begin."""
        return self._c.ring_rows_for(prompt_len)

    def decode_rows_for(self, prompt_len: int) -> int:
        """Ring-pool rows it keeps from the end of its prefill to end."""
        return self._c.decode_rows_for(prompt_len)

    def _s(self, stream):
        return _stream_handle(stream, getattr(self, "_cache_device", None))

    def begin(self, cache: PagedCache, seq: int, prompt_len: int, stream=None) -> None:
        self._c.begin(cache._c, seq, prompt_len, self._s(stream))

    def end(self, cache: PagedCache, seq: int, stream=None) -> None:
        self._c.end(cache._c, seq, self._s(stream))

    def packed_positions(self, seqs, dst, stream=None) -> None:
        self._c.packed_positions(_seqs(seqs), dst, self._s(stream))

    def prefill_store(self, layer: int, cache: PagedCache, seqs, k, v, stream=None) -> None:
        self._c.prefill_store(layer, cache._c, _seqs(seqs), k, v, self._s(stream))

    def prefill_select(self, layer: int, cache: PagedCache, seqs, q, lse=None, stream=None):
        return self._c.prefill_select(layer, cache._c, _seqs(seqs), q, lse, self._s(stream))

    def gather_next(self, seqs, hidden, dst, stream=None) -> None:
        self._c.gather_next(_seqs(seqs), hidden, dst, self._s(stream))

    def decode_append(self, layer: int, cache: PagedCache, seqs, k, v, pos, q, lse=None, stream=None) -> None:
        self._c.decode_append(layer, cache._c, _seqs(seqs), k, v, pos, q, lse, self._s(stream))

    def decode_set_lse(self, layer: int, cache: PagedCache, seqs, lse, stream=None) -> None:
        self._c.decode_set_lse(layer, cache._c, _seqs(seqs), lse, self._s(stream))

    def decode_compress(self, layer: int, cache: PagedCache, seqs, stream=None) -> None:
        self._c.decode_compress(layer, cache._c, _seqs(seqs), self._s(stream))

    def packed_rows(self, seqs) -> int:
        return self._c.packed_rows(_seqs(seqs))
