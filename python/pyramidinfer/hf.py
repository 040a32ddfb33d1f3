"""pyramidinfer.hf: PyramidInfer inside Hugging Face transformers (CPU or CUDA).

Llama-structured models (``LlamaForCausalLM`` and models built the same way,
e.g. SmolLM2, also loaded from a GGUF with ``gguf_file=``) keep a pyramid KV
cache: in prefill every layer keeps the tokens its recent window attends to
and only those tokens' hidden states go on to the next layer (deeper layers
compute fewer tokens), and in decode each layer evicts as the paper does. The
positions kept come from the library's C++ compressor (``pyramidinfer._core``),
the same code the C++ engines run; tensors reach it through DLPack, in place.
A model on a CUDA device (float16, bfloat16 or float32) runs the CUDA
compressor (``pyramidinfer.cuda``) over a paged cache in device memory whose
lengths the host tracks (no read-back of the cache in a step; the forward's
cache_position and mask are checked once per forward, which reads them); a
model on the CPU runs the host compressor in float32.

Quickstart (from the repository root, after examples/fetch_model.sh):

    import torch, transformers
    from pyramidinfer.hf import PyramidCache, pyramid
    gguf = dict(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = transformers.AutoTokenizer.from_pretrained("models", **gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained("models", dtype=torch.float32, **gguf)
    ids = tok(open("examples/data/moby_dick_ch1-3.txt").read()[:2000], return_tensors="pt").input_ids
    out = model.generate(ids, past_key_values=PyramidCache(model), max_new_tokens=32)  # the paper's defaults
    with pyramid(model, "snapkv", ratio=0.5):  # kvpress-style: each generate() in the block
        out = model.generate(ids, max_new_tokens=32)
    print(tok.decode(out[0, ids.shape[1]:]))

Policies (``policy=``): ``pyramid`` (the paper: token-dropping prefill, cosine
schedule), ``pyramid-perhead`` (one selection per KV head), and the
layer-local ones, where every layer computes every token and compresses only
its own cache: ``snapkv`` (window attention, per KV head), ``h2o``
(accumulated attention), ``streaming`` (sinks + most recent), plus ``full``.
Any :class:`pyramidinfer.PyramidCompressor` keyword overrides the preset.

Limits: batch size 1 (token dropping gives each sequence its own token set),
one token per forward after the prompt, float32 on the CPU, greedy/sampling
generation (no beam search). Attention reads a gathered copy of each
layer's pages (transformers' attention takes one K and V tensor a layer). With token
dropping a prefill forward returns logits for the rows the last layer
computed (``cache.rows``): the last row is always the prompt's last token.
Hooks are added to the model once (:func:`detach` removes them); they do
nothing unless the forward's cache is a :class:`PyramidCache`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Optional

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from . import (
    AccumulatedAttention,
    CosineSchedule,
    DecodeSchedule,
    Error,
    KeyNorm,
    PagedCache,
    Position,
    PyramidCompressor,
    RecentWindow,
    TopK,
    UniformSchedule,
)

__all__ = ["PyramidCache", "pyramid", "attach", "detach", "policy_kwargs", "POLICIES", "kv_fraction",
           "ratio_for_fraction"]

POLICIES = ("full", "pyramid", "pyramid-perhead", "snapkv", "h2o", "streaming", "knorm")


def policy_kwargs(policy: str = "pyramid", ratio: Optional[float] = None, *, sinks: int = 4,
                  min_context: int = 64, recent_ratio: float = 0.2) -> dict:
    """PyramidCompressor keywords for a named policy (the presets of
    examples/generate/policies.hpp, so the two sides build the same compressor).

    ratio: for pyramid*, the cosine schedule's final ratio (default 0.9); for
    the layer-local policies, the share of its context every layer keeps in
    prefill and of every 16-token segment in decode (default 0.9).
    """
    if policy not in POLICIES:
        raise Error(f"pyramidinfer.hf: policy = {policy!r} must be one of " + ", ".join(map(repr, POLICIES)))
    r = 0.9 if ratio is None else float(ratio)
    if not (0.0 < r <= 1.0):
        raise Error(f"pyramidinfer.hf: ratio = {ratio!r} must be in (0, 1]")
    kw = dict(recent_ratio=recent_ratio)
    if policy in ("pyramid", "pyramid-perhead"):
        gran = "per_kv_head" if policy == "pyramid-perhead" else "shared"
        kw.update(scoring=RecentWindow(1.2), selection=TopK(sinks, min_context, gran), schedule=CosineSchedule(r))
    elif policy == "full":
        kw.update(scoring=Position(), selection=TopK(sinks, min_context), schedule=UniformSchedule(1.0),
                  compress_decode=False)
    else:
        # Layer-local: the same share in every layer, in prefill and in decode
        # (a cosine decode schedule with final ratio 1 is flat: keep int(16 * r)).
        scoring = {"snapkv": RecentWindow(1.0), "h2o": AccumulatedAttention(), "streaming": Position(),
                   "knorm": KeyNorm()}[policy]
        gran = "per_kv_head" if policy == "snapkv" else "shared"
        kw.update(scoring=scoring, selection=TopK(sinks, min_context, gran), schedule=UniformSchedule(r),
                  decode=DecodeSchedule(16, r, 1.0), prefill_mode="layer_local")
    return kw


def _model_shape(config) -> tuple:
    """(layers, heads, kv_heads, head_dim) of a Llama-structured config."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def _model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _compressor_class(device: torch.device):
    if device.type == "cpu":
        return PyramidCompressor
    if device.type != "cuda":
        raise Error(f"pyramidinfer.hf: a model on {device} is not supported (CPU or CUDA)")
    from . import cuda
    if not cuda.available():
        raise Error("pyramidinfer.hf: the model is on CUDA but pyramidinfer's CUDA extension is not built or sees "
                    "no device (pyramidinfer.cuda.available() is False)")
    return cuda.PyramidCompressor


