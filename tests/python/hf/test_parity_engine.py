"""The HF path keeps the same positions as the C++ CPU engine and its logits
agree to fp32 tolerance. Both run SmolLM2 (the GGUF, dequantised to float32)
on the same tokens: examples/generate's PyramidEngine through
engine_driver.cpp, and transformers with a PyramidCache of the same policy.
The prompt is 240 tokens of Moby-Dick; 72 teacher-forced decode steps follow,
so decode eviction fires too (after window + segment = 49 + 16 steps; checked)."""

import glob
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import MODEL_DIR, MODEL_FILE, ROOT, torch

from pyramidinfer.hf import PyramidCache

PROMPT, STEPS = 240, 72
RTOL = 1e-4  # worst row: max |ours - C++| / max |C++|; fp32 sums in another order give ~1e-6


def _newest(paths):
    return max(os.path.getmtime(p) for p in paths)


@pytest.fixture(scope="module")
def driver():
    """Builds build-hf/hf-engine-driver (again when a source is newer)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler for the C++ engine driver")
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(here, "engine_driver.cpp")
    exe = os.path.join(ROOT, "build-hf", "hf-engine-driver")
    deps = [src] + glob.glob(os.path.join(ROOT, "include", "**", "*.hpp"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "examples", "llama*", "*.hpp")) + \
        glob.glob(os.path.join(ROOT, "examples", "generate", "*.hpp"))
    if not os.path.exists(exe) or os.path.getmtime(exe) < _newest(deps):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        cmd = [cxx, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "include"), "-I", os.path.join(ROOT, "examples"),
               src, "-o", exe]
        for blas in (["-lopenblas"], ["-lcblas"], ["-lblas"]):
            r = subprocess.run(cmd + blas, capture_output=True, text=True)
            if r.returncode == 0:
                break
        else:
            pytest.skip("cannot build the C++ engine driver (needs a CBLAS, e.g. Debian's libopenblas-dev): "
                        + r.stderr[-2000:])
    return exe


def _load_logits(path):
    with open(path, "rb") as f:
        shape = np.fromfile(f, dtype=np.int32, count=3)
        return np.fromfile(f, dtype=np.float32).reshape(shape)[:, 0]


def _load_positions(path):
    out = {}
    for line in open(path):
        when, l, h, *pos = line.split()
        out[(when, int(l), int(h))] = np.array(pos, dtype=np.int64)
    return out


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("policy,ratio", [("pyramid", None), ("pyramid-perhead", None), ("snapkv", 0.5),
                                          ("h2o", 0.5), ("streaming", 0.5), ("full", None)])
def test_same_positions_and_logits_as_cpp_engine(smollm, moby_ids, driver, tmp_path, policy, ratio):
    model, _ = smollm
    prompt, feed = moby_ids[:PROMPT], moby_ids[PROMPT:PROMPT + STEPS]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" ".join(map(str, prompt.tolist())) + "\n" + " ".join(map(str, feed.tolist())) + "\n\n")
    prefix = str(tmp_path / "cpp")
    subprocess.run([driver, os.path.join(MODEL_DIR, MODEL_FILE), str(tokens), policy, str(ratio or 0), prefix],
                   check=True)
    cpp_logits, cpp_pos = _load_logits(prefix + ".logits"), _load_positions(prefix + ".pos")

    cache = PyramidCache(model, policy, ratio, max_new_tokens=STEPS + 1)
    rows = []
    with torch.no_grad():
        out = model(prompt[None], past_key_values=cache, use_cache=True)
        rows.append(out.logits[0, -1].numpy())
        for t in feed:
            rows.append(model(t.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1].numpy())
    ours = np.stack(rows)

    heads = cache.kv_heads if cache.compressor.granularity == "per_kv_head" else 1
    L = cache.num_layers
    for l in range(L):
        for h in range(heads):
            np.testing.assert_array_equal(cache.prefill_positions[l][h].numpy(), cpp_pos[("prefill", l, h)],
                                          err_msg=f"{policy}: prefill positions, layer {l}, head {h}")
            np.testing.assert_array_equal(cache.positions(l, h).numpy(), cpp_pos[("final", l, h)],
                                          err_msg=f"{policy}: positions after decode, layer {l}, head {h}")
    rel = [_rel(ours[i], cpp_logits[i]) for i in range(len(ours))]
    print(f"{policy}: logits max rel err prefill {rel[0]:.2e}, decode {max(rel[1:]):.2e}; "
          f"held after prefill {[len(cpp_pos[('prefill', l, 0)]) for l in range(L)]}")
    assert max(rel) < RTOL, f"{policy}: worst logits row rel err {max(rel):.3e} (rows: {rel})"
    assert (ours.argmax(-1) == cpp_logits.argmax(-1)).all()

    held = [len(cpp_pos[("prefill", l, 0)]) for l in range(L)]
    final = [len(cpp_pos[("final", l, 0)]) for l in range(L)]
    if policy == "full":
        assert held == [PROMPT] * L and final == [PROMPT + STEPS] * L
    else:
        assert sum(held) < PROMPT * L, "prefill did not compress"
        assert any(f < h + STEPS for f, h in zip(final, held)), "decode eviction did not fire"
    if policy.startswith("pyramid"):
        assert held[-1] < held[0], "no pyramid: the last layer holds as much as the first"
