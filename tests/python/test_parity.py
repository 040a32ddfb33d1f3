"""The compressor through Python keeps the same positions as the same calls
made from C++ (tests/python/cpp_driver.cpp, the library's default
PyramidCompressor<>), on the same random inputs: prefill selections and the
positions every layer holds after decode. Skipped when no C++ compiler."""

import os
import shutil
import subprocess

import numpy as np
import pytest

import pyramidinfer as pi

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "..", "..", "include")
L, H, KV, D = 8, 4, 2, 16
PROMPT, STEPS, PAGE, PAGES = 700, 200, 16, 1024  # decode compresses from step 155 on


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("driver") / "cpp_driver")
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", INCLUDE, os.path.join(HERE, "cpp_driver.cpp"), "-o", exe],
                   check=True)
    return exe


class Stream:
    def __init__(self, values):
        self.values, self.at = values, 0

    def take(self, *shape):
        n = int(np.prod(shape))
        out = self.values[self.at:self.at + n].reshape(shape)
        self.at += n
        return out


def test_python_equals_cpp(driver, tmp_path):
    values = np.random.default_rng(11).standard_normal(4_000_000, dtype=np.float32)
    path = tmp_path / "stream.bin"
    values.tofile(path)
    out = tmp_path / "out.txt"
    subprocess.run([driver, str(path), str(out), *map(str, (L, H, KV, D, PROMPT, STEPS, PAGE, PAGES))], check=True)
    cpp = [np.array(line.split(), dtype=np.int32) for line in out.read_text().splitlines()]

    pc = pi.PyramidCompressor(L, H, KV, D)  # the paper's defaults, as PyramidCompressor<>
    cache = pi.PagedCache(L, KV, D, num_pages=PAGES, max_seqs=1, max_seq_len=PROMPT + STEPS, page_size=PAGE)
    s = Stream(values)
    pc.begin(cache, 0, PROMPT)
    w = pc.window(0)
    for l in range(L):
        n = len(pc.tokens(0))
        k, v, q = s.take(KV, n, D), s.take(KV, n, D), s.take(H, w, D)
        pc.prefill_store(l, cache, 0, k, v)
        np.testing.assert_array_equal(pc.prefill_select(l, cache, 0, q), cpp[l], err_msg=f"prefill layer {l}")
    assert len(cpp[L - 1]) < PROMPT  # the pyramid did compress
    for t in range(STEPS):
        for l in range(L):
            k, v, q = s.take(1, KV, 1, D), s.take(1, KV, 1, D), s.take(1, H, 1, D)
            pc.decode_append(l, cache, np.array([0], np.int32), k, v, np.array([PROMPT + t], np.int32), q)
            pc.decode_compress(l, cache, np.array([0], np.int32))
    held = pc.trace(PROMPT, 0)["prefill_len"]
    for l in range(L):
        np.testing.assert_array_equal(cache.positions(l, 0), cpp[L + l], err_msg=f"decode layer {l}")
        assert cache.length(l, 0) < held[l] + STEPS  # decode evicted