def _make_compressor(model, policy, ratio, overrides) -> tuple:
    """(compressor, the keywords it was made with), on the model's device."""
    kw = policy_kwargs(policy, ratio) if policy is not None else {}
    kw.update(overrides)
    return _compressor_class(_model_device(model))(*_model_shape(model.config), **kw), kw


def kv_fraction(model_or_config, prompt_len: int, policy: str = "pyramid", ratio: Optional[float] = None,
                **overrides) -> float:
    """Share of a full cache's slots a policy holds right after prefilling a
    `prompt_len`-token prompt (what KV budgets are matched on)."""
    config = getattr(model_or_config, "config", model_or_config)
    kw = policy_kwargs(policy, ratio)
    kw.update(overrides)
    pc = PyramidCompressor(*_model_shape(config), **kw)
    held = pc.trace(prompt_len, 0)["prefill_len"]
    return sum(held) / (prompt_len * len(held))


def ratio_for_fraction(model_or_config, prompt_len: int, target: float, policy: str = "pyramid",
                       **overrides) -> float:
    """The ratio whose kv_fraction is nearest `target` (a 1/400 grid, the
    smaller ratio on ties; the fraction is not monotone in the ratio because a
    layer whose count falls to min_context keeps everything)."""
    best, gap = 1.0, 2.0
    for i in range(1, 401):
        g = abs(kv_fraction(model_or_config, prompt_len, policy, i / 400, **overrides) - target)
        if g < gap - 1e-9:
            best, gap = i / 400, g
    return best


# --- hooks on the model ------------------------------------------------------


def _decoder_layers(model):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise Error(f"pyramidinfer.hf: {type(model).__name__} has no decoder layers at .model.layers "
                    "(a Llama-structured model is needed)")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            raise Error(f"pyramidinfer.hf: layer {i} of {type(model).__name__} has no self_attn.q_proj/k_proj/"
                        "v_proj (a Llama-structured model is needed)")
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            # Queries are taken at q_proj's output; a norm after it would be missed.
            raise Error(f"pyramidinfer.hf: {type(model).__name__} normalises queries after q_proj "
                        "(q_norm); only Llama-structured attention is supported")
    return list(layers)


