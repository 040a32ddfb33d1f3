"""The array kernels on the GPU: window scoring, top-k retention, compaction.

Thin wrappers over ``pyramidinfer._cuda`` (imported only where that module
was built). Inputs are DLPack CUDA arrays (torch tensors, cupy or jax arrays)
used in place with their strides, never copied; semantics are those of the
CPU functions of the same names (``pyramidinfer.window_attention_scores``
etc.). Work is enqueued on ``stream`` and nothing synchronises:

* ``stream=None``: torch's current stream on the inputs' device when torch is
  imported, else the legacy default stream (0); an ``int`` is a raw
  ``cudaStream_t``; an object with ``.cuda_stream`` (torch) or ``.ptr``
  (cupy) gives its handle.
* ``out=None`` / ``workspace=None``: allocated with torch on the inputs'
  device (without torch, pass them: ``*_workspace_bytes`` says how many
  bytes a workspace needs, a contiguous uint8 CUDA array).

    import torch, pyramidinfer.cuda_kernels as pk
    keys = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    queries = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.bfloat16)
    scores = pk.window_attention_scores(keys, queries)      # (1, 1, 4032) float32
    keep = pk.topk_indices(scores[:, 0], 2000, sinks=4)     # (1, 2000) int32, ascending
    pk.compact_rows(keys, keep[0])                          # keys[:, :, :2000] now the kept rows
"""

from __future__ import annotations

import sys

from . import _cuda
from ._core import Error

__all__ = [
    "window_attention_scores",
    "window_attention_scores_workspace_bytes",
    "topk_indices",
    "topk_indices_workspace_bytes",
    "compact_rows",
    "compact_rows_workspace_bytes",
    "gather_rows",
]

_KDL_CUDA = 2  # DLPack's device type of CUDA memory


def _cuda_index(device):
    """A CUDA device index from an int, a torch.device / 'cuda:N' string, or None (None: not CUDA / unknown)."""
    if device is None or isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    kind = getattr(device, "type", None)
    if kind is None and isinstance(device, str):
        kind, _, idx = device.partition(":")
        return (int(idx) if idx else 0) if kind == "cuda" else None
    if kind == "cuda":
        idx = getattr(device, "index", None)
        return 0 if idx is None else int(idx)
    return None


