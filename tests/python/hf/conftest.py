"""Fixtures of the pyramidinfer.hf tests. They need torch and transformers
(`pip install .[hf]`); the SmolLM2 tests also need the GGUF of
examples/fetch_model.sh and the `gguf` package, the C++ parity test a C++
compiler and a CBLAS. Whatever is missing skips, saying what and how to get it
(tests/python/run_hf_tests.sh sets everything up)."""

import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MODEL_DIR = os.environ.get("PYRAMIDINFER_MODEL_DIR", os.path.join(ROOT, "models"))
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = os.path.join(ROOT, "examples", "data", "moby_dick_ch1-3.txt")

torch = pytest.importorskip("torch", reason="pyramidinfer.hf needs torch: pip install .[hf]")
transformers = pytest.importorskip("transformers", reason="pyramidinfer.hf needs transformers: pip install .[hf]")


@pytest.fixture(scope="session")
def tiny_model():
    """A small random Llama (float32, 4 layers, GQA 4:2): fast API tests."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the SmolLM2 GGUF, dequantised to float32 by transformers."""
    pytest.importorskip("gguf", reason="loading a GGUF in transformers needs the gguf package: pip install gguf")
    if not os.path.isfile(os.path.join(MODEL_DIR, MODEL_FILE)):
        pytest.skip(f"{MODEL_FILE} not in {MODEL_DIR}: run examples/fetch_model.sh")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE,
                                                              dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def moby_ids(smollm):
    """The first chapters of Moby-Dick as SmolLM2 token ids (1-D int64)."""
    _, tok = smollm
    with open(TEXT) as f:
        return tok(f.read(), return_tensors="pt").input_ids[0]