class _Hooks:
    """The hooks pyramidinfer adds to a model: per decoder layer a forward
    pre-hook (token dropping: it hands the layer only the rows the previous
    layer kept) and a forward hook on q_proj (it lends the queries to the
    cache, which needs the window's queries; no recomputation, no copy)."""

    def __init__(self, model):
        self.active: Optional[PyramidCache] = None  # the cache of the forward in progress
        self.handles = []
        layers = _decoder_layers(model)
        for l, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre_layer(l), with_kwargs=True))
            self.handles.append(layer.self_attn.q_proj.register_forward_hook(self._q_out(l)))
        # After the last layer the cache is let go (the model does not keep it alive).
        self.handles.append(layers[-1].register_forward_hook(lambda *_: setattr(self, "active", None)))
        self.rope = getattr(sys.modules[type(_decoder_layers(model)[0].self_attn).__module__],
                            "apply_rotary_pos_emb", None)
        if self.rope is None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope
            self.rope = rope

    def _pre_layer(self, l):
        def hook(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            self.active = cache if isinstance(cache, PyramidCache) else None
            if self.active is None:
                return None
            out = self.active._enter_layer(l, args, kwargs)
            # The layer's RoPE tables (its kept rows' in a token-dropping
            # prefill): transformers >= 5.3 no longer hands them to update().
            self.active._tables[l] = (out[1] if out is not None else kwargs).get("position_embeddings")
            return out
        return hook

    def _q_out(self, l):
        def hook(module, inputs, output):
            if self.active is not None:
                self.active._queries[l] = output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(model) -> _Hooks:
    """Adds pyramidinfer's hooks to `model` (once; PyramidCache does it)."""
    hooks = getattr(model, "_pyramidinfer_hooks", None)
    if hooks is None:
        hooks = _Hooks(model)
        model._pyramidinfer_hooks = hooks
    return hooks


def detach(model) -> None:
    """Removes pyramidinfer's hooks from `model`."""
    hooks = getattr(model, "_pyramidinfer_hooks", None)
    if hooks is not None:
        hooks.remove()
        del model._pyramidinfer_hooks


# --- the cache ---------------------------------------------------------------


class _Layer(CacheLayerMixin):
    """transformers' per-layer view of a PyramidCache layer (lengths and
    masks; the tensors live in the paged cache)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "PyramidCache", layer: int):
        self._cache, self._layer = cache, layer

    # transformers builds masks and positions from these: they count the
    # tokens seen (the prompt and every decoded token), not the slots held,
    # so positions and the 2-D attention mask line up as with a full cache.
    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, cache_kwargs=None):
        return self._cache.update(key_states, value_states, self._layer, cache_kwargs)

    def get_seq_length(self) -> int:
        return self._cache.seen

    def get_mask_sizes(self, query) -> tuple:
        # transformers up to 5.2 passes the new tokens' cache_position (a
        # tensor), later versions their count (an int).
        n = query if isinstance(query, int) else query.shape[0]
        return self._cache.seen + n, 0

    def get_max_length(self) -> int:  # transformers >= 5.15 (no bound)
        return -1

    get_max_cache_shape = get_max_length  # its name before

    @property
    def is_initialized(self) -> bool:
        return self._cache.seen > 0

    @property
    def keys(self):
        return self._cache.held(self._layer)[0] if self._cache.seen else None

    @property
    def values(self):
        return self._cache.held(self._layer)[1] if self._cache.seen else None

    @property
    def max_batch_size(self) -> int:
        return 1

    @property
    def max_cache_len(self) -> int:
        return self._cache.max_seq_len


class PyramidCache(Cache):
    """A transformers Cache whose layers hold different numbers of tokens,
    stored in the library's paged host cache and compressed by its
    PyramidCompressor. One sequence (batch 1); one prompt per cache
    (:meth:`reset` starts over).

    policy / ratio: a preset of :func:`policy_kwargs`; `compressor_kwargs`
    override it (any PyramidCompressor keyword, e.g. ``recent_ratio=0.1``,
    ``selection=TopK(sinks=8)``; with ``policy=None`` they are all there is).
    max_new_tokens sizes the page pool with the planner (the pages this
    policy needs at most for the prompt plus that many tokens).
    """

    def __init__(self, model, policy: Optional[str] = "pyramid", ratio: Optional[float] = None, *,
                 max_new_tokens: int = 256, page_size: int = 16, **compressor_kwargs):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise Error(f"pyramidinfer.hf.PyramidCache: max_new_tokens = {max_new_tokens!r} must be an int >= 0")
        self.compressor, kw = _make_compressor(model, policy, ratio, compressor_kwargs)
        self.device = _model_device(model)
        self.dtype = next(model.parameters()).dtype
        self.num_layers, self.num_heads, self.kv_heads, self.head_dim = _model_shape(model.config)
        self.max_new_tokens, self.page_size = max_new_tokens, page_size
        self._hooks = attach(model)
        self._drop = kw.get("prefill_mode", "drop_tokens") == "drop_tokens"
        self._per_head = self.compressor.granularity == "per_kv_head"
        super().__init__(layers=[_Layer(self, l) for l in range(self.num_layers)])
        self.reset()

    # -- state --

    def reset(self) -> None:
        """Forgets the sequence: the next forward is a new prompt's prefill."""
        if getattr(self, "pages", None) is not None and self.compressor.live(0):
            self.compressor.end(self.pages, 0)
        self.pages = None  # the paged cache: PagedCache, or pyramidinfer.cuda.PagedCache on a GPU
        self.seen = 0            # tokens the model has seen (prompt + decoded)
        self.prompt_len = 0
        self.max_seq_len = 0
        self.prefilling = False
        self.rows: Optional[torch.Tensor] = None  # original positions of the rows the layer computes
        self._next: Optional[torch.Tensor] = None  # rows of the previous layer that go on
        self._queries: dict = {}  # per layer: q_proj output (the hooks lend it)
        self._tables: dict = {}   # per layer: the RoPE (cos, sin) the layer got
        self._mask: Optional[torch.Tensor] = None
        self._prefill_positions: list = []  # per layer: (held, position heads) positions after its prefill
        self._pos_step: Optional[torch.Tensor] = None  # the decode step's position (device int32)
        self._stream = 0  # the decode step's CUDA stream (torch's current one)
        self._seqs = np.zeros(1, dtype=np.int32)  # the one sequence slot, as the compressors take it

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def positions(self, layer: int, head: int = 0) -> torch.Tensor:
        """Original positions of the tokens `layer` holds now (KV head `head`)."""
        self._check_started("positions")
        return torch.from_numpy(self.pages.positions(layer, 0, head))

    @property
    def prefill_positions(self) -> list:
        """Per layer, per KV head: the positions it held right after its prefill (CPU int tensors)."""
        per_head = self.compressor.granularity == "per_kv_head"
        return [[p[:, h if per_head else 0].cpu() for h in range(self.kv_heads)] for p in self._prefill_positions]

    def lengths(self) -> list:
        """Tokens each layer holds now."""
        self._check_started("lengths")
        return [self.pages.length(l, 0) for l in range(self.num_layers)]

    def held(self, layer: int) -> tuple:
        """(keys, values) `layer` holds, (1, kv_heads, length, head_dim): a
        gather of its pages (the attention reads contiguous rows)."""
        self._check_started("held")
        if self.on_cuda:
            return self._held_cuda(layer)
        n = self.pages.length(layer, 0)
        pages = self.pages.page_table(layer, 0)
        out = []
        for pool in (self.pages.k_pool, self.pages.v_pool):  # (pages, page_size, kv_heads, d), no copy
            # numpy's take: torch's index_select of these few pages costs
            # milliseconds of thread start-up on a busy CPU.
            rows = np.take(pool, pages, axis=0).reshape(-1, self.kv_heads, self.head_dim)[:n]
            out.append(torch.from_numpy(np.ascontiguousarray(rows.transpose(1, 0, 2)))[None])
        return out[0], out[1]

    def _layer_pages(self, layer: int) -> tuple:
        """(page ids, length) of `layer` on the GPU: the length as the host
        tracks it, the pages a device view (no read-back)."""
        n = self.compressor.host_length(layer, 0)
        return self._page_tables[layer, 0, : -(-n // self.page_size)], n

    def _held_cuda(self, layer: int) -> tuple:
        pages, n = self._layer_pages(layer)
        out = []
        for pool in (self._k_pool, self._v_pool):  # (pages, page_size, kv_heads, d)
            rows = pool.index_select(0, pages).reshape(-1, self.kv_heads, self.head_dim)[:n]
            out.append(rows.transpose(0, 1).unsqueeze(0))
        return out[0], out[1]

    def _snapshot_positions(self, layer: int) -> torch.Tensor:
        """Layer's held positions (length, position heads), a device copy: no read-back."""
        pages, n = self._layer_pages(layer)
        return self._positions.index_select(0, pages).reshape(-1, self._positions.shape[2])[:n].clone()

    def _check_started(self, what):
        if self.pages is None:
            raise Error(f"pyramidinfer.hf.PyramidCache.{what}: nothing cached yet (run a prompt first)")

    # -- the model's calls --

    def _begin(self, n: int):
        pc = self.compressor
        steps = self.max_new_tokens
        pages = pc.pages(n, steps, self.page_size)["total_peak"]
        shape = (self.num_layers, self.kv_heads, self.head_dim)
        if self.on_cuda:
            from . import cuda
            self.pages = cuda.PagedCache(*shape, num_pages=pages, max_seqs=1, max_seq_len=n + steps,
                                         page_size=self.page_size, dtype=self.dtype, granularity=pc.granularity,
                                         device=self.device)
            pc.attach(self.pages, ring_rows=pc.ring_rows_for(n))
            # Device views (no copies) the attention's gathers read.
            self._k_pool, self._v_pool = self.pages.k_pool, self.pages.v_pool
            self._page_tables = torch.from_dlpack(self.pages.page_tables())
            self._positions = torch.from_dlpack(self.pages.positions_view())
        else:
            self.pages = PagedCache(*shape, num_pages=pages, max_seqs=1, max_seq_len=n + steps,
                                    page_size=self.page_size, granularity=pc.granularity)
        pc.begin(self.pages, 0, n)
        self.prompt_len, self.max_seq_len, self.prefilling = n, n + steps, True
        self.rows = torch.arange(n, device=self.device)

    def _enter_layer(self, l: int, args: tuple, kwargs: dict):
        """Before decoder layer l: in a token-dropping prefill, give it only the
        rows layer l - 1 kept (hidden states, RoPE tables, positions, mask)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] != 1:
            raise Error(f"pyramidinfer.hf.PyramidCache: batch size {hidden.shape[0]} is not supported "
                        "(one sequence per cache)")
        if l == 0:
            if self.seen == 0:
                self.reset()  # a prefill that failed half-way leaves a live sequence
                self._begin(hidden.shape[1])
            elif hidden.shape[1] != 1:
                raise Error(f"pyramidinfer.hf.PyramidCache: {hidden.shape[1]} tokens in one forward after the "
                            "prompt; decode takes one token per forward (reset() to start a new prompt)")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            # The forward's mask is causal over all tokens seen; the last query
            # row sees every key unless there is padding, which we refuse (a
            # pad would become a sink). Every layer gets the same mask: one
            # check (a read-back on a GPU) per forward.
            last = mask[0, :, -1]
            if l == 0 and not bool((last if last.dtype == torch.bool else last == 0).all()):
                raise Error("pyramidinfer.hf.PyramidCache: the attention mask hides tokens (padding); "
                            "one unpadded sequence per cache is supported")
            if not self.prefilling:
                # One query over its own past: nothing to mask, and the mask's
                # length (tokens seen) is not the layer's (tokens held).
                kwargs["attention_mask"] = None
                return args, kwargs
        if not (self.prefilling and self._drop and l > 0):
            return None
        # The hidden states are the previous layer's rows (T_{l-1}): they take
        # the relative indices. The RoPE tables, positions and mask are the
        # forward's, made once for the whole prompt: they take the kept
        # tokens' original positions (the prompt starts at 0).
        if self._next.numel() < hidden.shape[1]:
            hidden = hidden.index_select(1, self._next)
        rows = self._tokens()
        if rows.numel() < self.prompt_len:
            self.rows = rows
            if kwargs.get("position_embeddings") is not None:
                kwargs["position_embeddings"] = tuple(t.index_select(1, rows) for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"].index_select(-1, rows)
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = kwargs["cache_position"].index_select(0, rows)
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                kwargs["attention_mask"] = mask.index_select(2, rows).index_select(3, rows)
        if self._per_head:
            # Each KV head attends only to the tokens it kept; the mask is
            # filled in update(), once the layer's head sets are stored.
            m = hidden.shape[1]
            self._mask = torch.zeros(1, self.num_heads, m, m, dtype=hidden.dtype, device=hidden.device)
            kwargs["attention_mask"] = self._mask
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _tokens(self) -> torch.Tensor:
        """T_l's original positions, int64 on the model's device (a copy: the
        compressor's buffer is rewritten at the next layer)."""
        t = self.compressor.tokens(0)
        return torch.from_dlpack(t).long() if self.on_cuda else torch.from_numpy(t.astype("int64"))

    def _rope_queries(self, l: int, rows: slice, cache_kwargs) -> Optional[torch.Tensor]:
        """The queries of rows `rows` of layer l after RoPE, (1, heads, w, d).
        The CUDA compressor always takes them (its ring holds every policy's window)."""
        if not self.compressor.needs_queries and not self.on_cuda:
            return None
        q, tables = self._queries.pop(l, None), self._tables.pop(l, None)
        if cache_kwargs is not None and "cos" in cache_kwargs:  # transformers < 5.3 passes them here
            tables = cache_kwargs["cos"], cache_kwargs["sin"]
        if q is None or tables is None:
            raise Error("pyramidinfer.hf.PyramidCache: layer %d's queries or RoPE tables did not reach the cache "
                        "(is this a Llama-structured model with pyramidinfer's hooks attached?)" % l)
        q = q[:, rows]
        q = q.view(1, q.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = tables[0][:, rows], tables[1][:, rows]
        # The model's own RoPE; its key input is an empty slice (no heads), so
        # that nothing is computed twice.
        q, _ = self._hooks.rope(q, q[:, :0], cos, sin)
        return q.detach()

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: Optional[dict] = None):
        k, v = key_states.detach(), value_states.detach()
        self._check_kv(k)
        if self.prefilling:
            self._prefill_layer(layer_idx, k, v, cache_kwargs)
            return key_states, value_states  # the layer attends over all of T_l, as computed
        if k.shape[2] != 1:
            raise Error("pyramidinfer.hf.PyramidCache: decode takes one token per forward")
        return self._decode_layer(layer_idx, k, v, cache_kwargs)

    def _check_kv(self, k: torch.Tensor):
        if self.on_cuda and (k.device != self.device or k.dtype != self.dtype):
            raise Error(f"pyramidinfer.hf.PyramidCache: keys are {k.dtype} on {k.device}; the cache was made for "
                        f"{self.dtype} on {self.device} (the model's)")
        if not self.on_cuda and (k.dtype != torch.float32 or k.device.type != "cpu"):
            raise Error(f"pyramidinfer.hf.PyramidCache: keys are {k.dtype} on {k.device}; on the CPU this version "
                        "runs float32 (load the model with torch_dtype=torch.float32)")
        if k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise Error(f"pyramidinfer.hf.PyramidCache: keys of shape {tuple(k.shape)} do not match the model's "
                        f"(1, {self.kv_heads}, n, {self.head_dim})")

    def _prefill_layer(self, l: int, k: torch.Tensor, v: torch.Tensor, cache_kwargs):
        """Stores layer l's rows and selects the rows layer l + 1 computes."""
        pc = self.compressor
        pc.prefill_store(l, self.pages, 0, k[0], v[0])
        if self._per_head and self._drop and l > 0:
            self._fill_head_mask(l, self.rows)  # self.rows: T_l's positions
        q = self._rope_queries(l, slice(k.shape[2] - pc.window(0), None), cache_kwargs)
        if self.on_cuda:
            index, _ = pc.prefill_select(l, self.pages, 0, q[0])
            self._next = torch.from_dlpack(index)[0, : pc.token_count(0)].long()
            self._prefill_positions.append(self._snapshot_positions(l))
        else:
            nxt = pc.prefill_select(l, self.pages, 0, None if q is None else q[0])
            self._next = torch.from_numpy(nxt.astype("int64"))
            self._prefill_positions.append(self._host_positions(l))
        if l == self.num_layers - 1:
            self.prefilling, self.seen, self._mask = False, self.prompt_len, None

    def _host_positions(self, l: int) -> torch.Tensor:
        """Layer l's held positions, (length, position heads) (the CPU cache)."""
        heads = self.kv_heads if self._per_head else 1
        return torch.stack([self.positions(l, h) for h in range(heads)], dim=1)

    def _decode_layer(self, l: int, k: torch.Tensor, v: torch.Tensor, cache_kwargs):
        """Appends the token, returns what layer l attends over, then lets the
        compressor evict (after the gather, which keeps its copy)."""
        pc, pos = self.compressor, self.seen
        if l == 0:
            self._check_decode_position(pos, cache_kwargs)
        q = self._rope_queries(l, slice(None), cache_kwargs)
        on = dict(stream=self._stream) if self.on_cuda else {}  # torch's current stream, looked up once a step
        pc.decode_append(l, self.pages, self._seqs, k, v, self._pos_step, q, **on)
        keys, values = self.held(l)  # a gather, so compression below leaves it as it is
        pc.decode_compress(l, self.pages, self._seqs, **on)
        if l == self.num_layers - 1:
            self.seen += 1
        return keys, values

    def _check_decode_position(self, pos: int, cache_kwargs):
        """Once per step: the token continues the sequence and fits the pool."""
        cp = (cache_kwargs or {}).get("cache_position")
        if cp is not None and int(cp[-1]) != pos:
            raise Error(f"pyramidinfer.hf.PyramidCache: cache_position {int(cp[-1])} is not the next position "
                        f"{pos} (positions must continue the prompt)")
        if pos >= self.max_seq_len:  # the pool was planned for this many tokens
            raise Error(f"pyramidinfer.hf.PyramidCache: token {pos - self.prompt_len + 1} after the prompt is "
                        f"past max_new_tokens = {self.max_new_tokens}; make the cache with a larger one")
        self._pos_step = torch.tensor([pos], dtype=torch.int32, device=self.device)
        if self.on_cuda:
            self._stream = torch.cuda.current_stream(self.device).cuda_stream

    def _fill_head_mask(self, l: int, tokens: torch.Tensor):
        """Per-KV-head token dropping: head h of layer l stores only its own
        tokens; query rows see a key iff their KV head holds it and it is not
        in their future (as the C++ engine's per-head cache view)."""
        g = self.num_heads // self.kv_heads
        causal = tokens[None, :] <= tokens[:, None]
        for h in range(self.kv_heads):
            mine = torch.isin(tokens, self.positions(l, h).long().to(tokens.device))
            allowed = causal & mine[None, :]
            self._mask[0, h * g:(h + 1) * g] = torch.where(allowed, 0.0, -math.inf)

    # -- what transformers may call that a pyramid cache does not do --

    def _unsupported(self, what):
        raise Error(f"pyramidinfer.hf.PyramidCache: {what} is not supported (one sequence, no beam search)")

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache")

    def crop(self, max_length):
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats):
        if repeats != 1:
            self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    def __repr__(self):
        held = self.lengths() if self.pages is not None else []
        return f"PyramidCache(seen={self.seen}, held={held}, compressor={self.compressor!r})"


@contextlib.contextmanager
def pyramid(model, policy: Optional[str] = "pyramid", ratio: Optional[float] = None, *,
            max_new_tokens: int = 256, **compressor_kwargs):
    """Within the block, every forward of `model` that starts a new sequence
    (no cache, or an empty DynamicCache, as generate() passes) runs on a fresh
    PyramidCache(model, policy, ratio, ...): `model.generate` works unchanged.
    Yields a list that collects the caches made (to inspect what was kept)."""
    made: list = []
    _make_compressor(model, policy, ratio, compressor_kwargs)  # bad settings fail here, not mid-generate

    def swap(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        fresh = pkv is None or (isinstance(pkv, DynamicCache) and pkv.get_seq_length() == 0)
        if not fresh or kwargs.get("use_cache") is False:
            return None
        cache = PyramidCache(model, policy, ratio, max_new_tokens=max_new_tokens, **compressor_kwargs)
        made.append(cache)
        kwargs["past_key_values"], kwargs["use_cache"] = cache, True
        return args, kwargs

    had_hooks = getattr(model, "_pyramidinfer_hooks", None) is not None
    handle = model.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield made
    finally:
        handle.remove()
        if not had_hooks:
            detach(model)