def _device_of(x):
    """The CUDA device index an array lives on (None when it is not a CUDA array)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _cuda_index(x.device)
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None:
        kind, idx = dlpack_device()
        return int(idx) if int(kind) == _KDL_CUDA else None
    return None


def _stream_handle(stream, device=None):
    """The int cudaStream_t the binding takes for `stream` on `device`.

    None: torch.cuda.current_stream(device).cuda_stream when torch is imported
    (and has set up CUDA; before that its current stream is the default one),
    else 0, the legacy default stream. An int stays as it is. An object with
    .cuda_stream (torch.cuda.Stream) or .ptr (cupy.cuda.Stream) gives that.
    `device` is an int, a torch.device, 'cuda:N' or None (the current device).
    """
    if stream is None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return 0
        return int(torch.cuda.current_stream(_cuda_index(device)).cuda_stream)
    if isinstance(stream, bool):
        raise Error(f"pyramidinfer::stream: argument 'stream' = {stream!r} must be None, an int handle or a stream")
    if isinstance(stream, int):
        if stream < 0:
            raise Error(f"pyramidinfer::stream: argument 'stream' = {stream} must be a cudaStream_t handle (>= 0)")
        return stream
    for attr in ("cuda_stream", "ptr"):
        handle = getattr(stream, attr, None)
        if handle is not None:
            return int(handle)
    raise Error(
        f"pyramidinfer::stream: argument 'stream' = {stream!r} must be None, an int cudaStream_t handle, "
        "or a stream object with .cuda_stream (torch) or .ptr (cupy)"
    )


class _Alloc:
    """Allocates a call's missing out / workspace with torch on `device`, and
    keeps that memory from being reused by torch's caching allocator before
    work on `handle` (when it is not torch's current stream) is done."""

    def __init__(self, fn, device, handle):
        self.fn, self.device, self.handle = fn, device, handle
        self.made = []

    def _torch(self, what, need):
        try:
            import torch
        except ImportError:
            raise Error(
                f"pyramidinfer::{self.fn}: argument '{what}' = None must be given when torch is not installed "
                f"(pass {need})"
            ) from None
        return torch

    def empty(self, what, shape, dtype, need):
        torch = self._torch(what, need)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = torch.device("cuda", self.device) if self.device is not None else torch.device("cpu")
        t = torch.empty(shape, dtype=dtype, device=device)
        self.made.append(t)
        return t

    def done(self):
        """After the launch: ties our allocations to a stream that is not torch's current one."""
        if not self.made or self.device is None:
            return
        torch = sys.modules["torch"]
        if torch.cuda.current_stream(self.device).cuda_stream == self.handle:
            return
        stream = torch.cuda.ExternalStream(self.handle, device=torch.device("cuda", self.device))
        for t in self.made:
            t.record_stream(stream)


def _workspace(alloc, need, workspace, query):
    if workspace is not None or need == 0:
        return workspace
    return alloc.empty("workspace", (need,), "uint8", f"a contiguous uint8 CUDA array of {query}(...) = {need} bytes")


def _torch_dtype_name(x):
    """The torch dtype name of an array's dtype (torch.float16 -> 'float16', numpy/cupy dtypes alike)."""
    return str(getattr(x, "dtype", "float32")).replace("torch.", "")


# --- window scoring ----------------------------------------------------------


def window_attention_scores_workspace_bytes(keys, queries, lse=None, *, scale=0.0, distance_weight=1.2,
                                            granularity="shared"):
    """Bytes of the workspace window_attention_scores needs for these arguments (checks them as the call does)."""
    return _cuda.window_attention_scores_workspace_bytes(keys, queries, lse, float(scale), float(distance_weight),
                                                         granularity)


def window_attention_scores(keys, queries, lse=None, *, scale=0.0, distance_weight=1.2, granularity="shared",
                            out=None, workspace=None, stream=None):
    """Recent-window attention scores of the context slots [0, n - w), on the GPU.

    keys (b, kv_heads, n, d) and queries (b, q_heads, w, d): CUDA arrays of one
    dtype, float32, float16 or bfloat16 (or both without b); the queries are
    the last w tokens' (after RoPE), oldest first. lse, optional float32
    (b, q_heads, w): their softmax log-sum-exp. scale 0 means 1/sqrt(d).
    Returns `out`, float32 (b, groups, n - w) (groups 1 when shared, kv_heads
    per_kv_head), allocated when None. f16/bf16 with head_dim 64 or 128, rows
    contiguous and 16-byte aligned take the tensor-core kernels; any other
    strides take the library's CUDA-core fallback (same results).
    """
    fn = "window_attention_scores"
    device = _device_of(keys)
    handle = _stream_handle(stream, device)
    scale, distance_weight = float(scale), float(distance_weight)
    alloc = _Alloc(fn, device, handle)
    if out is None or workspace is None:
        # Checks every argument before anything is allocated.
        need = _cuda.window_attention_scores_workspace_bytes(keys, queries, lse, scale, distance_weight, granularity)
        workspace = _workspace(alloc, need, workspace, "window_attention_scores_workspace_bytes")
        if out is None:
            ks, qs = tuple(keys.shape), tuple(queries.shape)
            groups = 1 if granularity == "shared" else ks[-3]
            shape = ks[:-3] + (groups, ks[-2] - qs[-2])
            out = alloc.empty("out", shape, "float32", f"a float32 CUDA array of shape {shape}")
    _cuda.window_attention_scores(keys, queries, lse, scale, distance_weight, granularity, out, workspace, handle)
    alloc.done()
    return out


# --- top-k --------------------------------------------------------------------


def topk_indices_workspace_bytes(scores, k, sinks=0):
    """Bytes of the workspace topk_indices needs for these arguments (checks them as the call does)."""
    return _cuda.topk_indices_workspace_bytes(scores, int(k), int(sinks))


def topk_indices(scores, k, sinks=0, *, out=None, workspace=None, stream=None):
    """Keeps min(sinks, k) leading slots and the best others of each row of
    scores ((n,) or (rows, n) float32 CUDA): ascending int32 indices, (k,) or
    (rows, k), in `out` (allocated when None). Higher first, NaN last, ties to
    the lower index. Long rows (n >= 16384, at most 256 rows) are split across
    many thread blocks."""
    fn = "topk_indices"
    k, sinks = int(k), int(sinks)
    device = _device_of(scores)
    handle = _stream_handle(stream, device)
    alloc = _Alloc(fn, device, handle)
    if out is None or workspace is None:
        need = _cuda.topk_indices_workspace_bytes(scores, k, sinks)
        workspace = _workspace(alloc, need, workspace, "topk_indices_workspace_bytes")
        if out is None:
            shape = tuple(scores.shape[:-1]) + (k,)
            out = alloc.empty("out", shape, "int32", f"an int32 CUDA array of shape {shape}")
    _cuda.topk_indices(scores, k, sinks, out, workspace, handle)
    alloc.done()
    return out


# --- compaction ----------------------------------------------------------------


def compact_rows_workspace_bytes(x, kept):
    """Bytes of the workspace compact_rows needs for these arguments (checks them as the call does)."""
    return _cuda.compact_rows_workspace_bytes(x, kept)


def compact_rows(x, kept, *, workspace=None, stream=None):
    """In place: moves rows kept[i] -> i along axis -2 of x ((b, h, n, d) or
    (h, n, d) CUDA, float32, float16 or bfloat16, any strides) in every (b, h).
    Returns len(kept).

    kept: int32 CUDA (m,), m <= n, strictly ascending in [0, n). Its values
    are device data, so they are checked on the device and not raised on
    (nothing synchronises): a list that breaks the rule leaves x as it is and
    sets the workspace's first int32 to 1 (0 after a valid list); pass your
    own `workspace` to read it.
    """
    fn = "compact_rows"
    device = _device_of(x)
    handle = _stream_handle(stream, device)
    alloc = _Alloc(fn, device, handle)
    if workspace is None:
        need = _cuda.compact_rows_workspace_bytes(x, kept)
        workspace = _workspace(alloc, need, workspace, "compact_rows_workspace_bytes")
    count = _cuda.compact_rows(x, kept, workspace, handle)
    alloc.done()
    return count


def gather_rows(src, idx, *, out=None, stream=None):
    """out[i] = src[idx[i]] for src (n, c) CUDA (float32, float16 or bfloat16,
    any strides) and idx a contiguous int32 CUDA array of m <= n ascending
    indices; `out` (m, c) of src's dtype is allocated when None. idx's values
    are not checked (device data): an index outside [0, n) reads the nearest
    row (never out of bounds), and the order is not enforced."""
    fn = "gather_rows"
    device = _device_of(src)
    handle = _stream_handle(stream, device)
    alloc = _Alloc(fn, device, handle)
    if out is None:
        ss, ist = tuple(src.shape), tuple(idx.shape)
        # Wrong ranks: any shape does, the binding rejects src or idx first.
        shape = (ist[0] if len(ist) == 1 else 0, ss[-1] if len(ss) == 2 else 0)
        out = alloc.empty("out", shape, _torch_dtype_name(src), f"a CUDA array of src's dtype and shape {shape}")
    _cuda.gather_rows(src, idx, out, handle)
    alloc.done()
    return out
