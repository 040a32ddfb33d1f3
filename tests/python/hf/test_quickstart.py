"""The quickstart of pyramidinfer.hf's docstring (10 lines, proposed for the
README) runs as written on the SmolLM2 GGUF, and generates text."""

import contextlib
import io
import os
import textwrap

import pytest

from conftest import MODEL_DIR, ROOT

import pyramidinfer.hf as hf


def test_docstring_quickstart_runs(smollm, monkeypatch):
    doc = hf.__doc__
    start = doc.index("    import torch")
    code = textwrap.dedent(doc[start:doc.index("\n\n", start)])
    assert len(code.strip().splitlines()) <= 10
    if os.path.abspath(MODEL_DIR) != os.path.join(ROOT, "models"):
        pytest.skip("the quickstart reads models/ of the repository")
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "quickstart", "exec"), {})
    assert len(out.getvalue().split()) >= 5  # 32 tokens of text
