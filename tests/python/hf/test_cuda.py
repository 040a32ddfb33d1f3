"""pyramidinfer.hf on a GPU: the same model on CUDA keeps the same positions
as on the CPU (float32: the compressors give the host's bytes) and its
logits agree to float32 tolerance; in float16 the logits agree to float16
tolerance with the CPU's float32 run. Skipped without a GPU or without
pyramidinfer's CUDA extension."""

import copy

import pytest

from conftest import torch

import pyramidinfer.cuda as pc_cuda
from pyramidinfer.hf import PyramidCache

if not torch.cuda.is_available() or not pc_cuda.available():
    pytest.skip("no GPU or no CUDA extension: pyramidinfer.hf's CUDA path needs both", allow_module_level=True)

PROMPT, STEPS = 512, 40


def run(model, ids, policy, ratio):
    """Prefill logits, greedy tokens and the cache after STEPS decode steps."""
    cache = PyramidCache(model, policy, ratio, max_new_tokens=STEPS + 1)
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model(ids.to(dev)[None], past_key_values=cache, use_cache=True)
        first = out.logits[0, -1].float().cpu()
        tok, toks = out.logits[0, -1].argmax(), []
        for _ in range(STEPS):
            toks.append(int(tok))
            out = model(tok.view(1, 1), past_key_values=cache, use_cache=True)
            tok = out.logits[0, -1].argmax()
    return first, toks, cache


@pytest.fixture(scope="module")
def gpu_models(smollm):
    model, _ = smollm
    return {dt: copy.deepcopy(model).to("cuda", dt) for dt in (torch.float32, torch.float16)}


@pytest.mark.parametrize("policy,ratio", [("pyramid", None), ("snapkv", 0.5), ("h2o", 0.5), ("streaming", 0.5)])
def test_float32_gpu_keeps_the_cpus_positions(smollm, gpu_models, moby_ids, policy, ratio):
    ids = moby_ids[:PROMPT]
    cpu_logits, cpu_toks, cpu_cache = run(smollm[0], ids, policy, ratio)
    gpu_logits, gpu_toks, gpu_cache = run(gpu_models[torch.float32], ids, policy, ratio)
    for l, (a, b) in enumerate(zip(cpu_cache.prefill_positions, gpu_cache.prefill_positions)):
        for h, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x.long(), y.long()), f"layer {l} head {h}"
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)
    assert gpu_cache.lengths() == cpu_cache.lengths()
    # Greedy decoding through decode eviction: the same tokens and the same cache.
    assert gpu_toks == cpu_toks
    for l in range(cpu_cache.num_layers):
        assert torch.equal(gpu_cache.positions(l), cpu_cache.positions(l)), f"layer {l} after decode"


def test_float16_gpu_logits_within_half_precision(smollm, gpu_models, moby_ids):
    ids = moby_ids[:PROMPT]
    cpu_logits, _, cpu_cache = run(smollm[0], ids, "pyramid", None)
    gpu_logits, _, gpu_cache = run(gpu_models[torch.float16], ids, "pyramid", None)
    # The kept sets may differ at near-ties of float16 scores: nearly all agree.
    same = total = 0
    for a, b in zip(cpu_cache.prefill_positions, gpu_cache.prefill_positions):
        x, y = set(a[0].tolist()), set(b[0].tolist())
        same, total = same + len(x & y), total + len(x)
    assert same / total > 0.98, f"{same} of {total} positions agree"
    scale = cpu_logits.abs().max()
    assert (gpu_logits - cpu_logits).abs().max() / scale < 2e-2
    assert int(gpu_logits.argmax()) == int(cpu_logits.argmax())


def test_generate_on_gpu_with_the_context_manager(smollm, gpu_models, moby_ids):
    from pyramidinfer.hf import pyramid
    model = gpu_models[torch.float16]
    ids = moby_ids[:PROMPT].to("cuda")[None]
    with pyramid(model, "pyramid", max_new_tokens=16) as made:
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert out.shape[1] == PROMPT + 16 and len(made) == 1
    lengths = made[0].lengths()
    assert lengths[0] > lengths[-1]  # a pyramid: deeper layers hold less
