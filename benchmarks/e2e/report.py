"""Markdown table and plots from run_e2e.sh's e2e.jsonl.

    python3 report.py e2e.jsonl OUT_PREFIX
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r["shape"] != "tiny"]
G = 1 << 30
print("| engine | shape | policy | batch | prompt+gen | KV alloc GiB (ratio) | peak dev GiB | prefill s | decode ms/step | gen tok/s | total tok/s | compression share prefill / decode |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    pol = r["policy"] + (f" (r={r['final_ratio']:.2f})" if r["engine"] == "ours" and r["policy"] != "full" else "")
    if r.get("trigger") == "device" and r["policy"] != "full":
        pol += ", device trigger"
    if r.get("graph") is False:
        pol += ", no graph"
    ratio = f" ({r['kv_ratio']:.3f})" if "kv_ratio" in r else ""
    cs = r.get("comp_share_prefill", -1)
    share = f"{100*cs:.1f}% / {100*r['comp_share_decode']:.1f}%" if cs is not None and cs >= 0 else ""
    print(f"| {r['engine']} | {r['shape']} | {pol} | {r['batch']} | {r['prompt']}+{r['gen']} | {r['kv_bytes']/G:.2f}{ratio} | "
          f"{r['peak_device_bytes']/G:.1f} | {r['prefill_s']:.3f} | {r['decode_ms_step']:.2f} | {r['gen_tok_s']:.0f} | "
          f"{r['total_tok_s']:.0f} | {share} |")

# tokens/s vs batch, llama2-7b 512+256
fig, ax = plt.subplots(figsize=(6, 4))
for key, label in [(("ours", "full"), "ours, full cache"), (("ours", "pyramid45"), "ours, pyramid45 (plan <= 45% KV)"),
                   (("ours", "pyramid"), "ours, pyramid (paper defaults)"), (("hf-sdpa", "full"), "HF transformers sdpa"),
                   (("hf-eager", "full"), "HF transformers eager")]:
    pts = sorted((r["batch"], r["total_tok_s"]) for r in rows if (r["engine"], r["policy"]) == key
                 and r["shape"] == "llama2-7b" and r["prompt"] == 512 and r.get("trigger", "host") != "device"
                 and r.get("graph", True))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
ax.set_xscale("log", base=2)
ax.set_xlabel("batch")
ax.set_ylabel("total tokens/s (prompt + generated)")
ax.set_title("LLaMA-2-7B shape, random fp16 weights, 512+256")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2] + "_toks_vs_batch.png", dpi=120)

fig, ax = plt.subplots(figsize=(6, 4))
for pol in ["full", "pyramid", "pyramid45"]:
    r = next((r for r in rows if r["engine"] == "ours" and r["policy"] == pol and r["shape"] == "llama2-7b"
              and r["batch"] == 32 and r.get("trigger", "host") != "device" and r.get("graph", True)), None)
    if r:
        ax.plot(range(len(r["kv_layer_bytes"])), [b / (1 << 20) for b in r["kv_layer_bytes"]], label=pol)
ax.set_xlabel("layer")
ax.set_ylabel("KV bytes allocated (MiB)")
ax.set_title("LLaMA-2-7B shape, batch 32, 512+256, fp16")
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2] + "_kv_per_layer.png", dpi=120)
