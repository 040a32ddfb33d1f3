"""The package docstring's quickstart (10 lines) runs as written."""

import contextlib
import io
import textwrap

import pyramidinfer as pi


def test_docstring_quickstart_runs():
    doc = pi.__doc__
    code = textwrap.dedent(doc[doc.index("    import numpy"):])
    assert len(code.strip().splitlines()) <= 10
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "quickstart", "exec"), {})
    lengths, pages = eval(out.getvalue().split("] ")[0] + "]"), int(out.getvalue().split("] ")[1])
    pc = pi.PyramidCompressor(4, 8, 2, 64)
    assert lengths == pc.trace(512, 0)["prefill_len"]
    assert pages == pc.pages(512, 0, 16)["total_after_prefill"]
