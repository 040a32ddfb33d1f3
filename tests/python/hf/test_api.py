"""pyramidinfer.hf on a small random Llama: generate() through a passed cache
and through the context manager, token dropping, per-layer lengths, the full
policy against transformers' own cache, and the errors."""

import subprocess
import sys

import pytest

from conftest import torch, transformers

import pyramidinfer as pi
from pyramidinfer.hf import PyramidCache, detach, kv_fraction, pyramid, ratio_for_fraction

N, NEW = 300, 24


def prompt(n=N, seed=1):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=0, **kw)


def test_full_policy_equals_transformers_cache(tiny_model):
    ids = prompt()
    ref = generate(tiny_model, ids)
    cache = PyramidCache(tiny_model, "full", max_new_tokens=NEW)
    assert torch.equal(generate(tiny_model, ids, past_key_values=cache), ref)
    assert cache.lengths() == [N + NEW - 1] * 4  # the last generated token is never fed back
    with torch.no_grad():
        c = PyramidCache(tiny_model, "full", max_new_tokens=4)
        ours = tiny_model(ids, past_key_values=c, use_cache=True).logits
        full = tiny_model(ids).logits
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
        step = tiny_model(torch.tensor([[7]]), past_key_values=c, use_cache=True).logits[0, -1]
        ref_step = tiny_model(torch.cat([ids, torch.tensor([[7]])], 1)).logits[0, -1]
        torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)


