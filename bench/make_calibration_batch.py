"""A calibration batch for `ferrule merge --choose-q` / `--analytic-q`: the first N chat records
of each JSONL file, through the model's chat template, right-padded, as a safetensors file with
input_ids and attention_mask.

Usage: make_calibration_batch.py MODEL_DIR OUT.safetensors N FILE.jsonl [FILE.jsonl ...]
"""
import sys, json, torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
model, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sys.argv[4:]
tok = AutoTokenizer.from_pretrained(model)
rows = []
for f in files:
    for line in open(f).readlines()[:n]:
        msgs = json.loads(line)["messages"]
        rows.append(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
T = max(len(r) for r in rows)
ids = torch.zeros(len(rows), T, dtype=torch.int64); mask = torch.zeros_like(ids)
for i, r in enumerate(rows):
    ids[i, :len(r)] = torch.tensor(r); mask[i, :len(r)] = 1
save_file({"input_ids": ids, "attention_mask": mask}, out)
print(len(rows), T)
