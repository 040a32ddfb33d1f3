"""HF transformers peer of e2e-bench: a RANDOM-weight LlamaForCausalLM of the
same shape (fp16, from a config), `generate` with greedy decoding of exactly
GEN tokens after a PROMPT-token prompt, batch B. One JSON line per run.

    python3 hf_e2e.py SHAPE ATTN BATCH PROMPT GEN      (ATTN: eager | sdpa)
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "llama2-13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0),
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def main():
    shape, attn, batch, prompt, gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    cfg = LlamaConfig(max_position_embeddings=max(4096, prompt + gen), tie_word_embeddings=False,
                      **SHAPES[shape])
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=torch.float16, attn_implementation=attn).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, attention_mask=mask, pad_token_id=0)

    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        assert out.shape[1] == prompt + gen
        return t1 - t0, t2 - t1

    run()  # warm-up
    torch.cuda.reset_peak_memory_stats()
    pf, total = run()
    dec = max(total - pf, 1e-9)
    kv = 2 * cfg.num_hidden_layers * batch * (prompt + gen) * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads) * 2
    print(json.dumps(dict(engine="hf-" + attn, shape=shape, policy="full", batch=batch, prompt=prompt, gen=gen,
                          kv_bytes=kv, peak_device_bytes=torch.cuda.max_memory_allocated(), prefill_s=pf,
                          decode_ms_step=dec / (gen - 1) * 1e3, gen_tok_s=batch * gen / total,
                          total_tok_s=batch * (prompt + gen) / total, device=torch.cuda.get_device_name())),
          flush=True)


if __name__ == "__main__":
    main()
