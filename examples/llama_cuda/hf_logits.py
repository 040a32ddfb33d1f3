"""HF transformers reference: loads the same GGUF (transformers dequantises it
through the `gguf` package), runs each sequence of a token file (see
logits_io.hpp) in full attention, fp32, and writes the logits at the
positions the C++ tools report (prompt end, then each teacher-forced step) in
the same file format.

    python3 hf_logits.py MODEL.gguf TOKENS.txt OUT.bin
"""
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main():
    model_path, tokens_path, out_path = sys.argv[1:4]
    lines = open(tokens_path).read().split("\n")
    prompt = [int(x) for x in lines[0].split()]
    feed = [int(x) for x in lines[1].split()]
    lens = [int(x) for x in lines[2].split()] or [len(prompt)]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(model_path)),
                                                 gguf_file=os.path.basename(model_path),
                                                 torch_dtype=torch.float32).to(dev).eval()
    print("HF", model.config.model_type, "layers", model.config.num_hidden_layers, "device",
          torch.cuda.get_device_name() if dev == "cuda" else "cpu", flush=True)
    rows = []
    for n in lens:
        ids = torch.tensor([prompt[:n] + feed], device=dev)
        with torch.no_grad():
            logits = model(ids).logits[0].float().cpu().numpy()
        rows.append(logits[n - 1:n + len(feed)])  # (1 + steps, vocab)
    out = np.stack(rows, axis=1).astype(np.float32)  # (1 + steps, batch, vocab)
    with open(out_path, "wb") as f:
        np.array(out.shape, dtype=np.int32).tofile(f)
        out.tofile(f)
    print("wrote", out_path, out.shape)


if __name__ == "__main__":
    main()
