"""peft's merge of a LoRA adapter into its base, as users write it: load the base in f32,
PeftModel.from_pretrained, merge_and_unload, save_pretrained. The reference side of
bench/run_merge_adapter.sh.

    python bench/peft_merge.py --model M --adapter A --out DIR
"""
import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--adapter", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()
torch.set_grad_enabled(False)
base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
model = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
model.save_pretrained(args.out)
