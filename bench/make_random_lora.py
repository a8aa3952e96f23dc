"""A random LoRA adapter (PEFT layout) for a Llama-shaped model: rank R on every linear layer
(q, k, v, o, gate, up, down), A and B drawn from N(0, 0.02²) so that the merge changes every
adapted weight. Shapes are read from the model's config.json. For bench/run_merge_adapter.sh.

    python bench/make_random_lora.py --model assets/llama-1b-random --out DIR [--rank 16]
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
cfg = json.load(open(os.path.join(args.model, "config.json")))
h, inter = cfg["hidden_size"], cfg["intermediate_size"]
head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
q = cfg["num_attention_heads"] * head_dim
shapes = {
    "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
    "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
    "mlp.down_proj": (h, inter),
}
g = torch.Generator().manual_seed(args.seed)
tensors = {}
for layer in range(cfg["num_hidden_layers"]):
    for module, (out, inp) in shapes.items():
        key = f"base_model.model.model.layers.{layer}.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(args.rank, inp, generator=g) * 0.02
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, args.rank, generator=g) * 0.02
os.makedirs(args.out, exist_ok=True)
save_file(tensors, os.path.join(args.out, "adapter_model.safetensors"), metadata={"format": "pt"})
config = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": 2 * args.rank,
    "target_modules": [m.split(".")[1] for m in shapes], "lora_dropout": 0.0, "bias": "none",
    "base_model_name_or_path": None, "inference_mode": True,
}
json.dump(config, open(os.path.join(args.out, "adapter_config.json"), "w"), indent=2)