def test_token_dropping_prefill(tiny_model):
    """Layer l computes exactly the tokens layer l holds after prefill (T_l),
    deeper layers compute fewer, and the prompt's last token is the last row."""
    ids = prompt()
    computed = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: computed.append(a[0].shape[1]), with_kwargs=True)
             for layer in tiny_model.model.layers]
    try:
        cache = PyramidCache(tiny_model, "pyramid", 0.5, max_new_tokens=NEW)
        with torch.no_grad():
            out = tiny_model(ids, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    held = [len(p[0]) for p in cache.prefill_positions]
    assert computed == held  # hooks run after ours: they see the rows the layer really computes
    assert held[0] == N and held[-1] < held[2] < N and held == sorted(held, reverse=True)
    assert out.logits.shape[1] == held[-1] and int(cache.rows[-1]) == N - 1
    assert torch.equal(cache.rows, cache.prefill_positions[-1][0])
    w = cache.compressor.window(0)
    for pos in cache.prefill_positions:  # sinks and the window are always kept
        assert pos[0][:4].tolist() == [0, 1, 2, 3] and pos[0][-w:].tolist() == list(range(N - w, N))
    # The last row's logits are the prompt's: the same as rerunning the
    # model's own layers on the kept tokens only is not, so compare to full.
    with torch.no_grad():
        full = tiny_model(ids).logits[0, -1]
    assert not torch.allclose(out.logits[0, -1], full)  # compression changed something...
    assert torch.nn.functional.cosine_similarity(out.logits[0, -1], full, dim=0) > 0.9  # ...not everything


def test_generate_with_cache_and_context_manager_agree(tiny_model):
    ids = prompt(seed=2)
    for policy, ratio in (("pyramid", 0.6), ("snapkv", 0.5), ("h2o", 0.5), ("streaming", 0.5),
                          ("pyramid-perhead", 0.6)):
        cache = PyramidCache(tiny_model, policy, ratio, max_new_tokens=NEW)
        a = generate(tiny_model, ids, past_key_values=cache)
        with pyramid(tiny_model, policy, ratio, max_new_tokens=NEW) as made:
            b = generate(tiny_model, ids)
        assert torch.equal(a, b), policy
        assert len(made) == 1 and made[0].lengths() == cache.lengths(), policy
        # Positions held are the same as the manual loop's.
        manual = PyramidCache(tiny_model, policy, ratio, max_new_tokens=NEW)
        with torch.no_grad():
            lg = tiny_model(ids, past_key_values=manual, use_cache=True).logits[:, -1]
            for i in range(NEW - 1):
                tok = lg.argmax(-1, keepdim=True)
                assert int(tok) == int(a[0, N + i]), (policy, i)
                lg = tiny_model(tok, past_key_values=manual, use_cache=True).logits[:, -1]
        for l in range(4):
            assert torch.equal(manual.positions(l), cache.positions(l)), (policy, l)
    # Outside the block the model is as before (hooks removed, default cache).
    assert not hasattr(tiny_model, "_pyramidinfer_hooks") or tiny_model._pyramidinfer_hooks.handles
    assert torch.equal(generate(tiny_model, ids), generate(tiny_model, ids, past_key_values=None))


def test_layer_local_policies_keep_their_budget(tiny_model):
    ids = prompt()
    for policy in ("snapkv", "h2o", "streaming"):
        cache = PyramidCache(tiny_model, policy, 0.5, max_new_tokens=NEW)
        with torch.no_grad():
            out = tiny_model(ids, past_key_values=cache, use_cache=True)
        assert out.logits.shape[1] == N  # every layer computed every token
        w = cache.compressor.window(0)
        assert cache.lengths() == [w + int((N - w) * 0.5)] * 4, policy
        assert abs(kv_fraction(tiny_model, N, policy, 0.5) - sum(cache.lengths()) / (4 * N)) < 1e-12
    streaming = cache.positions(0).tolist()
    k = int((N - w) * 0.5)
    assert streaming == list(range(4)) + list(range(N - w - (k - 4), N))  # sinks + most recent


def test_ratio_for_fraction(tiny_model):
    # (4 layers of the cosine schedule cannot go below ~86%: layer 0 keeps all.)
    for policy, target in (("pyramid", 0.9), ("snapkv", 0.7)):
        r = ratio_for_fraction(tiny_model, N, target, policy)
        assert abs(kv_fraction(tiny_model, N, policy, r) - target) < 0.01, policy


def test_rejected_inputs(tiny_model):
    with pytest.raises(pi.Error, match="policy"):
        PyramidCache(tiny_model, "nope")
    with pytest.raises(pi.Error, match="ratio"):
        PyramidCache(tiny_model, "pyramid", 1.5)
    with pytest.raises(pi.Error, match="max_new_tokens"):
        PyramidCache(tiny_model, max_new_tokens=-1)
    with pytest.raises(pi.Error, match="recent_ratio"):
        PyramidCache(tiny_model, recent_ratio=2.0)
    with torch.no_grad():
        with pytest.raises(pi.Error, match="batch size 2"):
            tiny_model(prompt().repeat(2, 1), past_key_values=PyramidCache(tiny_model), use_cache=True)
        cache = PyramidCache(tiny_model, max_new_tokens=2)
        tiny_model(prompt(), past_key_values=cache, use_cache=True)
        with pytest.raises(pi.Error, match="one token per forward"):
            tiny_model(prompt(3), past_key_values=cache, use_cache=True)
        with pytest.raises(pi.Error, match="beam search"):
            cache.reorder_cache(torch.tensor([0]))
        for _ in range(2):
            tiny_model(torch.tensor([[1]]), past_key_values=cache, use_cache=True)
        with pytest.raises(pi.Error, match="max_new_tokens"):
            tiny_model(torch.tensor([[1]]), past_key_values=cache, use_cache=True)
        cache.reset()  # a new prompt on the same cache works
        tiny_model(prompt(seed=5), past_key_values=cache, use_cache=True)
        assert cache.seen == N
        half = transformers.LlamaForCausalLM(tiny_model.config).to(torch.bfloat16)  # the fixture stays float32
        with pytest.raises(pi.Error, match="float32"):
            half(prompt(), past_key_values=PyramidCache(half), use_cache=True)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(pi.Error, match="Llama-structured"):
        PyramidCache(gpt2)


def test_core_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import pyramidinfer\n"
            "try:\n    import pyramidinfer.hf\nexcept ImportError:\n    print('hf needs torch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "hf needs torch"


def test_detach(tiny_model):
    PyramidCache(tiny_model)
    assert tiny_model._pyramidinfer_hooks.handles
    detach(tiny_model)
    assert not hasattr(tiny_model, "_pyramidinfer_hooks")


def test_eager_attention_agrees_with_sdpa(tiny_model):
    """The eager attention reads the forward's 4-D mask (token dropping must
    cut it to the kept rows, decode must drop it) where sdpa runs without one.
    This random model's attention is nearly flat, so rounding between the two
    kernels may flip near-ties: selections are compared by overlap, the
    logits closely (a wrong mask would move them far)."""
    ids = prompt(seed=3)
    eager = transformers.LlamaForCausalLM(tiny_model.config.__class__(**{**tiny_model.config.to_dict(),
                                                                        "attn_implementation": "eager"}))
    eager.load_state_dict(tiny_model.state_dict())
    eager.eval()
    for policy in ("pyramid", "pyramid-perhead", "snapkv"):
        a = PyramidCache(tiny_model, policy, 0.5, max_new_tokens=NEW)
        b = PyramidCache(eager, policy, 0.5, max_new_tokens=NEW)
        with torch.no_grad():
            la = tiny_model(ids, past_key_values=a, use_cache=True).logits[0, -1]
            lb = eager(ids, past_key_values=b, use_cache=True).logits[0, -1]
            torch.testing.assert_close(la, lb, rtol=0, atol=1e-2)  # a flipped near-tie moves them ~1e-3
            for _ in range(NEW):  # decode
                tok = la.argmax().view(1, 1)
                la = tiny_model(tok, past_key_values=a, use_cache=True).logits[0, -1]
                lb = eager(tok, past_key_values=b, use_cache=True).logits[0, -1]
                torch.testing.assert_close(la, lb, rtol=0, atol=1e-2)
        for l in range(4):
            for h in range(2):
                x, y = set(a.prefill_positions[l][h].tolist()), set(b.prefill_positions[l][h].tolist())
                assert len(x) == len(y) and len(x & y) >= 0.95 * len(x), (policy, l, h)
        assert a.lengths() == b.lengths()


def test_padding_is_refused(tiny_model):
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad(), pytest.raises(pi.Error, match="padding"):
        tiny_model(ids, attention_mask=mask, past_key_values=PyramidCache(tiny_model), use_cache=True)
