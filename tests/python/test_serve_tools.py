"""The serving benchmark's Python tools (benchmarks/serve): the decode-step
fit of step_profile.py recovers the terms of data made from them."""
import importlib.util
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "serve" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_recovers_the_step_terms():
    sp = _load("step_profile")
    rng = random.Random(7)
    steps = []
    for _ in range(300):
        batch, kv = rng.randint(1, 700), rng.uniform(1e9, 4e10)
        noise = rng.uniform(-0.05, 0.05)
        steps.append({"batch": batch, "kv_read_bytes": kv, "prefill_ms": 0,
                      "decode_ms": 5.3 + 0.0258 * batch + 0.222 * kv / 1e9 + noise})
    steps.append({"batch": 400, "kv_read_bytes": 3e10, "prefill_ms": 9.0, "decode_ms": 99.0})  # a prefill: left out
    (fixed, per_seq, per_gb), rms, n = sp.fit_steps(steps)
    assert n == 300
    assert abs(fixed - 5.3) < 0.05
    assert abs(per_seq - 0.0258) < 1e-4
    assert abs(per_gb - 0.222) < 2e-3
    assert rms < 0.05


def test_fit_needs_three_independent_steps():
    sp = _load("step_profile")
    same = [{"batch": 10, "kv_read_bytes": 1e9, "prefill_ms": 0, "decode_ms": 3.0}] * 5
    assert sp.fit_steps(same) is None
    assert sp.fit_steps(same[:2]) is None
